# Section 2b of scripts/bench.sh (sourced): what a network namespace per payload costs at
# launch. mupilot's whole launch path (`true`, as in section 1) through a helper of its own for
# each network mode, interleaved: "host" (Landlock scoping where the kernel has it: nothing
# extra), "loopback" (a namespace with only lo) and "pasta" (the default ipc_fallback on kernels
# without Landlock ABI 6: a namespace connected by pasta, one more process per payload).
# Needs pasta (package passt); /dev/net/tun is made 0666 for the run and put back after.
# shellcheck shell=bash

apt_install passt
NETNS_MODES=(host loopback pasta)
NETNS_PIDS=()
TUN_MODE=$(stat -c %a /dev/net/tun)
chmod 0666 /dev/net/tun
netns_cleanup() {
    local p
    for p in "${NETNS_PIDS[@]}"; do stop_pid "$p"; done
    chmod "$TUN_MODE" /dev/net/tun
}
for m in "${NETNS_MODES[@]}"; do
    d=$WORK/netns-$m
    mkdir -p "$d"
    # The same site as the main helper's, with its own socket, records and state.
    sed -e "s|^socket = .*|socket = \"$d/switch.sock\"|" \
        -e "s|^audit_log = .*|audit_log = \"$d/audit.jsonl\"|" \
        -e "s|^state_dir = .*|state_dir = \"$d/state\"|" \
        -e "s|^\[sandbox\]$|[sandbox]\nnetwork = \"$m\"|" \
        "$WORK/vo/switch.toml" >"$d/switch.toml"
    "$BIN/mupilot-switch" serve --config "$d/switch.toml" >"$d/switch.log" 2>&1 &
    NETNS_PIDS+=($!)
    wait_for "test -S '$d/switch.sock'" 10 || { netns_cleanup; die "helper ($m) did not start: $(cat "$d/switch.log")"; }
done
log "network modes: $ROUNDS rounds x $PER_ROUND launches per mode, interleaved"
for _ in $(seq 1 "$ROUNDS"); do
    for m in "${NETNS_MODES[@]}"; do
        runuser -u mupilot -- "$LB" mupilot "$PER_ROUND" --socket "$WORK/netns-$m/switch.sock" \
            --vo-key "$WORK/vo/vo.key" --dn "/DC=org/DC=mupilot-demo/CN=alice" --vo demo \
            >>"$WORK/netns-$m.lat" || { netns_cleanup; die "launches with network = $m failed: $(tail -n 5 "$WORK/netns-$m/switch.log")"; }
    done
    printf '.' >&2
done
echo >&2
netns_cleanup
{
    echo
    echo "### Launch latency by network mode (\`true\`, ${ROUNDS} x ${PER_ROUND} launches each, interleaved)"
    echo
    echo "| network | p50 ms | p99 ms |"
    echo "|---|---|---|"
    for m in "${NETNS_MODES[@]}"; do
        read -r _ _ p50 p99 _ < <("$LB" stats "$WORK/netns-$m.lat")
        echo "| $m | $(awk -v a="$p50" 'BEGIN { printf "%.2f", a / 1000 }') | $(awk -v a="$p99" 'BEGIN { printf "%.2f", a / 1000 }') |"
    done
}
