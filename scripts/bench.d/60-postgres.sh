# Section 5 of scripts/bench.sh (sourced; alone with `scripts/bench.sh --postgres-only`):
# matches per second and match latency (client-side, p50/p99) with 100,000 queued payloads,
# for 1 SQLite instance and for 1 and 3 PostgreSQL instances on one database (a private
# cluster started here as the postgres account, defaults: fsync on, synchronous_commit on),
# and, for comparison only, 1 instance with synchronous_commit off (what the WAL flush costs).
# 16 pilots match at once over mTLS keep-alive connections (spread over the instances).
# The queue is filled with one real submission over HTTPS copied in SQL to 100,000 rows
# (100,000 fsynced HTTPS submissions would take minutes and measure submission instead).
# Uses BIN, WORK, EXTRA_PIDS, free_port, wait_for, stop_pid, log, die from bench.sh.
# shellcheck shell=bash
apt_install postgresql python3
PG_QUEUED=${MUPILOT_BENCH_PG_QUEUED:-100000}
PG_MATCHES=4000
PG_PILOTS=16
PGBIN=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d | sort -V | tail -n1)
[ -x "$PGBIN/initdb" ] || die "no PostgreSQL binaries under /usr/lib/postgresql (apt-get install postgresql)"
PGW=$WORK/pg
install -d -o postgres -g postgres -m 0700 "$PGW"
printf 'bench-admin\n' >"$PGW/admin-pw"
chown postgres:postgres "$PGW/admin-pw"
chmod 0600 "$PGW/admin-pw"
setpriv --reuid=postgres --regid=postgres --init-groups "$PGBIN/initdb" -D "$PGW/data" -U pgadmin \
    --auth=scram-sha-256 --pwfile="$PGW/admin-pw" -E UTF8 --locale=C.UTF-8 >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed: $(cat "$WORK/initdb.log")"
PGPORT=$(free_port)
# setpriv execs: $! is the postmaster's pid, stopped by it below and in bench.sh's cleanup.
setpriv --reuid=postgres --regid=postgres --init-groups "$PGBIN/postgres" -D "$PGW/data" -p "$PGPORT" \
    -k "$PGW" -c listen_addresses=127.0.0.1 -c max_connections=200 >"$PGW/postgres.log" 2>&1 &
PG_PID=$!
EXTRA_PIDS+=("$PG_PID")
psql_admin() { PGPASSWORD=bench-admin "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PGPORT" -U pgadmin "$@"; }
wait_for "psql_admin -d postgres -c 'SELECT 1'" 30 || die "postgres did not start: $(cat "$PGW/postgres.log")"
psql_admin -d postgres -c "CREATE ROLE mupilot LOGIN PASSWORD 'bench-role'" \
    -c "CREATE DATABASE mupilot OWNER mupilot" >/dev/null

# One VO per engine (its own certificates), servers on 127.0.0.1:0.
"$BIN/mupilot-server" init "$WORK/sqlvo" --listen 127.0.0.1:0 >/dev/null
"$BIN/mupilot-server" init "$WORK/pgvo" --listen 127.0.0.1:0 >/dev/null
printf 'bench-role\n' >"$WORK/pgvo/db-password"
chmod 0600 "$WORK/pgvo/db-password"
cat >>"$WORK/pgvo/server.toml" <<EOF

[database]
engine = "postgresql"
host = "127.0.0.1"
port = $PGPORT
dbname = "mupilot"
user = "mupilot"
password_file = "db-password"
EOF

# start_instance VO_DIR NAME: starts `serve`, sets INSTANCE_URL and INSTANCE_PID.
start_instance() {
    "$BIN/mupilot-server" serve --config "$1/server.toml" >"$WORK/$2.out" 2>"$WORK/$2.log" &
    INSTANCE_PID=$!
    EXTRA_PIDS+=("$INSTANCE_PID")
    wait_for "grep -q '^listening on ' '$WORK/$2.out'" 30 || die "$2 did not start: $(cat "$WORK/$2.log")"
    INSTANCE_URL=$(sed -n 's/^listening on //p' "$WORK/$2.out" | head -n1)
}

# fill_sql ENGINE: copies the one submitted payload to PG_QUEUED queued rows.
COPY_COLUMNS="owner_dn, vo, state, argv, env, jobtag, cores, memory_bytes, walltime_seconds, outputs, bundle_sha256, submitted_at, updated_at"
fill_sqlite() {
    python3 - "$WORK/sqlvo/server-data/mupilot.db" "$PG_QUEUED" "$COPY_COLUMNS" <<'PY'
import sqlite3, sys
db, n, cols = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = sqlite3.connect(db, timeout=30)
c.execute(f"""INSERT INTO payloads (id, {cols})
  WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?)
  SELECT 'p-bench-' || printf('%08d', i), {cols} FROM k, (SELECT * FROM payloads LIMIT 1)""", (n - 1,))
c.commit()
PY
}
fill_postgres() {
    psql_admin -d mupilot -c "INSERT INTO payloads (id, $COPY_COLUMNS)
        SELECT 'p-bench-' || lpad(i::text, 8, '0'), $COPY_COLUMNS
        FROM generate_series(1, $((PG_QUEUED - 1))) AS i, (SELECT * FROM payloads LIMIT 1) AS t" \
        -c "VACUUM ANALYZE payloads" >/dev/null
}

# measure NAME VO_DIR URL...: PG_MATCHES matches from PG_PILOTS pilots over the URLs.
declare -A PG_RATE PG_P50 PG_P99
measure() {
    local name=$1 vo=$2 out
    shift 2
    out=$("$BIN/examples/match_bench" spread "$vo" "$PG_MATCHES" "$PG_PILOTS" "$@") || die "match_bench failed for $name"
    PG_RATE[$name]=$(awk '$1 == "rate" { print $2 }' <<<"$out")
    PG_P50[$name]=$(awk '$1 == "p50" { print $2 }' <<<"$out")
    PG_P99[$name]=$(awk '$1 == "p99" { print $2 }' <<<"$out")
    log "$name: ${PG_RATE[$name]} matches/s, p50 ${PG_P50[$name]} ms, p99 ${PG_P99[$name]} ms"
}

log "SQLite: 1 instance, $PG_QUEUED queued"
start_instance "$WORK/sqlvo" sqlite
"$BIN/examples/match_bench" fill "$INSTANCE_URL" "$WORK/sqlvo" 1 -- /bin/true
fill_sqlite
measure sqlite_1 "$WORK/sqlvo" "$INSTANCE_URL"
stop_pid "$INSTANCE_PID"

log "PostgreSQL: 1 then 3 instances, $PG_QUEUED queued"
start_instance "$WORK/pgvo" pg-0
PG_URLS=("$INSTANCE_URL")
PG_INSTANCE_PIDS=("$INSTANCE_PID")
"$BIN/examples/match_bench" fill "$INSTANCE_URL" "$WORK/pgvo" 1 -- /bin/true
fill_postgres
measure postgresql_1 "$WORK/pgvo" "${PG_URLS[@]}"
for i in 1 2; do
    start_instance "$WORK/pgvo" "pg-$i"
    PG_URLS+=("$INSTANCE_URL")
    PG_INSTANCE_PIDS+=("$INSTANCE_PID")
done
measure postgresql_3 "$WORK/pgvo" "${PG_URLS[@]}"
for p in "${PG_INSTANCE_PIDS[@]}"; do stop_pid "$p"; done
# For comparison only, never a VO's setting: the same single instance without waiting for the
# WAL flush at commit (docs/vo-operator.md "Tuning": a crash could then hand a payload out twice).
psql_admin -d mupilot -c "ALTER DATABASE mupilot SET synchronous_commit = off" >/dev/null
start_instance "$WORK/pgvo" pg-async
measure postgresql_1_async "$WORK/pgvo" "$INSTANCE_URL"
stop_pid "$INSTANCE_PID"
# SIGINT: PostgreSQL's fast shutdown.
kill -INT "$PG_PID" 2>/dev/null || true
wait_for "! kill -0 $PG_PID" 30 || stop_pid "$PG_PID"

echo
echo "### Matching with $PG_QUEUED queued payloads: SQLite and PostgreSQL, 1 and 3 instances"
echo
echo "| database | instances | pilots | matches | matches/s | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|---:|---:|---:|"
echo "| SQLite (synchronous=FULL) | 1 | $PG_PILOTS | $PG_MATCHES | ${PG_RATE[sqlite_1]} | ${PG_P50[sqlite_1]} | ${PG_P99[sqlite_1]} |"
echo "| PostgreSQL $("$PGBIN/postgres" --version | awk '{ print $3 }') (fsync, synchronous_commit on) | 1 | $PG_PILOTS | $PG_MATCHES | ${PG_RATE[postgresql_1]} | ${PG_P50[postgresql_1]} | ${PG_P99[postgresql_1]} |"
echo "| PostgreSQL, one database | 3 | $PG_PILOTS | $PG_MATCHES | ${PG_RATE[postgresql_3]} | ${PG_P50[postgresql_3]} | ${PG_P99[postgresql_3]} |"
echo "| PostgreSQL, synchronous_commit off (comparison only: not durable) | 1 | $PG_PILOTS | $PG_MATCHES | ${PG_RATE[postgresql_1_async]} | ${PG_P50[postgresql_1_async]} | ${PG_P99[postgresql_1_async]} |"
echo
echo "Target: match p99 < 20 ms. Latency is the client's (mTLS request on a warm keep-alive" \
    "connection, answer with the signed envelope); all instances, the database and the pilots" \
    "share this machine's $(nproc) cores, so 3 instances show the cost of coordination through" \
    "row locks here, not the gain of 3 machines."
