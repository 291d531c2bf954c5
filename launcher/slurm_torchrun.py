"""torchrun for one node of a Slurm job, passing the trainer's exit code through.

`python -m olmoe_megatron.launcher.slurm_torchrun TORCHRUN_ARGS...` is torchrun
(`torch.distributed.run`) with two differences that slurm/entrypoint.sh relies on:

* Exit code. torchrun exits 1 whenever a worker fails, whatever its code. Here the code of the
  rank that failed first by itself comes through (see `exit_code_for`), 75 (EXIT_REQUEUE:
  preempted, checkpoint saved) included, so the entrypoint can requeue the job. A line naming the Slurm node, the rank and the code is logged.
* Signals. Under Slurm, slurmstepd delivers SIGUSR1 (`--signal=USR1@T`, `scancel --signal=USR1`)
  and SIGTERM (preemption, scancel, time limit) to every process of the step, the ranks included.
  The ranks decide what to do (the trainer checkpoints and exits 75); this agent keeps watching
  them rather than dying on SIGUSR1 (Python's default) or killing them on SIGTERM after a fixed
  30 s grace (torchrun's default), which would cut a checkpoint save short. Slurm's KillWait bounds
  the shutdown instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from olmoe_megatron.training.exit_codes import EXIT_REQUEUE

logger = logging.getLogger(__name__)

#: Signals torchrun's agent still handles itself (forwarding them to the ranks and stopping).
#: SIGTERM is left out on purpose: see the module docstring.
AGENT_HANDLED_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def _note_signal(signum: int, frame: object) -> None:
    logger.info("torchrun agent on %s received %s; its ranks decide what to do",
                os.environ.get("SLURMD_NODENAME", "?"), signal.Signals(signum).name)


def exit_code_for(failures: dict[int, object]) -> int:
    """The exit code of a failed torchrun, from the exit codes of its failed ranks.

    A rank that exited by itself with a code other than 75 is the cause and its code comes through.
    Otherwise, if a rank exited 75 (EXIT_REQUEUE), 75 comes through: the trainer exits 75 only once
    its checkpoint is committed on every rank, so siblings that the agent stopped right after (a
    negative code: its SIGTERM) lost nothing. Otherwise every rank died of a signal N: 128 + N.
    Among equals the earliest (then lowest) rank wins.

    Args:
        failures: torchrun's `ChildFailedError.failures`: global rank -> `ProcessFailure`
            (with `exitcode`, negative for a signal, and `timestamp`).
    """
    if not failures:
        return 1
    codes = {rank: int(f.exitcode) for rank, f in failures.items()}
    first_rank = min(failures, key=lambda r: (codes[r] <= 0, codes[r] == EXIT_REQUEUE, failures[r].timestamp, r))
    code = codes[first_rank]
    if code < 0:
        return 128 - code
    return code if code > 0 else 1


def main(argv: list[str] | None = None) -> int:
    # Before the (slow) torch import, so a signal arriving during start-up does not kill the agent.
    signal.signal(signal.SIGUSR1, _note_signal)
    signal.signal(signal.SIGTERM, _note_signal)
    # torchrun >= 2.8 reads --signals-to-handle from PET_SIGNALS_TO_HANDLE (its env fallback) and
    # exports it as TORCHELASTIC_SIGNALS_TO_HANDLE; older versions read the latter directly.
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", AGENT_HANDLED_SIGNALS)
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", os.environ["PET_SIGNALS_TO_HANDLE"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        node = os.environ.get("SLURMD_NODENAME", "?")
        for rank, failure in sorted(exc.failures.items()):
            logger.error("node %s: rank %d (local rank %d) exited with code %d",
                         node, rank, failure.local_rank, failure.exitcode)
        return exit_code_for(exc.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
