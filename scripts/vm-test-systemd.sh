#!/usr/bin/env bash
# Tests the site package under a real systemd: boots Debian 12 with systemd as PID 1 and cgroup
# v2 (scripts/vm-systemd.sh, Debian's own kernel), where scripts/vm-systemd.d/site.sh installs
# the .deb files scripts/package.sh built by following docs/site-admin.md's "Installing from the
# packages" block line by line, runs a VO server from its package and a pilot through
# mupilot-pilot@.service, and stops the helper under a running payload. This script asserts on
# what the guest recorded:
#   - the guide's block runs as written and names the package version Cargo.toml has;
#   - socket activation: the socket listens, the helper starts on the first pilot connection and
#     not before; the socket is 0660 root:mupilot-pilots; `systemd-analyze verify` is clean;
#   - the unit's hardening, StateDirectory=, LogsDirectory= and modes, as systemd and the kernel
#     (/proc/MAINPID/status) report them;
#   - payloads ran as their owners' accounts in cgroups below the pilot's service; carol was
#     denied; `systemctl stop mupilot-switch.service` left no payload process and no cgroup,
#     with kill and end records; the audit log verifies;
#   - `systemd-analyze security mupilot-switch.service` is what docs/site-admin.md shows;
#   - the records kept in tests/data/incident/ (docs/incident-response.md's source) have the
#     shape of this run's.
# Prints one "ok - ..." or "not ok - ..." line per check, then "N passed, M failed".
#
#   scripts/package.sh && scripts/vm-test-systemd.sh
#   MUPILOT_DEBS=DIR scripts/vm-test-systemd.sh     the .deb files from DIR (default target/packages)
#   KEEP_OUT=DIR scripts/vm-test-systemd.sh         keep what the guest recorded in DIR
#   PRINT_SECURITY=1 scripts/vm-test-systemd.sh     print the security report as the doc shows it
#   UPDATE_RECORDS=1 scripts/vm-test-systemd.sh     keep this run's audit and trace records in
#                                                   tests/data/incident/ (tests/records_incident.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
need_root

DEBS=${MUPILOT_DEBS:-$PWD/target/packages}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
SWITCH_DEB=$DEBS/mupilot-switch_${version}-1_amd64.deb
SERVER_DEB=$DEBS/mupilot-server_${version}-1_amd64.deb
for f in "$SWITCH_DEB" "$SERVER_DEB"; do
    [ -f "$f" ] || die "$f is missing: run scripts/package.sh first (or set MUPILOT_DEBS)"
done
apt_install jq

WORK=$(mktemp -d /tmp/mupilot-vm-systemd-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
O=$WORK/out
passed=0
failed=0

check() { # description command...
    local what=$1
    shift
    if "$@"; then
        echo "ok - $what"
        passed=$((passed + 1))
    else
        echo "not ok - $what"
        failed=$((failed + 1))
    fi
}

# is NAME TEXT: the guest's fact NAME is exactly TEXT (one line).
is() {
    local got
    got=$(cat "$O/$1" 2>/dev/null || echo "(no $1 recorded)")
    [ "$got" = "$2" ] || { echo "  $1: '$got', expected '$2'" >&2; return 1; }
}

# has NAME PATTERN: the guest's fact NAME has a line matching the extended regex PATTERN.
has() {
    grep -Eq -- "$2" "$O/$1" 2>/dev/null || {
        echo "  no line matching '$2' in $1:" >&2
        sed 's/^/    /' "$O/$1" 2>/dev/null | head -40 >&2
        return 1
    }
}

# rc NAME CODE: the guest's command for fact NAME exited CODE.
rc() {
    local got
    got=$(cat "$O/$1.rc" 2>/dev/null || echo none)
    [ "$got" = "$2" ] || {
        echo "  $1 exited $got, expected $2:" >&2
        sed 's/^/    /' "$O/$1" 2>/dev/null | head -40 >&2
        return 1
    }
}

t0=$(date +%s)
vm_rc=0
scripts/vm-systemd.sh --timeout 900 --out "$O" \
    --file "$SWITCH_DEB:$(basename "$SWITCH_DEB")" --file "$SERVER_DEB:$(basename "$SERVER_DEB")" \
    --file docs/site-admin.md:site-admin.md --file scripts/vm-systemd.d/site.sh:site.sh \
    -- bash site.sh 2>&1 | tee "$WORK/console" || vm_rc=$?
check "the systemd VM ran the guest script (exit $vm_rc, $(($(date +%s) - t0)) s)" test "$vm_rc" = 0

check "systemd is PID 1" is pid1 systemd
check "/sys/fs/cgroup is cgroup v2" is cgroupfs cgroup2fs
check "docs/site-admin.md installs the version Cargo.toml has ($version)" \
    grep -q "^# dpkg -i mupilot-switch_${version}-1_amd64.deb " docs/site-admin.md
check "the guide's 'Installing from the packages' block ran line by line" rc guide 0
check "the guide's block has dpkg -i, check-config and systemctl enable --now" bash -c \
    "grep -q '^dpkg -i ' '$O/guide.sh' && grep -q '^mupilot-switch check-config' '$O/guide.sh' &&
     grep -q '^systemctl enable --now mupilot-switch.socket' '$O/guide.sh'"

# Socket activation.
check "mupilot-switch.socket is enabled and listening" bash -c "$(declare -f is); O='$O'; is socket-active active && is socket-enabled enabled"
check "the helper does not run before a pilot connects" bash -c "$(declare -f is); O='$O'; is service-before inactive && is service-before-pilot inactive"
check "a local account outside mupilot-pilots gets EACCES at connect (and starts nothing)" bash -c "
    $(declare -f has); O='$O'
    [ \"\$(cat '$O/user-connect.rc')\" != 0 ] && has user-connect 'Permission denied'"
check "the first pilot connection started the helper" is service-after-pilot active
check "the helper started after the pilot (socket activation)" bash -c "
    s=\$(sed -n 's/^ExecMainStartTimestampMonotonic=//p' '$O/activation')
    p=\$(sed -n 's/^ExecMainStartTimestampMonotonic=//p' '$O/pilot-activation')
    [ -n \"\$s\" ] && [ -n \"\$p\" ] && [ \"\$s\" -gt \"\$p\" ] || { echo \"  helper \$s, pilot \$p\" >&2; false; }"
check "the helper never restarted" has activation '^NRestarts=0$'
check "socket /run/mupilot/switch.sock 0660 root:mupilot-pilots" is socket-stat '660 root mupilot-pilots socket'
check "/run/mupilot 0755 root (the socket's DirectoryMode=; no RuntimeDirectory=)" is rundir-stat '755 root root'
check "the socket unit's settings" bash -c "$(declare -f has); O='$O'
    has show-socket '^SocketMode=0660$' && has show-socket '^SocketGroup=mupilot-pilots$' &&
    has show-socket '^Accept=no$' && has show-socket '^RemoveOnStop=yes$'"
check "systemd-analyze verify of the installed units is clean" bash -c \
    "$(declare -f rc); O='$O'; rc verify 0 && { [ ! -s '$O/verify' ] || { sed 's/^/    /' '$O/verify' >&2; false; }; }"

# The service's settings as systemd loaded them, and as the kernel applies them.
for p in NoNewPrivileges=yes RestrictSUIDSGID=yes RestrictRealtime=yes LockPersonality=yes \
    StateDirectory=mupilot StateDirectoryMode=0700 LogsDirectory=mupilot LogsDirectoryMode=0700 \
    RuntimeDirectory= UMask=0077 MemoryMax=536870912 TasksMax=1024 KillMode=mixed \
    ProtectSystem=no ProtectHome=no PrivateTmp=no; do
    check "systemctl show mupilot-switch.service: $p" has show-service "^$p\$"
done
check "IPAddressDeny=any" has show-service '^IPAddressDeny=(any|0\.0\.0\.0/0 ::/0|::/0 0\.0\.0\.0/0)$'
check "the bounding set keeps cap_sys_admin, cap_setuid, cap_setgid, cap_kill" bash -c \
    "grep '^CapabilityBoundingSet=' '$O/show-service' | grep -w cap_sys_admin | grep -w cap_setuid | grep -w cap_setgid | grep -qw cap_kill"
check "the bounding set drops cap_sys_module, cap_sys_rawio, cap_sys_boot, cap_sys_time, cap_net_raw" bash -c \
    "! grep '^CapabilityBoundingSet=' '$O/show-service' | grep -Ewq 'cap_sys_module|cap_sys_rawio|cap_sys_boot|cap_sys_time|cap_net_raw'"
check "the running helper: NoNewPrivs 1 (kernel)" has helper-proc '^NoNewPrivs:[[:space:]]+1$'
check "the running helper: seccomp filter on (RestrictSUIDSGID and friends)" has helper-proc '^Seccomp:[[:space:]]+2$'
check "the running helper's bounding set has CAP_SYS_ADMIN (21), not CAP_SYS_MODULE (16)" bash -c "
    b=\$(awk '/^CapBnd:/ { print \$2 }' '$O/helper-proc')
    [ -n \"\$b\" ] && (( (0x\$b >> 21) & 1 )) && ! (( (0x\$b >> 16) & 1 ))"
check "the helper runs in its own service cgroup" has helper-cgroup '^0::/system.slice/mupilot-switch.service$'
check "state, log and scratch directories as StateDirectory=/LogsDirectory= and the package made them" bash -c "
    $(declare -f has); O='$O'
    has state-stat '^/var/lib/mupilot 700 root root$' && has state-stat '^/var/log/mupilot 700 root root$' &&
    has state-stat '^/var/spool/mupilot 711 root root$'"
check "check-config passes on the installed configuration" rc check-config 0

# Payloads as their owners.
status() { # name: "state account uid exit_code" of the payload
    jq -r '"\(.state) \(.account // "-") \(.uid // "-") \(.exit_code // "-")"' "$O/status-$1" 2>/dev/null
}
uid_of() { # account: its uid from the guest's audit log start records
    jq -r --arg a "$1" 'select(.event == "start" and .account == $a) | .uid' "$O/audit.jsonl" 2>/dev/null | head -n 1
}
for n in alice bob; do
    check "$n's payload ran as mpu-$n and succeeded" bash -c "
        s=\"$(status "$n")\"; [[ \"\$s\" =~ ^done\ mpu-$n\ [0-9]+\ 0\$ ]] || { echo \"  status: \$s\" >&2; false; }"
done
check "carol's payload was denied and never ran" bash -c \
    "[ \"\$(jq -r .state '$O/status-carol')\" != done ] && [ \"\$(jq -r '.account // \"-\"' '$O/status-carol')\" = - ]"
check "start records: accounts with uids >= 1000, cgroups below mupilot-pilot@demo.service" bash -c "
    jq -e -s '[.[] | select(.event == \"start\")] | length >= 3 and
        all(.[]; (.account | test(\"^mpu-(alice|bob)\$\")) and .uid >= 1000 and
            (.cgroup | test(\"^/sys/fs/cgroup/system.slice/system-mupilot\\\\\\\\x2dpilot.slice/mupilot-pilot@demo.service/\")))' \
        '$O/audit.jsonl' >/dev/null || { jq -c 'select(.event == \"start\") | {account, uid, cgroup}' '$O/audit.jsonl' >&2; false; }"
check "a denied record for carol (authorization)" bash -c \
    "jq -e -s 'any(.[]; .event == \"denied\" and (.owner_dn | endswith(\"CN=carol\")) and .denial_class == \"authorization\")' '$O/audit.jsonl' >/dev/null"
bob_uid=$(uid_of mpu-bob)
check "the long payload's processes ran as mpu-bob in one payload cgroup" bash -c "
    [ -s '$O/long-ps' ] && awk '\$1 != \"mpu-bob\" { exit 1 }' '$O/long-ps' &&
    grep -q '^/system.slice/system-mupilot\\\\x2dpilot.slice/mupilot-pilot@demo.service/.' '$O/long-cgroup' &&
    [ \"\$(wc -l <'$O/long-cgroup-procs')\" -ge 2 ] || { cat '$O/long-ps' '$O/long-cgroup' >&2; false; }"

# systemctl stop under a running payload.
check "systemctl stop mupilot-switch.service succeeded" rc stop 0
check "no payload process left after the stop" bash -c "[ ! -s '$O/after-stop-ps' ] || { cat '$O/after-stop-ps' >&2; false; }"
check "the payload's cgroup is gone after the stop" rc after-stop-cgroup 2
check "the helper is inactive after the stop" is service-after-stop inactive
check "kill (helper_stopping) and end records for the long payload" bash -c "
    id=\$(cat '$O/id-long')
    jq -e -s --arg id \"\$id\" 'any(.[]; .event == \"kill\" and .payload_id == \$id and .kill_reason == \"helper_stopping\") and
        any(.[]; .event == \"end\" and .payload_id == \$id)' '$O/audit.jsonl' >/dev/null"
check "the audit log verifies (chain intact)" has audit-verify 'chain intact'
# The pilot ends (and its unit fails) when its helper goes away: it reports its payloads lost.
check "the pilot noticed the helper's stop and ended" has journal-pilot 'ended \(helper connection lost'
check "no other unit failed in the guest" bash -c "! grep -v 'mupilot-pilot@demo.service' '$O/failed' | grep -q . || { cat '$O/failed' >&2; false; }"
[ -n "$bob_uid" ] || echo "  (no start record for mpu-bob)" >&2

# A configuration the helper refuses: no endless restart loop.
check "a refused configuration: the helper fails at its start limit ($(cat "$O/broken-seconds" 2>/dev/null || echo ?) s), not looping" bash -c "
    $(declare -f has); O='$O'
    has broken-service '^ActiveState=failed$' && has broken-service '^NRestarts=4$' &&
    [ \"\$(cat '$O/broken-seconds')\" -lt 60 ]"
check "a refused configuration: the socket fails with it and is gone (pilots get an error at once)" bash -c "
    $(declare -f has rc); O='$O'
    has broken-socket '^Result=service-start-limit-hit$' && has broken-socket '^ActiveState=failed$' &&
    rc broken-socket-file 2"
check "reset-failed and start bring the socket back once the configuration is fixed" bash -c "
    $(declare -f is rc); O='$O'; rc recovered-start 0 && is recovered-socket active"

# The records tests/records_incident.rs tells docs/incident-response.md's walkthrough with are
# a real run's: this run's must have their shape (the fields of each kind of record it uses, and
# which are empty), or the walkthrough no longer shows what the product writes.
shape() { # log jq-filter-of-the-records-used
    jq -c -s "$2 | map(to_entries | map(.key + (if .value == null then \"=null\" else \"\" end)))" "$1"
}
declare -A USED
USED[audit]='[(map(select(.event == "start"))[0]), (map(select(.event == "end" and .exit_code == 0))[0]),
    (map(select(.event == "denied" and .denial_class == "authorization"))[0])]'
USED[trace]='[(map(select(.event == "start"))[0]), (map(select(.event == "end" and .state == "done"))[0]),
    (map(select(.event == "end" and .decision == "deny"))[0])]'
if [ -n "${UPDATE_RECORDS:-}" ] && [ -s "$O/audit.jsonl" ] && [ -s "$O/trace.jsonl" ]; then
    cp "$O/audit.jsonl" tests/data/incident/audit.jsonl
    cp "$O/trace.jsonl" tests/data/incident/trace.jsonl
    log "tests/data/incident/ updated; RECORDS_DOC_PRINT=1 cargo test --test records_incident prints the walkthrough's new outputs"
fi
for log in audit trace; do
    check "tests/data/incident/$log.jsonl has the shape of this run's $log records" bash -c "
        $(declare -f shape)
        diff <(shape tests/data/incident/$log.jsonl '${USED[$log]}') <(shape '$O/$log.jsonl' '${USED[$log]}') >&2 ||
        { echo '  the records changed: UPDATE_RECORDS=1 scripts/vm-test-systemd.sh takes this run'\''s, then update docs/incident-response.md (RECORDS_DOC_PRINT=1 cargo test --test records_incident)' >&2; false; }"
done

# The security report in the doc is this run's.
sec_doc() {
    awk '/^<!-- systemd-analyze security: begin -->/ { s = 1; next } /^<!-- systemd-analyze security: end -->/ { exit }
         s && !/^```/ { print }' docs/site-admin.md
}
sec_real() { sed 's/\x1b\[[0-9;]*m//g; s/[[:space:]]*$//' "$O/security"; }
if [ -n "${PRINT_SECURITY:-}" ]; then
    echo "----- systemd-analyze security mupilot-switch.service -----"
    sec_real
fi
check "docs/site-admin.md shows this run's systemd-analyze security report" bash -c \
    "diff -u <($(declare -f sec_doc); sec_doc) <($(declare -f sec_real); O='$O'; sec_real) >&2"

boot=$(sed -n 's/.*vm-run: multi-user.target reached after \([0-9]*\) us$/\1/p' "$WORK/console" | tail -n 1)
[ -z "$boot" ] || log "multi-user.target reached $(awk -v u="$boot" 'BEGIN { printf "%.1f", u / 1e6 }') s after the kernel started"
if [ -n "${KEEP_OUT:-}" ]; then
    rm -rf "$KEEP_OUT"
    cp -a "$O" "$KEEP_OUT"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
