#!/usr/bin/env bash
# Runs inside a VM started by scripts/bench.d/20-supervision.sh (scripts/vm-test.sh --smp N):
# the whole system (server, helper, a pilot whose slot is the guest's N cores) with N sleeping
# payloads, so a pilot supervising 64 payloads is measured on a host with fewer cores.
# Prints KEY=VALUE lines: PAYLOADS, PILOT_RSS_KIB, PILOT_CPU_PCT, HELPER_RSS_KIB, LOOP_SECONDS
# (a fixed bash loop, to relate the emulated CPU's speed to the host's).
#
#   BIN=<dir of the release binaries> pilot-slot.sh N
set -euo pipefail
N=$1
: "${BIN:?BIN names the directory of the release binaries}"
say() { echo "pilot-slot: $*" >&2; }
wait_for() { # CMD SECONDS [PID that must stay alive]
    local i
    for i in $(seq 1 $(($2 * 10))); do
        eval "$1" && return 0
        [ -z "${3:-}" ] || kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
# Processes running `sleep` as uid $1.
sleepers() {
    local n=0 p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = sleep ] || continue
        awk -v u="$1" '/^Uid:/ { exit !($2 == u) }' "$p/status" 2>/dev/null && n=$((n + 1))
    done
    echo "$n"
}
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

for a in mupilot mpu-alice mpu-bob; do
    useradd --no-create-home --shell /usr/sbin/nologin --home-dir /nonexistent "$a"
done
# Not below /tmp: the helper refuses a scratch root inside the per-payload private dirs.
W=/var/lib/mupilot-bench
mkdir -p "$W"
chmod 0755 "$W"
"$BIN/mupilot-server" init "$W/vo" --listen 127.0.0.1:47001 >/dev/null
# The guest's Debian kernel has no Landlock scoping (ABI < 6): the helper's default refuses
# network = "host" there; these payloads only sleep, a loopback-only namespace each is fine.
sed -i 's/^\[sandbox\]$/[sandbox]\nipc_fallback = "loopback"/' "$W/vo/switch.toml"
grep -q '^ipc_fallback = "loopback"$' "$W/vo/switch.toml" || { say "switch.toml has no [sandbox] table"; exit 1; }
"$BIN/mupilot-switch" serve --config "$W/vo/switch.toml" >"$W/switch.log" 2>&1 &
SWITCH=$!
wait_for "[ -S '$W/vo/switch.sock' ]" 120 "$SWITCH" || { say "helper did not start: $(cat "$W/switch.log")"; exit 1; }
"$BIN/mupilot-server" serve --config "$W/vo/server.toml" >"$W/server.out" 2>"$W/server.log" &
SERVER=$!
wait_for "grep -q '^listening on ' '$W/server.out'" 120 "$SERVER" || { say "server did not start: $(cat "$W/server.log")"; exit 1; }
say "helper and server up after ${SECONDS} s"
URL=$(sed -n 's/^listening on //p' "$W/server.out" | head -n1)
mkdir -p "$W/vo/pilot-work"
chown mupilot "$W/vo/pilot-work" "$W/vo/pilot.crt" "$W/vo/pilot.key"
chmod 0700 "$W/vo/pilot-work"
# Launches take long in an emulated 64-CPU guest: wall time for all of them to overlap.
"$BIN/examples/match_bench" fill "$URL" "$W/vo" "$N" 3600 -- /bin/sleep 3600

# The pilot in a batch job's cgroup of its own, as a batch system would start it.
mkdir /sys/fs/cgroup/bench-job
(
    echo "$BASHPID" >/sys/fs/cgroup/bench-job/cgroup.procs
    exec setpriv --reuid=mupilot --regid=mupilot --init-groups \
        "$BIN/mupilot" run --config "$W/vo/pilot.toml" --idle-timeout 5
) >"$W/pilot.log" 2>&1 &
PILOT=$!
A=$(id -u mpu-alice)
wait_for "[ \$(sleepers $A) -ge $N ]" 600 "$PILOT" || { say "$(sleepers "$A") of $N payloads started: $(tail -n 20 "$W/pilot.log")"; exit 1; }
say "$N payloads running after ${SECONDS} s"
sleep 5
t0=$(ticks "$PILOT")
sleep 10
t1=$(ticks "$PILOT")
echo "PAYLOADS=$(sleepers "$A")"
echo "PILOT_RSS_KIB=$(rss_kib "$PILOT")"
# /proc/PID/stat counts in USER_HZ, 100 on Linux (the guest has no getconf).
echo "PILOT_CPU_PCT=$(awk -v t=$((t1 - t0)) 'BEGIN { printf "%.2f", t / 100 / 10 * 100 }')"
echo "HELPER_RSS_KIB=$(rss_kib "$SWITCH")"
# How much slower this emulated CPU is than the host's: the same bash loop is timed there.
t0=$EPOCHREALTIME
bash -c 'for ((i = 0; i < 200000; i++)); do :; done'
t1=$EPOCHREALTIME
echo "LOOP_SECONDS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
# The VM is thrown away; the pilot is stopped only so its last log lines say how it ended.
kill -TERM "$PILOT"
wait "$PILOT" || true
