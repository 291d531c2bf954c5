"""Parallel layout, process groups and the CPU backend for Megatron-Core (olmoe_megatron.parallel)."""

from olmoe_megatron.parallel.layout import ParallelLayout

__all__ = ["ParallelLayout"]
