#!/usr/bin/env bash
# A throw-away Slurm cluster on this one machine: munge + slurmctld + two emulated slurmd nodes
# (n1, n2 on ports 17001/17002), as root and without systemd. CI runs it before `make test`
# (.ci/run); the tests marked `slurm` submit real jobs to it. Starting takes a few seconds.
#
#   slurm/local/up.sh            # idempotent: a cluster that is already up is left as it is
#   slurm/local/down.sh          # stops only what this script started
#
# Environment:
#   OLMOE_SLURM_DIR        state, spool, logs and the generated slurm.conf (default /tmp/olmoe-slurm)
#   OLMOE_SLURM_NODES      number of emulated nodes (default 2)
#   OLMOE_SLURM_NODE_CPUS  CPUs each node advertises (default: nproc, at least 2)
#   OLMOE_SLURM_NODE_MEM   RealMemory in MB per node (default 4000)
#   OLMOE_SLURM_TIMEOUT    seconds to wait for the nodes to become idle (default 60)
# Clients find the cluster through /etc/slurm/slurm.conf (a symlink to the generated file, made
# only when no other slurm.conf is there) or through `source $OLMOE_SLURM_DIR/env.sh`.
set -euo pipefail

DIR=${OLMOE_SLURM_DIR:-/tmp/olmoe-slurm}
NODES=${OLMOE_SLURM_NODES:-2}
NODE_CPUS=${OLMOE_SLURM_NODE_CPUS:-$(nproc)}
(( NODE_CPUS >= 2 )) || NODE_CPUS=2   # the tests run 2 processes per node
NODE_MEM=${OLMOE_SLURM_NODE_MEM:-4000}
TIMEOUT=${OLMOE_SLURM_TIMEOUT:-60}
CONF=$DIR/etc/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
HOSTS_MARK="# olmoe-slurm-local"
START=$SECONDS

log() { echo "[slurm/local/up.sh +$((SECONDS - START))s] $*"; }
die() { echo "[slurm/local/up.sh] error: $*" >&2; exit 1; }
# A pid counts as alive unless it is gone or a zombie (a daemon that died under a non-reaping parent).
alive() { [[ -n ${1:-} && -e /proc/$1 ]] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
pid_in() { cat "$1" 2>/dev/null || true; }
node_names() { local i; for ((i = 1; i <= NODES; i++)); do printf 'n%d ' "$i"; done; }
# Nodes that answer and take jobs (idle, or busy with jobs when the cluster is already in use).
num_ready() { sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|allocated|completing)/' | wc -l; }

[[ $(id -u) == 0 ]] || die "must run as root (it starts munged, slurmctld and slurmd)"
[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "OLMOE_SLURM_NODES=$NODES must be a number from 1 to 99"
export SLURM_CONF=$CONF

# Already up (same state dir, every daemon alive, every node answering)? Then there is nothing to do:
# restarting would kill the jobs of whoever is using it.
already_up() {
  [[ -f $CONF ]] || return 1
  alive "$(pid_in "$DIR/run/slurmctld.pid")" || return 1
  local n
  for n in $(node_names); do alive "$(pid_in "$DIR/run/slurmd.$n.pid")" || return 1; done
  [[ $(timeout 10 sinfo -h -N -o '%N' 2>/dev/null | sort -u | wc -l) == "$NODES" ]] || return 1
  [[ $(num_ready) == "$NODES" ]]
}
if already_up; then
  log "already up: $NODES node(s), SLURM_CONF=$CONF"
  exit 0
fi

# 1. Packages. Debian's postinst scripts try to start the daemons through invoke-rc.d; without an
#    init system that is refused, which is fine: we start them ourselves below.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurmctld, slurmd, slurm-client, munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. Daemons of an earlier, half-dead cluster of ours (pids recorded under $DIR/run) must go before
#    fresh ones bind the same ports. Other Slurm daemons on this machine are not ours to touch.
stale=()
for f in "$DIR"/run/slurm*.pid; do
  [[ -e $f ]] || continue
  p=$(pid_in "$f")
  if alive "$p"; then kill -TERM "$p" 2>/dev/null || true; stale+=("$p"); fi
done
for p in "${stale[@]}"; do
  for _ in $(seq 50); do alive "$p" || break; sleep 0.1; done
  if alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
done
(( ${#stale[@]} == 0 )) || log "stopped ${#stale[@]} stale daemon(s) of an earlier cluster"

# 3. munge: slurm authenticates every RPC with it. A munged that already answers is reused (and not
#    stopped by down.sh); one we start is recorded so down.sh stops exactly that one.
mkdir -p "$DIR/run"
install -d -o munge -g munge -m 0700 /etc/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  if command -v mungekey >/dev/null; then mungekey -c -k /etc/munge/munge.key
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
  log "munged already running"
else
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || { tail -n 20 /var/log/munge/munged.log >&2 || true; die "munged did not start"; }
  cp /run/munge/munged.pid "$DIR/run/munged.started-by-us"
  log "munged started"
fi

# 4. Configuration, regenerated each start with fresh state (no jobs survive a restart).
rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log"
chown slurm:slurm "$DIR/state" "$DIR/log"
HOST=$(hostname -s)
if (( NODES == 1 )); then NODELIST=n1; else NODELIST="n[1-$NODES]"; fi
{
  cat <<CONF
# Generated by slurm/local/up.sh; regenerated on every start.
ClusterName=olmoe-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldPort=6817
# Several slurmd on one machine: each node takes CPUs/memory from this file, not from the hardware.
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Scheduling passes every 2 s instead of 30-60 s: a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
# Batch jobs may be requeued (scontrol requeue from slurm/entrypoint.sh after a preemption exit).
JobRequeue=1
# A requeued job waits out the step credential lifetime before it may start again (default 120 s);
# short here so that preemption tests take seconds. Steps must launch within it: 10 s is plenty
# for local daemons.
AuthInfo=cred_expire=10
# A node that dropped out comes back by itself once its slurmd answers again.
ReturnToService=2
# SIGTERM, then SIGKILL this many seconds later (scancel, time limit): short keeps tests bounded.
KillWait=5
InactiveLimit=0
# Finished jobs stay visible to scontrol/squeue this long: there is no accounting database here.
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmctldDebug=info
SlurmdDebug=info
CONF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} >"$CONF"
echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"

# Clients without SLURM_CONF (pytest, a user's shell) read /etc/slurm/slurm.conf; point it at ours
# unless a real configuration lives there.
mkdir -p /etc/slurm
if [[ ! -e $ETC_CONF || -L $ETC_CONF && $(readlink "$ETC_CONF") == "$DIR/"* ]]; then
  ln -sfn "$CONF" "$ETC_CONF"
else
  log "warning: $ETC_CONF belongs to another cluster; run 'source $DIR/env.sh' before sbatch/srun"
fi
# Jobs resolve node names (MASTER_ADDR=n1 in slurm/entrypoint.sh): every emulated node is this machine.
if ! grep -q "$HOSTS_MARK\$" /etc/hosts || ! grep "$HOSTS_MARK\$" /etc/hosts | grep -qw "n$NODES"; then
  sed -i "/$HOSTS_MARK\$/d" /etc/hosts
  echo "127.0.0.1 $(node_names)$HOSTS_MARK" >>/etc/hosts
fi

# 5. Daemons: they detach themselves and write their pids under $DIR/run.
slurmctld
for n in $(node_names); do slurmd -N "$n"; done
log "daemons started; waiting up to ${TIMEOUT}s for $NODES node(s) to be ready"
deadline=$((SECONDS + TIMEOUT))
until [[ $(num_ready) == "$NODES" ]]; do
  if (( SECONDS >= deadline )); then
    echo "[slurm/local/up.sh] error: nodes not ready after ${TIMEOUT}s" >&2
    sinfo -N -l >&2 || true
    for f in "$DIR"/log/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2; done
    exit 1
  fi
  sleep 0.2
done
sinfo -N
log "up: $NODES node(s), SLURM_CONF=$CONF"
