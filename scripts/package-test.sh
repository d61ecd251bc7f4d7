#!/usr/bin/env bash
# Tests the packages scripts/package.sh built in target/packages, as a site would use them:
#   - the .rpm files: name, contents, modes, config files, scriptlets, requirements (`rpm -qp`:
#     installing an EL9 package is not possible on this Debian host);
#   - the .deb files, for real: `dpkg -i` both, check files, modes, conffiles, directories,
#     accounts, man pages and units (`systemd-analyze verify`); name the VO key and the pilot
#     account, `mupilot-switch check-config` on the installed default config; run the installed
#     helper and server (as the units would: this host has no systemd as PID 1) and the static
#     pilot as the pilot account; a payload runs as its owner's account; then
#     `dpkg --purge` both and prove nothing is left behind and no host file was touched.
# The .deb part runs in a private mount namespace with tmpfs overlays over /etc, /usr, /var and
# /run: dpkg's database, the accounts and every file live in the overlays and vanish with the
# namespace, so the host is restored even if a check fails half way. The overlays' upper
# directories are also what proves the purge clean: whatever is left in them is a leftover.
# Prints one "ok - ..." or "not ok - ..." line per check, then "N passed, M failed".
#
#   scripts/package.sh && scripts/package-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/demo-env.sh
source scripts/lib/demo-env.sh
need_root

PKG=$PWD/target/packages
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
SWITCH_DEB=$PKG/mupilot-switch_${version}-1_amd64.deb
SERVER_DEB=$PKG/mupilot-server_${version}-1_amd64.deb
SWITCH_RPM=$PKG/mupilot-switch-${version}-1.x86_64.rpm
SERVER_RPM=$PKG/mupilot-server-${version}-1.x86_64.rpm
STATIC=$PKG/mupilot-$version-x86_64-linux-static

# check DESCRIPTION COMMAND...: one result line; the counts go to $RESULTS (shared with the
# namespace's half of this script).
check() {
    local what=$1
    shift
    if "$@"; then
        echo "ok - $what" | tee -a "$RESULTS"
    else
        echo "not ok - $what" | tee -a "$RESULTS"
    fi
}

# has FILE PATTERN: FILE has a line matching the extended regex PATTERN (says which, if not).
has() {
    grep -Eq -- "$2" "$1" || {
        echo "  no line matching '$2' in $1:" >&2
        sed 's/^/    /' "$1" | head -40 >&2
        return 1
    }
}

# mode_owner PATH MODE USER GROUP: PATH exists with exactly that octal mode and owner.
mode_owner() {
    local got
    got=$(stat -c '%a %U %G' "$1" 2>&1) || { echo "  $1: $got" >&2; return 1; }
    [ "$got" = "$2 $3 $4" ] || { echo "  $1: mode/owner '$got', expected '$2 $3 $4'" >&2; return 1; }
}

rpm_checks() {
    local l=$WORK/rpm
    mkdir -p "$l"
    rpm -qp --qf '%{NAME} %{VERSION} %{RELEASE} %{ARCH}\n' "$SWITCH_RPM" >"$l/switch.name"
    check "rpm: mupilot-switch $version x86_64" has "$l/switch.name" "^mupilot-switch $version 1 x86_64$"
    rpm -qlvp "$SWITCH_RPM" >"$l/switch.files"
    check "rpm: helper /usr/sbin/mupilot-switch 0755" has "$l/switch.files" '^-rwxr-xr-x .* /usr/sbin/mupilot-switch$'
    check "rpm: pilot /usr/bin/mupilot 0755" has "$l/switch.files" '^-rwxr-xr-x .* /usr/bin/mupilot$'
    check "rpm: /usr/bin/mupilot-glexec 0755, no setuid bit" has "$l/switch.files" '^-rwxr-xr-x .* /usr/bin/mupilot-glexec$'
    for u in mupilot-switch.socket mupilot-switch.service 'mupilot-pilot@.service'; do
        check "rpm: unit $u" has "$l/switch.files" "^-rw-r--r-- .* /usr/lib/systemd/system/$u\$"
    done
    check "rpm: /etc/mupilot/switch.toml 0644" has "$l/switch.files" '^-rw-r--r-- .* /etc/mupilot/switch.toml$'
    rpm -qcp "$SWITCH_RPM" >"$l/switch.config"
    check "rpm: switch.toml is a config file" has "$l/switch.config" '^/etc/mupilot/switch.toml$'
    check "rpm: policy examples" has "$l/switch.files" ' /usr/share/doc/mupilot/examples/site.policy$'
    check "rpm: man page mupilot-switch-check-config(8)" has "$l/switch.files" ' /usr/share/man/man8/mupilot-switch-check-config.8.gz$'
    check "rpm: man page mupilot-run(1)" has "$l/switch.files" ' /usr/share/man/man1/mupilot-run.1.gz$'
    check "rpm: bash completion" has "$l/switch.files" ' /usr/share/bash-completion/completions/mupilot-switch$'
    check "rpm: zsh completion" has "$l/switch.files" ' /usr/share/zsh/site-functions/_mupilot-switch$'
    check "rpm: no server files in the site package" bash -c "! grep -q 'mupilot-server' '$l/switch.files'"
    rpm -qp --scripts "$SWITCH_RPM" >"$l/switch.scripts"
    check "rpm: %post makes the state dir 0700" has "$l/switch.scripts" 'install -d -m 0700 -o root -g root /var/lib/mupilot /var/log/mupilot'
    check "rpm: %post makes the scratch root 0711" has "$l/switch.scripts" 'install -d -m 0711 -o root -g root /var/spool/mupilot'
    check "rpm: %post makes the socket's group" has "$l/switch.scripts" 'groupadd --system mupilot-pilots'
    check "rpm: %preun stops the helper on erase" has "$l/switch.scripts" 'systemctl disable --now mupilot-switch.socket'
    rpm -qp --requires "$SWITCH_RPM" >"$l/switch.requires"
    check "rpm: requires shadow-utils (groupadd)" has "$l/switch.requires" '^shadow-utils'
    check "rpm: requires glibc's libc.so.6 (from the binaries)" has "$l/switch.requires" '^libc\.so\.6'

    rpm -qp --qf '%{NAME} %{VERSION} %{ARCH}\n' "$SERVER_RPM" >"$l/server.name"
    check "rpm: mupilot-server $version x86_64" has "$l/server.name" "^mupilot-server $version x86_64$"
    rpm -qlvp "$SERVER_RPM" >"$l/server.files"
    check "rpm: /usr/bin/mupilot-server 0755" has "$l/server.files" '^-rwxr-xr-x .* /usr/bin/mupilot-server$'
    check "rpm: unit mupilot-server.service" has "$l/server.files" ' /usr/lib/systemd/system/mupilot-server.service$'
    check "rpm: man page mupilot-server-serve(8)" has "$l/server.files" ' /usr/share/man/man8/mupilot-server-serve.8.gz$'
    check "rpm: no helper in the server package" bash -c "! grep -q 'mupilot-switch' '$l/server.files'"
    rpm -qp --scripts "$SERVER_RPM" >"$l/server.scripts"
    check "rpm: %post makes the server's account" has "$l/server.scripts" 'useradd --system --gid mupilot-server'
}

static_checks() {
    local l=$WORK/static
    mkdir -p "$l"
    file -L "$STATIC" >"$l/file"
    check "static pilot: file(1) says statically linked" has "$l/file" 'static(-pie)? linked'
    readelf -lW "$STATIC" >"$l/phdrs"
    readelf -dW "$STATIC" >"$l/dynamic" 2>&1 || true
    check "static pilot: no program interpreter" bash -c "! grep -q INTERP '$l/phdrs'"
    check "static pilot: no shared library" bash -c "! grep -q NEEDED '$l/dynamic'"
    # A glibc-free binary asks for no versioned glibc symbol (GLIBC_2.x), the EL8 obstacle.
    check "static pilot: no GLIBC_ symbol version" bash -c "! readelf -VW '$STATIC' | grep -q GLIBC_"
}

# The .deb half, inside a private mount namespace (see the header).
deb_checks() {
    local T=$WORK/ns d
    mkdir -p "$T"
    mount -t tmpfs -o mode=0700 mupilot-pkgtest "$T"
    mkdir "$T/lower"
    mount --bind / "$T/lower" # the root filesystem without the overlays: what the host has
    for d in etc usr var run; do
        mkdir -p "$T/$d/u" "$T/$d/w"
        mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d/u,workdir=$T/$d/w" "/$d"
    done
    # Whatever this host already has of ours (a test's leftover account) would collide: clear
    # it in the overlay, then record the overlay's state as the baseline the purge returns to.
    local a
    for a in mupilot mpu-alice mupilot-server; do
        if getent passwd "$a" >/dev/null; then userdel "$a" >/dev/null 2>&1 || true; fi
    done
    for a in mupilot-pilots mupilot-server mupilot mpu-alice; do
        if getent group "$a" >/dev/null; then groupdel "$a" >/dev/null 2>&1 || true; fi
    done
    rm -rf /etc/mupilot /var/lib/mupilot /var/log/mupilot /var/spool/mupilot /run/mupilot \
        /etc/mupilot-server /var/lib/mupilot-server
    describe "$T" >"$T/baseline"

    local l=$T/log
    mkdir -p "$l"
    check "deb: dpkg -i mupilot-switch mupilot-server" dpkg -i "$SWITCH_DEB" "$SERVER_DEB"
    check "deb: /usr/sbin/mupilot-switch 0755 root" mode_owner /usr/sbin/mupilot-switch 755 root root
    check "deb: /usr/bin/mupilot 0755 root" mode_owner /usr/bin/mupilot 755 root root
    check "deb: /usr/bin/mupilot-glexec 0755 root, no setuid bit" mode_owner /usr/bin/mupilot-glexec 755 root root
    check "deb: /usr/bin/mupilot-server 0755 root" mode_owner /usr/bin/mupilot-server 755 root root
    for u in mupilot-switch.socket mupilot-switch.service mupilot-pilot@.service mupilot-server.service; do
        check "deb: unit $u" mode_owner "/usr/lib/systemd/system/$u" 644 root root
    done
    check "deb: /etc/mupilot/switch.toml 0644" mode_owner /etc/mupilot/switch.toml 644 root root
    dpkg-query -W -f='${Conffiles}\n' mupilot-switch >"$l/conffiles"
    check "deb: switch.toml is a conffile" has "$l/conffiles" '^ /etc/mupilot/switch.toml [0-9a-f]{32}$'
    check "deb: state dir /var/lib/mupilot 0700 root" mode_owner /var/lib/mupilot 700 root root
    check "deb: audit log dir /var/log/mupilot 0700 root" mode_owner /var/log/mupilot 700 root root
    check "deb: scratch root /var/spool/mupilot 0711 root" mode_owner /var/spool/mupilot 711 root root
    check "deb: gridmapdir 0755 root" mode_owner /etc/grid-security/gridmapdir 755 root root
    check "deb: grid-mapfile 0644 root" mode_owner /etc/grid-security/grid-mapfile 644 root root
    check "deb: the socket's group mupilot-pilots" getent group mupilot-pilots
    check "deb: the server's system account" bash -c '[ "$(id -u mupilot-server)" -lt 1000 ]'
    check "deb: /var/lib/mupilot-server 0700 mupilot-server" mode_owner /var/lib/mupilot-server 700 mupilot-server mupilot-server
    check "deb: /etc/mupilot-server 0750 root:mupilot-server" mode_owner /etc/mupilot-server 750 root mupilot-server
    check "deb: policy examples" test -f /usr/share/doc/mupilot/examples/vo-demo.policy
    check "deb: man finds mupilot-switch-check-config(8)" man -w mupilot-switch-check-config
    check "deb: man finds mupilot-run(1)" man -w mupilot-run
    check "deb: man finds mupilot-server-serve(8)" man -w mupilot-server-serve
    check "deb: bash completions" test -f /usr/share/bash-completion/completions/mupilot-switch -a \
        -f /usr/share/bash-completion/completions/mupilot-server
    check "deb: systemd-analyze verify the installed units" systemd-analyze verify \
        /usr/lib/systemd/system/mupilot-switch.socket /usr/lib/systemd/system/mupilot-switch.service \
        /usr/lib/systemd/system/mupilot-server.service

    # A site's two edits: the VO's key and the pilot account (switch.toml's defaults name
    # "demo", /etc/mupilot/vo-demo.pub and "mupilot"). And one owner in the grid-mapfile.
    local run=/var/lib/mupilot-pkgtest
    install -d -m 0755 "$run"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mupilot
    usermod -aG mupilot-pilots mupilot
    useradd --no-create-home --shell /usr/sbin/nologin mpu-alice
    local port
    port=$(free_port)
    mupilot-server init /etc/mupilot-server --listen "127.0.0.1:$port" >/dev/null
    sed -i 's|^data_dir = .*|data_dir = "/var/lib/mupilot-server"|' /etc/mupilot-server/server.toml
    chgrp -R mupilot-server /etc/mupilot-server
    chmod -R g+rX /etc/mupilot-server
    install -m 0644 /etc/mupilot-server/vo.pub /etc/mupilot/vo-demo.pub
    printf '"/DC=org/DC=mupilot-demo/CN=alice" mpu-alice\n' >/etc/grid-security/grid-mapfile.new
    mv /etc/grid-security/grid-mapfile.new /etc/grid-security/grid-mapfile
    check "deb: check-config passes on the installed default config" \
        mupilot-switch check-config --config /etc/mupilot/switch.toml
    # An upgrade (here: the same version again) keeps the site's edits and the modes.
    echo '# edited by the site' >>/etc/mupilot/switch.toml
    chmod 0755 /var/spool/mupilot
    check "deb: reinstalling keeps the edited conffile" bash -c \
        "dpkg -i '$SWITCH_DEB' >/dev/null && tail -1 /etc/mupilot/switch.toml | grep -qx '# edited by the site'"
    check "deb: reinstalling restores the scratch root's mode" mode_owner /var/spool/mupilot 711 root root

    # The pilot the VO ships (static if built), as the pilot account; the server by host name.
    local pilot=/usr/bin/mupilot
    [ -x "$STATIC" ] && pilot=$STATIC
    install -d -o mupilot -g mupilot -m 0700 "$run/pilot" "$run/pilot/work"
    install -o mupilot -g mupilot -m 0600 /etc/mupilot-server/pilot.key /etc/mupilot-server/pilot.crt "$run/pilot/"
    cp -r /etc/mupilot-server/certificates "$run/pilot/"
    chown -R mupilot:mupilot "$run/pilot/certificates"
    cat >"$run/pilot/pilot.toml" <<EOF
server_url = "https://localhost:$port"
cert = "$run/pilot/pilot.crt"
key = "$run/pilot/pilot.key"
ca = "$run/pilot/certificates"
switch_socket = "/run/mupilot/switch.sock"
work_dir = "$run/pilot/work"
EOF
    # As the units run them: the server unprivileged, the helper with UMask=0077.
    runuser -u mupilot-server -- /usr/bin/mupilot-server serve --config /etc/mupilot-server/server.toml \
        >"$l/server.log" 2>&1 &
    SERVER_PID=$!
    (umask 0077 && exec /usr/sbin/mupilot-switch serve --config /etc/mupilot/switch.toml) >"$l/switch.log" 2>&1 &
    SWITCH_PID=$!
    wait_for "test -S /run/mupilot/switch.sock" 10 || echo "  helper: $(cat "$l/switch.log")" >&2
    wait_for "(exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null" 10 || echo "  server: $(cat "$l/server.log")" >&2
    local client=(--server "https://localhost:$port" --cert /etc/mupilot-server/alice.crt
        --key /etc/mupilot-server/alice.key --ca /etc/mupilot-server/certificates)
    local id=""
    id=$(mupilot-server submit "${client[@]}" --jobtag pkgtest --cores 1 --memory 256M --walltime 60 -- \
        sh -c 'echo "runs as $(id -un)"') || echo "  submit failed" >&2
    check "deb: the pilot ($pilot) runs until the queue is empty" \
        timeout 120 runuser -u mupilot -- "$pilot" run --config "$run/pilot/pilot.toml" --idle-timeout 2
    mupilot-server status "${client[@]}" --json "$id" >"$l/status.json" 2>&1 || true
    jq -r '"\(.state) \(.account) \(.uid) \(.exit_code)"' "$l/status.json" >"$l/status" 2>&1 || true
    check "deb: the payload ran as its owner's account (mpu-alice) and succeeded" \
        has "$l/status" "^done mpu-alice $(id -u mpu-alice) 0$"
    mupilot-switch audit verify --log /var/log/mupilot/audit.jsonl >"$l/audit" 2>&1 || true
    check "deb: the installed helper's audit log is intact" has "$l/audit" 'intact'
    stop_pid "$SWITCH_PID"
    stop_pid "$SERVER_PID"
    SWITCH_PID="" SERVER_PID=""

    # Undo the site's own additions (accounts), then purge: the packages remove the rest.
    userdel mupilot
    userdel mpu-alice
    rm -rf "$run"
    check "deb: dpkg -r keeps the state" bash -c 'dpkg -r mupilot-switch mupilot-server >/dev/null &&
        test -d /var/lib/mupilot -a -f /var/log/mupilot/audit.jsonl -a -d /var/lib/mupilot-server &&
        test -f /etc/mupilot/switch.toml'
    check "deb: dpkg --purge mupilot-switch mupilot-server" dpkg --purge mupilot-switch mupilot-server
    check "deb: the purge removed the accounts and groups it made" bash -c \
        '! getent passwd mupilot-server && ! getent group mupilot-server && ! getent group mupilot-pilots'
    leftovers "$T" >"$l/leftovers"
    check "deb: the purge left nothing behind and touched no host file" bash -c "[ ! -s '$l/leftovers' ] || { sed 's/^/  /' '$l/leftovers' >&2; false; }"
}

# describe NS: one line per entry of the overlays' upper directories: path, then its type and,
# for a file, its content's hash.
describe() {
    local T=$1 d rel up
    for d in etc usr var run; do
        (cd "$T/$d/u" && find . -mindepth 1 | sort) | while IFS= read -r rel; do
            up=$T/$d/u/${rel#./}
            if [ -L "$up" ]; then
                printf '/%s/%s\tlink %s\n' "$d" "${rel#./}" "$(readlink "$up")"
            elif [ -d "$up" ]; then
                printf '/%s/%s\tdir\n' "$d" "${rel#./}"
            elif [ -c "$up" ]; then
                printf '/%s/%s\tchar %s\n' "$d" "${rel#./}" "$(stat -c '%t %T' "$up")"
            else
                printf '/%s/%s\tfile %s\n' "$d" "${rel#./}" "$(sha256sum <"$up" | cut -c1-64)"
            fi
        done
    done
}

# leftovers NS: every entry of the overlays now that is not as in the baseline and not as on the
# host: a path left behind, a host file changed, or a host file removed (a whiteout); dpkg's,
# man-db's, shadow's and systemd's own bookkeeping aside (`systemd-analyze verify` stamps
# /run/systemd/systemd-units-load when the host has none yet, as on a fresh machine).
leftovers() {
    local T=$1 path desc low
    describe "$T" | grep -vxFf "$T/baseline" | while IFS=$'\t' read -r path desc; do
        case "$path" in
        /var/lib/dpkg | /var/lib/dpkg/* | /var/log/dpkg.log | /var/cache/* | /var/log/apt/* | \
            /etc/*- | /etc/.pwd.lock | /var/log/lastlog | /var/log/faillog | \
            /run/systemd/systemd-units-load)
            continue
            ;;
        esac
        low=$T/lower$path
        case "$path" in
        /etc/passwd | /etc/group | /etc/shadow | /etc/gshadow | /etc/subuid | /etc/subgid)
            # Lines, not whole files: the host's own accounts may change meanwhile (the copy
            # here is from when this test first wrote the file). A line added and not removed
            # is a leftover account, group or id range.
            comm -23 <(sort "$path") <(sort "$low") |
                sed "s|^|left in $path: |"
            continue
            ;;
        esac
        case "$desc" in
        "char 0 0") echo "removed from the host: $path" ;;
        dir) [ -d "$low" ] || echo "left behind: $path/" ;;
        *)
            if [ ! -e "$low" ] && [ ! -L "$low" ]; then
                echo "left behind: $path"
            elif [ "$desc" != "file $(sha256sum <"$low" | cut -c1-64)" ]; then
                echo "changed: $path"
            fi
            ;;
        esac
    done
}

if [ "${1:-}" = "--in-namespace" ]; then
    WORK=$2
    RESULTS=$WORK/results
    SWITCH_PID="" SERVER_PID=""
    trap 'stop_pid "$SWITCH_PID"; stop_pid "$SERVER_PID"' EXIT
    deb_checks
    exit 0
fi

for f in "$SWITCH_DEB" "$SERVER_DEB" "$SWITCH_RPM" "$SERVER_RPM"; do
    [ -f "$f" ] || die "$f is missing: run scripts/package.sh first"
done
apt_install rpm jq file binutils man-db util-linux
WORK=$(mktemp -d /tmp/mupilot-package-test.XXXXXX)
RESULTS=$WORK/results
: >"$RESULTS"
trap 'rm -rf "$WORK"' EXIT

rpm_checks
if [ -f "$STATIC" ]; then
    static_checks
else
    echo "not ok - static pilot: $STATIC is missing (scripts/package.sh without NO_STATIC builds it)" | tee -a "$RESULTS"
fi
unshare --mount --propagation private "$0" --in-namespace "$WORK" ||
    echo "not ok - deb: the namespace half exited with $?" | tee -a "$RESULTS"

p=$(grep -c '^ok ' "$RESULTS" || true)
f=$(grep -c '^not ok ' "$RESULTS" || true)
echo "$p passed, $f failed"
[ "$f" -eq 0 ]
