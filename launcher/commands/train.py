"""`olmoe train`: train a run on the ranks of this torchrun or Slurm job."""

from __future__ import annotations

import argparse
import sys

from olmoe_megatron.launcher.run_args import add_run_arguments, resolve_run_config

NAME = "train"
HELP = "Train a recipe (run under torchrun/srun; `olmoe launch` wraps torchrun on one machine)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from olmoe_megatron.checkpoint.format import CheckpointFormatError
    from olmoe_megatron.data.errors import DataError
    from olmoe_megatron.training.trainer import train

    run_config = resolve_run_config(args)
    try:
        return train(run_config)
    except DataError as exc:
        print(f"olmoe train: data error: {exc}", file=sys.stderr)
        return 2
    except CheckpointFormatError as exc:
        print(f"olmoe train: checkpoint error: {exc}", file=sys.stderr)
        return 2
