# Section 4 of scripts/bench.sh (sourced): matches per second from mupilot-server over mTLS
# with keep-alive, from one pilot in sequence and from 16 pilots at once.
# shellcheck shell=bash
FETCH_OUT=$("$BIN/examples/match_bench" "$SERVER_URL" "$WORK/vo" 500 1600)
one=$(awk '$1 == "one" { print $2 }' <<<"$FETCH_OUT")
many=$(awk '$1 == "many" { print $2 }' <<<"$FETCH_OUT")
echo
echo "### Fetch: matches from mupilot-server (mTLS, keep-alive, SQLite)"
echo
echo "| pilots | matches | matches/s |"
echo "|---|---:|---:|"
echo "| 1, sequential | 500 | $one |"
echo "| 16, concurrent | 1600 | $many |"
echo
echo "Target: >= 500 matches/s. The server's SQLite runs with synchronous=FULL: every match is"
echo "fsynced before its envelope leaves (see \"What a durable match costs\" below)."
