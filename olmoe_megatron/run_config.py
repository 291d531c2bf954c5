"""The root run config: one value holding every concern, and the rules that cross them."""

from __future__ import annotations

import dataclasses

from olmoe_megatron.config import Config, ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.evaluation.config import EvalConfig
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.megatron_config import selective_recompute_modules
from olmoe_megatron.model.precision import PrecisionConfig, check_fp8_moe_act_recompute
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.training.config import CheckpointConfig, MetricsConfig, TrainConfig


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunConfig(Config):
    """A whole run: model, parallel layout, precision, training, data, checkpoints, metrics, evaluation."""

    name: str = "run"
    """Run name (logs, Slurm job names)."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelLayout = dataclasses.field(default_factory=ParallelLayout)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(demo_corpus=True))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.train.seq_length > self.model.max_sequence_length:
            raise ConfigError(
                f"train.seq_length={self.train.seq_length} exceeds model.max_sequence_length="
                f"{self.model.max_sequence_length}; lower train.seq_length or raise model.max_sequence_length"
            )
        if self.train.schedule == "anneal" and self.checkpoint.init_from is None and self.checkpoint.load in (None, "latest"):
            raise ConfigError(
                "train.schedule='anneal' starts a new run from trained weights, but no checkpoint is given: "
                "set --checkpoint.init_from=PRETRAINED_CHECKPOINT (with a new --data.seed to reshuffle the data)"
            )
        if self.precision.fp8 is not None and self.train.recompute == "selective":
            # FP8 runs on TE layers (PrecisionConfig.use_te refuses anything else), where selective
            # recompute includes the MoE activation of grouped-GEMM experts; the TE-version half of
            # Megatron's rule is checked where TE is resolved (model/megatron_config.py).
            if "moe_act" in selective_recompute_modules(self.model, use_te=True):
                check_fp8_moe_act_recompute(fp8_recipe=self.precision.fp8_recipe, te_version=None)
        if self.model.router_type == "expert_choice":
            self._validate_expert_choice()
        # The layout's rules that need only the model (the world size comes later): parallel/layout.py.
        self.parallel.validate(self.model)

    def _validate_expert_choice(self) -> None:
        model = self.model
        capacity = model.expert_capacity(self.train.seq_length)
        if capacity < 1:
            need = -(-model.num_experts // model.top_k)  # ceil(E / k): the shortest sequence with C >= 1 at factor 1
            raise ConfigError(
                f"model.router_type='expert_choice' gives each expert floor(model.expert_capacity_factor="
                f"{model.expert_capacity_factor} * model.top_k={model.top_k} * train.seq_length={self.train.seq_length}"
                f" / model.num_experts={model.num_experts}) = {capacity} tokens per sequence; it must be >= 1: "
                f"raise train.seq_length (>= {need} at factor 1) or model.expert_capacity_factor"
            )
        if self.parallel.cp > 1:
            raise ConfigError(
                f"parallel.context_parallel={self.parallel.cp} splits each sequence, over which "
                "model.router_type='expert_choice' chooses (model/expert_choice.py gathers only over tensor "
                "parallelism): use parallel.context_parallel=1"
            )

    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def validate_world_size(self, world_size: int, *, backend: str = "nccl") -> None:
        """Raises ConfigError unless this run fits `world_size` ranks (before anything starts)."""
        self.parallel.validate(self.model, world_size, backend=backend)
        dp = self.parallel.data_parallel_size(world_size)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            fits = [g for g in range(per_step, 8 * per_step + 1, per_step)]
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} must be a multiple of "
                f"train.micro_batch_size*data_parallel={self.train.micro_batch_size}*{dp}={per_step} on "
                f"{world_size} ranks; use global_batch_size in {fits[:4]} or change micro_batch_size"
            )
        if self.parallel.vpp and self.parallel.vpp > 1:
            micro = self.num_microbatches(world_size)
            if micro % self.parallel.pp:
                raise ConfigError(
                    f"the interleaved pipeline needs micro-batches per step ({micro}) divisible by "
                    f"parallel.pipeline_parallel={self.parallel.pp}; raise train.global_batch_size"
                )
