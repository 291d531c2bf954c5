"""The `olmoe` command line: a thin dispatcher over the subcommands in `commands/`.

Each module in `olmoe_megatron.launcher.commands` defines `NAME`, `HELP`, `add_arguments(parser)`
and `run(args) -> int`; this file only finds them and dispatches. Library code never reads
`sys.argv`; only this entry point does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import warnings
from pathlib import Path

from olmoe_megatron.config import ConfigError
from olmoe_megatron.launcher import commands


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olmoe", description="OLMoE-family Mixture-of-Experts pretraining on Megatron-Core."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _quiet_known_warnings() -> None:
    """Filters the warnings of megatron-core that are not true of our runs, each named exactly.

    - megatron-core 0.16.1 imports models/backends.py with every GPTModel (multi_token_prediction.py
      imports it) and that module warns "Apex is not installed. Falling back to Torch Norm" where
      apex is missing. The fallback it announces is its LayerNorm for Megatron's own specs; OLMoE's
      specs never use it (our RMSNorm: model/norms.py; TE's on GPUs), and importing GPTModel cannot
      be avoided.
    - Its distributed optimizer's zero_grad reads `.grad` of its fp32 shard views, which torch
      reports as "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed" on
      every fp32 step (megatron's own comment there: "throws grad-access warning"). Harmless: those
      views never carry gradients. Filtered for that megatron module only, so the same warning
      from any other code still shows.
    """
    warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm", category=UserWarning)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor",
                            category=UserWarning, module=r"megatron\.core\.optimizer\.optimizer")


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and not getattr(args, "_accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Megatron-Core logs every dataset index and checkpoint step at INFO: keep it for --log-level DEBUG.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"olmoe {args.command}: config error: {exc}", file=sys.stderr)
        return 2


#: Set by `olmoe launch` for its ranks: a directory where each rank records its exit code, because
#: torchrun reports any nonzero rank exit as 1 (75, requeue, and 76, non-finite, would be lost).
EXIT_DIR_ENV = "OLMOE_LAUNCH_EXIT_DIR"


def _record_exit(code: int) -> None:
    directory = os.environ.get(EXIT_DIR_ENV)
    if directory and "RANK" in os.environ:
        try:
            (Path(directory) / f"rank_{int(os.environ['RANK'])}").write_text(f"{code}\n")
        except (OSError, ValueError):
            pass  # the launcher then reports torchrun's own code


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        _record_exit(code)
    sys.exit(code)
