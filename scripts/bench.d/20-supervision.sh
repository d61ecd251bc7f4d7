# Section 3 of scripts/bench.sh (sourced): supervision cost. Payloads/s that one pilot and the
# helper sustain with short payloads (real server, pilot, helper); CPU and memory of the helper
# while 64 sleeping payloads run, and of a pilot while it supervises a full slot and while it
# supervises 64 (in a 64-CPU VM when this host has fewer cores).
# shellcheck shell=bash

CLK_TCK=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks (fields after the parenthesised command name).
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
pss_kib() { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# Descendants of PID (any depth) running the given executable.
descendants_running() {
    local root=$1 exe=$2
    ps -e -o pid=,ppid= | awk -v r="$root" '
        { parent[$1] = $2; pids[NR] = $1 }
        END { for (i in pids) { p = pids[i]; q = parent[p]
              while (q != "" && q != 0 && q != 1) { if (q == r) { print p; break } q = parent[q] } } }' |
        while read -r p; do [ "$(readlink "/proc/$p/exe" 2>/dev/null)" = "$exe" ] && echo "$p"; done
}
sum_ticks() { local s=0 p; for p in "$@"; do s=$((s + $(ticks "$p"))); done; echo "$s"; }
sum_pss() { local s=0 p; for p in "$@"; do s=$((s + $(pss_kib "$p"))); done; echo "$s"; }
cpu_pct() { awk -v t="$1" -v hz="$CLK_TCK" -v s="$2" 'BEGIN { printf "%.2f", t / hz / s * 100 }'; }
SAMPLE=10

# a) Short payloads through the whole system: 200 `true` payloads, one pilot.
SHORT=200
ends() { grep -c '"event":"end"' "$WORK/vo/audit.jsonl" || true; }
"$BIN/examples/match_bench" fill "$SERVER_URL" "$WORK/vo" "$SHORT" -- /bin/true
e0=$(ends)
t0=$(date +%s.%N)
runuser -u mupilot -- "$BIN/mupilot" run --config "$WORK/vo/pilot.toml" --idle-timeout 2 \
    >"$WORK/pilot-short.log" 2>&1 || die "pilot failed: $(tail -n 20 "$WORK/pilot-short.log")"
t1=$(date +%s.%N)
ran=$(($(ends) - e0))
[ "$ran" -eq "$SHORT" ] || die "the pilot ran $ran of $SHORT payloads: $(tail -n 20 "$WORK/pilot-short.log")"
short_rate=$(awk -v n="$SHORT" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", n / (b - a - 2) }')
short_wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')

# b) The helper while 64 payloads sleep (launched through it directly: one pilot's slot on
#    this host is smaller than 64 cores).
HOLD=64
runuser -u mupilot -- "$LB" hold "$HOLD" 40 --socket "$WORK/vo/switch.sock" \
    --vo-key "$WORK/vo/vo.key" --dn "/DC=org/DC=mupilot-demo/CN=alice" --vo demo \
    >"$WORK/hold.out" 2>"$WORK/hold.err" &
HOLD_PID=$!
EXTRA_PIDS+=("$HOLD_PID")
wait_for "grep -q '^started $HOLD' '$WORK/hold.out'" 30 || die "payloads did not start: $(cat "$WORK/hold.err")"
sleep 2
mapfile -t SUPERVISORS < <(descendants_running "$SWITCH_PID" "$BIN/mupilot-switch")
h0=$(ticks "$SWITCH_PID")
s0=$(sum_ticks "${SUPERVISORS[@]}")
sleep "$SAMPLE"
h1=$(ticks "$SWITCH_PID")
s1=$(sum_ticks "${SUPERVISORS[@]}")
helper_rss=$(rss_kib "$SWITCH_PID")
sup_pss=$(sum_pss "${SUPERVISORS[@]}")
sup_rss_one=$(rss_kib "${SUPERVISORS[0]}")
helper_cpu=$(cpu_pct $((h1 - h0)) "$SAMPLE")
sup_cpu=$(cpu_pct $((s1 - s0)) "$SAMPLE")
wait "$HOLD_PID" || die "hold failed: $(cat "$WORK/hold.err")"

# c) A pilot supervising a full slot of sleeping payloads.
SLOT=$(nproc)
"$BIN/examples/match_bench" fill "$SERVER_URL" "$WORK/vo" "$SLOT" -- /bin/sleep 25
runuser -u mupilot -- "$BIN/mupilot" run --config "$WORK/vo/pilot.toml" --idle-timeout 2 \
    >"$WORK/pilot-hold.log" 2>&1 &
PILOT_PID=$!
wait_for "[ \$(pgrep -c -u mpu-alice -x sleep || true) -ge $SLOT ]" 30 || die "pilot payloads did not start: $(tail -n 20 "$WORK/pilot-hold.log")"
sleep 2
# runuser forks the pilot: measure the mupilot process itself.
PILOT_REAL=$(descendants_running "$PILOT_PID" "$BIN/mupilot" | head -n1)
PILOT_REAL=${PILOT_REAL:-$PILOT_PID}
p0=$(ticks "$PILOT_REAL")
sleep "$SAMPLE"
p1=$(ticks "$PILOT_REAL")
pilot_rss=$(rss_kib "$PILOT_REAL")
pilot_cpu=$(cpu_pct $((p1 - p0)) "$SAMPLE")
wait "$PILOT_PID" || die "pilot failed: $(tail -n 20 "$WORK/pilot-hold.log")"
PILOT_PID=

# d) A pilot supervising 64 payloads: on a host with fewer cores its slot is smaller (it never
#    runs more single-core payloads than it has cores), so the whole system runs in a VM with
#    64 CPUs (scripts/vm-test.sh, cgroup v2) and the pilot's slot is those 64 cores.
WIDE=64
if [ "$(nproc)" -ge "$WIDE" ]; then
    wide_rss=$pilot_rss wide_cpu=$pilot_cpu wide_where="this host" wide_helper_rss=$helper_rss
    slowdown=1.0 wide_cpu_host=$pilot_cpu
else
    scripts/vm-test.sh --smp "$WIDE" --mem 8G --timeout 1200 \
        --bin "$BIN/mupilot" --bin "$BIN/mupilot-server" --bin "$BIN/mupilot-switch" \
        --bin "$BIN/examples/match_bench" --bin /usr/bin/sleep \
        --file scripts/bench.d/guest/pilot-slot.sh:/root/pilot-slot.sh --env "BIN=$BIN" \
        -- bash /root/pilot-slot.sh "$WIDE" >"$WORK/vm-wide.out" 2>&1 ||
        die "the $WIDE-CPU VM run failed: $(tail -n 30 "$WORK/vm-wide.out")"
    wide_value() { sed -n "s/^$1=//p" "$WORK/vm-wide.out" | tail -n1; }
    [ "$(wide_value PAYLOADS)" -ge "$WIDE" ] || die "the VM pilot ran $(wide_value PAYLOADS) of $WIDE payloads"
    wide_rss=$(wide_value PILOT_RSS_KIB) wide_cpu=$(wide_value PILOT_CPU_PCT)
    wide_helper_rss=$(wide_value HELPER_RSS_KIB)
    # The guest's CPUs are emulated (TCG): its CPU share, scaled by how much slower the same
    # bash loop ran there, is what the pilot would take of a host core.
    t0=$EPOCHREALTIME
    bash -c 'for ((i = 0; i < 200000; i++)); do :; done'
    t1=$EPOCHREALTIME
    slowdown=$(awk -v g="$(wide_value LOOP_SECONDS)" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", g / (b - a) }')
    wide_cpu_host=$(awk -v c="$wide_cpu" -v s="$slowdown" 'BEGIN { printf "%.2f", c / s }')
    wide_where="a $WIDE-CPU VM on this host (QEMU, cgroup v2)"
fi

echo
echo "### Supervision cost"
echo
echo "| what | value |"
echo "|---|---:|"
echo "| short payloads (\`/bin/true\`) through server + pilot + helper, one pilot ($SHORT payloads, ${short_wall} s incl. 2 s idle exit) | $short_rate payloads/s |"
echo "| helper daemon RSS, $HOLD payloads sleeping | $(mib "$helper_rss") MiB |"
echo "| helper daemon CPU, $HOLD payloads sleeping (${SAMPLE} s sample) | $helper_cpu % of a core |"
echo "| per-payload supervisors (one stage, pid 1 of its namespace, per payload; with the factory and idle stages ${#SUPERVISORS[@]} processes): total PSS | $(mib "$sup_pss") MiB (RSS of one: $(mib "$sup_rss_one") MiB) |"
echo "| per-payload supervisors: total CPU | $sup_cpu % of a core |"
echo "| pilot RSS, $SLOT payloads sleeping (its whole slot on this $SLOT-core host) | $(mib "$pilot_rss") MiB |"
echo "| pilot CPU, $SLOT payloads sleeping (${SAMPLE} s sample) | $pilot_cpu % of a core |"
echo "| pilot RSS, $WIDE payloads sleeping (its slot of $WIDE cores, in $wide_where) | $(mib "$wide_rss") MiB |"
echo "| pilot CPU, $WIDE payloads sleeping (10 s sample, same; heartbeats to the server every 30 s per payload) | $wide_cpu % of a guest CPU = $wide_cpu_host % of a host core (the guest ran a fixed loop $slowdown x slower) |"
echo "| helper daemon RSS, the same $WIDE payloads (same) | $(mib "$wide_helper_rss") MiB |"
echo
echo "Targets: pilot RSS <= 15 MiB, helper RSS <= 10 MiB, supervision CPU <= 1 % of a core." \
    "One pilot's slot is min(batch, cgroup, host cores) = $SLOT here, so the pilot supervises $SLOT" \
    "on the host itself and $WIDE in $wide_where; the helper's numbers are for $HOLD payloads held" \
    "through its socket."
