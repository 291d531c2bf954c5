"""`ParallelLayout`: the one value object that says how a run is split over ranks.

Degrees: tensor (tp), pipeline (pp) with optional virtual stages (vpp), context (cp), expert (ep),
expert-tensor (etp) and data (dp, derived from the world size). `validate(model, world_size)`
enforces Megatron-Core's rules before any process group exists, with errors that name the field,
the value, the rule and a fix. This is the one home of those rules: the run config, the dry-run
and the converters call it (with or without a world size) rather than restating any of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from olmoe_megatron.config import Config, ConfigError, divisors, one_of

if TYPE_CHECKING:
    from olmoe_megatron.model.config import ModelConfig

_AXES = ("tp", "cp", "ep", "dp", "pp")


@dataclasses.dataclass(kw_only=True, frozen=True)
class ParallelLayout(Config):
    """How the model and the batch are split over ranks (Megatron-Core's parallel degrees)."""

    tensor_parallel: int = 1
    """Tensor-parallel degree (Megatron tp): splits heads, FFN width and the vocabulary."""
    pipeline_parallel: int = 1
    """Pipeline stages (Megatron pp)."""
    virtual_pipeline_parallel: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule (None: not interleaved)."""
    context_parallel: int = 1
    """Context-parallel degree (splits the sequence; needs Transformer Engine attention)."""
    expert_parallel: int = 1
    """Expert-parallel degree: experts are split over this many ranks."""
    expert_tensor_parallel: int | None = None
    """Tensor-parallel degree inside each expert (None: same as tensor_parallel)."""
    sequence_parallel: bool = False
    """Split norms/dropout activations over the TP group (required for MoE with TP > 1)."""
    rank_order: str = "tp-cp-ep-dp-pp"
    """Order in which ranks are assigned to axes, fastest-varying first (Megatron's `order`)."""
    batch_p2p_comm: bool | None = None
    """Batch pipeline sends/receives (None: automatic; forced off for interleaved pipelines on gloo)."""

    # --------------------------------------------------------------- derived values
    @property
    def tp(self) -> int:
        return self.tensor_parallel

    @property
    def pp(self) -> int:
        return self.pipeline_parallel

    @property
    def vpp(self) -> int | None:
        return self.virtual_pipeline_parallel

    @property
    def cp(self) -> int:
        return self.context_parallel

    @property
    def ep(self) -> int:
        return self.expert_parallel

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel if self.expert_tensor_parallel is not None else self.tensor_parallel

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the dense part of the model (tp * pp * cp)."""
        return self.tp * self.pp * self.cp

    @property
    def expert_model_parallel_size(self) -> int:
        """Ranks that hold one copy of the experts (etp * ep * pp)."""
        return self.etp * self.ep * self.pp

    @property
    def smallest_world_size(self) -> int:
        """The fewest ranks this layout runs on: a multiple of both model-parallel sizes."""
        return math.lcm(self.model_parallel_size, self.expert_model_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def expert_data_parallel_size(self, world_size: int) -> int:
        return world_size // self.expert_model_parallel_size

    def use_batch_p2p_comm(self, *, backend: str) -> bool:
        """Megatron's default batches p2p ops; over gloo that corrupts interleaved pipelines."""
        if self.batch_p2p_comm is not None:
            return self.batch_p2p_comm
        return not (backend == "gloo" and self.vpp is not None and self.vpp > 1)

    def describe(self, world_size: int | None = None) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}"]
        if self.vpp:
            parts.append(f"vpp={self.vpp}")
        parts += [f"cp={self.cp}", f"ep={self.ep}", f"etp={self.etp}"]
        if world_size is not None:
            parts.append(f"dp={self.data_parallel_size(world_size)}")
            parts.append(f"edp={self.expert_data_parallel_size(world_size)}")
        parts.append(f"sp={'on' if self.sequence_parallel else 'off'}")
        return " ".join(parts)

    # --------------------------------------------------------------- rules
    def validate(
        self, model: ModelConfig | None = None, world_size: int | None = None, *, backend: str | None = None
    ) -> None:
        """Raises ConfigError if the layout breaks a rule.

        Without arguments only the layout's own rules are checked (this runs on construction); with
        a model, also Megatron-Core's rules for that model (the run config checks these); with a
        world size, also those of running there; with a backend ('gloo' or 'nccl'), also what that
        backend cannot do.
        """
        self._validate_own()
        if model is not None:
            if world_size is not None:
                self._validate_world(model, world_size)
            self._validate_for_model(model)
        if backend is not None:
            self._validate_backend(backend)

    def _validate_own(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "expert_parallel"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"parallel.{name}={value} must be >= 1")
        if self.expert_tensor_parallel is not None and self.expert_tensor_parallel < 1:
            raise ConfigError(f"parallel.expert_tensor_parallel={self.expert_tensor_parallel} must be >= 1 or null")
        if self.vpp is not None:
            if self.vpp < 1:
                raise ConfigError(f"parallel.virtual_pipeline_parallel={self.vpp} must be >= 1 or null")
            if self.vpp > 1 and self.pp == 1:
                raise ConfigError(
                    f"parallel.virtual_pipeline_parallel={self.vpp} needs parallel.pipeline_parallel > 1; "
                    "set parallel.pipeline_parallel=2 or parallel.virtual_pipeline_parallel=null"
                )
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1 (it splits activations "
                "over the TP group); set parallel.sequence_parallel=false or parallel.tensor_parallel=2"
            )
        axes = self.rank_order.split("-")
        if sorted(axes) != sorted(_AXES):
            raise ConfigError(
                f"parallel.rank_order={self.rank_order!r} must order each of tp, cp, ep, dp, pp once, "
                "e.g. 'tp-cp-ep-dp-pp' (Megatron's default)"
            )

    def _validate_world(self, model: ModelConfig, world_size: int) -> None:
        if world_size < 1:
            raise ConfigError(f"world_size={world_size} must be >= 1")
        mp = self.model_parallel_size
        if world_size % mp:
            fits = [w for w in range(mp, 8 * mp + 1, mp)]
            raise ConfigError(
                f"world_size={world_size} must be a multiple of tensor_parallel*pipeline_parallel*"
                f"context_parallel={self.tp}*{self.pp}*{self.cp}={mp}; use a world size of "
                f"{one_of(fits[:4])}, or change the layout"
            )
        expert_mp = self.expert_model_parallel_size
        if world_size % expert_mp:
            ok_ep = [e for e in divisors(world_size // max(1, self.etp * self.pp)) if model.num_experts % max(e, 1) == 0]
            raise ConfigError(
                f"world_size={world_size} must be a multiple of expert_tensor_parallel*expert_parallel*"
                f"pipeline_parallel={self.etp}*{self.ep}*{self.pp}={expert_mp}; try "
                f"parallel.expert_parallel in {one_of(ok_ep)}"
            )

    def _validate_for_model(self, model: ModelConfig) -> None:
        if model.num_heads % self.tp:
            raise ConfigError(
                f"parallel.tensor_parallel={self.tp} must divide model.num_heads={model.num_heads}; "
                f"use one of {one_of(divisors(model.num_heads))}"
            )
        if model.kv_heads % self.tp:
            raise ConfigError(
                f"parallel.tensor_parallel={self.tp} must divide model.num_kv_heads={model.kv_heads} "
                f"(full-width QK-norm shards k by whole heads); use one of {one_of(divisors(model.kv_heads))}"
            )
        if model.padded_vocab_size % self.tp:
            raise ConfigError(
                f"model.padded_vocab_size={model.padded_vocab_size} must be divisible by "
                f"parallel.tensor_parallel={self.tp}; use a tensor_parallel in "
                f"{one_of([d for d in divisors(model.padded_vocab_size) if d <= 64])}"
            )
        if model.is_moe:
            if model.num_experts % self.ep:
                raise ConfigError(
                    f"parallel.expert_parallel={self.ep} must divide model.num_experts={model.num_experts}; "
                    f"use one of {one_of(divisors(model.num_experts))}"
                )
            if model.expert_ffn_hidden_size % self.etp:
                raise ConfigError(
                    f"parallel.expert_tensor_parallel={self.etp} must divide model.expert_ffn_hidden_size="
                    f"{model.expert_ffn_hidden_size}; use one of {one_of(divisors(model.expert_ffn_hidden_size)[:8])}"
                )
            if self.tp > 1 and not self.sequence_parallel:
                raise ConfigError(
                    f"parallel.sequence_parallel=false with parallel.tensor_parallel={self.tp}: Megatron-Core "
                    "requires sequence parallel for MoE layers under tensor parallelism; set "
                    "parallel.sequence_parallel=true"
                )
        else:
            if self.ep > 1:
                raise ConfigError(
                    f"parallel.expert_parallel={self.ep} needs an MoE model (model.num_experts=0); set it to 1"
                )
            if model.dense_ffn_hidden_size % self.tp:
                raise ConfigError(
                    f"parallel.tensor_parallel={self.tp} must divide the dense FFN width "
                    f"{model.dense_ffn_hidden_size}"
                )
        stages = self.pp * (self.vpp or 1)
        if model.num_layers % stages:
            raise ConfigError(
                f"model.num_layers={model.num_layers} must be divisible by pipeline_parallel*"
                f"virtual_pipeline_parallel={self.pp}*{self.vpp or 1}={stages}; use pipeline_parallel in "
                f"{one_of([d for d in divisors(model.num_layers) if d > 1] or [1])}"
            )

    def _validate_backend(self, backend: str) -> None:
        if self.vpp and self.vpp > 1 and backend == "gloo" and self.batch_p2p_comm:
            raise ConfigError(
                "parallel.batch_p2p_comm=true with parallel.virtual_pipeline_parallel="
                f"{self.vpp} over gloo gives wrong gradients (two sends to one peer land in each other's "
                "buffers); set parallel.batch_p2p_comm=false or null"
            )
        if self.cp > 1 and backend == "gloo":
            raise ConfigError(
                f"parallel.context_parallel={self.cp} needs Transformer Engine's attention on CUDA; "
                "the CPU backend supports context_parallel=1"
            )
