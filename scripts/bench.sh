#!/usr/bin/env bash
# Side-by-side benchmarks, one machine, one run (a benchmark, never a timed test):
#   1. launch latency of `true`: bare fork+exec, setpriv, unshare+setpriv, bubblewrap+setpriv,
#      sudo -u, and mupilot's whole path (pilot request -> helper -> payload -> exit reported),
#      interleaved in rounds so machine noise hits every contender alike;
#   2. decision latency (authorization + mapping) with 10,000 policy lines and 10,000 bans;
#   3. supervision: payloads/s through pilot + helper + server; CPU and memory while payloads sleep;
#   4. fetch: matches/s from the server over mTLS with keep-alive, 1 and 16 pilots;
#   5. records: append rate, verify rate, `audit who` over 1,000,000 records;
#   6. grid: verifying an owner's X.509 proxy and VOMS AC, cold and cached;
#   7. PostgreSQL: matches/s and match p99 with 100,000 queued, 1 SQLite instance and 1 and 3
#      PostgreSQL instances on one database.
# Sections 2-7 are scripts/bench.d/*.sh, sourced in order with this script's variables.
# Prints a markdown table and writes it, with the machine's description, to docs/benchmarks.md.
#
#   scripts/bench.sh [--rounds R] [--per-round N] [--launch-only | --postgres-only | --only PART]
#     (default 6 rounds of 50 = 300 launches each; --launch-only runs section 1 alone and prints
#     its table without rewriting docs/benchmarks.md, for iterating on the launch path;
#     --postgres-only likewise runs section 7 alone: scripts/bench.d/60-postgres.sh;
#     --only PART runs scripts/bench.d/*-PART.sh alone, e.g. --only grid, and prints its table)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/demo-env.sh
source scripts/lib/demo-env.sh
need_root

ROUNDS=6
PER_ROUND=50
LAUNCH_ONLY=0
ONLY=
POSTGRES_ONLY=0
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --per-round) PER_ROUND=$2; shift 2 ;;
    --launch-only) LAUNCH_ONLY=1; shift ;;
    --postgres-only) POSTGRES_ONLY=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    *) die "unknown argument $1 (use --rounds R --per-round N --launch-only --postgres-only --only PART)" ;;
    esac
done

if [ "$POSTGRES_ONLY" = 1 ]; then
    log "building (release): mupilot-server, match_bench"
    cargo build --release --locked -q --bin mupilot-server --example match_bench
    BIN=$PWD/target/release
    WORK=$(mktemp -d /var/lib/mupilot-bench.XXXXXX)
    chmod 0755 "$WORK"
    EXTRA_PIDS=()
    # shellcheck disable=SC2317 # called by the trap
    pg_cleanup() {
        for p in "${EXTRA_PIDS[@]}"; do stop_pid "$p"; done
        rm -rf "$WORK"
    }
    trap pg_cleanup EXIT
    # shellcheck source=scripts/bench.d/60-postgres.sh
    source scripts/bench.d/60-postgres.sh
    exit 0
fi

apt_install bubblewrap sudo util-linux jq
log "building (release)"
cargo build --release --locked -q --bins --examples
BIN=$PWD/target/release
LB=$BIN/examples/launch_bench

if [ -n "$ONLY" ]; then
    parts=(scripts/bench.d/*-"$ONLY".sh)
    [ -e "${parts[0]}" ] || die "no part scripts/bench.d/*-$ONLY.sh (parts: $(cd scripts/bench.d && ls ./*.sh | sed 's/^..[0-9]*-//; s/\.sh$//' | tr '\n' ' '))"
    # shellcheck disable=SC1090
    source "${parts[0]}"
    exit 0
fi

WORK=$(mktemp -d /var/lib/mupilot-bench.XXXXXX)
chmod 0755 "$WORK"
EXTRA_PIDS=()
ensure_demo_accounts # the pilot account and the mapped demo accounts (scripts/lib/demo-env.sh)
cleanup() {
    for p in "${EXTRA_PIDS[@]}"; do stop_pid "$p"; done
    stop_pid "${PILOT_PID:-}"
    stop_pid "${SERVER_PID:-}"
    stop_pid "${SWITCH_PID:-}"
    [ -z "${ATTACH_CG:-}" ] || rmdir "$ATTACH_CG" 2>/dev/null || true
    rm -rf "$WORK"
    remove_demo_accounts
}
trap cleanup EXIT

U=$(id -u mpu-alice)
G=$(id -g mpu-alice)
SCRATCH=$WORK/scratch
install -d -o "$U" -g "$G" -m 0700 "$SCRATCH"

# The helper, configured by `mupilot-server init`, serving the pilot account.
"$BIN/mupilot-server" init "$WORK/vo" --listen "127.0.0.1:$(free_port)" >/dev/null
"$BIN/mupilot-switch" serve --config "$WORK/vo/switch.toml" >"$WORK/switch.log" 2>&1 &
SWITCH_PID=$!
wait_for "test -S '$WORK/vo/switch.sock'" 10 || die "helper did not start: $(cat "$WORK/switch.log")"
chmod 0644 "$WORK/vo/vo.key" # the bench client signs as the VO would; demo key only

# The VO server (sections 3 and 4), and the pilot account's files for `mupilot run`.
"$BIN/mupilot-server" serve --config "$WORK/vo/server.toml" >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
wait_for "grep -q '^listening on ' '$WORK/server.out'" 30 || die "server did not start: $(cat "$WORK/server.log")"
# shellcheck disable=SC2034 # used by scripts/bench.d/*.sh
SERVER_URL=$(sed -n 's/^listening on //p' "$WORK/server.out" | head -n1)
install -d -o mupilot -m 0700 "$WORK/vo/pilot-work"
chown mupilot "$WORK/vo/pilot.crt" "$WORK/vo/pilot.key"

# The kernel's cost of moving one process into a cgroup (mupilot's init does it once per
# payload): `sh` joining an empty cgroup, next to `sh` alone.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    ATTACH_CG=/sys/fs/cgroup/mupilot-bench-attach-$$
else
    ATTACH_CG=/sys/fs/cgroup/pids/mupilot-bench-attach-$$
fi
mkdir "$ATTACH_CG"

SETPRIV=(setpriv "--reuid=$U" "--regid=$G" --clear-groups)
declare -A CONTENDERS=(
    [bare]="true"
    [setpriv]="${SETPRIV[*]} true"
    [unshare_setpriv]="unshare -m -p -i -u -f ${SETPRIV[*]} true"
    [bwrap_setpriv]="bwrap --unshare-pid --unshare-ipc --unshare-uts --die-with-parent --ro-bind / / --tmpfs /tmp --bind $SCRATCH $SCRATCH --proc /proc --dev /dev --chdir $SCRATCH ${SETPRIV[*]} true"
    [sudo]="sudo -u mpu-alice true"
    [sh_gap]="sh -c true"
    [sh_cgroup_attach_gap]="sh -c 'echo 0 >$ATTACH_CG/cgroup.procs && exec true'"
)
# The *_gap contenders pause 50 ms (untimed) before each launch: a cgroup migration is cheap
# right after another one and costs an RCU grace period when the last one is older.
declare -A CMD_OPTS=([sh_gap]="--gap-ms 50" [sh_cgroup_attach_gap]="--gap-ms 50")
ORDER=(bare setpriv unshare_setpriv bwrap_setpriv sudo ns_floor sh_gap sh_cgroup_attach_gap mupilot)

log "launch latency: $ROUNDS rounds x $PER_ROUND launches per contender, interleaved"
for _ in $(seq 1 "$ROUNDS"); do
    for c in "${ORDER[@]}"; do
        if [ "$c" = ns_floor ]; then
            "$LB" floor "$PER_ROUND" --uid "$U" --gid "$G" >>"$WORK/$c.lat"
        elif [ "$c" = mupilot ]; then
            runuser -u mupilot -- "$LB" mupilot "$PER_ROUND" --socket "$WORK/vo/switch.sock" \
                --vo-key "$WORK/vo/vo.key" --dn "/DC=org/DC=mupilot-demo/CN=alice" --vo demo \
                >>"$WORK/$c.lat"
        else
            eval "set -- ${CONTENDERS[$c]}"
            # shellcheck disable=SC2086
            "$LB" cmd "$PER_ROUND" ${CMD_OPTS[$c]:-} -- "$@" >>"$WORK/$c.lat"
        fi
    done
    printf '.' >&2
done
echo >&2

declare -A P50 P99 N
while read -r name n p50 p99 _mean; do
    N[$name]=$n P50[$name]=$p50 P99[$name]=$p99
done < <(for c in "${ORDER[@]}"; do "$LB" stats "$WORK/$c.lat"; done)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
ms() { awk -v a="$1" 'BEGIN { printf "%.2f", a / 1000 }'; }

TABLE=$WORK/table.md
{
    echo "### Launch latency of \`true\` (${N[mupilot]} launches each, interleaved)"
    echo
    echo "| contender | p50 ms | p99 ms | p50 / mupilot p50 |"
    echo "|---|---:|---:|---:|"
    for c in "${ORDER[@]}"; do
        echo "| $c | $(ms "${P50[$c]}") | $(ms "${P99[$c]}") | $(ratio "${P50[$c]}" "${P50[mupilot]}") |"
    done
    echo
    echo "Targets: mupilot p50 <= 0.8 x bwrap_setpriv p50 (now $(ratio "${P50[mupilot]}" "${P50[bwrap_setpriv]}") x)," \
        "and <= 4 x bare p50 (now $(ratio "${P50[mupilot]}" "${P50[bare]}") x)."
    echo
    echo "\`ns_floor\` is the kernel work no launcher with mupilot's namespaces can skip, done in one" \
        "process without any helper program, cgroup, scratch, record or capability drop (fork, unshare" \
        "pid/mount/IPC/UTS, fork, / slave, /proc and /tmp mounts, uid switch, exec \`true\`):" \
        "$(ratio "${P50[ns_floor]}" "${P50[bare]}") x bare here, against the target of 4 x bare for the whole path."
    echo
    echo "\`sh_cgroup_attach_gap\` - \`sh_gap\` is the kernel's cost of moving one process into a" \
        "cgroup when no migration happened in the last 50 ms" \
        "(p50 $(awk -v a="${P50[sh_cgroup_attach_gap]}" -v b="${P50[sh_gap]}" 'BEGIN { printf "%.2f", (a - b) / 1000 }') ms):" \
        "mupilot's stage avoids it on cgroup v1 by joining through 'tasks' as a single thread (see the analysis below)."
} >"$TABLE"

if [ "$LAUNCH_ONLY" = 1 ]; then
    cat "$TABLE"
    exit 0
fi

for extra in scripts/bench.d/*.sh; do
    [ -e "$extra" ] || continue
    # Each extra section appends its own markdown to the table.
    log "section $(basename "$extra" .sh)"
    # shellcheck disable=SC1090
    source "$extra" >>"$TABLE"
done

cat "$TABLE"
{
    echo "# Benchmarks"
    echo
    echo "Produced by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d): $(nproc) cores," \
        "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)," \
        "$(uname -sr), $(awk -F: '/model name/ { print $2; exit }' /proc/cpuinfo | sed 's/^ *//')," \
        "cgroup $(if [ -f /sys/fs/cgroup/cgroup.controllers ]; then echo v2; else echo v1; fi)."
    echo "Each number is from the same run; rerun the script to reproduce."
    echo
    cat "$TABLE"
    echo
    cat scripts/bench-analysis.md
} >docs/benchmarks.md
log "wrote docs/benchmarks.md"
