#!/usr/bin/env bash
# Stops the cluster slurm/local/up.sh started: its slurmctld and slurmd (pids recorded under
# $OLMOE_SLURM_DIR/run), munged only if up.sh started it, and the /etc/hosts and
# /etc/slurm/slurm.conf entries it made. Safe to run when nothing is up.
#   OLMOE_SLURM_PURGE=1   also delete $OLMOE_SLURM_DIR (logs included)
set -euo pipefail

DIR=${OLMOE_SLURM_DIR:-/tmp/olmoe-slurm}
CONF=$DIR/etc/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
HOSTS_MARK="# olmoe-slurm-local"

alive() { [[ -n ${1:-} && -e /proc/$1 ]] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
# TERM, wait up to 5 s, then KILL: a daemon stuck in a dead job must not block CI's teardown.
stop_pid() {
  local p=$1 _
  alive "$p" || return 0
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 50); do alive "$p" || return 0; sleep 0.1; done
  echo "[slurm/local/down.sh] pid $p ignored SIGTERM; killing it"
  kill -KILL "$p" 2>/dev/null || true
}

if [[ -f $CONF ]] && alive "$(cat "$DIR/run/slurmctld.pid" 2>/dev/null || true)"; then
  export SLURM_CONF=$CONF
  # Jobs first, so that slurmd does not wait on their steps while shutting down.
  timeout 10 scancel --full --user=root 2>/dev/null || true
  timeout 10 scontrol shutdown 2>/dev/null || true
fi
for f in "$DIR"/run/slurm*.pid; do
  [[ -e $f ]] || continue
  stop_pid "$(cat "$f" 2>/dev/null || true)"
  rm -f "$f"
done
if [[ -f $DIR/run/munged.started-by-us ]]; then
  stop_pid "$(cat "$DIR/run/munged.started-by-us")"
  rm -f "$DIR/run/munged.started-by-us"
fi
sed -i "/$HOSTS_MARK\$/d" /etc/hosts 2>/dev/null || true
if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then rm -f "$ETC_CONF"; fi
if [[ ${OLMOE_SLURM_PURGE:-0} == 1 ]]; then rm -rf "$DIR"; fi
echo "[slurm/local/down.sh] down"
