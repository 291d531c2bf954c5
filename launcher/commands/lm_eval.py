"""`olmoe lm-eval ...` (and the `olmoe-lm-eval` script): lm-evaluation-harness's own CLI, unchanged,
with our checkpoints available as `--model olmoe_megatron`.

    olmoe lm-eval --model olmoe_megatron --model_args ckpt=runs/demo/checkpoints --tasks hellaswag
    olmoe-lm-eval --model olmoe_megatron --model_args ckpt=DIR,max_length=1024 \\
        --tasks my_task --include_path my_tasks/ --output_path results/

lm-eval 0.4.13 looks models up in its in-process registry only (no plugin entry points), so the
stock `lm_eval` script cannot see ours: this command registers the adapter first, then hands
every argument to lm-eval's CLI (`lm_eval.__main__.cli_evaluate`). Needs the `eval` extra.
"""

from __future__ import annotations

import argparse
import sys

NAME = "lm-eval"
HELP = "Run lm-evaluation-harness (its CLI and options) with --model olmoe_megatron --model_args ckpt=DIR."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Every argument goes to lm-eval's CLI (see `olmoe-lm-eval --help`). model_args of "
                     "olmoe_megatron: ckpt (required), tokenizer, max_length, micro_batch_size, max_gen_toks, "
                     "overrides ('--section.field=value' settings separated by ';').")
    parser.set_defaults(_accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    # lm-eval's CLI parses sys.argv itself: hand it this command's arguments for the call.
    saved = sys.argv
    sys.argv = ["olmoe lm-eval", *(args.overrides or [])]
    try:
        return main()
    finally:
        sys.argv = saved


def main() -> int:
    """The `olmoe-lm-eval` console script: registers `olmoe_megatron`, then runs lm-eval's CLI on sys.argv."""
    from olmoe_megatron.config import ConfigError

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("olmoe lm-eval: lm-evaluation-harness is not installed; pip install -e '.[eval]'", file=sys.stderr)
        return 2
    from olmoe_megatron.evaluation.lm_eval_plugin import register

    register()
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse errors and --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ConfigError as exc:  # bad model_args or overrides
        print(f"olmoe lm-eval: config error: {exc}", file=sys.stderr)
        return 2
    return 0
