#!/usr/bin/env bash
# Boots a Debian 12 root filesystem with systemd as PID 1 in a QEMU VM (Debian's kernel of
# linux-image-amd64, pure cgroup v2, as a site's worker node runs) and runs one command as root
# in it once the system reached multi-user.target; prints the command's output and exits with
# its status.
#
#   scripts/vm-systemd.sh [options] -- COMMAND [ARGS...]
#   scripts/vm-systemd.sh --image     only build (or find) the cached root filesystem image
#
#   --file SRC:DST   put a host file or directory at /mupilot-run/DST in the guest (repeatable);
#                    the command runs in /mupilot-run
#   --out DIR        copy what the command left in /mupilot-run/out back to DIR on the host
#   --mem SIZE       guest memory (QEMU -m syntax), default 2G
#   --smp N          guest CPUs, default 2
#   --timeout SECS   kill the VM after SECS seconds (exit 124), default 900
#   --verbose        print the whole serial console (kernel and systemd messages) too
#   --keep           keep the work directory (disks, console log) and print its path
#
# The root filesystem is built once with debootstrap from the Debian archive (minbase with
# systemd, dbus, man-db, jq, procps and what the packages need; about 1 min) into an ext4 image
# by `mkfs.ext4 -d` (no loop mount), cached in $MUPILOT_VM_CACHE/debian12-systemd/ under the
# hash of its recipe (this file's image section), so a changed recipe rebuilds it. Each run
# boots it with QEMU's -snapshot (the cached image is never written), gives the command's files
# on a second disk (also made by `mkfs.ext4 -d`) and reads /mupilot-run/out back with debugfs.
# The guest runs the command from mupilot-vm-run.service (After=multi-user.target) with output
# on the serial console; afterwards it powers off.
#
# Exit status: the command's status; 124 on timeout; 125 when the VM could not be built or did
# not report a status (the console log is printed then). Needs root.
# Environment: MUPILOT_VM_CACHE (default /var/cache/mupilot-vm), MUPILOT_DEBIAN_MIRROR (default
# http://deb.debian.org/debian).
set -euo pipefail

MUPILOT_LOG_TAG=vm-systemd.sh
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/vm-kernel.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/vm-kernel.sh"

CACHE=${MUPILOT_VM_CACHE:-/var/cache/mupilot-vm}
MIRROR=${MUPILOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
MEM=2G
SMP=2
TIMEOUT=900
FILES=()
OUT=""
VERBOSE=0
KEEP=0
QPID=""
WORK=""

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
        --file) FILES+=("${2:?--file needs SRC:DST}"); shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --mem) MEM=${2:?--mem needs a size like 2G}; shift 2 ;;
        --smp) SMP=${2:?--smp needs a number}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
        --verbose) VERBOSE=1; shift ;;
        --keep) KEEP=1; shift ;;
        -h | --help) usage ;;
        --) shift; break ;;
        *) fail "unknown option '$1'; put the guest command after '--' (see --help)" ;;
        esac
    done
    [ $# -gt 0 ] || fail "no command given; usage: scripts/vm-systemd.sh [options] -- COMMAND [ARGS...]"
    CMD=("$@")
    [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || fail "--timeout '$TIMEOUT' is not a number of seconds"
    [[ "$SMP" =~ ^[0-9]+$ ]] || fail "--smp '$SMP' is not a number"
}

# ---- the image (its recipe: everything from here to "end of the image recipe" is hashed) ----

# What debootstrap adds to minbase: systemd as init and its bus, what the tests read units and
# records with (man-db for systemd-analyze verify's man: links, jq, procps), and the .debs'
# dependencies (libc6 and passwd are in minbase).
IMAGE_PACKAGES=systemd,systemd-sysv,dbus,man-db,jq,procps,kmod
IMAGE_SUITE=bookworm
IMAGE_SIZE=1536M

# The unit and script that run the command once the system is up: /mupilot-run is the second
# disk; output goes to the serial console between two marker lines, then the guest powers off.
guest_runner() {
    cat >"$1/etc/systemd/system/mupilot-vm-run.service" <<'EOF'
[Unit]
Description=Run the command scripts/vm-systemd.sh gave
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/mupilot-vm-run
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
    cat >"$1/usr/local/sbin/mupilot-vm-run" <<'EOF'
#!/bin/sh
# Written by scripts/vm-systemd.sh: runs /mupilot-run/cmd.sh from the run disk, reports.
err() { echo "vm-run: error: $*"; }
if ! mount -t ext4 /dev/vdb /mupilot-run; then
    err "cannot mount the run disk /dev/vdb"
    systemctl poweroff --no-block
    exit 1
fi
TOKEN=$(cat /mupilot-run/token)
# Boot time to multi-user.target, in microseconds since the kernel started.
echo "vm-run: multi-user.target reached after $(systemctl show -P ActiveEnterTimestampMonotonic multi-user.target) us"
echo "MUPILOT-VM-START-$TOKEN"
cd /mupilot-run && /bin/sh /mupilot-run/cmd.sh </dev/null 2>&1
rc=$?
cd /
sync
umount /mupilot-run || err "cannot unmount the run disk"
echo "MUPILOT-VM-EXIT-$TOKEN=$rc"
systemctl poweroff --no-block
EOF
    chmod 0755 "$1/usr/local/sbin/mupilot-vm-run"
    mkdir -p "$1/mupilot-run" "$1/etc/systemd/system/multi-user.target.wants"
    ln -sf /etc/systemd/system/mupilot-vm-run.service "$1/etc/systemd/system/multi-user.target.wants/"
}

# configure_root ROOT: a worker node's basics, and nothing that slows the boot under TCG or
# waits for a device udev would announce (the image has no udev: device nodes come from
# devtmpfs, and no unit waits for a .device).
configure_root() {
    local r=$1 u
    echo mupilot-vm >"$r/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 mupilot-vm\n::1 localhost ip6-localhost\n' >"$r/etc/hosts"
    printf '/dev/vda / ext4 rw,noatime 0 1\n' >"$r/etc/fstab"
    ln -sf /lib/systemd/system/multi-user.target "$r/etc/systemd/system/default.target"
    for u in getty@.service serial-getty@.service apt-daily.timer apt-daily-upgrade.timer \
        man-db.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer dpkg-db-backup.timer \
        systemd-journal-flush.service; do
        ln -sf /dev/null "$r/etc/systemd/system/$u"
    done
    # The journal in memory only: the disk is a throw-away snapshot anyway.
    mkdir -p "$r/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\n' >"$r/etc/systemd/journald.conf.d/mupilot-vm.conf"
    guest_runner "$r"
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb
}

# end of the image recipe

image_recipe_hash() {
    {
        sed -n '/^# ---- the image (its recipe/,/^# end of the image recipe/p' "${BASH_SOURCE[0]}"
        echo "$MIRROR"
    } | sha256sum | cut -c1-16
}

# ensure_image: sets IMAGE, the cached root filesystem image for the current recipe; builds it
# (debootstrap into a directory, then mkfs.ext4 -d) when missing. Older images are removed.
ensure_image() {
    local dir=$CACHE/debian12-systemd hash
    hash=$(image_recipe_hash)
    IMAGE=$dir/root-$hash.ext4
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    flock -w 900 9 || fail "another vm-systemd.sh holds $dir/.lock for over 900 s"
    if [ -f "$IMAGE" ]; then
        flock -u 9
        return
    fi
    apt_install debootstrap e2fsprogs
    local tmp t0
    t0=$(date +%s)
    tmp=$(mktemp -d "$dir/.build.XXXXXX")
    log "building the Debian 12 root filesystem (debootstrap $IMAGE_SUITE from $MIRROR; about a minute, once per recipe)"
    # In a mount namespace of its own: debootstrap mounts /proc and /sys in the target, and
    # those mounts go away with the namespace whatever happens.
    if ! unshare --mount --propagation private debootstrap --variant=minbase \
        --include="$IMAGE_PACKAGES" "$IMAGE_SUITE" "$tmp/root" "$MIRROR" >"$tmp/debootstrap.log" 2>&1; then
        tail -n 30 "$tmp/debootstrap.log" >&2
        rm -rf "$tmp"
        fail "debootstrap $IMAGE_SUITE from $MIRROR failed (log above); check the network to the Debian mirror or set MUPILOT_DEBIAN_MIRROR"
    fi
    configure_root "$tmp/root"
    mkfs.ext4 -q -F -L mupilot-root -d "$tmp/root" "$tmp/root.ext4" "$IMAGE_SIZE" >/dev/null ||
        { rm -rf "$tmp"; fail "mkfs.ext4 -d of the root filesystem failed"; }
    mv "$tmp/root.ext4" "$IMAGE"
    log "root filesystem image $IMAGE built in $(($(date +%s) - t0)) s ($(du -sm "$tmp/root" | cut -f1) MB of files)"
    rm -rf "$tmp"
    find "$dir" -maxdepth 1 -name 'root-*.ext4' ! -name "root-$hash.ext4" -delete
    flock -u 9
}

# build_initrd: a busybox initramfs that loads the virtio and ext4 modules (Debian builds them
# as modules), mounts /dev/vda and hands over to systemd.
build_initrd() {
    local r=$WORK/initrd m line ko rel
    mkdir -p "$r"/{bin,dev,proc,sys,newroot}
    cp /bin/busybox "$r/bin/busybox"
    apt_install kmod
    [ -f "$KROOT/lib/modules/$KVER/modules.dep" ] || depmod -b "$KROOT" "$KVER"
    : >"$r/modules.sh"
    for m in virtio_pci virtio_blk ext4; do
        while read -r line; do
            case $line in
            insmod\ *)
                ko=${line#insmod }
                ko=${ko%% *}
                rel=${ko#"$KROOT"}
                if [ ! -e "$r$rel" ]; then
                    mkdir -p "$(dirname "$r$rel")"
                    cp "$ko" "$r$rel"
                    echo "insmod $rel || echo 'vm-initrd: error: insmod $rel failed'" >>"$r/modules.sh"
                fi
                ;;
            builtin\ *) ;;
            *) fail "unexpected modprobe output for $m: $line" ;;
            esac
        done < <(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" 2>&1 ||
            echo "error: module $m not found in $KVER")
    done
    cat >"$r/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
. /modules.sh
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o rw,noatime /dev/vda /newroot || echo "vm-initrd: error: cannot mount /dev/vda"
umount /dev /proc
exec switch_root /newroot /lib/systemd/systemd
EOF
    chmod 0755 "$r/init"
    (cd "$r" && find . -print0 | cpio --null -o -H newc --quiet) >"$WORK/initrd.cpio" ||
        fail "building the initramfs failed"
}

# build_run_disk: the command and its files on an ext4 image of their own.
build_run_disk() {
    local d=$WORK/run spec src dst a
    mkdir -p "$d/out"
    for spec in "${FILES[@]}"; do
        src=${spec%%:*}
        dst=${spec#*:}
        if [ "$src" = "$spec" ] || [ -z "$src" ] || [[ "$dst" = /* ]] || [[ "$dst" = *..* ]]; then
            fail "--file '$spec' must be SRC:DST with DST relative to /mupilot-run"
        fi
        [ -e "$src" ] || fail "--file '$spec': $src does not exist"
        mkdir -p "$(dirname "$d/$dst")"
        cp -a "$src" "$d/$dst"
    done
    echo "$TOKEN" >"$d/token"
    {
        printf 'exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8'
        for a in "${CMD[@]}"; do printf " '%s'" "${a//\'/\'\\\'\'}"; done
        printf '\n'
    } >"$d/cmd.sh"
    local mb
    mb=$(($(du -sm "$d" | cut -f1) * 2 + 256))
    mkfs.ext4 -q -F -L mupilot-run -d "$d" "$WORK/run.ext4" "${mb}M" >/dev/null || fail "mkfs.ext4 -d of the run disk failed"
}

run_vm() {
    local console=$WORK/console.log t0 deadline
    : >"$console"
    t0=$(date +%s.%N)
    # TCG: the project's host has no usable KVM (scripts/vm-test.sh probes and records it).
    local accel=tcg cpu=max
    if [ "$(sed -n 1p "$CACHE/kvm-verdict" 2>/dev/null)" = ok ]; then accel=kvm cpu=host; fi
    "${QEMU[@]}" -nodefaults -no-user-config -nographic -no-reboot \
        -accel "$accel" -cpu "$cpu" -m "$MEM" -smp "$SMP" \
        -kernel "$KERNEL" -initrd "$WORK/initrd.cpio" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 rw cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 systemd.show_status=0 random.trust_cpu=on" \
        -drive "file=$IMAGE,format=raw,if=virtio,index=0,snapshot=on" \
        -drive "file=$WORK/run.ext4,format=raw,if=virtio,index=1" \
        -serial "file:$console" -monitor none \
        </dev/null >"$WORK/qemu.out" 2>&1 &
    QPID=$!
    tail -n +1 -s 0.2 -f --pid="$QPID" "$console" | console_filter 'vm-(run|initrd): ' &
    local tailpid=$! outcome=finished
    deadline=$(($(date +%s) + TIMEOUT))
    while kill -0 "$QPID" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            outcome=timeout
            kill -TERM "$QPID" 2>/dev/null || true
            wait_for "! kill -0 $QPID" 3 || kill -KILL "$QPID" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$QPID" || true
    QPID=""
    wait "$tailpid" 2>/dev/null || true
    ELAPSED=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$outcome" = timeout ]; then
        warn "timeout after ${TIMEOUT}s; killed qemu"
        [ "$VERBOSE" = 1 ] || { echo "----- console log -----" >&2; tr -d '\r' <"$console" >&2; }
        copy_out || true
        exit 124
    fi
    BOOT_RC=$(tr -d '\r' <"$console" | sed -n "s/.*MUPILOT-VM-EXIT-$TOKEN=\([0-9]*\)\$/\1/p" | tail -n 1)
    if [ -z "$BOOT_RC" ]; then
        warn "the guest reported no exit status"
        { echo "----- qemu output -----"; cat "$WORK/qemu.out"; echo "----- console log -----"; tr -d '\r' <"$console"; } >&2
        exit 125
    fi
    BOOT_US=$(tr -d '\r' <"$console" | sed -n 's/.*vm-run: multi-user.target reached after \([0-9]*\) us$/\1/p' | tail -n 1)
}

copy_out() {
    [ -n "$OUT" ] || return 0
    mkdir -p "$OUT" "$WORK/dump"
    # debugfs reads the guest's ext4 without mounting it; rdump makes DIR/out.
    debugfs -R "rdump /out $WORK/dump" "$WORK/run.ext4" >/dev/null 2>"$WORK/debugfs.err" ||
        { warn "debugfs could not copy /out from the run disk: $(cat "$WORK/debugfs.err")"; return 1; }
    cp -a "$WORK/dump/out/." "$OUT/"
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if [ -n "${QPID:-}" ] && kill -0 "$QPID" 2>/dev/null; then
        kill -KILL "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
}

main() {
    need_root
    if [ "${1:-}" = --image ]; then
        ensure_image
        echo "$IMAGE"
        exit 0
    fi
    parse_args "$@"
    apt_install busybox-static cpio e2fsprogs
    ensure_qemu
    ensure_kernel
    ensure_image
    WORK=$(mktemp -d /tmp/mupilot-vmsd.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    TOKEN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    build_initrd
    build_run_disk
    run_vm
    copy_out || exit 125
    local boot="?"
    [ -n "${BOOT_US:-}" ] && boot=$(awk -v u="$BOOT_US" 'BEGIN { printf "%.1f", u / 1e6 }')
    log "guest command exited $BOOT_RC; VM ran ${ELAPSED}s, multi-user.target after ${boot}s"
    exit "$BOOT_RC"
}

main "$@"
