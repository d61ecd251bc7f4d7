# shellcheck shell=bash
# The QEMU and the Debian kernel the project's VMs boot (scripts/vm-test.sh, scripts/vm-systemd.sh).
# Holds: finding or unpacking qemu-system-x86_64, fetching and caching linux-image-amd64's kernel,
# and the filter both read the guest's serial console with. Must not: build guests or boot them. Callers set CACHE and MUPILOT_LOG_TAG;
# lib/common.sh gives log, warn and apt_install. Also usage (the calling script's header
# comment) and fail, both exiting 125 (the VM scripts' "could not run").
# shellcheck disable=SC2034 # QEMU, KERNEL, KVER and KROOT are for the callers

# usage: the calling script's header comment (its lines after the shebang), then exit 125.
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 125
}

fail() {
    printf '[%s] error: %s\n' "$MUPILOT_LOG_TAG" "$*" >&2
    exit 125
}

# ensure_qemu: sets QEMU (the command, as an array). The host's qemu-system-x86_64 when it has
# one; else Debian's qemu-system-x86, installed when that removes nothing; else the same
# packages unpacked into $CACHE/qemu/root and never installed. The last case is real: a host
# with qemu-utils from another release (e.g. 1:10.0 from bookworm-backports, which Breaks
# qemu-system-common << 1:8.0) cannot take the release's qemu-system-x86 (1:7.2) without apt
# removing that qemu-utils, and a test script must not remove what the machine has.
ensure_qemu() {
    if command -v qemu-system-x86_64 >/dev/null; then
        QEMU=(qemu-system-x86_64)
        return
    fi
    local root=$CACHE/qemu/root
    mkdir -p "$CACHE/qemu"
    exec 7>"$CACHE/qemu/.lock"
    flock -w 600 7 || fail "another vm-test.sh holds $CACHE/qemu/.lock for over 600 s"
    if [ ! -x "$root/usr/bin/qemu-system-x86_64" ]; then
        local plan
        plan=$(apt-get -s -q install --no-install-recommends qemu-system-x86 2>/dev/null) || plan=""
        if [ -z "$plan" ]; then
            apt-get -q -o DPkg::Lock::Timeout=600 update >&2 || warn "apt-get update failed"
            plan=$(apt-get -s -q install --no-install-recommends qemu-system-x86 2>/dev/null) ||
                fail "apt-get cannot plan an install of qemu-system-x86; check the package lists (apt-get update)"
        fi
        if ! grep -q '^Remv ' <<<"$plan"; then
            flock -u 7
            apt_install qemu-system-x86
            QEMU=(qemu-system-x86_64)
            return
        fi
        local removes pkgs tmp deb
        removes=$(awk '/^Remv / { print $2 }' <<<"$plan" | tr '\n' ' ')
        pkgs=$(awk '/^Inst / { print $2 }' <<<"$plan")
        log "installing qemu-system-x86 would remove ${removes}(installed from another release); unpacking it into $root instead (once, never installed)"
        tmp=$(mktemp -d "$CACHE/qemu/.extract.XXXXXX")
        # shellcheck disable=SC2086 # one package name per word
        (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download $pkgs >&2) ||
            { rm -rf "$tmp"; fail "apt-get download of qemu-system-x86 and its libraries failed; check the network to the Debian mirror"; }
        for deb in "$tmp"/*.deb; do
            dpkg-deb -x "$deb" "$tmp/root" || { rm -rf "$tmp"; fail "dpkg-deb -x $deb failed"; }
        done
        rm -rf "$root"
        mv "$tmp/root" "$root"
        rm -rf "$tmp"
    fi
    flock -u 7
    # The unpacked libraries first, the firmware (SeaBIOS, option ROMs) from the unpacked tree.
    QEMU=(env "LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
        "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios")
}

# ensure_kernel: sets KERNEL, KVER and KROOT (a tree with lib/modules/KVER) for the kernel that
# Debian's linux-image-amd64 currently depends on, downloading and extracting it once into CACHE.
ensure_kernel() {
    mkdir -p "$CACHE"
    exec 8>"$CACHE/.lock"
    flock -w 600 8 || fail "another vm-test.sh holds $CACHE/.lock for over 600 s"
    local pkg=""
    # apt-cache takes a second or two: reuse its answer for a day.
    if [ -n "$(find "$CACHE/current" -mmin -1440 2>/dev/null)" ]; then
        pkg=$(cat "$CACHE/current")
    fi
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        [ -z "$pkg" ] || echo "$pkg" >"$CACHE/current"
    fi
    if [ -z "$pkg" ]; then
        log "apt-get update (linux-image-amd64 unknown to apt-cache)"
        apt-get -q -o DPkg::Lock::Timeout=600 update >&2 || warn "apt-get update failed"
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        [ -z "$pkg" ] || echo "$pkg" >"$CACHE/current"
    fi
    if [ -z "$pkg" ]; then
        # Offline: use the newest kernel already in the cache.
        local newest
        newest=$(find "$CACHE" -mindepth 2 -maxdepth 2 -name vmlinuz -printf '%h\n' 2>/dev/null | sort -V | tail -n 1)
        [ -n "$newest" ] || fail "cannot resolve linux-image-amd64 with apt-cache and no kernel is cached in $CACHE"
        pkg=linux-image-${newest##*/}
        warn "apt-cache cannot resolve linux-image-amd64; using cached $pkg"
    fi
    KVER=${pkg#linux-image-}
    local kdir=$CACHE/$KVER
    if [ ! -f "$kdir/vmlinuz" ]; then
        log "fetching $pkg (once; cached in $kdir)"
        local tmp
        tmp=$(mktemp -d "$CACHE/.extract.XXXXXX")
        if ! (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >&2); then
            # Stale package lists name a kernel the mirror no longer has: refresh and re-resolve once.
            rm -f "$CACHE/current"
            rm -rf "$tmp"
            if [ -z "${_MUPILOT_VM_REFRESHED:-}" ]; then
                _MUPILOT_VM_REFRESHED=1
                apt-get -q -o DPkg::Lock::Timeout=600 update >&2 || warn "apt-get update failed"
                flock -u 8
                ensure_kernel
                return
            fi
            fail "apt-get download $pkg failed; check the network to the Debian mirror"
        fi
        dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x" || { rm -rf "$tmp"; fail "dpkg-deb -x of $pkg failed"; }
        mkdir -p "$tmp/out/root/lib/modules"
        mv "$tmp/x/boot/vmlinuz-$KVER" "$tmp/out/vmlinuz"
        [ -f "$tmp/x/boot/config-$KVER" ] && mv "$tmp/x/boot/config-$KVER" "$tmp/out/config"
        extract_vmlinux "$tmp/out"
        if [ -d "$tmp/x/lib/modules/$KVER" ]; then
            mv "$tmp/x/lib/modules/$KVER" "$tmp/out/root/lib/modules/"
        elif [ -d "$tmp/x/usr/lib/modules/$KVER" ]; then
            mv "$tmp/x/usr/lib/modules/$KVER" "$tmp/out/root/lib/modules/"
        fi
        rm -rf "$kdir"
        mv "$tmp/out" "$kdir"
        rm -rf "$tmp"
    fi
    # The uncompressed ELF kernel boots through PVH and skips the in-guest decompression of the
    # bzImage, which takes about 8 s under TCG.
    if [ -f "$kdir/vmlinux" ]; then KERNEL=$kdir/vmlinux; else KERNEL=$kdir/vmlinuz; fi
    KROOT=$kdir/root
    flock -u 8
}

# extract_vmlinux DIR: write DIR/vmlinux, the ELF kernel inside DIR/vmlinuz, when the kernel
# supports PVH boot (CONFIG_PVH=y) and its payload is xz, gzip or zstd compressed.
extract_vmlinux() {
    local dir=$1 magic tool off
    grep -qx 'CONFIG_PVH=y' "$dir/config" 2>/dev/null || return 0
    for magic in 'xz:\xfd7zXZ' 'gzip:\x1f\x8b\x08' 'zstd:\x28\xb5\x2f\xfd'; do
        tool=${magic%%:*}
        command -v "$tool" >/dev/null || continue
        while read -r off; do
            tail -c +$((off + 1)) "$dir/vmlinuz" | "$tool" -dcq >"$dir/vmlinux.tmp" 2>/dev/null || true
            if [ "$(head -c 4 "$dir/vmlinux.tmp" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; then
                mv "$dir/vmlinux.tmp" "$dir/vmlinux"
                return 0
            fi
        done < <(LC_ALL=C grep -aboP "${magic#*:}" "$dir/vmlinuz" | cut -d: -f1)
    done
    rm -f "$dir/vmlinux.tmp"
    warn "could not extract an ELF vmlinux from the bzImage; booting the bzImage (slower under TCG)"
}

# console_filter PATTERN: stream the console, printing the command's output (between the
# MUPILOT-VM-START-$TOKEN and MUPILOT-VM-EXIT-$TOKEN= markers) and lines matching the awk regex
# PATTERN (the guest's own error lines); everything when VERBOSE=1.
console_filter() {
    local live=()
    # mawk (Debian's default awk) reads pipes in blocks unless told otherwise: output would arrive
    # only when the guest ends.
    awk -W version 2>&1 | grep -q mawk && live=(-W interactive)
    awk "${live[@]}" -v tok="$TOKEN" -v verbose="$VERBOSE" -v pat="$1" '
        { sub(/\r+$/, "") }
        index($0, "MUPILOT-VM-START-" tok) { on = 1; if (verbose) print; fflush(); next }
        (i = index($0, "MUPILOT-VM-EXIT-" tok "=")) {
            if (i > 1) print substr($0, 1, i - 1)
            on = 0; if (verbose) print substr($0, i); fflush(); next
        }
        on || verbose || $0 ~ pat { print; fflush() }
    '
}
