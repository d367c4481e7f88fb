#!/usr/bin/env bash
# REGISTER latency with 1,000 AORs in the table and with 1,000,000 (issue 15 #5: within
# 1.5x), through the real server, from the load generator.
#
#   benches/scale/registrar-1m.sh [OUT_DIR]          (~4 minutes; RATE=8000 STEP_S=10)
#
# A release sipring (1 shard, plain TCP, open registration, 200 AORs per connection, no
# per-address binding limit) on the first allowed CPU, sipring-load on the second. Small:
# 1,000 UAs with one AOR each. Large: 5,000 UAs with 200 AORs each (`--aors-per-ua`), so
# a million AORs within the descriptor limit. Both run REGISTERs at RATE/s: a warm-up long
# enough to register every AOR of the table once (sent, not measured), then STEP_S seconds
# measured, still going through every AOR (refreshes of a full table); RSS and
# `sipring_bindings` are read once the table is full.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-registrar-1m/$(date -u +%Y%m%dT%H%M%SZ)}
RATE=${RATE:-8000}
STEP_S=${STEP_S:-10}
source benches/lib.sh
CPUS=($(allowed_cpus))
[ "${#CPUS[@]}" -ge 2 ] || { echo "need 2 allowed CPUs"; exit 1; }
SERVER_CPU=${CPUS[0]}; GEN_CPU=${CPUS[1]}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-registrar-1m.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
build_bins
ulimit -n "$(ulimit -Hn)"
tcp_server_toml "$W/s.toml" 127.0.0.1:17080 1 "" "max_bindings_per_ip = 0" \
  "[registrar]" "max_aors_per_connection = 200" "[admin]" 'address = "127.0.0.1:17079"'
metric() { curl -s 127.0.0.1:17079/metrics | awk -v n="$1" '$1 == n {print $2}'; }
run() { # run TAG USERS AORS_PER_UA
  local warm=$(( $2 * $3 / RATE + 2 ))
  SIPRING_LOG=warn taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/s.toml" >"$OUT/$1-server.log" 2>&1 &
  local spid=$!
  sleep 1
  taskset -c "$GEN_CPU" "$LOAD" register --transport tcp --target 127.0.0.1:17080 --shards 1 --quiet \
    --users "$2" --aors-per-ua "$3" --expires 3600 --rate "$RATE" --duration "$STEP_S" --warmup "$warm" \
    --timeout 60 --connect-concurrency 256 --json "$OUT/$1.json" >"$OUT/$1.txt" 2>&1 &
  local lpid=$!
  # With the table full (the measured phase): bindings and RSS.
  local want=$(( $2 * $3 )) b=0
  for _ in $(seq 600); do
    b=$(metric sipring_bindings); [ "${b:-0}" -ge "$want" ] && break
    kill -0 "$lpid" 2>/dev/null || break; sleep 0.5
  done
  echo "$1: bindings ${b:-0}, RSS $(awk '/VmRSS/{print $2}' /proc/$spid/status) kB" | tee -a "$OUT/placement.txt"
  echo "$1 server threads: $(threads "$spid")" >> "$OUT/placement.txt"
  echo "$1 generator threads: $(threads "$lpid")" >> "$OUT/placement.txt"
  wait "$lpid" || true
  # The server's own view (read to reply written, warm-up included).
  curl -s 127.0.0.1:17079/metrics | grep 'histogram="forward_REGISTER"' > "$OUT/$1-server-latency.txt" || true
  kill "$spid"; wait "$spid" 2>/dev/null || true
}
run small 1000 1
run large 5000 200
python3 - "$OUT" "$RATE" "$STEP_S" <<'PY' | tee "$OUT/results.md"
import json, sys
out, rate, step = sys.argv[1:4]
def k(tag):
    s = json.load(open(f"{out}/{tag}.json"))
    return s, s["kinds"]["register"]
(s1, a), (s2, b) = k("small"), k("large")
print(f"REGISTER refreshes at {rate}/s for {step} s, 1 server shard, generator on its own CPU")
print()
print("| table | p50 ms | p90 ms | p99 ms | p99.9 ms | failed |")
print("| --- | --- | --- | --- | --- | --- |")
for name, s, x in (("1,000 AORs", s1, a), ("1,000,000 AORs", s2, b)):
    print(f"| {name} | {x['p50_ms']:.3f} | {x['p90_ms']:.3f} | {x['p99_ms']:.3f} | {x['p999_ms']:.3f} | {s['failed']} |")
print()
print(f"p99 ratio 1M / 1k: {b['p99_ms'] / a['p99_ms']:.2f} (target <= 1.5); p50 ratio {b['p50_ms'] / a['p50_ms']:.2f}")
print(f"generator late sends: 1k {s1['late_sends']} (max lag {s1['max_lag_ms']:.1f} ms), 1M {s2['late_sends']} (max lag {s2['max_lag_ms']:.1f} ms)")
def server(tag):
    q = {}
    for l in open(f"{out}/{tag}-server-latency.txt"):
        if 'quantile="' in l:
            q[l.split('quantile="')[1].split('"')[0]] = float(l.split()[-1]) * 1000
    return q
try:
    x, y = server("small"), server("large")
    print(f"server side (read to answer written, warm-up included), p50 / p99 / p99.9 ms: "
          f"1k {x['0.5']:.3f} / {x['0.99']:.3f} / {x['0.999']:.3f}; 1M {y['0.5']:.3f} / {y['0.99']:.3f} / {y['0.999']:.3f}")
except (OSError, KeyError):
    print("server side: not read")
PY
