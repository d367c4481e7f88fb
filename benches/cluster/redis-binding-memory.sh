#!/usr/bin/env bash
# What one binding costs in Redis, stored as sipring's cluster stores it (docs/CLUSTER.md,
# engine/src/cluster.rs: one hash `b:{aor}` per AOR, one field per node whose value lists
# that node's bindings, the key's TTL the latest expiry), in a cluster-enabled redis-server
# (7.0, Debian) holding every slot: used_memory before and after N bindings (a phone-sized
# contact and +sip.instance each), and how long a pipelined load of them takes
# (redis-cli --pipe: the server's write rate, not a client's).
#
#   benches/cluster/redis-binding-memory.sh [OUT_DIR]      (N=200000 by default, ~15 s)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-target/bench-redis/$(date -u +%Y%m%dT%H%M%SZ)}
N=${N:-200000}
PORT=${PORT:-17379}
mkdir -p "$OUT"
dpkg-query -W -f='${Status}' redis-server 2>/dev/null | grep -q "install ok installed" ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
W=$(mktemp -d /tmp/sipring-redis.XXXXXX)
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
redis-server --port "$PORT" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "$W/nodes.conf" \
  --save '' --appendonly no --daemonize yes --dir "$W" --logfile "$W/redis.log"
for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$PORT" cluster addslotsrange 0 16383 >/dev/null
python3 - "$N" > "$W/load.resp" <<'PY'
import hashlib, sys
n, w = int(sys.argv[1]), sys.stdout.write
def cmd(*a):
    w(f"*{len(a)}\r\n" + "".join(f"${len(str(x).encode())}\r\n{x}\r\n" for x in a))
for i in range(n):
    aor = f"sip:user{i}@example.com"
    inst = f"<urn:uuid:{hashlib.md5(str(i).encode()).hexdigest()[:8]}-1c2d-4e5f-8a9b-{i:012d}>"
    contact = f'<sip:user{i}@203.0.113.{i % 250}:{40000 + i % 20000};transport=tls;ob>;+sip.instance="{inst}";reg-id=1'
    exp = 1790000000000 + (i % 3600) * 1000
    flow = (i % 16) << 48 | (1000000 + i)
    value = f"1790000000000123 {exp}\n{exp}\t{flow:x}\t{inst}\t1\t{contact}\n"
    key = f"b:{{{aor}}}"
    cmd("HSET", key, "node-a", value)
    cmd("PEXPIRE", key, 3600000, "NX")
    cmd("PEXPIRE", key, 3600000, "GT")
PY
mem() { redis-cli -p "$PORT" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r'; }
before=$(mem)
t0=$(date +%s.%N)
redis-cli -p "$PORT" --pipe < "$W/load.resp" > "$W/pipe.txt"
t1=$(date +%s.%N)
after=$(mem)
{
  echo "redis $(redis-server --version | awk '{print $3}'), cluster mode, one node with every slot"
  tail -1 "$W/pipe.txt"
  echo "bindings: $N; keys: $(redis-cli -p "$PORT" dbsize)"
  echo "used_memory: $before -> $after bytes: $(( (after - before) / N )) B per binding (one copy; a replica doubles it)"
  python3 -c "print(f'pipelined load: {($t1 - $t0):.2f} s, {$N / ($t1 - $t0):.0f} bindings/s (3 commands each, as sipring writes one)')"
} | tee "$OUT/results.txt"
