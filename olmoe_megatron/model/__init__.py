"""The OLMoE model on Megatron-Core: config, specs, OLMoE-specific modules, losses."""

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import PrecisionConfig

__all__ = ["ModelConfig", "PrecisionConfig"]
