"""Kernels outside torch's operator set. `ops.cpu`: the fused bf16 CPU kernels written in C."""
