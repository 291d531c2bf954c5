"""What one checkpoint save costs the busiest rank: bytes it writes and host memory it gathers.

Counted from the configs alone, with the same per-rank parameter counts as the memory estimate
(model/memory.py): model weights in their dtype; the distributed optimizer's state (Adam moments,
plus fp32 master weights in bf16) in the format `checkpoint.optimizer_format` names.

- Weights are replicated over data parallelism (experts over expert-data parallelism); a fully
  parallel save spreads their writes over those ranks, otherwise one replica writes them all.
- 'dp_reshardable': each rank writes its own optimizer shard; nothing is gathered.
- 'fully_reshardable': the shards are gathered into parameter shapes first: on every rank (and
  written spread over the DP ranks when fully parallel), or with `optimizer_mem_efficient` on DP
  rank 0 alone, which then writes all of it.
"""

from __future__ import annotations

import dataclasses

from olmoe_megatron.model.memory import estimate_memory


@dataclasses.dataclass(frozen=True)
class SaveCost:
    written_bytes: int
    """Bytes the busiest rank writes."""
    gathered_bytes: int
    """Host memory the busiest rank holds for the gathered optimizer state during the save."""
    checkpoint_bytes: int
    """Size of the whole checkpoint (weights and optimizer state, every rank's)."""


def save_cost(run, *, world_size: int) -> SaveCost:
    """The save cost of `run` (a RunConfig) on `world_size` ranks."""
    estimate = estimate_memory(
        run.model, run.parallel, run.precision, world_size=world_size, seq_length=run.train.seq_length,
        micro_batch_size=run.train.micro_batch_size, distributed_optimizer=run.train.use_distributed_optimizer,
        recompute=run.train.recompute)
    dense, experts = estimate.dense_params, estimate.expert_params
    param_bytes = 2 if run.precision.dtype == "bf16" else 4
    state_bytes = 8 + (4 if run.precision.dtype == "bf16" else 0)
    dp = run.parallel.data_parallel_size(world_size)
    edp = run.parallel.expert_data_parallel_size(world_size)
    checkpoint = run.checkpoint

    def spread(per_param: int) -> float:
        return per_param * (dense / dp + experts / edp)

    shard = dense + experts
    weights = spread(param_bytes) if checkpoint.fully_parallel else shard * param_bytes
    gathered = 0.0
    if not run.train.use_distributed_optimizer:
        optimizer = spread(state_bytes) if checkpoint.fully_parallel else shard * state_bytes
    elif checkpoint.optimizer_format == "dp_reshardable":
        optimizer = spread(state_bytes)
    elif checkpoint.optimizer_mem_efficient:
        gathered = optimizer = shard * state_bytes
    else:
        gathered = shard * state_bytes
        optimizer = spread(state_bytes) if checkpoint.fully_parallel else shard * state_bytes
    total_params = run.model.num_params()
    return SaveCost(written_bytes=int(weights + optimizer), gathered_bytes=int(gathered),
                    checkpoint_bytes=int(total_params * (param_bytes + state_bytes)))
