#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for testing slurm/*.sh against slurmctld/slurmd.
#
#   tools/slurm_local.sh up   [DIR]   install (if missing), configure, start, wait until idle
#   tools/slurm_local.sh down [DIR]   cancel its jobs, stop exactly the daemons it started
#   tools/slurm_local.sh status [DIR] daemons and nodes
#   tools/slurm_local.sh env  [DIR]   prints `export SLURM_CONF=...` for sbatch/squeue/scontrol
#
# DIR (default $GEM_SLURM_DIR, else /tmp/megatron-gem-slurm) holds everything: slurm.conf, a
# munge key and socket, state, spool, logs and pid files. Nothing is written to /etc/slurm or
# /etc/munge; the only system file touched is /etc/hosts: one marked line naming the nodes,
# added only when the names do not resolve yet, removed again by `down`. Needs root (the
# daemons run as root, munged as the munge user).
#
# Layout: munged, slurmctld, and one slurmd per emulated node (`slurmd -N nodeK`), all on
# 127.0.0.1 with their own ports. Settings that work on one machine without cgroups:
# linuxproc process tracking, no task plugin, no accounting, cons_tres/CR_Core.
#
# Environment: GEM_SLURM_NODES (2); GEM_SLURM_CPUS (CPUs per node, default nproc);
# GEM_SLURM_PORT (slurmctld's port, 16817; node K's slurmd listens on GEM_SLURM_PORT+K);
# GEM_SLURM_GPUS (emulated "gpu" GRES per node, 8: the production headers' --gpus-per-node
# can be scheduled here; there is no device behind it).
#
# Idempotent: `up` on a running cluster only re-checks it; `down` on a stopped one does nothing.
# Exit status: 0 done; 3 this machine cannot host it (not root, apt missing or failing); else 1.
set -euo pipefail

CMD=${1:-}
DIR=${2:-${GEM_SLURM_DIR:-/tmp/megatron-gem-slurm}}
NODES=${GEM_SLURM_NODES:-2}
CPUS=${GEM_SLURM_CPUS:-$(nproc)}
GPUS=${GEM_SLURM_GPUS:-8}
CTLD_PORT=${GEM_SLURM_PORT:-16817}
NODE_PORT0=$((CTLD_PORT + 1))
HOSTS_MARK="# megatron-gem slurm_local $DIR"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "[slurm_local] $*" >&2; }
die() { log "error: $*"; exit 1; }
# Exit 3: this machine cannot host the cluster (not root, nothing to install with). Callers
# such as the test suite skip on 3 and fail on anything else.
cannot() { log "cannot: $*"; exit 3; }

node_names() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

# ---- installing -------------------------------------------------------------------------------

have_binaries() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1

apt_retry() {
  # Another apt run (e.g. a parallel set-up) holds the lock: wait for it instead of failing.
  local try
  for try in $(seq 1 60); do
    if DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=120 "$@"; then return 0; fi
    if ! fuser /var/lib/apt/lists/lock /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock >/dev/null 2>&1; then
      return 1
    fi
    log "apt is busy (another apt-get); waiting ($try)"
    sleep 5
  done
  return 1
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null || cannot "slurm/munge are not installed and there is no apt-get to install them"
  log "installing ${PACKAGES[*]} (Debian packages)"
  apt_retry update >&2 || cannot "apt-get update failed"
  apt_retry install -y --no-install-recommends "${PACKAGES[@]}" >&2 || cannot "apt-get install ${PACKAGES[*]} failed"
  have_binaries || die "installed ${PACKAGES[*]} but the daemons are still missing"
}

# ---- /etc/hosts -------------------------------------------------------------------------------

ensure_hosts() {
  local missing="" n
  for n in $(node_names); do getent hosts "$n" >/dev/null || missing+=" $n"; done
  [ -z "$missing" ] && return 0
  log "adding to /etc/hosts: 127.0.0.1$missing"
  # Append in place (no rename): /etc/hosts is often a bind mount in containers.
  echo "127.0.0.1$missing $HOSTS_MARK" >>/etc/hosts
}

remove_hosts() {
  grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
  local kept
  kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts
}

# ---- pid files --------------------------------------------------------------------------------

# pid_alive FILE NAME: the pid in FILE is running and is the daemon NAME (not a recycled pid).
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(tr -dc 0-9 <"$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# stop_daemons FILE:NAME...: SIGTERM to each live one at once, then wait (SIGKILL after 10 s).
stop_daemons() {
  local spec file name pid i pids=()
  for spec in "$@"; do
    file=${spec%%:*} name=${spec##*:}
    if pid_alive "$file" "$name"; then
      pid=$(tr -dc 0-9 <"$file")
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$file"
  done
  for pid in "${pids[@]}"; do
    for i in $(seq 1 100); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
      log "pid $pid ignored SIGTERM for 10 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

# ---- configuration ----------------------------------------------------------------------------

write_configs() {
  local host ports gres_line="" gres_types="" i
  host=$(hostname)
  ports="[$NODE_PORT0-$((NODE_PORT0 + NODES - 1))]"
  [ "$NODES" -eq 1 ] && ports=$NODE_PORT0
  if [ "$GPUS" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    gres_line="Gres=gpu:$GPUS"
    # Emulated GPUs: slurmd drops a "gpu" GRES without device files and wants character
    # devices, so the names are links to /dev/null. Jobs get scheduled and see
    # CUDA_VISIBLE_DEVICES; there is no device behind it.
    mkdir -p "$DIR/fakegpu"
    for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$DIR/fakegpu/nvidia$i"; done
    echo "NodeName=node[1-$NODES] Name=gpu File=$DIR/fakegpu/nvidia[0-$((GPUS - 1))]" >"$DIR/gres.conf"
  else
    : >"$DIR/gres.conf"
  fi
  cat >"$DIR/slurm.conf.new" <<EOF
# Written by tools/slurm_local.sh: a test cluster of $NODES emulated nodes on $host.
ClusterName=gemlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/pid/slurmctld.pid
SlurmdPidFile=$DIR/pid/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every second (defaults 60/30 s): a requeued job restarts promptly.
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MinJobAge=4
KillWait=10
SlurmdParameters=config_overrides
$gres_types
NodeName=node[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports CPUs=$CPUS $gres_line State=UNKNOWN
PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$DIR/slurm.conf.new" "$DIR/slurm.conf"
}

make_dirs() {
  local n
  mkdir -p "$DIR"/{state,log,pid,munge}
  for n in $(node_names); do mkdir -p "$DIR/spool/$n"; done
  # munged runs as the munge user: it must reach its key and socket, and it refuses
  # directories that others can write.
  chmod 0755 "$DIR"
  chown munge:munge "$DIR/munge"
  chmod 0755 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$DIR/munge/munge.key"
    chmod 0400 "$DIR/munge/munge.key"
  fi
}

# ---- up / down --------------------------------------------------------------------------------

wait_for() {  # wait_for SECONDS COMMAND...: true once COMMAND succeeds, false on time-out
  local secs=$1 i
  shift
  for i in $(seq 1 $((secs * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  if echo "$states" | grep -q -E ' (inval|drain|drained|draining)$'; then
    sinfo -N -R >&2 || true
    die "a node was rejected (reason above); logs in $DIR/log"
  fi
  [ "$(echo "$states" | grep -c ' idle$')" -eq "$NODES" ]
}

start_munged() {
  pid_alive "$DIR/pid/munged.pid" munged && return 0
  rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
  log "starting munged"
  runuser -u munge -- munged \
    --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" ||
    die "munged did not start; see $DIR/munge/munged.log"
  wait_for 10 test -s "$DIR/munge/munged.pid" || die "munged wrote no pid file"
  # munged runs unprivileged, so its own pid file lives in its directory; keep a copy with
  # the others so `down` finds every daemon in one place.
  cp "$DIR/munge/munged.pid" "$DIR/pid/munged.pid"
  wait_for 10 munge --socket="$DIR/munge/munge.socket" -n || die "munged does not answer"
}

start_slurmctld() {
  pid_alive "$DIR/pid/slurmctld.pid" slurmctld && return 0
  log "starting slurmctld (port $CTLD_PORT)"
  # -c: no controller was running, so no job of ours is either; start from a clean state
  # (a node drained by an earlier, different configuration would otherwise stay drained).
  slurmctld -c || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  wait_for 20 scontrol ping || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
}

start_slurmd() {  # start_slurmd NODE
  pid_alive "$DIR/pid/slurmd.$1.pid" slurmd && return 0
  log "starting slurmd -N $1"
  slurmd -N "$1" || die "slurmd -N $1 did not start; see $DIR/log/slurmd.$1.log"
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || cannot "needs root (slurmd runs jobs as any user; munged as munge)"
  install_packages
  ensure_hosts
  make_dirs
  write_configs
  export SLURM_CONF="$DIR/slurm.conf"
  start_munged
  start_slurmctld
  local n
  for n in $(node_names); do start_slurmd "$n"; done
  local i
  for i in $(seq 1 600); do nodes_idle && break; sleep 0.1; done
  if ! nodes_idle; then
    sinfo -N >&2 || true
    die "nodes did not become idle within 60 s; logs in $DIR/log"
  fi
  log "up: $NODES nodes x $CPUS CPUs idle; export SLURM_CONF=$SLURM_CONF"
}

no_live_jobs() { [ -z "$(squeue -h -t running,completing,suspended -o %i 2>/dev/null)" ]; }

cmd_down() {
  export SLURM_CONF="$DIR/slurm.conf"
  local jobs=()
  pid_alive "$DIR/pid/slurmctld.pid" slurmctld && mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
  if [ "${#jobs[@]}" -gt 0 ]; then
    # Jobs' processes belong to slurmstepd, not to slurmd: end them before the daemons go.
    log "cancelling jobs: ${jobs[*]}"
    scancel --full --signal=KILL "${jobs[@]}" 2>/dev/null || true
    scancel "${jobs[@]}" 2>/dev/null || true
    wait_for 30 no_live_jobs ||
      log "warning: jobs still listed after 30 s"
  fi
  local f daemons=("$DIR/pid/slurmctld.pid:slurmctld")
  for f in "$DIR"/pid/slurmd.*.pid; do
    [ -e "$f" ] && daemons+=("$f:slurmd")
  done
  stop_daemons "${daemons[@]}"
  stop_daemons "$DIR/pid/munged.pid:munged"  # last: the others authenticate through it
  remove_hosts
  log "down ($DIR)"
}

cmd_status() {
  export SLURM_CONF="$DIR/slurm.conf"
  local f name
  for f in "$DIR"/pid/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    if pid_alive "$f" "${name%%.*}"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: stopped"; fi
  done
  sinfo -N 2>/dev/null || echo "slurmctld: not answering"
}

case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$DIR/slurm.conf" ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
