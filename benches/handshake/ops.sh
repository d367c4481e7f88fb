#!/usr/bin/env bash
# Issue 15 #4: what the runtime does per handshake — io_uring submissions (by opcode),
# io_uring_enter calls and syscalls of the server process — for sipring and for the
# reflector (the minimal server on the same runtime), at one rate below saturation.
#
#   benches/handshake/ops.sh [OUT_DIR]      (~30 s plus the build; Debian 12, 2+ CPUs, root for perf)
#
# Each server on SERVER_CPU, `sipring-load handshake` (full TLS 1.3, X25519, one OPTIONS,
# close) on LOAD_CPU at RATE for 6 s; `perf stat` counts tracepoints over 4 s of it and
# `perf record` samples the submissions' opcodes for 1 s. Counting, not timing: the
# figures are per handshake completed in the counted window (RATE × 4 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-$PWD/target/bench-handshake-ops/$(date -u +%Y%m%dT%H%M%SZ)}
RATE=${RATE:-500}
source benches/handshake/common.sh
tls_server_toml "$W/s.toml" "$W/pki" 127.0.0.1:17171 1 ""
EVENTS=io_uring:io_uring_submit_req,syscalls:sys_enter_io_uring_enter,raw_syscalls:sys_enter,context-switches
one() { # NAME PID PORT
  handshake_load "$3" "$RATE" 6 "$1"
  local lp=$!
  sleep 1
  perf stat -x, -e "$EVENTS" -p "$2" -- sleep 4 2>"$OUT/$1.stat"
  perf record -e io_uring:io_uring_submit_req -p "$2" -o "$W/$1.data" -- sleep 1 >/dev/null 2>&1 || true
  perf script -i "$W/$1.data" 2>/dev/null | grep -o 'opcode [A-Z_]*' | sort | uniq -c | sort -rn >"$OUT/$1.opcodes" || true
  wait "$lp" || true
  echo "$1: $(threads "$2") (generator: taskset -c $LOAD_CPU)" >>"$OUT/placement.txt"
  kill "$2" 2>/dev/null || true
  wait "$2" 2>/dev/null || true
}
SIPRING_LOG=warn taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/s.toml" >"$W/server.log" 2>&1 &
sleep 1
one sipring $! 17171
start_reflector 17172
sleep 1
one reflector $! 17172
python3 - "$OUT" "$RATE" <<'PY' | tee "$OUT/results.md"
import json, sys
out, rate = sys.argv[1], int(sys.argv[2])
hs = rate * 4  # handshakes in the counted window
print(f"per handshake at {rate}/s (counted over 4 s = {hs} handshakes)\n")
print("| server | io_uring submissions | io_uring_enter | syscalls | context switches | failed | top opcodes (1 s sample, per handshake) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in ("sipring", "reflector"):
    c = {}
    for l in open(f"{out}/{name}.stat"):
        f = l.strip().split(",")
        if len(f) > 2 and f[0].replace(".", "").isdigit():
            c[f[2]] = float(f[0])
    s = json.load(open(f"{out}/{name}.json"))
    ops = []
    for l in open(f"{out}/{name}.opcodes"):
        n, _, op = l.split()
        ops.append(f"{op} {int(n) / rate:.1f}")
    g = lambda k: c.get(k, float("nan")) / hs
    print(f"| {name} | {g('io_uring:io_uring_submit_req'):.1f} | {g('syscalls:sys_enter_io_uring_enter'):.1f} | "
          f"{g('raw_syscalls:sys_enter'):.1f} | {g('context-switches'):.1f} | {s['failed']} | {', '.join(ops[:5])} |")
PY
