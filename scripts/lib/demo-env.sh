# Shared by demo.sh, test.sh and bench.sh: demo accounts, free ports, stopping by pid.
# shellcheck shell=bash
# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The pilot account and the two mapped demo accounts (carol has none on purpose).
DEMO_ACCOUNTS=(mupilot mpu-alice mpu-bob)
CREATED_ACCOUNTS=()

ensure_demo_accounts() {
    local a
    for a in "${DEMO_ACCOUNTS[@]}"; do
        if ! getent passwd "$a" >/dev/null; then
            useradd --no-create-home --shell /usr/sbin/nologin --home-dir /nonexistent "$a"
            CREATED_ACCOUNTS+=("$a")
        fi
    done
}

# Removes only the accounts this run created.
remove_demo_accounts() {
    local a
    for a in "${CREATED_ACCOUNTS[@]}"; do
        userdel "$a" 2>/dev/null || true
    done
    CREATED_ACCOUNTS=()
}

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# Stops a process we started: TERM, then KILL after 5 s. Never by name.
stop_pid() {
    local pid=${1:-}
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
