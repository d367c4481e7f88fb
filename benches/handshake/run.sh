#!/usr/bin/env bash
# Issue 15 #4: how close the server's handshake path at the socket comes to rustls's own
# server half in memory, measured without a generator bigger than the server.
#
#   benches/handshake/run.sh [OUT_DIR]      (~2 minutes plus the bench build; Debian 12, 2+ CPUs, root for perf)
#
#
# In one run, A/B:
#  1. the criterion bench `tls_handshake_server` (the server's calls of a full TLS 1.3
#     handshake, ECDSA P-256, X25519, sipring's own rustls config, client work off the clock);
#  2. sipring (one shard, SERVER_CPU) under `sipring-load handshake` (connect, full TLS 1.3
#     handshake with X25519 as in the bench, one OPTIONS, close; generator on LOAD_CPU) at
#     RATES, each STEP_S seconds;
#     the server's CPU time (utime + stime of the process, /proc/<pid>/stat) over the step
#     divided by the handshakes completed = CPU per handshake at the socket, the accept,
#     the TCP teardown, the OPTIONS and the kernel's share of loopback included.
#  3. the same ladder against the reflector (`sipring-load reflect`: the same runtime, socket
#     code, TLS session and handshake driver, a stateless 200 for the OPTIONS, no SIP state):
#     the least a TLS server on these sockets can spend per handshake.
# Efficiency = in-memory server half / CPU per handshake at the socket: the fraction of the
# in-memory rate one fully used core would reach; and reflector / sipring CPU per handshake:
# what sipring's own server path costs beyond the minimal server. PERF=1 also records a profile of the server
# (DWARF call graphs, 3 s) during the highest rate: perf-dso.txt (kernel vs userspace),
# perf-report.txt (self time), perf-children.txt (inclusive: rustls, io_uring, sends, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-handshake/$(date -u +%Y%m%dT%H%M%SZ)}
RATES=${RATES:-"500 1000 1500"}
STEP_S=${STEP_S:-8}
source benches/handshake/common.sh

echo "== 1. criterion: the server half in memory"
cargo bench -p sipring-benches --bench tls --no-run >/dev/null 2>&1 # built on every CPU, run on one
taskset -c "$SERVER_CPU" cargo bench -p sipring-benches --bench tls -- 'tls_handshake_server/sipring_policy_tls13_p256_x25519' \
  --warm-up-time 1 --measurement-time 4 2>&1 | tee "$OUT/criterion.txt" | grep -E "^tls_handshake|time:" || true

tls_server_toml "$W/s.toml" "$W/pki" 127.0.0.1:17161 1 ""

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
last=${RATES##* }
ladder() { # NAME PID PORT: the handshake ladder against one server, its CPU per step
  local name=$1 pid=$2 port=$3 r lp t0 t1
  for r in $RATES; do
    handshake_load "$port" "$r" "$STEP_S" "$name-$r"
    lp=$!
    t0=$(ticks "$pid")
    if [ "${PERF:-}" = 1 ] && [ "$name" = sipring ] && [ "$r" = "$last" ]; then
      sleep 2
      perf record -F 499 --call-graph dwarf,16384 -p "$pid" -o "$W/perf.data" -- sleep 3 >/dev/null 2>&1 || true
    fi
    wait $lp || true
    t1=$(ticks "$pid")
    echo "$r $((t1 - t0)) $HZ" > "$OUT/$name-$r.cpu"
    echo "$name, rate $r: server $(( (t1 - t0) * 1000 / HZ )) ms CPU"
  done
  echo "$name: $(threads "$pid") (generator: taskset -c $LOAD_CPU)" >> "$OUT/placement.txt"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

echo "== 2. at the socket: sipring's CPU per handshake"
SIPRING_LOG=warn taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/s.toml" >"$W/server.log" 2>&1 &
SP=$!
sleep 1
ladder sipring "$SP" 17161

echo "== 3. at the socket: the reflector's CPU per handshake"
start_reflector 17162
RP=$!
sleep 1
ladder reflector "$RP" 17162
if [ -f "$W/perf.data" ]; then
  perf report -i "$W/perf.data" --no-children --sort dso,symbol -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -60 > "$OUT/perf-report.txt" || true
  perf report -i "$W/perf.data" --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' > "$OUT/perf-dso.txt" || true
  # Inclusive time of the server's own steps and of the crates under them.
  perf report -i "$W/perf.data" --children --sort symbol -g none 2>/dev/null | grep -v '^#' | grep -v '^$' \
    | head -150 > "$OUT/perf-children.txt" || true
fi

python3 - "$OUT" "$RATES" <<'PY' | tee "$OUT/results.md"
import json, re, sys
out, rates = sys.argv[1], sys.argv[2].split()
crit = open(f"{out}/criterion.txt").read()
m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", crit)
unit = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3}
mem_us = float(m.group(1)) * unit[m.group(2)] if m else float("nan")
print(f"in memory (criterion, server half, sipring's config): median {mem_us:.1f} µs = {1e6 / mem_us:.0f}/s per core\n")
def step(name, r):
    s = json.load(open(f"{out}/{name}-{r}.json"))
    k = s["kinds"].get("tls_handshake", {})
    done = k.get("count", 0)
    _, ticks, hz = open(f"{out}/{name}-{r}.cpu").read().split()
    cpu_ms = int(ticks) * 1000 / int(hz)
    return done, s["failed"], k, cpu_ms, (cpu_ms * 1000 / done if done else float("nan"))
print("| offered/s | server | completed | failed | handshake p50 / p99 ms | server CPU (ms) | CPU per handshake (µs) | in-memory / at the socket |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
per = {}
for r in rates:
    for name in ("sipring", "reflector"):
        done, failed, k, cpu_ms, p = step(name, r)
        per[(name, r)] = p
        print(f"| {r} | {name} | {done} | {failed} | {k.get('p50_ms', 0):.2f} / {k.get('p99_ms', 0):.2f} | {cpu_ms:.0f} | {p:.0f} | {mem_us / p:.0%} |")
print("\n| offered/s | reflector / sipring CPU per handshake |")
print("| --- | --- |")
for r in rates:
    print(f"| {r} | {per[('reflector', r)] / per[('sipring', r)]:.2f} |")
PY
