# shellcheck shell=bash
# Shared helpers for mupilot's test infrastructure scripts (scripts/slurm.sh, scripts/vm-test.sh).
# Holds: logging, root check, idempotent Debian package installation, polling with a timeout.
# Must not: start or stop services, or hold state of its own; callers own their processes.

# Prefix for log lines; callers may set MUPILOT_LOG_TAG before sourcing.
: "${MUPILOT_LOG_TAG:=${0##*/}}"

# log MSG...: an informational line on stderr (stdout stays for the caller's real output).
log() { printf '[%s] %s\n' "$MUPILOT_LOG_TAG" "$*" >&2; }

# warn MSG...: a warning line on stderr.
warn() { printf '[%s] warning: %s\n' "$MUPILOT_LOG_TAG" "$*" >&2; }

# die MSG...: an error line on stderr, then exit 1.
die() {
    printf '[%s] error: %s\n' "$MUPILOT_LOG_TAG" "$*" >&2
    exit 1
}

# need_root: exit with a clear message unless running as uid 0.
need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        die "must run as root (uid 0), running as uid $(id -u); rerun with sudo"
    fi
}

# Set once apt-get update ran in this process, so several apt_install calls update only once.
_MUPILOT_APT_UPDATED=""

# _pkg_installed PKG: true when dpkg reports PKG fully installed.
_pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

# apt_install PKG...: install the packages that are not installed yet, non-interactively,
# never removing an installed package (--no-remove: apt gives up instead; a package of another
# release can Break what the release brings). Runs apt-get update first when the package lists
# are missing or an install failed, and retries the install once. Waits for the dpkg lock
# (other processes may be installing).
apt_install() {
    local missing=() p
    for p in "$@"; do
        _pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local apt=(apt-get -q -y -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$_MUPILOT_APT_UPDATED" ] && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        log "apt-get update (no package lists yet)"
        "${apt[@]}" update >&2 || warn "apt-get update failed"
        _MUPILOT_APT_UPDATED=1
    fi
    log "installing: ${missing[*]}"
    if "${apt[@]}" install --no-install-recommends --no-remove "${missing[@]}" >&2; then
        return 0
    fi
    warn "install of ${missing[*]} failed; running apt-get update and retrying once"
    "${apt[@]}" update >&2 || warn "apt-get update failed"
    _MUPILOT_APT_UPDATED=1
    "${apt[@]}" install --no-install-recommends --no-remove "${missing[@]}" >&2 ||
        die "could not install ${missing[*]} without removing installed packages; see what apt would remove with apt-get -s install ${missing[*]}, check the package names with apt-cache policy and the network to the Debian mirror"
}

# wait_for CMD TIMEOUT_SECONDS: run CMD (a string, evaluated by bash) every 0.5 s until it
# succeeds; returns 0 on success, 1 when TIMEOUT_SECONDS passed without success.
wait_for() {
    local cmd=$1 timeout=$2 deadline
    deadline=$(($(date +%s) + timeout))
    while :; do
        if eval "$cmd" >/dev/null 2>&1; then
            return 0
        fi
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.5
    done
}

# pid_alive PIDFILE: true when PIDFILE names a running process.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}
