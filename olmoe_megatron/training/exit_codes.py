"""Process exit codes the trainer uses, shared with the Slurm entrypoint."""

#: Training finished (max steps or tokens reached).
EXIT_OK = 0
#: Preempted (SIGUSR1/SIGTERM): the current step finished, a checkpoint was saved, requeue me.
#: The Slurm entrypoint turns this into `scontrol requeue $SLURM_JOB_ID`. 75 is EX_TEMPFAIL.
EXIT_REQUEUE = 75
#: Too many non-finite losses in a row: a checkpoint was saved and training stopped.
EXIT_NONFINITE = 76
