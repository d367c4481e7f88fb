#!/usr/bin/env bash
# What one binding costs in Redis, stored as sipring's cluster stores it (docs/CLUSTER.md,
# engine/src/cluster.rs: one hash `b:{aor}` per AOR, one field per node whose value lists
# that node's bindings, the key's TTL the latest expiry), in a cluster-enabled redis-server
# (7.0, Debian) holding every slot: used_memory before and after N bindings (a phone-sized
# contact and +sip.instance each), and how long a pipelined load of them takes
# (redis-cli --pipe: the server's write rate, not a client's) — first as the three commands
# sipring wrote until 2026-12-01 (HSET, PEXPIRE NX, PEXPIRE GT), then, after FLUSHALL, as
# the one EVAL of WRITE_FIELD (with its text) it sends now — the script read out of
# cluster.rs —, and as EVALSHA (the script loaded first) for comparison.
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
# The script as cluster.rs has it: the Rust string literal's lines, continuations removed.
python3 - engine/src/cluster.rs > "$W/write_field.lua" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
m = re.search(r'const WRITE_FIELD: &str = "(.*?)";', src, re.S)
print(re.sub(r'\\\n\s*', '', m.group(1)), end='')
PY
SHA=$(redis-cli -p "$PORT" script load "$(cat "$W/write_field.lua")")
for mode in pipe evalsha eval; do
python3 - "$N" "$mode" "$W/write_field.lua" "$SHA" > "$W/load-$mode.resp" <<'PY'
import hashlib, sys
n, w = int(sys.argv[1]), sys.stdout.write
mode, script, sha = sys.argv[2], open(sys.argv[3]).read(), sys.argv[4]
import time
# Expiries an hour from now (PEXPIREAT in the past would delete the key at once).
base = int(time.time() * 1000) + 3600000
def cmd(*a):
    w(f"*{len(a)}\r\n" + "".join(f"${len(str(x).encode())}\r\n{x}\r\n" for x in a))
for i in range(n):
    aor = f"sip:user{i}@example.com"
    inst = f"<urn:uuid:{hashlib.md5(str(i).encode()).hexdigest()[:8]}-1c2d-4e5f-8a9b-{i:012d}>"
    contact = f'<sip:user{i}@203.0.113.{i % 250}:{40000 + i % 20000};transport=tls;ob>;+sip.instance="{inst}";reg-id=1'
    exp = base + (i % 3600) * 1000
    flow = (i % 16) << 48 | (1000000 + i)
    value = f"1790000000000123 {exp}\n{exp}\t{flow:x}\t{inst}\t1\t{contact}\n"
    key = f"b:{{{aor}}}"
    if mode == "pipe":
        cmd("HSET", key, "node-a", value)
        cmd("PEXPIRE", key, 3600000, "NX")
        cmd("PEXPIRE", key, 3600000, "GT")
    elif mode == "evalsha":
        cmd("EVALSHA", sha, 1, key, "node-a", value, exp, "1790000000000123")
    else:
        cmd("EVAL", script, 1, key, "node-a", value, exp, "1790000000000123")
PY
done
mem() { redis-cli -p "$PORT" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r'; }
load() { # mode -> seconds
  local t0 t1
  t0=$(date +%s.%N)
  redis-cli -p "$PORT" --pipe < "$W/load-$1.resp" > "$W/pipe-$1.txt"
  t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}
before=$(mem)
t_pipe=$(load pipe)
after=$(mem)
keys=$(redis-cli -p "$PORT" dbsize)
redis-cli -p "$PORT" flushall >/dev/null
t_script=$(load eval)
keys_script=$(redis-cli -p "$PORT" dbsize)
ttl=$(redis-cli -p "$PORT" pttl "b:{sip:user0@example.com}")
redis-cli -p "$PORT" flushall >/dev/null
t_eval=$(load evalsha)
{
  echo "redis $(redis-server --version | awk '{print $3}'), cluster mode, one node with every slot"
  tail -1 "$W/pipe-pipe.txt"
  tail -1 "$W/pipe-eval.txt"
  tail -1 "$W/pipe-evalsha.txt"
  echo "bindings: $N; keys: $keys (pipeline), $keys_script (script; a key's PTTL: $ttl ms)"
  echo "used_memory: $before -> $after bytes: $(( (after - before) / N )) B per binding (one copy; a replica doubles it)"
  python3 -c "print(f'pipelined load, 3 commands each: {$t_pipe:.2f} s, {$N / $t_pipe:.0f} bindings/s')"
  python3 -c "print(f'one EVAL of WRITE_FIELD with its text each (as sipring writes one now): {$t_script:.2f} s, {$N / $t_script:.0f} bindings/s ({$t_pipe / $t_script:.2f}x the pipeline)')"
  python3 -c "print(f'one EVALSHA of it each (the script loaded first): {$t_eval:.2f} s, {$N / $t_eval:.0f} bindings/s ({$t_pipe / $t_eval:.2f}x the pipeline)')"
} | tee "$OUT/results.txt"
