#!/usr/bin/env bash
# Runs the sandbox and isolation tests inside a pure cgroup-v2 VM (scripts/vm-test.sh), so the
# v2 half of the cgroup code is proven on a real v2 kernel: payload cgroups, cgroup.kill,
# memory.peak, the no-internal-processes rule (the test starts in a non-root cgroup).
#
#   scripts/vm-test-sandbox.sh          build the test binaries, boot one VM, run them all
#   scripts/vm-test-sandbox.sh NAME...  only these test binaries (e.g. pilot_attacks)
#
# sandbox_netns runs payloads in network namespaces connected by pasta (the default
# ipc_fallback on this kernel, which has no Landlock ABI 6): the guest gets Debian's pasta, the
# tun module, and a dummy eth0 with addresses and default routes, the node's "network".
#
# pilot_attacks runs the real helper daemon in the guest (the pilot account's attacks, and
# that payloads land below the connecting pilot's cgroup on v2); slot_real reads a real v2
# cgroup's limits as the pilot's slot discovery does; switch_usage reads a running payload's
# CPU and memory (memory.peak included) from its v2 cgroup through the real helper.
#
# Prints each test binary's cargo-test output; exits non-zero when any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh
need_root
apt_install passt iproute2

TESTS=(sandbox_isolation sandbox_env sandbox_orphan sandbox_attacks sandbox_netns pilot_attacks slot_real switch_usage)
[ $# -eq 0 ] || TESTS=("$@")
log "building the sandbox test binaries"
# examples/attack is the hostile payload of sandbox_attacks (raw syscalls: the guest has no
# python or gcc); the tests find it beside their deps directory.
cargo build --locked --bin mupilot-switch --example attack
mapfile -t BINARIES < <(
    cargo test --locked --no-run --message-format=json "${TESTS[@]/#/--test=}" 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .profile.test == true) | .executable // empty'
)
[ ${#BINARIES[@]} -eq ${#TESTS[@]} ] || die "expected ${#TESTS[@]} test binaries, found: ${BINARIES[*]}"
# The library's unit tests hold the cgroup module's own checks.
mapfile -t LIB < <(
    cargo test --locked --no-run --lib --message-format=json 2>/dev/null |
        jq -r 'select(.reason == "compiler-artifact" and .profile.test == true) | .executable // empty'
)
BINARIES+=("${LIB[@]}")

# Debug binaries are large; the guest gets copies without debug info, at their build paths (the
# tests find mupilot-switch by the absolute path cargo compiled into them), plus their libraries.
STRIPPED=$(mktemp -d /tmp/mupilot-vm-bins.XXXXXX)
trap 'rm -rf "$STRIPPED"' EXIT
# util-linux's IPC tools: the isolation tests create SysV segments (busybox has none).
args=(--mem 3G --timeout 1200 --bin /usr/bin/ipcmk --bin /usr/bin/ipcs
    --bin /usr/bin/pasta --bin /usr/bin/pasta.avx2 --bin /usr/sbin/ip --module tun --module dummy)
for b in "$PWD/target/debug/mupilot-switch" "$PWD/target/debug/examples/attack" "${BINARIES[@]}"; do
    objcopy --strip-debug "$b" "$STRIPPED/$(basename "$b")"
    args+=(--file "$STRIPPED/$(basename "$b"):$b")
done
while read -r lib; do
    lib=$(readlink -f "$lib") # /lib is a symlink to usr/lib: copy to the real path
    args+=(--file "$lib:$lib")
done < <(for b in "${BINARIES[@]}" "$PWD/target/debug/examples/attack"; do ldd "$b"; done | awk '/=> \// { print $3 } /^\t\// { print $1 }' | sort -u)
# The node's network: a dummy eth0 with IPv4 and IPv6 addresses and default routes, which is
# what pasta copies into each payload's namespace (it needs a routable interface).
script='ip link add eth0 type dummy && ip addr add 192.0.2.2/24 dev eth0 &&
    ip addr add fd00::2/64 dev eth0 nodad && ip link set eth0 up &&
    ip route add default via 192.0.2.1 && ip -6 route add default via fd00::1 || exit 125; rc=0'
for b in "${BINARIES[@]}"; do
    # One test at a time: the tests share accounts and the VM has little memory.
    case $b in
    */deps/mupilot-*) filter='sandbox cgroups' ;; # the lib's sandbox and cgroups unit tests
    # The guest has no resolver to ask (no /etc/resolv.conf, no network beyond the dummy).
    */deps/sandbox_netns-*) filter='--skip through_the_hosts_resolver' ;;
    *) filter= ;;
    esac
    script+="; echo '=== $(basename "$b")'; $b --test-threads=1 $filter || rc=1"
done
script+='; exit $rc'
log "running ${#BINARIES[@]} test binaries in a cgroup-v2 VM"
scripts/vm-test.sh "${args[@]}" -- sh -c "cd / && $script"
