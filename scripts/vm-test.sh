#!/usr/bin/env bash
# Runs one command as root inside a throw-away Linux VM with a pure cgroup v2 hierarchy (QEMU,
# KVM when usable, TCG otherwise), prints the command's output and exits with its exit status.
#
#   scripts/vm-test.sh [options] -- COMMAND [ARGS...]
#   scripts/vm-test.sh --selftest     boot a few guests and check what tests rely on
#
#   --mem SIZE        guest memory (QEMU -m syntax), default 2G
#   --smp N           guest CPUs, default 2
#   --timeout SECS    kill the VM after SECS seconds (exit 124), default 600
#   --bin PATH        copy an executable and the shared libraries ldd lists, to the same path (repeatable)
#   --file SRC:DST    copy a file or directory from the host to DST in the guest (repeatable)
#   --env NAME=VALUE  add a variable to the command's otherwise clean environment (repeatable)
#   --module NAME     load a kernel module (and its dependencies) from the Debian kernel package (repeatable)
#   --append ARGS     extra kernel command line arguments
#   --accel MODE      auto (default: KVM when /dev/kvm works, probed once and cached), kvm or tcg
#   --no-kvm          same as --accel tcg
#   --verbose         print the whole serial console (kernel and init messages) too
#   --keep            keep the work directory (initramfs, console log) and print its path
#   --root-cgroup     run the command in the root cgroup instead of /sys/fs/cgroup/vm-test.scope
#
# Exit status: the command's status; 124 on timeout; 125 when the VM could not be built or did
# not report a status (the console log is printed then). Needs root (it builds device nodes).
# Environment: MUPILOT_VM_CACHE (default /var/cache/mupilot-vm) holds the extracted Debian kernel.
set -euo pipefail

MUPILOT_LOG_TAG=vm-test.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/vm-kernel.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/vm-kernel.sh"

CACHE=${MUPILOT_VM_CACHE:-/var/cache/mupilot-vm}
MEM=2G
SMP=2
TIMEOUT=600
BINS=()
FILES=()
ENVS=()
MODULES=()
APPEND=""
ACCEL=auto
QPID=""
VERBOSE=0
KEEP=0
ROOT_CGROUP=0
# The cgroup the command starts in (unless --root-cgroup); memory, cpu and pids are available in
# it, and its cgroup.subtree_control is empty.
CMD_CGROUP=/sys/fs/cgroup/vm-test.scope
# Host tools the guest always gets, so tests create and inspect real accounts with the real tools.
# /bin/sh is Debian's dash and env is coreutils' because Debian's static busybox prefers its own
# applets: its sh and env would run busybox `id` or `setpriv` even where a real one is in PATH.
HOST_TOOLS=(/usr/sbin/useradd /usr/sbin/userdel /usr/sbin/usermod /usr/sbin/groupadd /usr/sbin/groupdel
    /usr/bin/getent /usr/bin/id /usr/bin/setpriv /usr/bin/dash /usr/bin/bash /usr/bin/env)
GUEST_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
        --mem) MEM=${2:?--mem needs a size like 2G}; shift 2 ;;
        --smp) SMP=${2:?--smp needs a number}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
        --bin) BINS+=("${2:?--bin needs a path}"); shift 2 ;;
        --file) FILES+=("${2:?--file needs SRC:DST}"); shift 2 ;;
        --env) ENVS+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
        --module) MODULES+=("${2:?--module needs a module name}"); shift 2 ;;
        --append) APPEND=${2?--append needs kernel arguments}; shift 2 ;;
        --accel) ACCEL=${2:?--accel needs auto, kvm or tcg}; shift 2 ;;
        --no-kvm) ACCEL=tcg; shift ;;
        --verbose) VERBOSE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --root-cgroup) ROOT_CGROUP=1; shift ;;
        -h | --help) usage ;;
        --) shift; break ;;
        *) fail "unknown option '$1'; put the guest command after '--' (see --help)" ;;
        esac
    done
    [ $# -gt 0 ] || fail "no command given; usage: scripts/vm-test.sh [options] -- COMMAND [ARGS...]"
    CMD=("$@")
    [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || fail "--timeout '$TIMEOUT' is not a number of seconds"
    [[ "$SMP" =~ ^[0-9]+$ ]] || fail "--smp '$SMP' is not a number"
    case $ACCEL in auto | kvm | tcg) ;; *) fail "--accel '$ACCEL' must be auto, kvm or tcg" ;; esac
    local e
    for e in "${ENVS[@]}"; do
        [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || fail "--env '$e' is not NAME=VALUE"
    done
}

# copy_path SRC [DST]: copy SRC (dereferenced) into the guest tree at DST (default: same path),
# replacing whatever is there (such as a busybox applet link, which must not be written through).
copy_path() {
    local src=$1 dst=$ROOT${2:-$1}
    mkdir -p "$(dirname "$dst")"
    rm -f "$dst"
    cp -L --preserve=mode,timestamps "$src" "$dst"
}

# copy_with_libs PATH: copy an executable and every shared library ldd resolves for it.
copy_with_libs() {
    local bin=$1 lib
    copy_path "$bin"
    # ldd prints "name => /path (addr)" and "/lib64/ld-linux... (addr)"; take every absolute path.
    # A static binary or a script has no libraries ("not a dynamic executable").
    while read -r lib; do
        [ -e "$ROOT$lib" ] || copy_path "$lib"
    done < <(ldd "$bin" 2>/dev/null | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }')
}

# sh_quote ARG: ARG as a single-quoted POSIX sh word (busybox sh reads it back unchanged).
sh_quote() {
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

build_root() {
    local d
    # Mirror the host's merged-/usr symlinks so library paths from ldd resolve the same way.
    for d in bin sbin lib lib64; do
        if [ -L "/$d" ]; then
            ln -s "$(readlink "/$d")" "$ROOT/$d"
        fi
    done
    mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc,proc,sys,dev,tmp,run,root,home,mnt}
    mkdir -p "$ROOT"/var/{tmp,lib,log,mail,spool} "$ROOT/newroot" "$ROOT/mupilot"
    for d in bin sbin lib lib64; do [ -e "$ROOT/$d" ] || mkdir -p "$ROOT/$d"; done
    chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
    chmod 0700 "$ROOT/root"
    mknod -m 0600 "$ROOT/dev/console" c 5 1
    mknod -m 0666 "$ROOT/dev/null" c 1 3

    # busybox and its applet links (absolute targets, so they work from any directory).
    cp /bin/busybox "$ROOT/bin/busybox"
    # One perl (essential on Debian) instead of a shell loop: 270 links in milliseconds.
    "$ROOT/bin/busybox" --list-full | ROOT=$ROOT perl -ne '
        chomp; my $p = "$ENV{ROOT}/$_"; (my $d = $p) =~ s{/[^/]+$}{};
        system("mkdir", "-p", $d) unless -d $d;
        symlink("/bin/busybox", $p) unless -e $p || -l $p;
    ' || fail "creating the busybox applet links failed"

    # Real account tools and the NSS files module they load at run time (not in ldd's list).
    local t libc_dir
    for t in "${HOST_TOOLS[@]}"; do
        [ -x "$t" ] || fail "$t missing on the host; install the passwd, libc-bin, coreutils and util-linux packages"
        copy_with_libs "$t"
    done
    ln -sf dash "$ROOT/usr/bin/sh"
    libc_dir=$(dirname "$(ldd /usr/bin/id | awk '$1 == "libc.so.6" { print $3 }')")
    for t in "$libc_dir"/libnss_files.so.*; do
        [ -e "$t" ] && copy_path "$t"
    done

    # Account databases: root only; tests add their own users with useradd.
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
    printf 'root:x:0:\n' >"$ROOT/etc/group"
    printf 'root:*:19000:0:99999:7:::\n' >"$ROOT/etc/shadow"
    printf 'root:*::\n' >"$ROOT/etc/gshadow"
    chmod 0600 "$ROOT/etc/shadow" "$ROOT/etc/gshadow"
    printf 'passwd: files\ngroup: files\nshadow: files\ngshadow: files\nhosts: files\nservices: files\n' \
        >"$ROOT/etc/nsswitch.conf"
    printf '127.0.0.1 localhost mupilot-vm\n::1 localhost ip6-localhost\n' >"$ROOT/etc/hosts"
    echo mupilot-vm >"$ROOT/etc/hostname"
    [ -f /etc/login.defs ] && cp /etc/login.defs "$ROOT/etc/login.defs"
    [ -f /etc/default/useradd ] && mkdir -p "$ROOT/etc/default" && cp /etc/default/useradd "$ROOT/etc/default/"
    if [ -d /etc/skel ]; then cp -a /etc/skel "$ROOT/etc/skel"; else mkdir -p "$ROOT/etc/skel"; fi

    # Caller's binaries and files.
    local b spec src dst
    for b in "${BINS[@]}"; do
        if [[ "$b" != /* ]]; then
            b=$(realpath -e "$b" 2>/dev/null || command -v "$b" || true)
        fi
        if [ -z "$b" ] || [ ! -f "$b" ]; then fail "--bin: no such file: $b"; fi
        copy_with_libs "$b"
    done
    for spec in "${FILES[@]}"; do
        src=${spec%%:*}
        dst=${spec#*:}
        if [ "$src" = "$spec" ] || [ -z "$src" ] || [[ "$dst" != /* ]]; then
            fail "--file '$spec' must be SRC:DST with an absolute DST"
        fi
        [ -e "$src" ] || fail "--file '$spec': $src does not exist"
        mkdir -p "$(dirname "$ROOT$dst")"
        rm -rf "${ROOT:?}$dst"
        cp -a "$src" "$ROOT$dst"
    done

    # Kernel modules, resolved with their dependencies on the host.
    : >"$ROOT/mupilot/modules.sh"
    if [ "${#MODULES[@]}" -gt 0 ]; then
        apt_install kmod
        [ -f "$KROOT/lib/modules/$KVER/modules.dep" ] || depmod -b "$KROOT" "$KVER"
        local m line ko
        for m in "${MODULES[@]}"; do
            while read -r line; do
                case $line in
                insmod\ *)
                    ko=${line#insmod }
                    ko=${ko%% *}
                    rel=${ko#"$KROOT"}
                    [ -e "$ROOT$rel" ] || { mkdir -p "$(dirname "$ROOT$rel")"; cp "$ko" "$ROOT$rel"; }
                    echo "insmod $rel || echo 'vm-init: error: insmod $rel failed'" >>"$ROOT/mupilot/modules.sh"
                    ;;
                builtin\ *) ;;
                *) fail "unexpected modprobe output for $m: $line" ;;
                esac
            done < <(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>&1 ||
                echo "error: module $m not found in $KVER")
        done
    fi

    # The command, as one sh line of single-quoted words, run with a clean environment, in a
    # non-root cgroup like a systemd service or a batch job (the root cgroup is exempt from v2's
    # no-internal-processes rule, so a test running there would miss what real hosts enforce).
    {
        if [ "$ROOT_CGROUP" = 0 ]; then
            printf 'mkdir -p %s && echo $$ >%s/cgroup.procs || echo "vm-init: error: cannot enter %s"\n' \
                "$CMD_CGROUP" "$CMD_CGROUP" "$CMD_CGROUP"
        fi
        printf 'exec /usr/bin/env -i PATH=%s HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C' "$GUEST_PATH"
        for e in "${ENVS[@]}"; do printf ' %s' "$(sh_quote "$e")"; done
        for a in "${CMD[@]}"; do printf ' %s' "$(sh_quote "$a")"; done
        printf '\n'
    } >"$ROOT/mupilot/cmd.sh"

    write_init
}

write_init() {
    cat >"$ROOT/init" <<EOF
#!/bin/busybox sh
# Guest init written by scripts/vm-test.sh: pure cgroup v2 system, runs /mupilot/cmd.sh once,
# prints its status after a marker line and powers off.
export PATH=$GUEST_PATH
TOKEN=$TOKEN
EOF
    cat >>"$ROOT/init" <<'EOF'
err() { echo "vm-init: error: $*"; }
if [ "$1" != stage2 ]; then
    # Stage 1 (on the initramfs rootfs): copy everything into a real tmpfs and switch_root to it,
    # so pivot_root, mount propagation changes and unmounting / behave as on a normal host.
    mount -t tmpfs -o mode=0755 tmpfs /newroot || err "tmpfs for the new root"
    for e in /* /.[!.]*; do
        [ -e "$e" ] || continue
        [ "$e" = /newroot ] && continue
        cp -a "$e" /newroot/ || err "copy $e to the new root"
    done
    mkdir -p /newroot/newroot
    exec switch_root /newroot /init stage2
fi
mount -t proc proc /proc || err "mount proc"
mount -t sysfs sysfs /sys || err "mount sysfs"
mount -t devtmpfs devtmpfs /dev || err "mount devtmpfs"
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || err "mount devpts"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || err "mount /dev/shm"
mount -t mqueue mqueue /dev/mqueue 2>/dev/null
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || err "mount cgroup2"
echo '+memory +cpu +pids' >/sys/fs/cgroup/cgroup.subtree_control || err "enable memory cpu pids controllers"
# /tmp and /run are tmpfs mounts of their own, as on a host; what --bin/--file put below them
# (a repository cloned under /tmp has its test binaries there) moves onto the new mount
# instead of being hidden by it.
for d in /tmp:1777 /run:0755; do
    mode=${d#*:}
    d=${d%:*}
    mv "$d" "$d.initramfs" || err "move $d aside"
    mkdir "$d"
    mount -t tmpfs -o mode="$mode" tmpfs "$d" || err "mount $d"
    cp -a "$d.initramfs/." "$d/" || err "copy the initramfs' $d onto its tmpfs"
    rm -rf "$d.initramfs"
done
# A normal systemd host has / shared; tests of mount propagation must see the same.
mount --make-rshared / || err "make / shared"
hostname mupilot-vm
ip link set lo up || err "loopback up"
. /mupilot/modules.sh
cd /root
echo "MUPILOT-VM-START-$TOKEN"
/bin/sh /mupilot/cmd.sh </dev/null
rc=$?
echo "MUPILOT-VM-EXIT-$TOKEN=$rc"
poweroff -f
EOF
    chmod 0755 "$ROOT/init"
}

# boot ACCEL START_DEADLINE: run the VM once with ACCEL (kvm or tcg). Sets BOOT_RC (the guest
# command's status) and ELAPSED. Returns 0 when the guest reported a status, 2 when
# START_DEADLINE (seconds, 0 = none) passed without the start marker (a KVM that does not work),
# 124 on timeout, 125 when the guest reported no status.
boot() {
    local accel=$1 start_deadline=$2 console=$WORK/console.log cpu=max
    [ "$accel" = kvm ] && cpu=host
    : >"$console"
    local t0 qpid
    t0=$(date +%s.%N)
    "${QEMU[@]}" -nodefaults -no-user-config -nographic -no-reboot \
        -accel "$accel" -cpu "$cpu" -m "$MEM" -smp "$SMP" \
        -kernel "$KERNEL" -initrd "$WORK/initrd.cpio" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 cgroup_no_v1=all random.trust_cpu=on $APPEND" \
        -serial "file:$console" -monitor none -pidfile "$WORK/qemu.pid" \
        </dev/null >"$WORK/qemu.out" 2>&1 &
    qpid=$!
    QPID=$qpid
    tail -n +1 -s 0.2 -f --pid="$qpid" "$console" | console_filter '^vm-init: ' &
    local tailpid=$! outcome=running now deadline started=0
    deadline=$(($(date +%s) + TIMEOUT))
    [ "$start_deadline" -gt 0 ] && start_deadline=$(($(date +%s) + start_deadline))
    while kill -0 "$qpid" 2>/dev/null; do
        now=$(date +%s)
        if [ "$started" = 0 ] && grep -q "MUPILOT-VM-START-$TOKEN" "$console"; then
            started=1
        fi
        if [ "$now" -ge "$deadline" ]; then
            outcome=timeout
        elif [ "$started" = 0 ] && [ "$start_deadline" -gt 0 ] && [ "$now" -ge "$start_deadline" ]; then
            outcome=nostart
        fi
        if [ "$outcome" != running ]; then
            kill -TERM "$qpid" 2>/dev/null || true
            wait_for "! kill -0 $qpid" 3 || kill -KILL "$qpid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    local qrc=0
    wait "$qpid" || qrc=$?
    QPID=""
    wait "$tailpid" 2>/dev/null || true
    ELAPSED=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    grep -q "MUPILOT-VM-START-$TOKEN" "$console" && started=1
    if [ "$outcome" = timeout ]; then
        warn "timeout after ${TIMEOUT}s; killed qemu (pid $qpid)"
        [ "$VERBOSE" = 1 ] || { echo "----- console log -----" >&2; tr -d '\r' <"$console" >&2; }
        return 124
    fi
    BOOT_RC=$(tr -d '\r' <"$console" | sed -n "s/.*MUPILOT-VM-EXIT-$TOKEN=\([0-9]*\)\$/\1/p" | tail -n 1)
    [ -n "$BOOT_RC" ] && return 0
    if [ "$started" = 0 ] && [ "$start_deadline" -gt 0 ]; then
        return 2
    fi
    warn "the guest reported no exit status (qemu exit $qrc)"
    {
        echo "----- qemu output -----"
        cat "$WORK/qemu.out"
        echo "----- console log -----"
        tr -d '\r' <"$console"
    } >&2
    return 125
}

# kvm_verdict: "ok", "broken" or "" (untested) for KVM on this host kernel and QEMU version;
# a nested or half-working KVM can be far slower than TCG, so auto mode probes once and caches.
kvm_key() {
    echo "$(uname -r) $("${QEMU[@]}" --version | head -n 1)"
}
kvm_verdict() {
    local f=$CACHE/kvm-verdict
    [ -f "$f" ] && [ "$(sed -n 2p "$f")" = "$(kvm_key)" ] && sed -n 1p "$f"
    return 0
}
set_kvm_verdict() {
    printf '%s\n%s\n' "$1" "$(kvm_key)" >"$CACHE/kvm-verdict.$$" && mv -f "$CACHE/kvm-verdict.$$" "$CACHE/kvm-verdict"
}

run_vm() {
    local rc=0 accel=tcg probe=0
    case $ACCEL in
    kvm) accel=kvm ;;
    auto)
        if [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ "$(kvm_verdict)" != broken ]; then
            accel=kvm
            [ "$(kvm_verdict)" = ok ] || probe=20
        fi
        ;;
    esac
    boot "$accel" "$probe" || rc=$?
    if [ "$probe" -gt 0 ]; then
        if [ "$rc" = 2 ] || [ "$rc" = 125 ]; then
            warn "KVM did not boot the guest within ${probe}s ($(head -n 1 "$WORK/qemu.out")); recorded in $CACHE/kvm-verdict, using TCG from now on"
            set_kvm_verdict broken
            accel=tcg rc=0
            boot tcg 0 || rc=$?
        else
            set_kvm_verdict ok
        fi
    fi
    [ "$rc" = 0 ] || exit "$rc"
    log "guest command exited $BOOT_RC; VM ($accel) ran ${ELAPSED}s; initramfs built in ${BUILD_SECS}s"
    exit "$BOOT_RC"
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    # Interrupted (INT/TERM) while the VM runs: stop the qemu this script started.
    if [ -n "${QPID:-}" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -KILL "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then
            log "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
}

# selftest: boots a few guests and checks what tests rely on; PASS/FAIL lines, then
# "N passed, N failed"; exit 1 on any failure.
selftest() {
    need_root
    local passed=0 failed=0 out rc tmp
    tmp=$(mktemp -d /tmp/mupilot-vm-selftest.XXXXXX)
    check() {
        if "$@"; then passed=$((passed + 1)); echo "PASS: $CHECK"; else failed=$((failed + 1)); echo "FAIL: $CHECK"; fi
    }
    rc=0
    out=$("$0" -- sh -c 'cat /sys/fs/cgroup/cgroup.subtree_control; mount | grep cgroup2; cat /proc/self/cgroup; useradd -m mpt-inf-v && id mpt-inf-v && test -d /home/mpt-inf-v && userdel -r mpt-inf-v 2>/dev/null; exit 7' 2>"$tmp/err") || rc=$?
    CHECK="exit status 7 comes back" check test "$rc" = 7
    CHECK="cgroup2 on /sys/fs/cgroup" check grep -q '^cgroup2 on /sys/fs/cgroup type cgroup2' <<<"$out"
    CHECK="memory cpu pids enabled in the root" check grep -qx 'cpu memory pids' <<<"$out"
    CHECK="command runs in 0::/vm-test.scope" check grep -qx '0::/vm-test.scope' <<<"$out"
    CHECK="useradd -m and id of a real user" check grep -q '^uid=1000(mpt-inf-v) gid=1000(mpt-inf-v)' <<<"$out"
    echo "file content" >"$tmp/f"
    rc=0
    # shellcheck disable=SC2016 # $A is expanded by the guest's shell
    out=$("$0" --bin /usr/bin/xz --file "$tmp/f:/opt/x/f" --env 'A=b c' -- sh -c 'cat /opt/x/f; echo "A=$A"; xz --version' 2>>"$tmp/err") || rc=$?
    CHECK="--file copies" check grep -qx 'file content' <<<"$out"
    CHECK="--env passes" check grep -qx 'A=b c' <<<"$out"
    CHECK="--bin with its libraries runs" check grep -q '^liblzma' <<<"$out"
    rc=0
    "$0" --timeout 3 -- sleep 60 >/dev/null 2>>"$tmp/err" || rc=$?
    CHECK="--timeout gives 124" check test "$rc" = 124
    [ "$failed" -eq 0 ] || { echo "----- stderr of the runs -----"; cat "$tmp/err"; }
    rm -rf "$tmp"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

main() {
    if [ "${1:-}" = --selftest ]; then
        selftest
        exit
    fi
    parse_args "$@"
    need_root
    apt_install busybox-static cpio xz-utils
    ensure_qemu
    ensure_kernel
    local t0
    t0=$(date +%s.%N)
    WORK=$(mktemp -d /tmp/mupilot-vm.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ROOT=$WORK/root
    mkdir -p "$ROOT"
    TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    build_root
    # Uncompressed: gzip costs more (host compression plus in-guest decompression under TCG,
    # measured 2-4 s for a 70 MB test binary) than loading the larger image saves.
    (cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) >"$WORK/initrd.cpio" ||
        fail "building the initramfs failed"
    BUILD_SECS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    run_vm
}

main "$@"
