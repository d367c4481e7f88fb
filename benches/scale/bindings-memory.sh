#!/usr/bin/env bash
# Memory held by registrations, and what comes back when they go (issue 16 #5).
#
#   benches/scale/bindings-memory.sh [OUT_DIR]      (~1 minute)
#
# A release sipring (1 shard, plain TCP listener, no authentication, default registrar
# limits: 16 AORs per connection, 10 contacts per AOR, 1 KiB per contact) on SERVER_CPU;
# CONNS connections from 127.0.0.2.. each register 16 AORs with 10 contacts of ~0.95 KB:
# CONNS x 160 bindings. RSS is read idle, with everything registered, after every binding is
# removed (REGISTER Contact: *, Expires: 0) at once and 10 s later, and after the connections
# close. `sipring_bindings` from /metrics confirms each stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-bindings/$(date -u +%Y%m%dT%H%M%SZ)}
CONNS=${CONNS:-300}
source benches/lib.sh
CPUS=($(allowed_cpus))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-bench-bindings.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; cp "$W/log" "$OUT/server.log" 2>/dev/null; rm -rf "$W"' EXIT
build_bins
ulimit -n "$(ulimit -Hn)"
tcp_server_toml "$W/s.toml" 127.0.0.1:17070 1 "" "[admin]" 'address = "127.0.0.1:17069"'
SIPRING_LOG=warn taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/s.toml" >"$W/log" 2>&1 &
PID=$!
sleep 1
python3 - "$PID" "$CONNS" <<'PY' | tee "$OUT/results.txt"
import socket, sys, time, urllib.request
pid, conns = int(sys.argv[1]), int(sys.argv[2])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) / 1024
def bindings():
    t = urllib.request.urlopen("http://127.0.0.1:17069/metrics").read().decode()
    for l in t.splitlines():
        if l.startswith("sipring_bindings "):
            return int(float(l.split()[1]))
    return 0
def settle(want, limit=10):
    end = time.time() + limit
    while time.time() < end and bindings() != want:
        time.sleep(0.25)
    return bindings()
pad = "p" * 900
def register(s, c, user, contacts, expires, seq):
    head = (f"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.{c % 250}:5060;branch=z9hG4bK{c}x{user}x{seq}\r\n"
            f"Max-Forwards: 70\r\nTo: <sip:m{c}x{user}@example.com>\r\nFrom: <sip:m{c}x{user}@example.com>;tag=t{c}\r\n"
            f"Call-ID: mem-{c}-{user}\r\nCSeq: {seq} REGISTER\r\n{contacts}Expires: {expires}\r\nContent-Length: 0\r\n\r\n")
    s.sendall(head.encode())
def read_answers(s, n):
    buf, got = b"", 0
    while got < n:
        d = s.recv(65536)
        if not d:
            raise SystemExit("connection closed by the server")
        buf += d
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            code = int(head.split(b" ", 2)[1])
            if code != 200:
                raise SystemExit(f"REGISTER answered {code}")
            got += 1
print(f"{conns} connections x 16 AORs x 10 contacts of ~0.95 KB = {conns * 160} bindings")
idle = rss(); print(f"idle: RSS {idle:.1f} MiB, bindings {bindings()}")
socks = []
for c in range(conns):
    s = socket.socket(); s.bind((f"127.0.0.{2 + c % 200}", 0)); s.connect(("127.0.0.1", 17070)); socks.append(s)
for c, s in enumerate(socks):
    for u in range(16):
        contacts = "".join(f"Contact: <sip:m{c}x{u}@10.0.0.{k}:5060;transport=tcp;x={pad}>\r\n" for k in range(10))
        register(s, c, u, contacts, 3600, 1)
    read_answers(s, 16)
full_b = settle(conns * 160); full = rss()
print(f"registered: RSS {full:.1f} MiB (+{full - idle:.1f}), bindings {full_b}: {(full - idle) * 1048576 / max(full_b, 1):.0f} B per binding")
for c, s in enumerate(socks):
    for u in range(16):
        register(s, c, u, "Contact: *\r\n", 0, 2)
    read_answers(s, 16)
gone_b = settle(0); gone = rss()
print(f"all removed: RSS {gone:.1f} MiB ({(gone - idle) / max(full - idle, 1e-9) * 100:.0f} % of the growth still held), bindings {gone_b}")
time.sleep(10); later = rss()
print(f"10 s later: RSS {later:.1f} MiB ({(later - idle) / max(full - idle, 1e-9) * 100:.0f} % held)")
for s in socks: s.close()
time.sleep(3); closed = rss()
print(f"connections closed, 3 s later: RSS {closed:.1f} MiB ({(closed - idle) / max(full - idle, 1e-9) * 100:.0f} % held)")
PY
kill "$PID"; wait "$PID" 2>/dev/null || true
echo "results in $OUT"
