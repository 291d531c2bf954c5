"""`olmoe sweep report`: tokens/s, MFU and peak memory per layout from a sweep's metrics files.

    olmoe sweep report runs/sweep/                 # every *.jsonl below it
    olmoe sweep report runs/sweep/*.jsonl --format csv --warmup-steps 3

Submit the sweep itself with `olmoe slurm submit --recipe NAME --sweep layouts.txt
--metrics.jsonl=runs/sweep/{task}.jsonl` (slurm/sweep.sbatch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmoe_megatron.launcher.slurm_sweep import format_csv, format_json, format_table, metrics_files, summarize

NAME = "sweep"
HELP = "report a layout sweep: tokens/s, MFU and peak memory per layout"

_FORMATS = {"table": format_table, "csv": format_csv, "json": format_json}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("report",), help="report: tabulate the sweep's metrics")
    parser.add_argument("paths", nargs="+", type=Path, help="metrics JSONL files or directories holding them")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="leading steps per layout left out of tokens/s and MFU (default 1)")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="table")


def run(args: argparse.Namespace) -> int:
    summaries = summarize(metrics_files(args.paths), num_warmup_steps=args.warmup_steps)
    sys.stdout.write(_FORMATS[args.format](summaries))
    return 0
