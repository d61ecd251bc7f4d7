#!/usr/bin/env bash
# Where mupilot's launch time goes: runs N launches of `true` through a real helper (as
# scripts/bench.sh does) under `perf record -a -g -e sched:sched_switch`, then attributes the
# time every thread spent blocked to the kernel functions on its stack (cgroup migration, RCU
# grace periods, fsync, discard, vfork). A profile, never a test; the evidence behind
# scripts/bench-analysis.md.
#
#   scripts/bench-profile.sh [N]     (default 30 launches; run after scripts/bench.sh built)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/demo-env.sh
source scripts/lib/demo-env.sh
need_root
N=${1:-30}
apt_install linux-perf python3
BIN=$PWD/target/release
LB=$BIN/examples/launch_bench
[ -x "$LB" ] || die "$LB is missing: run scripts/bench.sh (or cargo build --release --examples) first"

WORK=$(mktemp -d /var/lib/mupilot-profile.XXXXXX)
chmod 0755 "$WORK"
created=()
for a in mupilot mpu-alice; do
    if ! getent passwd "$a" >/dev/null; then
        useradd --no-create-home --shell /usr/sbin/nologin --home-dir /nonexistent "$a"
        created+=("$a")
    fi
done
cleanup() {
    stop_pid "${SWITCH_PID:-}"
    rm -rf "$WORK"
    for a in "${created[@]}"; do userdel "$a" 2>/dev/null || true; done
}
trap cleanup EXIT

"$BIN/mupilot-server" init "$WORK/vo" --listen "127.0.0.1:$(free_port)" >/dev/null
"$BIN/mupilot-switch" serve --config "$WORK/vo/switch.toml" >"$WORK/switch.log" 2>&1 &
SWITCH_PID=$!
wait_for "test -S '$WORK/vo/switch.sock'" 20 || die "helper did not start: $(cat "$WORK/switch.log")"
chmod 0644 "$WORK/vo/vo.key"

log "recording $N launches"
perf record -q -a -g -e sched:sched_switch -o "$WORK/perf.data" -- \
    runuser -u mupilot -- "$LB" mupilot "$N" --socket "$WORK/vo/switch.sock" \
    --vo-key "$WORK/vo/vo.key" --dn "/DC=org/DC=mupilot-demo/CN=alice" --vo demo >"$WORK/lat"
"$LB" stats "$WORK/lat" | awk '{ printf "launches %s p50 %.2f ms p99 %.2f ms\n", $2, $3 / 1000, $4 / 1000 }'
perf script -i "$WORK/perf.data" -F comm,pid,tid,time,event,trace,ip,sym 2>/dev/null >"$WORK/sched.txt"

N=$N python3 - "$WORK/sched.txt" <<'EOF'
# Blocked time per (thread name, state, kernel functions of interest), from each switch-out to
# the thread's next switch-in; per launch = total / N.
import collections, os, re, sys

WATCH = ["synchronize_rcu_normal", "percpu_down_write", "cgroup_procs_write_start",
         "kernel_clone", "ext4_sync_file", "file_write_and_wait_range", "blkdev_issue_flush",
         "blkdev_issue_discard", "do_rmdir", "do_unlinkat", "free_ipc", "zap_pid_ns_processes"]
n = int(os.environ["N"])
out, total, count = {}, collections.defaultdict(float), collections.Counter()
for block in open(sys.argv[1]).read().split("\n\n"):
    lines = block.strip().split("\n")
    head = re.search(r"\s([\d.]+): sched:sched_switch: prev_comm=(.*?) prev_pid=(\d+) .*"
                     r"prev_state=(\S+) ==> next_comm=.*? next_pid=(\d+)", lines[0])
    if not head:
        continue
    t, comm, pid, state, nxt = float(head[1]), head[2], head[3], head[4], head[5]
    if nxt in out:
        t0, key = out.pop(nxt)
        total[key] += t - t0
        count[key] += 1
    if state not in ("D", "S"):
        continue
    frames = [re.sub(r"\+0x[0-9a-f]+", "", f.split()[1]) for f in lines[1:] if len(f.split()) > 1]
    seen = [f for f in WATCH if f in frames]
    if seen:
        out[pid] = (t, f"{re.sub(r'[0-9]+$', '', comm)[:14]} {state} {' < '.join(seen)}")
print(f"{'ms/launch':>10} {'count':>6}  thread state kernel functions")
for key, v in sorted(total.items(), key=lambda kv: -kv[1])[:20]:
    print(f"{v * 1000 / n:10.2f} {count[key]:6d}  {key}")
EOF
