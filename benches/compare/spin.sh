#!/usr/bin/env bash
# What server.spin_before_park_us buys and costs: idle CPU of one shard over 10 s, and
# MESSAGE latency at a light load (500/s), with and without spinning, in one run.
#
#   benches/compare/spin.sh            (SERVER_CPU, LOAD_CPU: by default the first and the last CPU
#                                      this process may use)
set -euo pipefail
cd "$(dirname "$0")/../.."
CPUS=($(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}; LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
[ "$SERVER_CPU" != "$LOAD_CPU" ] || { echo "SERVER_CPU and LOAD_CPU are both $SERVER_CPU: this needs two allowed CPUs (Cpus_allowed_list: $(python3 -c 'import os; print(sorted(os.sched_getaffinity(0)))'))" >&2; exit 2; }
cargo build --release -p sipring -p sipring-load >/dev/null 2>&1
W=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
target/release/sipring certs --out "$W/pki" >/dev/null
hz=$(getconf CLK_TCK)
for spin in 0 200; do
  cat > "$W/s.toml" <<CFG
[server]
shards = 1
first_cpu = 0
spin_before_park_us = $spin
hostname = "sip.example.com"
local_hosts = ["127.0.0.1"]
[[listen]]
kind = "tls"
address = "127.0.0.1:15061"
[[tls.certificate]]
cert = "$W/pki/server.pem"
key = "$W/pki/server.key"
[auth]
# Routing work only, as in the Kamailio config it is compared with (and earlier figures);
# benches/auth/run.sh measures what authentication costs.
enabled = false
[admin]
address = "127.0.0.1:15060"
CFG
  SIPRING_LOG=warn taskset -c "$SERVER_CPU" target/release/sipring run --config "$W/s.toml" > "$W/log" 2>&1 &
  pid=$!; sleep 2
  t0=$(awk '{print $14+$15}' /proc/$pid/stat); sleep 10; t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  idle=$(python3 -c "print(round(($t1-$t0)/$hz/10*100,1))")
  taskset -c "$LOAD_CPU" target/release/sipring-load message --target 127.0.0.1:15061 --ca "$W/pki/ca.pem" --users 50 --rate 500 --duration 10 --shards 1 --quiet --json "$W/m$spin.json" > /dev/null 2>&1 || true
  lat=$(python3 -c "import json;k=json.load(open('$W/m$spin.json'))['kinds']['message'];print(f\"p50 {k['p50_ms']:.3f} ms, p99 {k['p99_ms']:.3f} ms, p99.9 {k['p999_ms']:.3f} ms\")")
  echo "spin_before_park_us=$spin: idle CPU ${idle}% of one core; MESSAGE at 500/s: $lat"
  kill $pid; wait $pid || true
done
