#!/usr/bin/env python3
"""The helper's resident memory and threads under the pilot account's resource attacks (issue
14.3), as a markdown table. Needs root; starts its own `mupilot-switch serve` on a temp site.

    scripts/helper-rss.py [--old] target/debug/mupilot-switch

  --old   the helper before [limits] existed: write no [limits] table into switch.toml

Attacks, each from a fresh helper, measured while the attack holds (VmRSS, RssAnon: the heap
and stacks the attack can grow, VmHWM: the peak since start):
  idle      the helper after start, nobody connected
  frames    4 connections say hello, then each announces a 200 MiB frame and sends it
  idle300   300 connections say hello and stay idle
  slow      50 connections say hello, then trickle a frame one byte per second; after 15 s
            the number of them the helper still holds open is reported too
"""
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def mib(kb_field):
    return int(kb_field.split()[0]) / 1024


def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


HELLO = frame({"type": "hello", "pilot_id": "rss-attack"})


def site(binary, old):
    d = tempfile.mkdtemp(prefix="mupilot-rss-")
    os.chmod(d, 0o755)
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", f"{d}/vo.key"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", f"{d}/vo.key", "-pubout", "-out", f"{d}/vo.pub"],
                   check=True, capture_output=True)
    open(f"{d}/grid-mapfile", "w").write("")
    scratch = tempfile.mkdtemp(prefix="mupilot-rss-", dir="/var/lib")
    cfg = f"""socket = "run/switch.sock"
allowed_pilots = ["root"]
gridmap = "grid-mapfile"
audit_log = "log/audit.jsonl"
state_dir = "state"
[[vo]]
name = "rss"
public_key = "vo.pub"
[sandbox]
scratch_root = "{scratch}/scratch"
"""
    if not old:
        cfg += "[limits]\n"
    open(f"{d}/switch.toml", "w").write(cfg)
    log = open(f"{d}/daemon.log", "w")
    p = subprocess.Popen([binary, "serve", "--config", f"{d}/switch.toml"],
                         stdout=subprocess.DEVNULL, stderr=log)
    sock = f"{d}/run/switch.sock"
    for _ in range(500):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            break
        except OSError:
            time.sleep(0.02)
    time.sleep(0.5)
    return p, sock, d, scratch


def hello(sock):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(HELLO)
    s.settimeout(10)
    head = s.recv(4, socket.MSG_WAITALL)
    ev = json.loads(s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL))
    if ev.get("type") != "welcome":
        s.close()
        raise OSError(ev.get("reason", "no welcome"))
    return s


def attack_frames(sock, pid):
    conns = [hello(sock) for _ in range(4)]
    chunk = b" " * (1 << 20)

    def send(s):
        try:
            s.sendall(struct.pack(">I", 200 << 20))
            for _ in range(200):
                s.sendall(chunk)
        except OSError:
            pass  # the helper refused the frame and closed

    ts = [threading.Thread(target=send, args=(s,)) for s in conns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    time.sleep(0.5)
    return conns, ""


def attack_idle300(sock, pid):
    conns = []
    refused = 0
    for _ in range(300):
        try:
            conns.append(hello(sock))
        except (OSError, struct.error, ValueError):
            refused += 1
    time.sleep(0.5)
    return conns, f"{300 - refused} served, {refused} refused"


def attack_slow(sock, pid):
    conns = [hello(sock) for _ in range(50)]
    for s in conns:
        s.sendall(struct.pack(">I", 1 << 20))
    for _ in range(15):
        for s in conns:
            try:
                s.send(b" ")
            except OSError:
                pass
        time.sleep(1)
    open_ = 0
    for s in conns:
        s.setblocking(False)
        try:
            s.recv(1)  # an answer (the helper's error) or EOF: closed by the helper
        except BlockingIOError:
            open_ += 1  # nothing to read, not closed: the helper still holds it
        except OSError:
            pass
    return conns, f"{open_} of 50 still open after 15 s"


def run(binary, old, name, attack):
    p, sock, d, scratch = site(binary, old)
    try:
        note = ""
        conns = []
        if attack:
            conns, note = attack(sock, p.pid)
        st = status(p.pid)
        row = (f"| {name} | {mib(st['VmRSS']):.1f} | {mib(st['RssAnon']):.1f} | "
               f"{mib(st['VmHWM']):.1f} | {st['Threads']} | {note} |")
        for s in conns:
            s.close()
        return row
    finally:
        p.terminate()
        p.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    args = sys.argv[1:]
    old = "--old" in args
    args = [a for a in args if a != "--old"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    binary = os.path.abspath(args[0])
    print("| attack | RSS MiB | of it anonymous MiB | peak RSS MiB | threads | |")
    print("|---|---|---|---|---|---|")
    for name, attack in [("idle", None), ("frames", attack_frames), ("idle300", attack_idle300),
                         ("slow", attack_slow)]:
        print(run(binary, old, name, attack), flush=True)


if __name__ == "__main__":
    main()
