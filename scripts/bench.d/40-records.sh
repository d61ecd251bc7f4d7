# Section 5 of scripts/bench.sh (sourced): the record layer: append rate (fsync per record and
# batched), `audit who` and verify over a 1,000,000-record audit log.
# shellcheck shell=bash
RECORDS_OUT=$("$BIN/examples/records_bench")
echo
echo "### Records (hash-chained JSON lines, 1,000,000-record audit log)"
echo
echo "| measurement | result |"
echo "|---|---|"
# Each line is "what: result"; timestamps contain ':' but never ': '.
awk '{ i = index($0, ": "); if (i) { r = substr($0, i + 2); sub(/^ +/, "", r); print "| " substr($0, 1, i - 1) " | " r " |" } }' <<<"$RECORDS_OUT"
