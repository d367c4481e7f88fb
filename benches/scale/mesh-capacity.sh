#!/usr/bin/env bash
# Issue 15 #2: does the default cross-shard channel (`server.mesh_capacity`, 1024) shed load
# below the rate a large one (16384) carries? A/B in one run (CAPS="8 1024 16384" adds a
# channel far too small, so the overflow queue behind it is what is measured): the same 2-shard sipring with
# each capacity, MESSAGE between UAs spread over both shards (about half the requests and
# their 200s cross the mesh), the same ladder of rates alternating A and B. Reported per
# rate: answered, 503s (mesh refusals and shedding), timeouts, p50/p99.
#
#   benches/scale/mesh-capacity.sh [OUT_DIR]      (~4 minutes; Debian 12, 2+ CPUs, root)
#
# The server's shards run on the first two allowed CPUs, held together to SERVER_CPU_PERCENT
# of one CPU each by a CPU cgroup (default 30, CFS quota per 1 ms slices), so that one
# generator on the last allowed CPU can drive them past saturation; every thread's
# Cpus_allowed_list goes to placement.txt. A rate passes with no failure and p99 <= 10 ms.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-mesh-capacity/$(date -u +%Y%m%dT%H%M%SZ)}
source benches/lib.sh
CPUS=($(allowed_cpus))
LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
RATES=${RATES:-"1000 1500 2000 2500 3000 3500 4000"}
STEP_S=${STEP_S:-8}
PCT=${SERVER_CPU_PERCENT:-30}
CAPS=${CAPS:-"1024 16384"} # mesh_capacity values, A/B/...
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-bench-mesh.XXXXXX)
cpu_cgroup sipring-bench-mesh "$PCT" 2 # both shards together: 2 x PCT % of a CPU
trap 'kill $(jobs -p) 2>/dev/null || true; cgroup_cleanup; rm -rf "$W"' EXIT

build_bins
ulimit -n "$(ulimit -Hn)"
"$SIPRING" certs --out "$W/pki" >/dev/null

for cap in $CAPS; do
  tls_server_toml "$W/m$cap.toml" "$W/pki" 127.0.0.1:17261 2 "mesh_capacity = $cap"
done

for r in $RATES; do
  for cap in $CAPS; do
    ladder_step "m$cap-$r" "$SIPRING" run --config "$W/m$cap.toml" -- \
      message --target 127.0.0.1:17261 --ca "$W/pki/ca.pem" --shards 1 --users 400 \
      --connect-concurrency 8 --rate "$r" --duration "$STEP_S" --warmup 1 --timeout 5 --prefix u
    echo "$r/s mesh_capacity $cap: done"
  done
done

python3 - "$OUT" "$RATES" "$PCT" "$CAPS" <<'PY' | tee "$OUT/results.md"
import json, sys
out, rates, pct, caps = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4].split()
print(f"2 shards, each held to {pct} % of a CPU; MESSAGE between 400 UAs; pass = no failure and p99 <= 10 ms\n")
print("| offered/s | mesh_capacity | answered 200/s | 503 | timeouts | other | p50 / p99 ms | pass |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
best = {}
for r in rates:
    for cap in caps:
        s = json.load(open(f"{out}/m{cap}-{r}.json")); k = s["kinds"].get("message", {})
        fl = k.get("failures", {})
        s503 = sum(v for c, v in fl.items() if "503" in c)
        to = sum(v for c, v in fl.items() if "timeout" in c)
        other = s["failed"] - s503 - to
        ok = s["failed"] == 0 and k.get("p99_ms", 1e9) <= 10.0 and k.get("count", 0) > 0
        if ok: best[cap] = max(best.get(cap, 0), int(r))
        print(f"| {r} | {cap} | {k.get('rate_per_s', 0):.0f} | {s503} | {to} | {other} | "
              f"{k.get('p50_ms', 0):.2f} / {k.get('p99_ms', 0):.2f} | {'yes' if ok else 'no'} |")
print("\nbest passing rate: " + ", ".join(f"mesh_capacity {c} → {best.get(c, 0)}/s" for c in caps))
PY
