#!/usr/bin/env bash
# Issue 15 #3 on a host without many cores: what sharding itself costs. The same sipring
# with 1, 2 and 4 shards (`SHARDS=`), every shard floating (`pin_shards = false`) on ONE
# CPU held to SERVER_CPU_PERCENT % by a CPU cgroup, so each shard count has the same CPU;
# the generator on another CPU. With N shards (N-1)/N of the lookups and forwards cross the
# mesh, so the best passing rate of N shards over one shard's is the throughput a core keeps
# when it shards: E(N). N cores would carry about N x E(N) x one shard, less what one CPU
# does not show (cache and memory traffic between cores) and more what it adds (shards on
# one CPU take turns, so every crossing costs a context switch). It is a proxy, not the
# scaling curve: that needs cores (benches/manycore/run.sh).
#
#   benches/scale/shards-one-cpu.sh [OUT_DIR]     (~5 minutes; Debian 12, 2+ CPUs, root)
#
# SCENARIO=message (default; 400 UAs sending MESSAGE to each other) or call (INVITE/ACK/BYE
# with a 1 s hold). Rates alternate the shard counts at each step; a rate passes with no
# failure and p99 <= 10 ms. Two figures per shard count: the best passing rate (which also
# carries the shards' taking turns on one CPU: a crossing waits for the scheduler), and the
# capacity, the most answered/s of any step (past it the door sheds), which is what the CPU
# per request allows. (CPU time per request below saturation is no measure here: a server
# below its budget pays a wake-up per message and uses most of the budget at any rate.)
# Every thread's Cpus_allowed_list goes to placement.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-shards-one-cpu/$(date -u +%Y%m%dT%H%M%SZ)}
source benches/lib.sh
CPUS=($(allowed_cpus))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}
LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
[ "$SERVER_CPU" != "$LOAD_CPU" ] || { echo "need two CPUs (server, generator)" >&2; exit 2; }
SCENARIO=${SCENARIO:-message}
SHARDS=${SHARDS:-"1 2 4"}
PCT=${SERVER_CPU_PERCENT:-60}
STEP_S=${STEP_S:-8}
case $SCENARIO in
  message) RATES=${RATES:-"1000 1500 2000 2500 3000 3500 4000 4500 5000"}; KIND=message
           EXTRA=(--users 400) ;;
  call)    RATES=${RATES:-"200 300 400 500 600 700 800 900 1000"}; KIND=invite_200
           EXTRA=(--users 400 --hold 1 --max-concurrent 100000) ;;
  *) echo "SCENARIO is message or call" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-bench-shards.XXXXXX)
cpu_cgroup sipring-bench-shards "$PCT" 1 # all shards together: PCT % of one CPU
trap 'kill $(jobs -p) 2>/dev/null || true; cgroup_cleanup; rm -rf "$W"' EXIT

build_bins
ulimit -n "$(ulimit -Hn)"
"$SIPRING" certs --out "$W/pki" >/dev/null
for n in $SHARDS; do
  tls_server_toml "$W/s$n.toml" "$W/pki" 127.0.0.1:17263 "$n" "pin_shards = false"
done

for r in $RATES; do
  for n in $SHARDS; do
    ladder_step "s$n-$r" taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/s$n.toml" -- \
      "$SCENARIO" --target 127.0.0.1:17263 --ca "$W/pki/ca.pem" --shards 1 "${EXTRA[@]}" \
      --connect-concurrency 8 --rate "$r" --duration "$STEP_S" --warmup 1 --timeout 5 --prefix u
    echo "$SCENARIO $r/s, $n shard(s): done"
  done
done

python3 - "$OUT" "$RATES" "$PCT" "$SHARDS" "$SCENARIO" "$KIND" <<'PY' | tee "$OUT/results.md"
import json, sys
out, rates, pct, shards, scen, kind = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4].split(), sys.argv[5], sys.argv[6]
print(f"{scen}: 1..N shards floating on one CPU held to {pct} % of it; pass = no failure and p99 <= 10 ms\n")
print("| offered/s | shards | answered/s | 503 | other failures | p50 / p99 ms | pass |")
print("| --- | --- | --- | --- | --- | --- | --- |")
best, cap = {}, {}
for r in rates:
    for n in shards:
        s = json.load(open(f"{out}/s{n}-{r}.json")); k = s["kinds"].get(kind, {})
        fl = k.get("failures", {}); s503 = sum(v for c, v in fl.items() if "503" in c)
        ok = s["failed"] == 0 and k.get("p99_ms", 1e9) <= 10.0 and k.get("count", 0) > 0
        if ok and all(best.get(n, 0) >= int(x) for x in rates if int(x) < int(r)):
            best[n] = int(r)  # the highest rate of an unbroken run of passes from the bottom
        cap[n] = max(cap.get(n, 0), k.get("rate_per_s", 0))
        print(f"| {r} | {n} | {k.get('rate_per_s', 0):.0f} | {s503} | {s['failed'] - s503} | "
              f"{k.get('p50_ms', 0):.2f} / {k.get('p99_ms', 0):.2f} | {'yes' if ok else 'no'} |")
b1, c1 = best.get(shards[0], 0), cap.get(shards[0], 0)
print(f"\n| shards | best passing rate/s | / {shards[0]} shard's | capacity (most answered/s) | / {shards[0]} shard's |")
print("| --- | --- | --- | --- | --- |")
for n in shards:
    b, c = best.get(n, 0), cap.get(n, 0)
    print(f"| {n} | {b} | {b / b1 if b1 else 0:.2f} | {c:.0f} | {c / c1 if c1 else 0:.2f} |")
PY
