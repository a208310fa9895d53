#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   bash tests/slurm/cluster.sh up       install (if missing), configure, start; wait until the node is idle
#   bash tests/slurm/cluster.sh status   exit 0 if the daemons started by `up` run and the node answers
#   bash tests/slurm/cluster.sh down     stop exactly the daemons `up` started (pids in the state dir)
#
# Needs root and apt-get (Debian/Ubuntu); exit status 3 means SLURM cannot be set up here. No
# systemd needed: munged, slurmctld and slurmd are started by hand, each recorded in
# $STATE/<daemon>.pid. `up` is idempotent: when the cluster it started is still up and healthy
# (and was started by this version of the script) it does nothing. `make test` runs `up`.
# The node advertises two stand-in GPUs (count-only gres backed by copies of /dev/null), so that
# rules with `resources: gpu=1` are scheduled exactly as on a real GPU cluster; they run on CPU.
# There is no accounting daemon (so no `sacct`): the test profile overlay polls `squeue` instead,
# which is why MinJobAge is long (finished jobs must stay visible to squeue).
set -euo pipefail

STATE=${SUBMERGE_SLURM_STATE:-/run/submerge-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
GRES_CONF=$CONF_DIR/gres.conf
MARK="# written by submerge tests/slurm/cluster.sh"
PARTITION=debug
NGPU=2
GPU_DEV_PREFIX=/dev/submerge-gpu   # stand-in GPU devices: /dev/submerge-gpu0, /dev/submerge-gpu1
HOST=$(hostname -s)

log() { echo "cluster.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# Exit status 3: SLURM cannot be installed on this machine (no root, no apt-get, no package
# mirror). tests/test_slurm.py skips, loudly, only in this case; any other failure fails it.
unavailable() { log "UNAVAILABLE: $*"; exit 3; }

# --- pids of the daemons we started -------------------------------------------------------------
# A pid file counts only while its process is alive and runs the expected program.
our_pid() {  # our_pid NAME -> prints the pid if alive
    local name=$1 pid
    [[ -r $STATE/$name.pid ]] || return 1
    pid=$(<"$STATE/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    echo "$pid"
}

# Is any process called NAME running? (/proc directly: bare images have no pgrep)
running() { grep -qxF "$1" /proc/[0-9]*/comm 2>/dev/null; }

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1; }

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# --- install ------------------------------------------------------------------------------------
install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sinfo sbatch munged munge; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    ((EUID == 0)) || unavailable "slurm/munge are not installed and I am not root (cannot apt-get)"
    command -v apt-get >/dev/null || unavailable "slurm/munge are not installed and there is no apt-get"
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || unavailable "apt-get update failed (no package mirror reachable?)"
    # Services cannot start here (no systemd); the post-install scripts only say so.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || unavailable "apt-get install slurmctld slurmd slurm-client munge failed"
}

# --- configuration ------------------------------------------------------------------------------
write_config() {
    local real_mem cpus tmp
    # RealMemory must not exceed what slurmd measures, or the node is drained ("Low RealMemory").
    real_mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [[ -n $real_mem ]] || die "slurmd -C did not report RealMemory"
    real_mem=$((real_mem * 8 / 10))
    cpus=$(nproc)
    ((cpus > 2)) && cpus=2

    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a real SLURM configuration"
    fi
    mkdir -p "$CONF_DIR"
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARK
ClusterName=submerge
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue for an hour: the test profile polls squeue (no sacct here).
MinJobAge=3600
ReturnToService=2
# Every task records the GPUs SLURM gave it (tests/test_slurm.py reads $STATE/log/tasks.log).
TaskProlog=$STATE/task-prolog.sh
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem Gres=gpu:$NGPU State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    install -m 0644 "$tmp" "$CONF"
    # shellcheck disable=SC2016  # expanded by the task, not here
    printf '#!/bin/sh\necho "job=$SLURM_JOB_ID step=${SLURM_STEP_ID:-batch} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}" >>%s\n' \
        "$STATE/log/tasks.log" >"$tmp"
    install -m 0755 "$tmp" "$STATE/task-prolog.sh"
    printf '%s\nName=gpu File=%s[0-%d]\n' "$MARK" "$GPU_DEV_PREFIX" $((NGPU - 1)) >"$tmp"
    install -m 0644 "$tmp" "$GRES_CONF"
    rm -f "$tmp"
}

prepare_dirs() {
    local i
    mkdir -p "$STATE/log" /var/spool/slurmctld /var/spool/slurmd /run/slurm /run/munge
    touch "$STATE/log/slurmctld.log" "$STATE/log/tasks.log"
    chmod 0666 "$STATE/log/tasks.log"
    chown slurm: /var/spool/slurmctld "$STATE/log/slurmctld.log"
    chown munge: /run/munge
    chmod 0755 /run/munge
    # Stand-in GPUs: character devices with /dev/null's numbers (1, 3). Without a File= the node
    # would go INVAL and GPU jobs would pend forever.
    for ((i = 0; i < NGPU; i++)); do
        [[ -c $GPU_DEV_PREFIX$i ]] || mknod -m 0666 "$GPU_DEV_PREFIX$i" c 1 3
    done
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge: /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
}

# --- start / stop -------------------------------------------------------------------------------
# Each daemon runs in the foreground of its own session; $! is then the daemon itself.
start_daemon() {  # start_daemon NAME CMD...
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT CMD...
    local limit=$1 what=$2 t
    shift 2
    for ((t = 0; t < limit * 5; t++)); do
        "$@" && return 0
        sleep 0.2
    done
    die "$what not ready after ${limit}s (logs: $STATE/log/)"
}

node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated) ]]; }
slurmctld_answers() { scontrol ping 2>/dev/null | grep -q UP; }

start_all() {
    # Ours were stopped before; a munged that answers now is the system's (e.g. from systemd).
    if munge_works; then
        log "using the munged that is already running (not started by me)"
    else
        start_daemon munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
        wait_for 10 munged munge_works
    fi
    running slurmctld && die "a slurmctld not started by me is running; stop it first"
    running slurmd && die "a slurmd not started by me is running; stop it first"
    start_daemon slurmctld slurmctld -D
    wait_for 20 slurmctld slurmctld_answers
    start_daemon slurmd slurmd -D
    wait_for 30 "node $HOST" node_ready
}

stop_all() {
    local name pid t
    for name in slurmd slurmctld munged; do
        if pid=$(our_pid "$name"); then
            kill "$pid"
            for ((t = 0; t < 50; t++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            log "stopped $name (pid $pid)"
        fi
        rm -f "$STATE/$name.pid"
    done
}

healthy() {
    local name
    for name in slurmctld slurmd; do
        our_pid "$name" >/dev/null || return 1
    done
    munge_works && node_ready
}

# --- commands -----------------------------------------------------------------------------------
cmd_up() {
    local start=${EPOCHREALTIME//[.,]/}
    if command -v sinfo >/dev/null && healthy \
        && [[ $(cat "$STATE/script.sha256" 2>/dev/null) == "$(script_hash)" ]]; then
        log "already up: node $HOST is $(node_state) (check took $(elapsed "$start") s)"
        return 0
    fi
    ((EUID == 0)) || unavailable "must run as root to start the cluster"
    install_packages
    mkdir -p "$STATE"
    stop_all  # whatever is left of an earlier, broken start
    write_config
    prepare_dirs
    start_all
    script_hash >"$STATE/script.sha256"
    log "up: node $HOST is $(node_state), partition $PARTITION, $NGPU stand-in GPUs (setup took $(elapsed "$start") s)"
}

# A cluster started by an older version of this script is restarted with the current configuration.
script_hash() { sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1; }

elapsed() {  # elapsed START_MICROSECONDS -> seconds with one decimal
    local d=$((${EPOCHREALTIME//[.,]/} - $1))
    printf '%d.%d' $((d / 1000000)) $((d / 100000 % 10))
}

cmd_status() {
    if command -v sinfo >/dev/null && healthy; then
        sinfo -N -o '%N %T %c %m %G'
        return 0
    fi
    log "not up"
    return 1
}

case ${1:-} in
    up) cmd_up ;;
    down) stop_all ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
