# Section 2 of scripts/bench.sh (sourced): the helper's launch decision alone, ban lists + site
# and VO policies + grid-mapfile mapping, through the helper's Authorizer.
# shellcheck shell=bash
DECISION_OUT=$("$BIN/examples/decision_bench" 10000 10000 10000 10000)
read -r _ d_n d_permits d_p50 d_p99 < <(grep '^decide ' <<<"$DECISION_OUT")
read -r _ _ p_p50 p_p99 f_p50 f_p99 < <(grep '^policy ' <<<"$DECISION_OUT")
echo
echo "### Decision latency (10,000 policy lines, 10,000 banned DNs, 10,000-line grid-mapfile)"
echo
echo "| what | decisions | p50 µs | p99 µs |"
echo "|---|---:|---:|---:|"
echo "| whole decision: bans + site/VO policy + mapping (helper's Authorizer, files followed live) | $d_n | $d_p50 | $d_p99 |"
echo "| bans + policies, files followed live | $d_n | $p_p50 | $p_p99 |"
echo "| policies only, in memory | $d_n | $f_p50 | $f_p99 |"
echo
echo "Target: decision p50 <= 50 µs (now $d_p50 µs; $d_permits of $d_n permitted)."
