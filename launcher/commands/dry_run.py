"""`olmoe dry-run`: print the resolved config, parameter counts, layout and memory; build nothing."""

from __future__ import annotations

import argparse

from olmoe_megatron.config.base import dump_yaml
from olmoe_megatron.launcher.run_args import add_run_arguments, resolve_run_config
from olmoe_megatron.model.memory import estimate_memory

NAME = "dry-run"
HELP = "Resolve a run config and print parameters, layout and per-rank memory without training."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to plan for (default: the smallest world the layout needs)")
    parser.add_argument("--quiet-config", action="store_true", help="skip printing the resolved YAML")


def run(args: argparse.Namespace) -> int:
    run_config = resolve_run_config(args)
    layout = run_config.parallel
    world = args.world_size if args.world_size is not None else layout.smallest_world_size
    run_config.validate_world_size(world)
    model = run_config.model
    if not args.quiet_config:
        print("# resolved config")
        print(dump_yaml(run_config))
    total, active = model.num_params(), model.num_params(active=True)
    print(f"recipe/run          {run_config.name}")
    print(f"parameters          {total / 1e9:.3f}B total, {active / 1e9:.3f}B active per token")
    print(f"  exact             {total:,} total, {active:,} active per token")
    print(f"model FLOPs/token   {model.flops_per_token(run_config.train.seq_length) / 1e9:.2f} GFLOP "
          f"(seq {run_config.train.seq_length})")
    print(f"world size          {world}")
    print(f"layout              {layout.describe(world)}")
    print(f"micro-batches/step  {run_config.num_microbatches(world)} x {run_config.train.micro_batch_size} "
          f"sequences per DP rank; global batch {run_config.train.global_batch_size} x "
          f"{run_config.train.seq_length} = {run_config.train.tokens_per_step:,} tokens")
    estimate = estimate_memory(
        model, layout, run_config.precision, world_size=world, seq_length=run_config.train.seq_length,
        micro_batch_size=run_config.train.micro_batch_size,
        distributed_optimizer=run_config.train.use_distributed_optimizer, recompute=run_config.train.recompute,
    )
    print(f"memory per rank     (busiest stage, {run_config.precision.dtype})")
    for label, value in estimate.table():
        print(f"  {label:<36}{value}")
    from olmoe_megatron.checkpoint.cost import save_cost

    cost = save_cost(run_config, world_size=world)
    checkpoint = run_config.checkpoint
    print(f"checkpoint save     (optimizer {checkpoint.optimizer_format}"
          f"{', memory-efficient' if checkpoint.optimizer_mem_efficient else ''}, "
          f"{'fully parallel' if checkpoint.fully_parallel else 'one writer per replica'})")
    print(f"  {'written by the busiest rank':<36}{cost.written_bytes / 2**30:8.2f} GiB")
    print(f"  {'gathered optimizer state (host)':<36}{cost.gathered_bytes / 2**30:8.2f} GiB")
    print(f"  {'whole checkpoint':<36}{cost.checkpoint_bytes / 2**30:8.2f} GiB")
    return 0

