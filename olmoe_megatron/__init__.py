"""OLMoE-Megatron: Mixture-of-Experts pretraining on Megatron-Core."""

from olmoe_megatron import lazy_jit as _lazy_jit

_lazy_jit.install()  # before anything imports megatron-core (see lazy_jit)
