#!/usr/bin/env bash
# A private one-node Slurm cluster for mupilot's tests: installs slurm-wlm and munge, writes its
# own configuration into a private directory, starts munged, slurmctld and slurmd from it, and
# stops exactly those processes again (by their pid files, never by name).
#
#   scripts/slurm.sh start    install if needed, start (no-op when already running), wait until idle
#   scripts/slurm.sh stop     cancel all jobs, stop our daemons, clean state so start works again
#   scripts/slurm.sh status   show our daemons and sinfo; exit 0 when all run, 3 otherwise
#   scripts/slurm.sh env      print `export SLURM_CONF=...` for callers (eval "$(scripts/slurm.sh env)")
#   scripts/slurm.sh selftest start, run jobs (cgroup, env, scancel, non-root user), start/stop twice
#
# Environment: MUPILOT_SLURM_DIR (default /var/lib/mupilot-slurm), MUPILOT_SLURM_TIMEOUT (60 s),
# MUPILOT_SLURM_CGROUP (auto, v1, v2, or none = no cgroup confinement; default auto).
# It does not touch /etc/slurm or the system's munged: everything lives under MUPILOT_SLURM_DIR.
set -euo pipefail

MUPILOT_LOG_TAG=slurm.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

DIR=${MUPILOT_SLURM_DIR:-/var/lib/mupilot-slurm}
TIMEOUT=${MUPILOT_SLURM_TIMEOUT:-60}
ETC=$DIR/etc
CONF=$ETC/slurm.conf
RUN=$DIR/run
LOGS=$DIR/log
STATE=$DIR/state
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_KEY=/etc/munge/munge.key
PID_MUNGED=$MUNGE_DIR/munged.pid
PID_CTLD=$RUN/slurmctld.pid
PID_SLURMD=$RUN/slurmd.pid
NODE=$(hostname -s)

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# install_packages: the Debian packages this script runs.
install_packages() {
    apt_install slurm-wlm munge
}

# port_in_use PORT: true when something listens on TCP PORT (v4 or v6), read from /proc/net.
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p="$hex" 'NR > 1 { split($2, a, ":"); if (a[2] == p && $4 == "0A") found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# pick_ports: two free TCP ports for slurmctld and slurmd, starting at a random point of 17000-18999.
pick_ports() {
    local p tries=0
    p=$((17000 + RANDOM % 2000))
    CTLD_PORT="" SLURMD_PORT=""
    while [ -z "$SLURMD_PORT" ]; do
        tries=$((tries + 1))
        [ "$tries" -gt 2000 ] && die "no free TCP port found in 17000-18999 for slurmctld/slurmd"
        p=$((p >= 18999 ? 17000 : p + 1))
        port_in_use "$p" && continue
        if [ -z "$CTLD_PORT" ]; then CTLD_PORT=$p; else SLURMD_PORT=$p; fi
    done
}

# cgroup_plugin: cgroup/v1 when v1 controllers are mounted (a hybrid layout like
# /sys/fs/cgroup/<controller> plus /sys/fs/cgroup/unified confuses slurm's autodetect),
# cgroup/v2 on a pure unified hierarchy, "none" only when MUPILOT_SLURM_CGROUP=none asks for it.
cgroup_plugin() {
    case ${MUPILOT_SLURM_CGROUP:-auto} in
    v1) echo cgroup/v1; return ;;
    v2) echo cgroup/v2; return ;;
    none) echo none; return ;;
    auto) ;;
    *) die "MUPILOT_SLURM_CGROUP='$MUPILOT_SLURM_CGROUP' must be auto, v1, v2 or none" ;;
    esac
    if [ "$(stat -f -c %T /sys/fs/cgroup)" = "cgroup2fs" ]; then
        # Slurm 22.05's cgroup/v2 asks systemd over dbus for a slurmstepd scope; without systemd
        # slurmd fails to start ("cannot connect to dbus system daemon").
        if [ ! -d /run/systemd/system ] || [ ! -S /run/dbus/system_bus_socket ]; then
            die "pure cgroup v2 without a running systemd and dbus: slurm's cgroup/v2 plugin cannot work here; run on a systemd host, or set MUPILOT_SLURM_CGROUP=none to run jobs without cgroup confinement"
        fi
        echo cgroup/v2
    elif grep -q ' cgroup ' /proc/mounts; then
        echo cgroup/v1
    else
        die "no cgroup filesystem mounted under /sys/fs/cgroup; mount cgroup v1 controllers or cgroup2 first, or set MUPILOT_SLURM_CGROUP=none"
    fi
}

# node_line: NodeName line with this host's real CPU layout and RealMemory a bit below MemTotal.
node_line() {
    local hw mem_total_mb real_mem
    hw=$(slurmd -C | head -n 1) || die "slurmd -C failed; is slurmd installed?"
    mem_total_mb=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    # Leave 5% (at least 256 MiB) for the OS so slurmd never reports less than it was promised.
    real_mem=$((mem_total_mb - (mem_total_mb / 20 > 256 ? mem_total_mb / 20 : 256)))
    hw=$(sed -E "s/^NodeName=[^ ]+/NodeName=$NODE/; s/RealMemory=[0-9]+/RealMemory=$real_mem/" <<<"$hw")
    echo "$hw NodeAddr=127.0.0.1 NodeHostname=$NODE State=UNKNOWN"
}

write_config() {
    local plugin proctrack=proctrack/cgroup task=task/cgroup,task/affinity acct=jobacct_gather/cgroup
    plugin=$(cgroup_plugin)
    if [ "$plugin" = none ]; then
        warn "MUPILOT_SLURM_CGROUP=none: jobs are tracked by process tree and NOT confined by cgroups"
        proctrack=proctrack/linuxproc task=task/affinity acct=jobacct_gather/linux
    fi
    pick_ports
    mkdir -p "$ETC" "$RUN" "$LOGS" "$STATE/ctld" "$STATE/slurmd"
    chmod 0755 "$DIR" "$ETC" "$RUN"
    : >"$ETC/plugstack.conf"
    cat >"$CONF" <<EOF
# Written by scripts/slurm.sh; rewritten on every start.
ClusterName=mupilot
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$PID_CTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$ETC/plugstack.conf
MpiDefault=none
SwitchType=switch/none
ProctrackType=$proctrack
TaskPlugin=$task
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
AccountingStorageType=accounting_storage/none
JobAcctGatherType=$acct
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
$(node_line)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    [ "$plugin" = none ] && plugin=autodetect
    cat >"$ETC/cgroup.conf" <<EOF
# Written by scripts/slurm.sh.
CgroupPlugin=$plugin
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainDevices=no
EOF
}

# start_munged: our own munged on a private socket, as the munge user, with the system key
# (created when absent).
start_munged() {
    if pid_alive "$PID_MUNGED"; then
        return 0
    fi
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile="$MUNGE_KEY"
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$PID_MUNGED"
    runuser -u munge -- munged 9>&- --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$PID_MUNGED" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        { show_logs; die "munged failed to start"; }
    wait_for "[ -S '$MUNGE_SOCKET' ] && munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" 15 ||
        { show_logs; die "munged does not answer on $MUNGE_SOCKET"; }
}

show_logs() {
    local f
    for f in "$MUNGE_DIR/munged.log" "$LOGS/slurmctld.log" "$LOGS/slurmd.log"; do
        [ -f "$f" ] || continue
        printf '===== %s (last 40 lines) =====\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
}

node_idle() {
    local st
    st=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null) || return 1
    [ "$st" = "idle" ]
}

all_running() {
    pid_alive "$PID_MUNGED" && pid_alive "$PID_CTLD" && pid_alive "$PID_SLURMD"
}

cmd_start() {
    need_root
    export SLURM_CONF=$CONF
    if all_running; then
        log "already running (SLURM_CONF=$CONF)"
        wait_for node_idle_or_busy "$TIMEOUT" || { show_logs; die "node $NODE not up"; }
        return 0
    fi
    # A partly running cluster (one daemon died) is restarted from a clean state.
    any_running && cmd_stop
    install_packages
    local t0
    t0=$(date +%s.%N)
    write_config
    local f
    for f in "$LOGS"/*.log; do [ -f "$f" ] && mv -f "$f" "$f.old"; done
    start_munged
    slurmctld -f "$CONF" -c 9>&- || { show_logs; die "slurmctld failed to start"; }
    wait_for "pid_alive '$PID_CTLD' && scontrol ping | grep -q UP" "$TIMEOUT" ||
        { show_logs; die "slurmctld not answering within ${TIMEOUT}s"; }
    slurmd -f "$CONF" 9>&- || { show_logs; die "slurmd failed to start"; }
    if ! wait_for node_idle "$TIMEOUT"; then
        sinfo -N -l >&2 || true
        show_logs
        die "node $NODE not idle within ${TIMEOUT}s; see the logs above (in $LOGS)"
    fi
    log "up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s: node $NODE idle, SLURM_CONF=$CONF"
}

node_idle_or_busy() {
    local st
    st=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null) || return 1
    case $st in idle | mix | alloc) return 0 ;; *) return 1 ;; esac
}

any_running() {
    pid_alive "$PID_MUNGED" || pid_alive "$PID_CTLD" || pid_alive "$PID_SLURMD"
}

# stop_pidfile NAME PIDFILE: SIGTERM the process named in PIDFILE, SIGKILL after 15 s.
stop_pidfile() {
    local name=$1 pf=$2 pid
    pid_alive "$pf" || { rm -f "$pf"; return 0; }
    pid=$(cat "$pf")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for "! kill -0 $pid" 15; then
        warn "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_for "! kill -0 $pid" 5 || warn "$name (pid $pid) still alive"
    fi
    rm -f "$pf"
}

# slurm_cgroups: the cgroup trees our slurmd creates for jobs (v1: one per controller; v2: one).
slurm_cgroups() {
    local d
    for d in /sys/fs/cgroup/*/slurm /sys/fs/cgroup/*/"slurm_$NODE" /sys/fs/cgroup/slurm \
        /sys/fs/cgroup/"slurm_$NODE" /sys/fs/cgroup/system.slice/slurmstepd.scope \
        /sys/fs/cgroup/system.slice/"${NODE}_slurmstepd.scope"; do
        [ -d "$d" ] && echo "$d"
    done
    return 0
}

# remove_slurm_cgroups: SIGKILL processes our Slurm left in its job cgroups (slurmstepd and
# job processes whose daemons are gone), then rmdir the empty cgroups bottom-up.
remove_slurm_cgroups() {
    local d pids
    for d in $(slurm_cgroups); do
        pids=$(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "${pids// /}" ]; then
            warn "killing processes left in $d: $pids"
            # shellcheck disable=SC2086 # one pid per word
            kill -KILL $pids 2>/dev/null || true
            sleep 0.5
        fi
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
}

no_jobs() {
    [ -z "$(squeue -h -o %i)" ]
}

cmd_stop() {
    need_root
    export SLURM_CONF=$CONF
    if pid_alive "$PID_CTLD" && [ -f "$CONF" ]; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
            # shellcheck disable=SC2086 # one job id per word
            scancel $jobs 2>/dev/null || true
            # Without slurmd nobody ends the jobs: their processes are killed through the cgroups below.
            if pid_alive "$PID_SLURMD" && ! wait_for no_jobs 30; then
                warn "jobs still listed after 30 s: $(squeue -h -o %i | tr '\n' ' ')"
            fi
        fi
    fi
    stop_pidfile slurmd "$PID_SLURMD"
    stop_pidfile slurmctld "$PID_CTLD"
    stop_pidfile munged "$PID_MUNGED"
    remove_slurm_cgroups
    rm -rf "$STATE" "$RUN" "$MUNGE_DIR/munge.socket" "$MUNGE_DIR/munge.socket.lock"
    log "stopped"
}

cmd_status() {
    local rc=0 name pf
    for name in munged:"$PID_MUNGED" slurmctld:"$PID_CTLD" slurmd:"$PID_SLURMD"; do
        pf=${name#*:}
        if pid_alive "$pf"; then
            echo "${name%%:*}: running (pid $(cat "$pf"))"
        else
            echo "${name%%:*}: not running"
            rc=3
        fi
    done
    if [ "$rc" -eq 0 ]; then
        SLURM_CONF=$CONF sinfo -N -l || rc=3
    fi
    return "$rc"
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

# selftest: the checks this cluster is meant to pass, printed as PASS/FAIL lines and a
# "N passed, N failed" summary; exit 1 on any failure. Starts the cluster if needed and stops it
# at the end only if it started it. Creates and removes the user mpt-inf-u.
cmd_selftest() {
    need_root
    local passed=0 failed=0 started_here=0 out job user=mpt-inf-u tmp
    check() {
        if "$@"; then passed=$((passed + 1)); echo "PASS: $CHECK"; else failed=$((failed + 1)); echo "FAIL: $CHECK"; fi
    }
    pid_alive "$PID_CTLD" || started_here=1
    CHECK="start" check "$0" start
    export SLURM_CONF=$CONF
    tmp=$(mktemp -d /tmp/mupilot-slurm-selftest.XXXXXX)
    chmod 0755 "$tmp"
    job=$(sbatch --parsable -c 2 --mem=1G -t 3 -o "$tmp/out.txt" --wrap 'cat /proc/self/cgroup; env | grep SLURM') || job=""
    CHECK="batch job $job finishes" check wait_for "[ -z \"\$(squeue -h -j $job 2>/dev/null)\" ] && [ -s $tmp/out.txt ]" 60
    out=$(cat "$tmp/out.txt" 2>/dev/null || true)
    CHECK="job cgroup is /slurm*/uid_0/job_$job/" check grep -Eq ":/slurm[^/]*/uid_0/job_$job/" <<<"$out"
    CHECK="SLURM_CPUS_ON_NODE=2" check grep -qx 'SLURM_CPUS_ON_NODE=2' <<<"$out"
    CHECK="SLURM_MEM_PER_NODE=1024" check grep -qx 'SLURM_MEM_PER_NODE=1024' <<<"$out"
    job=$(sbatch --parsable -t 3 -o /dev/null --wrap 'sleep 300') || job=""
    CHECK="sleeping job $job runs" check wait_for "[ \"\$(squeue -h -j $job -o %T)\" = RUNNING ]" 30
    scancel "$job" || true
    CHECK="scancel ends job $job" check wait_for "[ -z \"\$(squeue -h -j $job 2>/dev/null)\" ]" 30
    userdel -r "$user" >/dev/null 2>&1 || true
    useradd -m "$user"
    local home
    home=$(getent passwd "$user" | cut -d: -f6)
    job=$(runuser -u "$user" -- env SLURM_CONF="$CONF" sbatch --parsable -t 2 -D "$home" -o "$home/out.txt" --wrap 'id -un') || job=""
    CHECK="job $job of a non-root user runs as that user" check wait_for "[ \"\$(cat $home/out.txt 2>/dev/null)\" = $user ]" 60
    wait_for "[ -z \"\$(squeue -h -u $user)\" ]" 30 || true
    userdel -r "$user" >/dev/null 2>&1 || true
    rm -rf "$tmp"
    if [ "$started_here" = 1 ]; then
        local i
        for i in 1 2; do
            CHECK="stop ($i)" check "$0" stop
            CHECK="start ($i)" check "$0" start
        done
        CHECK="final stop" check "$0" stop
    fi
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

# with_lock CMD: run CMD holding $DIR/.lock, so concurrent start/stop calls do not interleave.
with_lock() {
    need_root
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "another scripts/slurm.sh holds $DIR/.lock for over 120 s"
    "$@"
}

case ${1:-} in
start) with_lock cmd_start ;;
stop) with_lock cmd_stop ;;
status) cmd_status ;;
selftest) cmd_selftest ;;
env) cmd_env ;;
*) usage ;;
esac
