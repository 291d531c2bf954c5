"""`olmoe launch --nproc-per-node N -- train ...`: torchrun on this machine, with a free port."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from olmoe_megatron.parallel.context import free_port

NAME = "launch"
HELP = "Run an olmoe command on N local processes through torchrun (e.g. `olmoe launch -n 2 -- train --recipe olmoe_demo`)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--nproc-per-node", type=int, default=2, help="processes to start")
    parser.add_argument("--threads-per-proc", type=int, default=None,
                        help="OMP threads per process (default: cores // processes, at least 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the olmoe command and its arguments")


def torchrun_command(nproc: int, olmoe_args: list[str], *, port: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={port or free_port()}",
        "-m", "olmoe_megatron.launcher.cli", *olmoe_args,
    ]


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not command:
        print("olmoe launch: give the command after --, e.g. `olmoe launch -n 2 -- train --recipe olmoe_demo`",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    threads = args.threads_per_proc or max(1, (os.cpu_count() or 1) // args.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return subprocess.call(torchrun_command(args.nproc_per_node, command), env=env)
