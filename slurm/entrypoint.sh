#!/usr/bin/env bash
# The one script every node of an OLMoE job runs (srun'ed by slurm/train.sbatch and sweep.sbatch):
#
#   srun bash slurm/entrypoint.sh COMMAND [ARGS...]       e.g. olmoe train --recipe olmoe_1b_7b ...
#
# COMMAND is any executable run once per rank with the torch.distributed environment (RANK,
# LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): `olmoe train ...`,
# `python -m some.module`, `python test_script.py`.
#
# Two launch modes, chosen by how many tasks srun started per node:
#   torchrun (one task per node):  a per-node health check, then torchrun starts NPROC ranks here.
#   srun     (one task per rank):  RANK/LOCAL_RANK/WORLD_SIZE come from SLURM_PROCID/SLURM_LOCALID/
#                                  SLURM_NTASKS and COMMAND runs directly (health check on local task 0).
#
# Preemption: the trainer exits 75 (EXIT_REQUEUE, olmoe_megatron/training/exit_codes.py) once its
# checkpoint is committed on every rank. The leader task (node 0 under torchrun, rank 0 under srun)
# then runs `scontrol requeue $SLURM_JOB_ID`; the requeued job runs the same command and the
# trainer resumes from its latest checkpoint. Other tasks exit 0 on 75 so that srun's
# --kill-on-bad-exit does not cut the leader short.
#
# Environment (all optional):
#   OLMOE_LAUNCH              torchrun | srun (default: srun when srun started >1 task per node)
#   OLMOE_NPROC_PER_NODE      ranks per node (default: the GPUs Slurm gave this node; CPU runs must set it)
#   OLMOE_GPUS_PER_NODE       GPUs the health check expects (default: the GPUs Slurm gave this node)
#   OLMOE_MASTER_PORT         rendezvous port (default: derived from the job id)
#   OLMOE_RDZV_BACKEND        static (default: rank 0 on the first node) | c10d
#   OLMOE_RDZV_TIMEOUT        seconds for all nodes to join the rendezvous (default 600)
#   OLMOE_VENV                a virtualenv whose bin/ goes first on PATH
#   OLMOE_PYTHON              interpreter for torchrun and the health check (default python3)
#   OLMOE_HEALTH              1 (default) | 0 to skip the per-node health check
#   OLMOE_HEALTH_IMPORTS      modules that must import (default "torch megatron.core olmoe_megatron")
#   OLMOE_HEALTH_DISK_PATHS   paths that need free space (default "$TMPDIR or /tmp" and the cwd)
#   OLMOE_HEALTH_MIN_FREE_GB  free space each of them needs (default 2)
#   OLMOE_REQUEUE             1 (default) | 0: never call scontrol requeue
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME   network interface for gloo/NCCL (passed through)
set -euo pipefail

EXIT_REQUEUE=75  # olmoe_megatron/training/exit_codes.py
EXIT_HEALTH=3    # this node failed its health check (distinct from a trainer failure)

node=${SLURMD_NODENAME:-$(hostname -s)}
log() { echo "[entrypoint ${node} node ${SLURM_NODEID:-?} task ${SLURM_PROCID:-?}] $*" >&2; }
die() { log "error: $*"; exit "${2:-2}"; }

(($# > 0)) || die "no command given; usage: entrypoint.sh COMMAND [ARGS...]"
[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] || die "not inside a Slurm job step (run it through srun)"

if [[ -n ${OLMOE_VENV:-} ]]; then export PATH="$OLMOE_VENV/bin:$PATH"; fi
PY=${OLMOE_PYTHON:-python3}

# --- Rendezvous -------------------------------------------------------------------------------
# The first node of the allocation hosts the rendezvous store; every node computes the same name.
# (Not `| head -n1`: under pipefail, scontrol dying of SIGPIPE on a long node list would end the job.)
job_hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${job_hosts%%$'\n'*}
# One port per job, so jobs sharing a node do not collide; 15000-29999 stays below Linux's
# default ephemeral range (32768-60999), where outgoing connections could already hold it.
MASTER_PORT=${OLMOE_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
export MASTER_ADDR MASTER_PORT

num_nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
num_step_tasks=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}}
num_step_nodes=${SLURM_STEP_NUM_NODES:-$num_nodes}
if [[ -z ${OLMOE_LAUNCH:-} ]]; then
  if ((num_step_tasks > num_step_nodes)); then OLMOE_LAUNCH=srun; else OLMOE_LAUNCH=torchrun; fi
fi

# GPUs Slurm gave this node: SLURM_GPUS_ON_NODE (set with --gpus-per-node / --gres=gpu:N).
gpus_on_node=${SLURM_GPUS_ON_NODE:-0}
GPUS_EXPECTED=${OLMOE_GPUS_PER_NODE:-$gpus_on_node}
# Ranks this task starts: all of the node's under torchrun, itself under srun.
if [[ $OLMOE_LAUNCH == torchrun ]]; then num_local_ranks=${OLMOE_NPROC_PER_NODE:-$gpus_on_node}; else num_local_ranks=1; fi

# --- Settings from Megatron-Core's MoE guide (defaults only: a value already set wins) -------------
# One hardware work queue per device, so the kernels Megatron launches to overlap TP/SP communication
# with compute start in issue order (it refuses TP comm overlap otherwise). Raise to 32 only for
# --overlap-moe-expert-parallel-comm, which schedules EP all-to-all on its own streams.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# MoE token counts per expert change every step, so activation sizes vary: expandable segments stop
# the caching allocator from fragmenting into many odd-sized blocks (an OOM cause in long MoE runs).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# Free NCCL buffers when the collective finishes instead of tracking them with recordStream, which
# holds memory until a later sync (Megatron's distributed optimizer does many async collectives).
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# NVLink SHARP buffers cost GPU memory per communicator and there is one per EP/DP/TP group;
# off unless a site knows it helps.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Leave SMs free for communication kernels that overlap LayerNorm (TE reads these).
export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-8}
export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-8}
# A collective that errors or times out aborts the process (and so the job) instead of hanging it:
# the watchdog tears down the communicator and raises (3 = abort without cleanup, torch's default).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
# Print NCCL's version and topology choice once per rank: the first thing to check in a slow job.
export NCCL_DEBUG=${NCCL_DEBUG:-VERSION}
# Each rank gets its share of this task's CPUs for intra-op threads (torchrun would force 1).
num_threads=$(( ${SLURM_CPUS_PER_TASK:-1} / (num_local_ranks > 0 ? num_local_ranks : 1) ))
((num_threads > 0)) || num_threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$num_threads}

# --- Per-node health check ----------------------------------------------------------------------
# A node with a broken environment, missing GPUs or a full disk fails here, in seconds, naming
# itself, instead of hanging the rendezvous or dying mid-run.
health_check() {
  local imports=${OLMOE_HEALTH_IMPORTS:-torch megatron.core olmoe_megatron}
  local min_free_gb=${OLMOE_HEALTH_MIN_FREE_GB:-2}
  local paths=${OLMOE_HEALTH_DISK_PATHS:-${TMPDIR:-/tmp} $PWD}
  local out path free_kb
  # shellcheck disable=SC2086  # the module list is space-separated on purpose
  if ! out=$("$PY" -c 'import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)' $imports 2>&1); then
    die "health check: '$PY' cannot import all of: $imports"$'\n'"$out" "$EXIT_HEALTH"
  fi
  if ((GPUS_EXPECTED > 0)); then
    local num_gpus
    num_gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    ((num_gpus >= GPUS_EXPECTED)) \
      || die "health check: torch sees $num_gpus GPU(s), $GPUS_EXPECTED expected (nvidia-smi -L: $(nvidia-smi -L 2>&1 | wc -l) lines)" "$EXIT_HEALTH"
  fi
  for path in $paths; do
    [[ -d $path ]] || continue
    free_kb=$(df -Pk "$path" | awk 'NR == 2 {print $4}')
    ((free_kb >= min_free_gb * 1024 * 1024)) \
      || die "health check: $path has $((free_kb / 1024 / 1024)) GB free, $min_free_gb GB needed (OLMOE_HEALTH_MIN_FREE_GB)" "$EXIT_HEALTH"
  done
}

# --- Launch -------------------------------------------------------------------------------------
# Signals: Slurm delivers SIGUSR1 (--signal=USR1@SECONDS, scancel --signal=USR1) and SIGTERM
# (preemption, scancel, time limit) to every process of the step, so the trainer hears them
# itself. This shell must outlive the trainer to act on its exit code: it notes the signal and keeps
# waiting (a trap with a handler, not an ignore, so the child still gets the default disposition).
got_signal=""
trap 'got_signal=USR1' USR1
trap 'got_signal=TERM' TERM

is_leader=0
case $OLMOE_LAUNCH in
  torchrun)
    ((num_step_tasks == num_step_nodes)) \
      || die "torchrun mode needs one task per node, srun started $num_step_tasks tasks on $num_step_nodes nodes (use --ntasks-per-node=1, or OLMOE_LAUNCH=srun)"
    nproc=$num_local_ranks
    ((nproc > 0)) || die "no ranks to start: Slurm gave this node no GPUs; set OLMOE_NPROC_PER_NODE for a CPU run"
    [[ ${SLURM_NODEID:-0} == 0 ]] && is_leader=1
    if [[ ${OLMOE_HEALTH:-1} == 1 ]]; then health_check; fi
    # static (default): node rank = SLURM_NODEID, the store lives in node 0's agent, and after the
    # start each agent only watches its own ranks. c10d: group ranks go by arrival order (global
    # rank 0 may live on any node; nothing here or in the trainer assumes otherwise) and every agent
    # polls the store for membership changes while the ranks run, so when the agent hosting it
    # leaves first (all ranks exiting 75 together, say) the others die of RendezvousConnectionError
    # and their failure races the leader's requeue (seen on the local cluster). With Slurm requeue
    # as the restart mechanism (--max-restarts=0) c10d's elasticity buys nothing here.
    rdzv_backend=${OLMOE_RDZV_BACKEND:-static}
    rdzv=(--rdzv-backend="$rdzv_backend" --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
      --rdzv-conf="join_timeout=${OLMOE_RDZV_TIMEOUT:-600}")
    if [[ $rdzv_backend == static ]]; then rdzv+=(--node-rank="${SLURM_NODEID:-0}"); fi
    log "torchrun: $num_nodes node(s) x $nproc rank(s), rendezvous $rdzv_backend at $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
    # Output lines carry node and global rank, so a failure in a 256-rank log names its origin.
    export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[${node} rank\${rank}]:"
    cmd=("$PY" -m olmoe_megatron.launcher.slurm_torchrun --nnodes="$num_nodes" --nproc-per-node="$nproc"
      "${rdzv[@]}" --max-restarts=0 --tee=3 --no-python "$@")
    ;;
  srun)
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS GROUP_RANK=${SLURM_NODEID:-0}
    export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / num_nodes))}
    [[ $SLURM_PROCID == 0 ]] && is_leader=1
    if [[ ${OLMOE_HEALTH:-1} == 1 && $SLURM_LOCALID == 0 ]]; then health_check; fi
    ((SLURM_PROCID == 0)) && log "srun: $WORLD_SIZE rank(s) on $num_nodes node(s), master $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
    cmd=("$@")
    ;;
  *) die "OLMOE_LAUNCH=$OLMOE_LAUNCH must be torchrun or srun" ;;
esac

# Not `exec`: after the command exits, this shell turns exit code 75 into a requeue.
rc=0
"${cmd[@]}" || rc=$?
if [[ -n $got_signal ]]; then log "received SIG$got_signal during the run"; fi

if ((rc == EXIT_REQUEUE)); then
  if ((is_leader == 0)); then
    log "preempted (exit $EXIT_REQUEUE): checkpoint saved; the leader task requeues the job"
    exit 0
  fi
  if [[ ${OLMOE_REQUEUE:-1} == 1 ]]; then
    log "preempted (exit $EXIT_REQUEUE): checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || log "error: scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
  else
    log "preempted (exit $EXIT_REQUEUE): checkpoint saved; OLMOE_REQUEUE=0, so not requeueing"
  fi
  exit "$EXIT_REQUEUE"
fi
if ((rc != 0)); then
  if [[ $OLMOE_LAUNCH == srun ]]; then
    log "rank $RANK (local rank $LOCAL_RANK) on node $node exited with code $rc"
  else
    log "torchrun on node $node exited with code $rc"
  fi
fi
exit "$rc"
