#!/usr/bin/env bash
# Overload shedding at the door: the same sipring (one shard) with `limits.overload_lag_ms`
# at LAG_MS (default: 10, the server's default) and 0 (no shedding), offered MESSAGE load past its capacity by one
# generator. Reported per mode and rate: what was admitted (answered 200) and its latency,
# what was shed (503) or timed out, and the server's RSS idle and at its peak.
#
#   benches/overload/run.sh [OUT_DIR]          (~4 minutes; Debian 12, 2+ CPUs)
#
# Server on SERVER_CPU (default: the first allowed CPU), generator on LOAD_CPU (default: the
# last), pinned with taskset; each process's threads' Cpus_allowed_list goes to
# placement.txt. Capacity C is the best MESSAGE/s with no failure and p99 <= 10 ms, found
# first (shedding on, as deployed; CAPACITY=N skips the search); then C x FACTORS is offered
# to both modes, alternating.
#
# OC=1 adds a third mode: shedding on, with RFC 7339 overload control between the generator
# and the server (`--overload-control`, `limits.overload_control = "all"`): the generator
# advertises `oc` as a cooperating upstream proxy or SBC would and drops the share of new
# requests the server asks for before sending them (column "dropped upstream").
#
# SERVER_CPU_PERCENT=N (1-99) runs the server in a CPU cgroup holding it to N % of its core
# (CFS quota of 1 ms per 100/N ms, cgroup v2 or v1; root): a slower server core, so that one
# generator core can offer 3x the server's capacity without being the bottleneck itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-overload/$(date -u +%Y%m%dT%H%M%SZ)}
source benches/lib.sh
CPUS=($(allowed_cpus))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}
LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
CAP_RATES=${CAP_RATES:-"8000 12000 16000 20000 24000 28000 32000"}
FACTORS=${FACTORS:-"2 3"}
STEP_S=${STEP_S:-8}
SERVER_CPU_PERCENT=${SERVER_CPU_PERCENT:-}
LAG_MS=${LAG_MS:-10} # limits.overload_lag_ms with shedding on (the default: 10)
CONNECT_CONCURRENCY=${CONNECT_CONCURRENCY:-64} # handshakes at once during setup
DEFAULT_MODES="shed noshed"; [ "${OC:-0}" = 1 ] && DEFAULT_MODES="shed oc noshed"
MODES=${MODES:-$DEFAULT_MODES} # a subset of "shed oc noshed"
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-bench-overload.XXXXXX)
[ -z "$SERVER_CPU_PERCENT" ] || cpu_cgroup sipring-bench-overload "$SERVER_CPU_PERCENT" 1
trap 'kill $(jobs -p) 2>/dev/null || true; cgroup_cleanup; rm -rf "$W"' EXIT

build_bins
ulimit -n "$(ulimit -Hn)"
"$SIPRING" certs --out "$W/pki" >/dev/null

for mode in $MODES; do
  lag=$LAG_MS; [ $mode = noshed ] && lag=0
  oc=partners; [ $mode = oc ] && oc=all
  tls_server_toml "$W/$mode.toml" "$W/pki" 127.0.0.1:17061 1 "" "overload_lag_ms = $lag" "overload_control = \"$oc\"" "[admin]" 'address = "127.0.0.1:17060"'
done

start() { SIPRING_LOG=warn "${CG_RUN[@]}" taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/$1.toml" >"$W/$1.log" 2>&1 & echo $! > "$W/pid"; sleep 1; }
stop() { kill "$(cat "$W/pid")" 2>/dev/null || true; wait "$(cat "$W/pid")" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$(cat "$W/pid")/status"; }
shed_total() { curl -s http://127.0.0.1:17060/metrics | awk '/^sipring_overload_shed_total /{print $2}'; }
load() { # load TAG RATE [generator flags]
  local tag=$1 rate=$2; shift 2
  taskset -c "$LOAD_CPU" "$LOAD" message "$@" --target 127.0.0.1:17061 --ca "$W/pki/ca.pem" --shards 1 --quiet \
    --users 400 --connect-concurrency "$CONNECT_CONCURRENCY" --rate "$rate" --duration "$STEP_S" --warmup 1 --timeout 5 --prefix u \
    --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1 &
  local lp=$! peak=0 r
  sleep 1
  echo "$tag server: $(threads "$(cat "$W/pid")")" >> "$OUT/placement.txt"
  echo "$tag generator: $(threads "$lp")" >> "$OUT/placement.txt"
  while kill -0 $lp 2>/dev/null; do
    r=$(rss_kb); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.2
  done
  wait $lp || true
  echo "$peak" > "$OUT/$tag.peak_rss_kb"
}
passes() {
  python3 - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); k = s["kinds"].get("message")
sys.exit(0 if k and s["failed"] == 0 and k["p99_ms"] <= 10.0 and k["count"] > 0 else 1)
PY
}

if [ -n "${CAPACITY:-}" ]; then
  cap=$CAPACITY # given (e.g. found by an earlier run with another LAG_MS): no search
else
  echo "== capacity (shedding on): best MESSAGE/s with no failure and p99 <= 10 ms"
  cap=0
  for r in $CAP_RATES; do
    ok=0
    for try in 1 2; do
      start shed; load "cap-$r" "$r"; stop
      if passes "$OUT/cap-$r.json"; then ok=1; break; fi
    done
    if [ $ok = 1 ]; then cap=$r; echo "$r/s: pass"; else echo "$r/s: fail (twice)"; break; fi
  done
fi
echo "$cap" > "$OUT/capacity"
[ "$cap" -gt 0 ] || { echo "no passing rate"; exit 1; }

echo "== offered C x {$FACTORS}, modes: $MODES"
for f in $FACTORS; do
  r=$((cap * f))
  for mode in $MODES; do
    start "$mode"
    echo "$(rss_kb)" > "$OUT/over-$mode-x$f.idle_rss_kb"
    flags=(); [ $mode = oc ] && flags=(--overload-control)
    load "over-$mode-x$f" "$r" "${flags[@]}"
    shed_total > "$OUT/over-$mode-x$f.shed" || true
    # The server's own view: loop lag and read-to-forwarded quantiles over the run.
    curl -s http://127.0.0.1:17060/metrics | grep '^sipring_latency_seconds' > "$OUT/over-$mode-x$f.latency" || true
    sleep 3
    echo "$(rss_kb)" > "$OUT/over-$mode-x$f.after_rss_kb"
    stop
    echo "x$f ($r/s) $mode: done"
  done
done

python3 - "$OUT" "$SERVER_CPU" "$LOAD_CPU" "$FACTORS" "${SERVER_CPU_PERCENT:-100}" "$LAG_MS" "$MODES" <<'PY' | tee "$OUT/results.md"
import json, sys
out, scpu, lcpu, factors, pct, lag, modes = sys.argv[1:8]
cap = int(open(f"{out}/capacity").read())
def rd(p, d="0"):
    try: return open(p).read().strip() or d
    except OSError: return d
print(f"server on CPU {scpu} ({pct} % of it), generator on CPU {lcpu} (threads: placement.txt); capacity C = {cap} MESSAGE/s; shedding on = overload_lag_ms {lag}\n")
print("| offered | shedding | admitted/s | admitted p50 / p99 / p99.9 ms | 503 | timeouts | other failures | dropped upstream (RFC 7339) | generator late sends | RSS idle → peak → 3 s after (MiB) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
names = {"shed": "on", "noshed": "off", "oc": "on + overload control"}
for f in factors.split():
    for mode in modes.split():
        tag = f"over-{mode}-x{f}"
        s = json.load(open(f"{out}/{tag}.json")); k = s["kinds"].get("message", {})
        fl = k.get("failures", {})
        s503 = sum(v for c, v in fl.items() if "503" in c)
        to = sum(v for c, v in fl.items() if "timeout" in c)
        other = k.get("failed", 0) - s503 - to
        mib = lambda x: f"{int(rd(x)) / 1024:.0f}"
        print(f"| {f}×C = {cap*int(f)}/s | {names[mode]} | {k.get('rate_per_s', 0):.0f} | "
              f"{k.get('p50_ms', 0):.2f} / {k.get('p99_ms', 0):.2f} / {k.get('p999_ms', 0):.2f} | {s503} | {to} | {other} | {s.get('oc_dropped', 0)} | {s['late_sends']} | "
              f"{mib(f'{out}/{tag}.idle_rss_kb')} → {mib(f'{out}/{tag}.peak_rss_kb')} → {mib(f'{out}/{tag}.after_rss_kb')} |")
PY
