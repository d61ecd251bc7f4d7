# Section 6 of scripts/bench.sh (sourced): what verifying the owner's grid credential adds to a
# launch (src/grid): cold (chain against the CA directory with its CRL, RFC 3820 rules, VOMS AC
# signature and .lsc) and cached by the credential's SHA-256; and the helper's answer to a
# delegated launch's proxy_request (the payload's key and CSR), with its key pool ready and
# drained. Run alone: scripts/bench.sh --only grid
# shellcheck shell=bash
apt_install voms-clients xxd openssl
GRID_PKI=$PWD/target/tmp/bench-grid-pki
rm -rf "$GRID_PKI"
sh tests/grid_support/make-fixtures.sh "$GRID_PKI"
GRID_OUT=$("$BIN/examples/grid_bench" "$GRID_PKI" 2000)
read -r _ g_cold_p50 g_cold_p99 g_cached_p50 g_cached_p99 g_first_p50 < <(grep '^grid ' <<<"$GRID_OUT")
read -r _ k_p50 k_p99 < <(grep '^keys ' <<<"$GRID_OUT")

# A helper of its own with a [grid] table (mupilot-server init's demo layout), asked for CSRs
# as a pilot: spaced 300 ms apart (the pool refills between them), then 40 back to back (the
# pool's 8 keys, then whatever the refill thread made meanwhile on the other core, else a key
# made on the request). Before the pool, every request made its key: the `keys` row.
ensure_demo_accounts
GRID_SITE=$(mktemp -d /var/lib/mupilot-bench-grid.XXXXXX)
chmod 0755 "$GRID_SITE"
"$BIN/mupilot-server" init "$GRID_SITE/vo" --listen "127.0.0.1:$(free_port)" >/dev/null
printf '\n[grid]\ncert_dir = "%s"\nvomsdir = "%s"\n' "$GRID_PKI/certificates" "$GRID_PKI/vomsdir" >>"$GRID_SITE/vo/switch.toml"
"$BIN/mupilot-switch" serve --config "$GRID_SITE/vo/switch.toml" >"$GRID_SITE/switch.log" 2>&1 &
GRID_SWITCH_PID=$!
if [ -n "${WORK:-}" ]; then
    EXTRA_PIDS+=("$GRID_SWITCH_PID") # stopped by bench.sh's cleanup if this section dies
else
    trap 'stop_pid "$GRID_SWITCH_PID"; rm -rf "$GRID_SITE" "$GRID_PKI"; remove_demo_accounts' EXIT
fi
wait_for "test -S '$GRID_SITE/vo/switch.sock'" 10 || die "helper with [grid] did not start: $(cat "$GRID_SITE/switch.log")"
chmod 0644 "$GRID_SITE/vo/vo.key" # the bench client signs as the VO would; demo key only
sleep 3 # the key pool fills at start
csr() { # file, n, gap ms
    runuser -u mupilot -- "$LB" csr "$2" --gap-ms "$3" --socket "$GRID_SITE/vo/switch.sock" \
        --vo-key "$GRID_SITE/vo/vo.key" --dn "/DC=org/DC=mupilot-demo/CN=alice" --vo demo >"$1" ||
        die "launch_bench csr failed: $(tail -n 5 "$GRID_SITE/switch.log")"
}
csr "$GRID_SITE/csr-spaced.lat" 60 300
sleep 3
csr "$GRID_SITE/csr-burst.lat" 40 0
read -r _ _ c_spaced_p50 c_spaced_p99 _ < <("$LB" stats "$GRID_SITE/csr-spaced.lat")
read -r _ _ c_pool_p50 c_pool_p99 _ < <(head -n 8 "$GRID_SITE/csr-burst.lat" >"$GRID_SITE/csr-pool.lat" && "$LB" stats "$GRID_SITE/csr-pool.lat")
read -r _ _ c_burst_p50 c_burst_p99 _ < <("$LB" stats "$GRID_SITE/csr-burst.lat")
stop_pid "$GRID_SWITCH_PID"
rm -rf "$GRID_SITE" "$GRID_PKI"
echo
echo "### Grid credential verification (RFC 3820 proxy + VOMS AC, CA directory with a CRL)"
echo
echo "| what | p50 µs | p99 µs |"
echo "|---|---:|---:|"
echo "| cold: chain, CRL, proxy rules, AC signature, .lsc (cache cleared each time) | $g_cold_p50 | $g_cold_p99 |"
echo "| cached: SHA-256 of the proxy file, CA directory and vomsdir stat, lookup, claim | $g_cached_p50 | $g_cached_p99 |"
echo "| first call of a fresh verifier (CA directory loaded, then cold) | $g_first_p50 | |"
echo
echo "Target: p50 added per launch < 500 µs (cached: $g_cached_p50 µs; a new credential: $g_cold_p50 µs)."
echo
echo "### The helper's answer to a delegated launch's proxy_request (the payload's key and CSR)"
echo
echo "| requests | p50 µs | p99 µs |"
echo "|---|---:|---:|"
echo "| making one key and CSR (RSA-2048): what every request waited for before the key pool | $k_p50 | $k_p99 |"
echo "| 60 requests 300 ms apart: each takes a key the pool made ahead | $c_spaced_p50 | $c_spaced_p99 |"
echo "| 40 back to back: the first 8 (the pool's keys) | $c_pool_p50 | $c_pool_p99 |"
echo "| 40 back to back: all (the pool drained, refilled on the other core, else a key made on the request) | $c_burst_p50 | $c_burst_p99 |"
