#!/bin/bash
# Runs inside the Debian 12 + systemd VM of scripts/vm-systemd.sh, started by
# scripts/vm-test-systemd.sh with the packages and docs/site-admin.md in /mupilot-run.
# Installs the site as docs/site-admin.md says (its "Installing from the packages" block, line by
# line), runs a VO server from its package and a pilot through mupilot-pilot@.service, and
# records what it finds in /mupilot-run/out: one file per fact, NAME holding the output and
# NAME.rc the exit status. It judges nothing: scripts/vm-test-systemd.sh asserts on the files.
set -u
cd /mupilot-run || exit 1
OUT=/mupilot-run/out
mkdir -p "$OUT"
PORT=8443
CLIENT_DIR=/etc/mupilot-server

note() { echo "site.sh: $*"; }

# trouble WHAT: say so on the console with the units' journals (the host sees out/ only when
# the guest finishes).
trouble() {
    note "$*"
    systemctl --no-pager status mupilot-switch.socket mupilot-switch.service 'mupilot-pilot@demo.service' 2>&1 | tail -n 40
    journalctl --no-pager -n 60 -u mupilot-switch.service -u 'mupilot-pilot@demo.service' 2>&1
}

# fact NAME COMMAND...: run COMMAND, keep its output and status.
fact() {
    local name=$1
    shift
    "$@" >"$OUT/$name" 2>&1
    echo $? >"$OUT/$name.rc"
}

# poll SECONDS COMMAND...: run COMMAND every 0.2 s until it succeeds; 1 if it never did.
poll() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

client() { # user: the flags a VO member's client uses
    echo --server "https://localhost:$PORT" --cert "$CLIENT_DIR/$1.crt" --key "$CLIENT_DIR/$1.key" \
        --ca "$CLIENT_DIR/certificates"
}

submit() { # name user args...: submit, keep the payload id in $OUT/id-NAME
    local name=$1 user=$2
    shift 2
    # shellcheck disable=SC2046 # client's words
    fact "id-$name" mupilot-server submit $(client "$user") "$@"
}

fact pid1 cat /proc/1/comm
fact cgroupfs stat -f -c %T /sys/fs/cgroup
fact kernel uname -r

# The VO's side, from its own package: the server the pilot fetches payloads from. Its vo.pub is
# "the key your VO gives you" of the guide.
fact server-dpkg dpkg -i ./mupilot-server_*_amd64.deb
fact server-init mupilot-server init "$CLIENT_DIR" --listen "127.0.0.1:$PORT"
sed -i 's|^data_dir = .*|data_dir = "/var/lib/mupilot-server"|' "$CLIENT_DIR/server.toml"
chgrp -R mupilot-server "$CLIENT_DIR"
chmod -R g+rX "$CLIENT_DIR"
fact server-start systemctl start mupilot-server.service
poll 30 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" || trouble "the VO server does not listen on $PORT"
cp "$CLIENT_DIR/vo.pub" ./vo.pub

# The site admin's side: the guide's block as written. $EDITOR maps alice and bob (carol stays
# unmapped) and chooses ipc_fallback for this kernel; the packaged switch.toml already names the
# VO "demo", its key and the account "mupilot".
awk '/^## Installing from the packages/ { s = 1 } s && /^```console/ { b = 1; next } b && /^```/ { exit }
     b && /^# / { sub(/^# /, ""); print }' site-admin.md >guide.sh
cat >editor.sh <<'EOF'
#!/bin/sh
# The guide's "$EDITOR switch.toml grid-mapfile": the mappings, written atomically.
for f in "$@"; do
    case $f in
    */switch.toml)
        # Debian 12's kernel has no Landlock ABI 6. The default fallback, "pasta", connects
        # each payload's namespace to the node's network, but this guest has no network device
        # for it to connect to (and no udev to make /dev/net/tun 0666): choose "loopback".
        sed 's/^# ipc_fallback = "pasta"$/ipc_fallback = "loopback"/' "$f" >"$f.new"
        mv "$f.new" "$f"
        ;;
    */grid-mapfile)
        { cat "$f"; printf '"/DC=org/DC=mupilot-demo/CN=alice" mpu-alice\n"/DC=org/DC=mupilot-demo/CN=bob" mpu-bob\n'; } >"$f.new"
        mv "$f.new" "$f"
        ;;
    esac
done
EOF
chmod 0755 editor.sh
cp guide.sh "$OUT/guide.sh"
EDITOR=/mupilot-run/editor.sh fact guide bash -ex guide.sh
[ "$(cat "$OUT/guide.rc")" = 0 ] || { note "the guide's block failed:"; cat "$OUT/guide"; }

fact socket-active systemctl is-active mupilot-switch.socket
fact socket-enabled systemctl is-enabled mupilot-switch.socket
fact service-before systemctl is-active mupilot-switch.service
fact socket-stat stat -c '%a %U %G %F' /run/mupilot/switch.sock
fact rundir-stat stat -c '%a %U %G' /run/mupilot
fact verify systemd-analyze verify /usr/lib/systemd/system/mupilot-switch.socket \
    /usr/lib/systemd/system/mupilot-switch.service /usr/lib/systemd/system/mupilot-server.service
fact security systemd-analyze security --no-pager mupilot-switch.service
fact show-socket systemctl show -p ListenStream -p SocketUser -p SocketGroup -p SocketMode \
    -p DirectoryMode -p Accept -p RemoveOnStop mupilot-switch.socket
fact show-service systemctl show -p NoNewPrivileges -p RestrictSUIDSGID -p RestrictRealtime \
    -p LockPersonality -p IPAddressDeny -p CapabilityBoundingSet -p AmbientCapabilities \
    -p StateDirectory -p StateDirectoryMode -p LogsDirectory -p LogsDirectoryMode \
    -p RuntimeDirectory -p UMask -p MemoryMax -p TasksMax -p KillMode -p ProtectSystem \
    -p PrivateTmp -p ProtectHome -p RestrictNamespaces mupilot-switch.service

# The pilot as a testing node without a batch system runs it: mupilot-pilot@demo.service, as
# the pilot account, with its certificate and a work directory of its own.
install -d -o mupilot -g mupilot -m 0700 /etc/mupilot/pilot-demo ~mupilot/work
install -o mupilot -g mupilot -m 0600 "$CLIENT_DIR/pilot.key" "$CLIENT_DIR/pilot.crt" /etc/mupilot/pilot-demo/
cp -r "$CLIENT_DIR/certificates" /etc/mupilot/pilot-demo/
chown -R mupilot:mupilot /etc/mupilot/pilot-demo/certificates
cat >/etc/mupilot/pilot-demo.toml <<EOF
server_url = "https://localhost:$PORT"
cert = "/etc/mupilot/pilot-demo/pilot.crt"
key = "/etc/mupilot/pilot-demo/pilot.key"
ca = "/etc/mupilot/pilot-demo/certificates"
work_dir = "$(getent passwd mupilot | cut -d: -f6)/work"
EOF

# The pilot runs in the environment Slurm gives a batch job (job 4711, 2 cores, 1 GiB, an hour
# left): it reads its slot and batch job id from there, as in production, and the records carry
# them (tests/records_incident.rs tells its walkthrough with this run's records).
mkdir -p /etc/systemd/system/mupilot-pilot@demo.service.d
cat >/etc/systemd/system/mupilot-pilot@demo.service.d/slurm-job.conf <<EOF
[Service]
Environment=SLURM_JOB_ID=4711 SLURM_CPUS_ON_NODE=2 SLURM_MEM_PER_NODE=1024 SLURM_JOB_END_TIME=$(($(date +%s) + 3600))
EOF
systemctl daemon-reload

# Payloads: alice's and bob's report who and where they run, with an input bundle; carol has
# no mapping; bob's long one is running when the helper is stopped.
mkdir -p bundle
echo "input of the systemd VM test" >bundle/input.txt
# shellcheck disable=SC2016 # expanded by the payload's shell
show='echo "user=$(id -un) uid=$(id -u) cgroup=$(cat /proc/self/cgroup)"; cat input.txt'
submit alice alice --jobtag systemd-vm --cores 1 --memory 256M --walltime 120 --bundle bundle -- sh -c "$show"
submit bob bob --jobtag systemd-vm --cores 1 --memory 256M --walltime 120 --bundle bundle -- sh -c "$show"
submit carol carol --jobtag systemd-vm --cores 1 --memory 256M --walltime 120 -- sh -c 'echo carol must never run'

# A local account outside mupilot-pilots (here a payload account) cannot connect, so it cannot
# start the helper either: the kernel refuses the connect on the socket's mode.
fact user-connect runuser -u mpu-alice -- mupilot-switch audit kill --owner /DC=org/DC=x/CN=y
fact service-before-pilot systemctl is-active mupilot-switch.service
fact pilot-start systemctl start mupilot-pilot@demo.service
poll 60 systemctl is-active mupilot-switch.service || trouble "the helper never became active"
fact service-after-pilot systemctl is-active mupilot-switch.service
fact activation systemctl show -p ExecMainStartTimestampMonotonic -p ActiveEnterTimestampMonotonic \
    -p NRestarts mupilot-switch.service
fact pilot-activation systemctl show -p ExecMainStartTimestampMonotonic mupilot-pilot@demo.service
for n in alice bob carol; do
    # shellcheck disable=SC2046 # client's words
    fact "status-$n" mupilot-server status $(client "$n") --json --wait 60 "$(cat "$OUT/id-$n")"
done

# The helper, running: what the kernel says of its privileges, and the state it keeps.
main=$(systemctl show -P MainPID mupilot-switch.service)
fact helper-proc grep -E '^(NoNewPrivs|CapBnd|CapEff|Seccomp):' "/proc/$main/status"
fact helper-cgroup cat "/proc/$main/cgroup"
fact state-stat stat -c '%n %a %U %G' /var/lib/mupilot /var/log/mupilot /var/spool/mupilot
fact check-config mupilot-switch check-config --config /etc/mupilot/switch.toml

# A long payload, running when the admin stops the helper.
submit long bob --jobtag systemd-vm --cores 1 --memory 256M --walltime 900 -- sh -c 'sleep 600 & sleep 600; wait'
poll 60 pgrep -u mpu-bob -x sleep || trouble "bob's long payload never started"
sleep 1
fact long-ps ps -o user=,pid=,cgroup=,args= -u mpu-bob
pid=$(pgrep -u mpu-bob -x sleep | head -n 1)
cg=$(sed -n 's/^0:://p' "/proc/$pid/cgroup" 2>/dev/null)
echo "$cg" >"$OUT/long-cgroup"
fact long-cgroup-procs cat "/sys/fs/cgroup$cg/cgroup.procs"
t0=$(date +%s.%N)
fact stop systemctl stop mupilot-switch.service
echo "$t0 $(date +%s.%N)" >"$OUT/stop-seconds"
fact after-stop-ps ps -o user=,pid=,args= -u mpu-bob
fact after-stop-cgroup ls -d "/sys/fs/cgroup$cg"
fact service-after-stop systemctl is-active mupilot-switch.service

# The records, for the host: the audit log (and its verification) and the pilot's trace.
fact pilot-stop systemctl stop mupilot-pilot@demo.service
fact audit-verify mupilot-switch audit verify
cp /var/log/mupilot/audit.jsonl "$OUT/audit.jsonl"
cp ~mupilot/work/trace.jsonl "$OUT/trace.jsonl" 2>/dev/null
fact journal-switch journalctl --no-pager -o short-monotonic -u mupilot-switch.service -u mupilot-switch.socket
fact journal-pilot journalctl --no-pager -o short-monotonic -u mupilot-pilot@demo.service
fact failed systemctl --failed --no-legend

# A configuration check-config refuses (Debian 12's kernel and ipc_fallback = "refuse"): the
# service fails after its start limit instead of restarting for ever, the socket fails with it,
# and the guide's recovery brings the socket back once the configuration is fixed.
sed -i 's/^ipc_fallback = "loopback"$/ipc_fallback = "refuse"/' /etc/mupilot/switch.toml
t0=$(date +%s)
systemctl start mupilot-switch.service >/dev/null 2>&1
# shellcheck disable=SC2016 # expanded by that bash
poll 90 bash -c '[ "$(systemctl show -P Result mupilot-switch.socket)" = service-start-limit-hit ]' ||
    trouble "the helper did not hit its start limit"
echo $(($(date +%s) - t0)) >"$OUT/broken-seconds"
fact broken-service systemctl show -p Result -p NRestarts -p ActiveState mupilot-switch.service
fact broken-socket systemctl show -p Result -p ActiveState mupilot-switch.socket
fact broken-socket-file ls -l /run/mupilot/switch.sock
sed -i 's/^ipc_fallback = "refuse"$/ipc_fallback = "loopback"/' /etc/mupilot/switch.toml
systemctl reset-failed mupilot-switch.service mupilot-switch.socket
fact recovered-start systemctl start mupilot-switch.socket
fact recovered-socket systemctl is-active mupilot-switch.socket
note "done"
