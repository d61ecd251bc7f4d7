#!/usr/bin/env bash
# Runs every test of mupilot on this machine, as root: unit and integration tests against real
# accounts, cgroups (this host's hierarchy), namespaces, TLS, SQLite and PostgreSQL (private
# clusters the tests start from Debian's postgresql binaries); the Slurm tests under
# a real one-node Slurm started here; the sandbox tests again inside a cgroup-v2 VM; and the
# demo. Installs what it needs, so a fresh machine passes. `.ci/run` calls this script.
#
#   scripts/test.sh            everything
#   SKIP_VM=1 SKIP_SLURM=1 scripts/test.sh   the host tests only (quicker while developing)
#   SKIP_PACKAGES=1 scripts/test.sh          without building and testing the packages
#   SKIP_SYSTEMD=1 scripts/test.sh           without the packages under systemd (Debian 12 VM)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/demo-env.sh
source scripts/lib/demo-env.sh
need_root

log "installing test prerequisites"
apt_install jq python3 iproute2 procps util-linux passwd man-db
# grid credentials: OpenSSL to build src/grid; voms-proxy-fake/voms-proxy-info, openssl and xxd
# for tests/grid_support/make-fixtures.sh and the independent judges in tests/grid_verify.rs.
apt_install libssl-dev pkg-config openssl voms-clients xxd
# LCMAPS itself, for tests/lcmaps_compat.rs (one gridmapdir lease per person, whoever maps).
apt_install liblcmaps0 lcmaps-plugins-verify-proxy lcmaps-plugins-voms lcmaps-plugins-basic-poolaccount voms-clients openssl
# initdb and postgres for tests/pg_support (each test starts its own cluster; the package's
# own cluster service is not used).
apt_install postgresql
# pasta connects each payload's network namespace in the ipc_fallback (tests/sandbox_netns.rs).
apt_install passt

LOGDIR=$(mktemp -d /tmp/mupilot-test.XXXXXX)
passed=0
failed=0
failures=()

skipped=0
skips=()

# Adds the counts of every `test result:` line of a cargo test log. A test that cannot run on
# this machine's cgroup layout prints `SKIPPED: <test>: needs ...` (tests/common) and passes
# in libtest's count: it is counted as skipped instead, and listed at the end.
count_cargo() {
    local log=$1 p f line
    p=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) s += $i } END { print s + 0 }' "$log")
    f=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) s += $i } END { print s + 0 }' "$log")
    while IFS= read -r line; do
        skips+=("$line")
        skipped=$((skipped + 1))
        p=$((p - 1))
    done < <(grep -o 'SKIPPED: [^;]*' "$log" || true)
    passed=$((passed + p))
    failed=$((failed + f))
}

step() { # name, command...
    local name=$1
    shift
    log "== $name"
    if "$@"; then
        log "== $name: ok"
    else
        log "== $name: FAILED"
        failures+=("$name")
    fi
}

log "building"
cargo build --locked --all-targets
cargo build --locked --release

# Each program compiled with its own cargo feature alone (docs/architecture.md "Boundaries the
# build enforces"): the helper has no HTTP, TLS or SQL crate to use, so code in src/switch that
# names one (or reaches crate::tls, crate::pilot, crate::server) fails here.
own_features() {
    cargo check --locked --no-default-features --features switch,grid --bin mupilot-switch &&
        cargo check --locked --no-default-features --features switch --bin mupilot-switch &&
        cargo check --locked --no-default-features --features pilot --bin mupilot &&
        cargo check --locked --no-default-features --features server --bin mupilot-server &&
        cargo check --locked --no-default-features --features glexec --bin mupilot-glexec
}
step "each program with only its own features" own_features

host_tests() {
    local out=$LOGDIR/cargo-test.log rc=0
    # --no-fail-fast: every test binary runs, so the count below is the whole suite's even
    # when one binary has failures (cargo test stops at the first failing binary otherwise).
    cargo test --locked --all-targets --no-fail-fast 2>&1 | tee "$out" || rc=$?
    count_cargo "$out"
    return $rc
}
step "unit and integration tests (host, cgroup v1)" host_tests

# The server's API tests again with every demo VO on its own PostgreSQL cluster.
pg_server_tests() {
    local out=$LOGDIR/server-postgresql.log rc=0
    MUPILOT_TEST_ENGINE=postgresql cargo test --locked --no-fail-fast \
        --test server_api --test server_matching --test server_metrics \
        --test server_membership --test server_delegation 2>&1 | tee "$out" || rc=$?
    count_cargo "$out"
    return $rc
}
step "server tests on PostgreSQL" pg_server_tests

if [ -z "${SKIP_SLURM:-}" ] && [ -x scripts/slurm.sh ]; then
    slurm_tests() {
        local out=$LOGDIR/slurm.log rc=0
        scripts/slurm.sh start
        # shellcheck disable=SC1090
        source <(scripts/slurm.sh env)
        cargo test --locked --no-fail-fast --features slurm-tests --test slurm 2>&1 | tee "$out" || rc=$?
        scripts/slurm.sh stop || rc=1
        count_cargo "$out"
        return $rc
    }
    step "Slurm tests (real slurmctld + slurmd)" slurm_tests
fi

if [ -z "${SKIP_VM:-}" ] && [ -x scripts/vm-test-sandbox.sh ]; then
    vm_tests() {
        local out=$LOGDIR/vm.log rc=0
        scripts/vm-test-sandbox.sh 2>&1 | tee "$out" || rc=$?
        count_cargo "$out"
        return $rc
    }
    step "sandbox tests in a cgroup-v2 VM" vm_tests
fi

if [ -z "${SKIP_PACKAGES:-}" ]; then
    # Reuses the release build above; the first run on a machine also compiles cargo-deb,
    # cargo-generate-rpm and the pilot's dependencies for musl.
    package_tests() {
        local out=$LOGDIR/packages.log rc=0
        { scripts/package.sh && scripts/package-test.sh; } 2>&1 | tee "$out" || rc=$?
        passed=$((passed + $(grep -c '^ok - ' "$out" || true)))
        failed=$((failed + $(grep -c '^not ok - ' "$out" || true)))
        return $rc
    }
    step "packages (.deb installed and purged, .rpm contents, static pilot)" package_tests
fi

if [ -z "${SKIP_PACKAGES:-}" ] && [ -z "${SKIP_VM:-}" ] && [ -z "${SKIP_SYSTEMD:-}" ]; then
    # The .deb files of the packages step, installed under a real systemd (Debian 12 in QEMU,
    # cgroup v2) by following docs/site-admin.md; the first run builds the root filesystem
    # image (debootstrap, about a minute) and caches it.
    systemd_tests() {
        local out=$LOGDIR/systemd.log rc=0
        scripts/vm-test-systemd.sh 2>&1 | tee "$out" || rc=$?
        passed=$((passed + $(grep -c '^ok - ' "$out" || true)))
        failed=$((failed + $(grep -c '^not ok - ' "$out" || true)))
        return $rc
    }
    step "site package under systemd (Debian 12 VM: socket activation, hardening, stop)" systemd_tests
fi

demo_test() {
    local out=$LOGDIR/demo.log rc=0
    scripts/demo.sh 2>&1 | tee "$out" || rc=$?
    # The demo is a test too: every mapped payload ran as its own account, carol was denied.
    if [ $rc -eq 0 ] && grep -q 'deny: ' "$out" && grep -q 'mpu-alice' "$out" && grep -q 'mpu-bob' "$out" &&
        grep -q 'helper audit log: .*intact' "$out" && grep -q 'pilot trace log: .*intact' "$out"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        rc=1
    fi
    return $rc
}
step "demo (scripts/demo.sh)" demo_test

rm -rf "$LOGDIR"
echo
if [ ${#failures[@]} -gt 0 ]; then
    printf 'failed steps: %s\n' "${failures[*]}"
fi
for s in "${skips[@]}"; do
    echo "$s"
done
echo "$passed passed, $failed failed, $skipped skipped"
[ ${#failures[@]} -eq 0 ] && [ "$failed" -eq 0 ]
