#!/usr/bin/env bash
# The main job, end to end, on one machine, as root:
#   VO server (mTLS, SQLite) -> pilot (as the `mupilot` account) -> mupilot-switch (root)
#   -> each payload under its owner's own account, isolated -> records.
# Three VO members submit; carol has no mapping in the site's grid-mapfile, so the helper
# denies her payload and it never runs. Prints one table row per payload and stops
# everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/demo-env.sh
source scripts/lib/demo-env.sh

need_root
apt_install jq

log "building (release)"
cargo build --release --locked -q
BIN=$PWD/target/release
started=$(date +%s.%N)

ensure_demo_accounts
# Not below /tmp: payloads get a private /tmp, so their scratch must live elsewhere.
WORK=$(mktemp -d /var/lib/mupilot-demo.XXXXXX)
chmod 0755 "$WORK"
cleanup() {
    stop_pid "${PILOT_PID:-}"
    stop_pid "${SWITCH_PID:-}"
    stop_pid "${SERVER_PID:-}"
    rm -rf "$WORK"
    remove_demo_accounts
}
trap cleanup EXIT

PORT=$(free_port)
"$BIN/mupilot-server" init "$WORK/vo" --listen "127.0.0.1:$PORT" >/dev/null
# The pilot's credentials and work directory belong to the pilot account, nobody else.
chown mupilot: "$WORK/vo/pilot.crt" "$WORK/vo/pilot.key"
install -d -o mupilot -g mupilot -m 0700 "$WORK/vo/pilot-work"

"$BIN/mupilot-server" serve --config "$WORK/vo/server.toml" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
"$BIN/mupilot-switch" serve --config "$WORK/vo/switch.toml" >"$WORK/switch.log" 2>&1 &
SWITCH_PID=$!
wait_for "test -S '$WORK/vo/switch.sock'" 10 || die "helper did not start: $(cat "$WORK/switch.log")"
wait_for "(exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null" 10 || die "server did not start: $(cat "$WORK/server.log")"

submit() { # user, then submit flags and argv
    local user=$1
    shift
    "$BIN/mupilot-server" submit --server "https://127.0.0.1:$PORT" \
        --cert "$WORK/vo/$user.crt" --key "$WORK/vo/$user.key" --ca "$WORK/vo/certificates" "$@"
}

log "submitting payloads from alice, bob and carol"
mkdir -p "$WORK/bundle" && printf 'print-me\n' >"$WORK/bundle/input.txt"
ids=()
ids+=("alice:$(submit alice --jobtag demo --cores 1 --memory 256M --walltime 60 --output result.txt -- \
    sh -c 'id -u > result.txt; echo "alice payload runs as $(id -un) in $PWD"')")
ids+=("alice:$(submit alice --jobtag demo --cores 1 --memory 256M --walltime 60 -- \
    sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo counted $i')")
ids+=("bob:$(submit bob --jobtag demo --cores 1 --memory 256M --walltime 60 --bundle "$WORK/bundle" --output copy.txt -- \
    sh -c 'cp input.txt copy.txt; echo "bob payload runs as $(id -un)"; ls /proc | grep -c "^[0-9]"')")
ids+=("bob:$(submit bob --jobtag demo --cores 1 --memory 256M --walltime 60 -- \
    sh -c 'ls /var/lib 2>&1 | head -1; cat /etc/hostname; exit 3')")
ids+=("carol:$(submit carol --jobtag demo --cores 1 --memory 256M --walltime 60 -- \
    sh -c 'echo carol must never run')")

log "running the pilot as the 'mupilot' account until the queue is empty"
runuser -u mupilot -- "$BIN/mupilot" run --config "$WORK/vo/pilot.toml" --idle-timeout 2 \
    >"$WORK/pilot.log" 2>&1 &
PILOT_PID=$!
wait "$PILOT_PID" || die "pilot failed: $(tail -20 "$WORK/pilot.log")"
PILOT_PID=

printf '\n%-38s %-34s %-10s %-6s %-5s %-6s %-8s %s\n' \
    PAYLOAD "OWNER DN" ACCOUNT UID EXIT "CPU s" "PEAK MiB" DECISION
for entry in "${ids[@]}"; do
    user=${entry%%:*} id=${entry#*:}
    submit_status() { "$BIN/mupilot-server" status --server "https://127.0.0.1:$PORT" \
        --cert "$WORK/vo/$user.crt" --key "$WORK/vo/$user.key" --ca "$WORK/vo/certificates" --json "$id"; }
    submit_status | jq -r '[.payload_id, .owner_dn, (.account // "-"), (.uid // "-"),
        (if .exit_code != null then .exit_code elif .signal != null then "sig\(.signal)" else "-" end),
        (if .cpu_seconds != null then (.cpu_seconds * 1000 | round / 1000) else "-" end),
        (if .peak_memory_bytes != null then (.peak_memory_bytes / 1048576 * 10 | round / 10) else "-" end),
        (if .state == "denied" then "deny: \(.reason)" else "permit (\(.state))" end)] | @tsv' |
        while IFS=$'\t' read -r p o a u e c m d; do
            printf '%-38s %-34s %-10s %-6s %-5s %-6s %-8s %s\n' "$p" "$o" "$a" "$u" "$e" "$c" "$m" "$d"
        done
done

echo
"$BIN/mupilot-switch" audit verify --log "$WORK/vo/audit.jsonl" | sed 's/^/helper audit log: /'
"$BIN/mupilot" trace verify --log "$WORK/vo/pilot-work/trace.jsonl" | sed 's/^/pilot trace log: /'
awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "demo finished in %.1f s after the build\n", e - s }'
