"""`olmoe eval --ckpt DIR`: validation losses and task accuracy of any checkpoint, in any layout.

    olmoe eval --ckpt runs/demo/checkpoints --eval.tasks=[demo-next-line] \\
        --eval.datasets='[{name: stdlib, demo_heldout: true}]'
    olmoe launch -n 2 -- eval --ckpt CKPT --parallel.expert_parallel=2 --eval.tasks=[hellaswag.jsonl]

Runs on one process, under `olmoe launch -n N` or srun; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NAME = "eval"
HELP = "Evaluate a checkpoint: held-out losses (eval.datasets) and multiple-choice tasks (eval.tasks)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint root (its latest step) or step directory")
    parser.add_argument("--output", default=None,
                        help="JSON result path (default: <step dir>/eval.json)")
    parser.epilog = ("Overrides as --section.field=value: --eval.* (datasets, tasks, tokens, micro_batch_size, "
                     "task_limit), --parallel.* (layout; default data parallel), --data.tokenizer, "
                     "--train.seq_length, --precision.dtype.")
    parser.set_defaults(_accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from olmoe_megatron.data.errors import DataError
    from olmoe_megatron.evaluation.checkpoint_eval import evaluate_checkpoint, format_table

    try:
        result = evaluate_checkpoint(args.ckpt, list(args.overrides or []))
    except (DataError, FileNotFoundError) as exc:
        print(f"olmoe eval: {exc}", file=sys.stderr)
        return 2
    if dist.get_rank() == 0:
        output = Path(args.output) if args.output else Path(result["checkpoint"]) / "eval.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(output)
        print(f"checkpoint {result['checkpoint']} (step {result['step']}), layout {result['layout']}")
        print(format_table(result), end="")
        print(f"wrote {output}")
    return 0
