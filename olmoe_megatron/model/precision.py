"""Numeric precision and the module backend: bf16/fp32, Transformer Engine and its FP8 recipes."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from packaging.version import Version

from olmoe_megatron.config import Config, ConfigError

#: Megatron-Core's names for the FP8 scaling recipes we offer.
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


@dataclasses.dataclass(kw_only=True, frozen=True)
class PrecisionConfig(Config):
    """Parameter/compute dtype, which module backend builds the layers, and FP8 settings."""

    dtype: Literal["bf16", "fp32"] = "bf16"
    """Compute and parameter dtype. bf16 keeps fp32 master weights in the optimizer."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in fp32 (OLMoE: yes)."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layer modules: 'te' (Transformer Engine, GPU), 'local' (plain torch, CPU or GPU), 'auto'
    (te when Transformer Engine imports and CUDA is present, else local)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format for TE GEMMs (None: off). 'hybrid' is e4m3 forward, e5m2 backward."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    """Scaling recipe: delayed (amax history), tensorwise (current scaling), blockwise (1x128/128x128)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is derived from the history."""

    def validate(self) -> None:
        if self.fp8 is not None:
            if self.spec == "local":
                raise ConfigError(
                    f"precision.fp8={self.fp8!r} needs Transformer Engine layers; set precision.spec=te "
                    "(or auto) or precision.fp8=null"
                )
            if self.dtype != "bf16":
                raise ConfigError(
                    f"precision.fp8={self.fp8!r} with precision.dtype={self.dtype!r}: FP8 runs inside a bf16 "
                    "model; set precision.dtype=bf16"
                )
        if self.fp8_amax_history_len < 1:
            raise ConfigError(f"precision.fp8_amax_history_len={self.fp8_amax_history_len} must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def use_te(self) -> bool:
        """Resolves `spec`; raises a clear error if TE (or a GPU for FP8) is required but missing."""
        te_ok, why = transformer_engine_status()
        if self.spec == "te" or self.fp8 is not None:
            if not te_ok:
                what = f"precision.fp8={self.fp8!r}" if self.fp8 else "precision.spec=te"
                raise ConfigError(f"{what} needs Transformer Engine on a CUDA GPU: {why}")
            if self.fp8 is not None:
                check_fp8_hardware(self.fp8_recipe)
            return True
        return self.spec == "auto" and te_ok


def transformer_engine_status() -> tuple[bool, str]:
    """(usable, reason): TE is usable when CUDA is present and transformer_engine imports."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (Transformer Engine is a GPU extra: pip install 'olmoe-megatron[gpu]' on a CUDA machine)"
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as exc:
        return False, f"transformer_engine does not import ({exc}); pip install 'olmoe-megatron[gpu]'"
    return True, "ok"


def transformer_engine_version() -> str | None:
    """The installed Transformer Engine's version as Megatron-Core's own checks read it
    (`megatron.core.utils.get_te_version`: `te.__version__`, else the distribution's); None without TE."""
    from megatron.core.utils import get_te_version

    version = get_te_version()
    return None if version is None else str(version)


#: Megatron-Core 0.16.1 (transformer_config.py __post_init__): FP8 with `moe_act` or `layernorm`
#: selective recompute needs TE >= 2.6.0dev0 and refuses delayed scaling.
FP8_MOE_ACT_RECOMPUTE_MIN_TE = "2.6.0dev0"


def check_fp8_moe_act_recompute(*, fp8_recipe: str, te_version: str | None) -> None:
    """Megatron-Core's rule for FP8 with the MoE activation recomputed (selective recompute).

    Delayed scaling is refused; the other recipes need TE >= 2.6.0dev0. Raises ConfigError naming the fix before Megatron's bare ValueError.

    Args:
        fp8_recipe: precision.fp8_recipe of an FP8 run whose selective recompute includes moe_act.
        te_version: the installed TE version; None skips that half (config time, TE not resolved yet).
    """
    if fp8_recipe == "delayed":
        raise ConfigError(
            "precision.fp8_recipe='delayed' with train.recompute='selective': selective recompute includes "
            "the MoE activation (moe_act, grouped-GEMM experts), which Megatron-Core refuses under delayed "
            "scaling; set precision.fp8_recipe=tensorwise (or blockwise on Hopper), or train.recompute=full, "
            "or train.recompute=null"
        )
    if te_version is not None and Version(te_version) < Version(FP8_MOE_ACT_RECOMPUTE_MIN_TE):
        raise ConfigError(
            f"train.recompute='selective' with precision.fp8_recipe={fp8_recipe!r} recomputes the MoE activation "
            f"in FP8, which needs transformer-engine>={FP8_MOE_ACT_RECOMPUTE_MIN_TE}; the installed one is "
            f"{te_version}: pip install 'olmoe-megatron[gpu]' (the TE range megatron-core supports), or set "
            "train.recompute=full"
        )


def check_fp8_hardware(recipe: str) -> None:
    """FP8 GEMMs need compute capability >= 8.9 (Ada/Hopper); blockwise needs Hopper (9.0)."""
    major, minor = torch.cuda.get_device_capability()
    capability = major + minor / 10
    needed = 9.0 if recipe == "blockwise" else 8.9
    if capability < needed:
        raise ConfigError(
            f"precision.fp8_recipe={recipe!r} needs a GPU of compute capability >= {needed} "
            f"(Hopper-class); this {torch.cuda.get_device_name()} is {major}.{minor}. "
            "Set precision.fp8=null to train in bf16"
        )


def megatron_fp8_fields(precision: PrecisionConfig) -> dict:
    """The TransformerConfig fields for FP8 (empty when FP8 is off)."""
    if precision.fp8 is None:
        return {}
    fields = {"fp8": precision.fp8, "fp8_recipe": precision.fp8_recipe}
    if precision.fp8_recipe == "delayed":
        fields.update(
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    return fields
