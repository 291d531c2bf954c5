"""`olmoe launch --nproc-per-node N -- train ...`: torchrun on this machine, with a free port."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

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


#: Signals `olmoe launch` passes on to torchrun (which passes them to the ranks): a scheduler's
#: SIGTERM or a Slurm SIGUSR1 must reach the trainer, not just end the launcher.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def run_forwarding_signals(command: list[str], *, env: dict[str, str]) -> int:
    """Runs `command` and waits for it; the FORWARDED_SIGNALS this process receives are sent on to
    it (so its ranks stop cleanly and nothing is left running). Returns its exit code."""
    child = subprocess.Popen(command, env=env)
    previous = {}

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        previous[sig] = signal.signal(sig, forward)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # SIGINT was forwarded too; wait for the child to stop
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not command:
        print("olmoe launch: give the command after --, e.g. `olmoe launch -n 2 -- train --recipe olmoe_demo`",
              file=sys.stderr)
        return 2
    if args.nproc_per_node < 1:
        print(f"olmoe launch: -n/--nproc-per-node={args.nproc_per_node} must be at least 1, e.g. -n 2", file=sys.stderr)
        return 2
    if args.threads_per_proc is not None and args.threads_per_proc < 1:
        print(f"olmoe launch: --threads-per-proc={args.threads_per_proc} must be at least 1 (or leave it out)",
              file=sys.stderr)
        return 2
    import tempfile

    from olmoe_megatron.launcher.cli import EXIT_DIR_ENV

    env = dict(os.environ)
    threads = args.threads_per_proc or max(1, (os.cpu_count() or 1) // args.nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    with tempfile.TemporaryDirectory(prefix="olmoe-launch-") as exit_dir:
        env[EXIT_DIR_ENV] = exit_dir
        code = run_forwarding_signals(torchrun_command(args.nproc_per_node, command), env=env)
        return ranks_exit_code(Path(exit_dir), args.nproc_per_node, default=code)


def ranks_exit_code(exit_dir: Path, nproc: int, *, default: int) -> int:
    """The ranks' common exit code when every rank recorded the same one (75 after a stop signal,
    76 after non-finite losses: torchrun would report 1), else `default` (torchrun's code)."""
    codes = set()
    for rank in range(nproc):
        path = exit_dir / f"rank_{rank}"
        try:
            codes.add(int(path.read_text().strip()))
        except (OSError, ValueError):
            return default
    return codes.pop() if len(codes) == 1 else default
