# Section 6 of scripts/bench.sh (sourced): what verifying the owner's grid credential adds to a
# launch (src/grid): cold (chain against the CA directory with its CRL, RFC 3820 rules, VOMS AC
# signature and .lsc) and cached by the credential's SHA-256. Run alone: scripts/bench.sh --only grid
# shellcheck shell=bash
apt_install voms-clients xxd openssl
GRID_PKI=$PWD/target/tmp/bench-grid-pki
rm -rf "$GRID_PKI"
sh tests/grid_support/make-fixtures.sh "$GRID_PKI"
read -r _ g_cold_p50 g_cold_p99 g_cached_p50 g_cached_p99 g_first_p50 < <("$BIN/examples/grid_bench" "$GRID_PKI" 2000 | grep '^grid ')
rm -rf "$GRID_PKI"
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
