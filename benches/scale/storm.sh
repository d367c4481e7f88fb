#!/usr/bin/env bash
# Scale: N registered TLS connections held on one server core, keepalive cost, and a server
# restart turned into a measured reconnect storm.
#
#   benches/scale/storm.sh [OUT_DIR]      (as root; N=100000 by default, ~5 minutes)
#
# The server runs on SERVER_CPU (default: the first allowed CPU), sipring-load on LOAD_CPU
# (default: the last allowed CPU), both on this
# host. sipring-load holds N UAs (in GENS processes when one process may not hold them all: it
# uses two descriptors per connection; idle scenario, CRLF keepalive every KEEPALIVE_S) spread over
# 8 loopback source addresses and, with --reconnect, connects again and re-registers when the
# server goes away. The script: waits until N connections are up, reads the server's RSS and
# its CPU over an idle window of IDLE_S seconds, stops it (SIGTERM), starts it again on the
# same port, and times until N contacts are registered again (the registrar starts empty). The `reconnect` histogram (loss → new
# registration's 200) and the storm's `tls_handshake` histogram land in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/scale/$(date -u +%Y%m%dT%H%M%SZ)}
N=${N:-100000}
CPUS=($(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}
LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
[ "$SERVER_CPU" != "$LOAD_CPU" ] || { echo "SERVER_CPU and LOAD_CPU are both $SERVER_CPU: this needs two allowed CPUs (Cpus_allowed_list: $(python3 -c 'import os; print(sorted(os.sched_getaffinity(0)))'))" >&2; exit 2; }
IDLE_S=${IDLE_S:-30}
KEEPALIVE_S=${KEEPALIVE_S:-30}
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-600}
STORM_TIMEOUT_S=${STORM_TIMEOUT_S:-300}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-scale.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT

# The server needs one descriptor per connection, the generator two: raise the hard limit
# (root) first; where it cannot be raised, split the UAs over GENS generator processes.
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
[ "$NOFILE" -ge $((N + 500)) ] || { echo "nofile limit $NOFILE is too low for a server holding N=$N"; exit 1; }
PER_GEN=$(( (NOFILE - 500) / 2 ))
GENS=${GENS:-$(( (N + PER_GEN - 1) / PER_GEN ))}
[ $(( (N + GENS - 1) / GENS )) -le "$PER_GEN" ] || { echo "GENS=$GENS generators cannot hold N=$N under nofile $NOFILE"; exit 1; }

cargo build --release -p sipring -p sipring-load >/dev/null 2>&1
SIPRING=$ROOT/target/release/sipring
LOAD=$ROOT/target/release/sipring-load
"$SIPRING" certs --out "$W/pki" >/dev/null

cat > "$W/sipring.toml" <<CFG
[server]
shards = 1
first_cpu = 0
domains = ["example.com"]
hostname = "sip.example.com"
local_hosts = ["127.0.0.1"]
drain_timeout_s = 2
[[listen]]
kind = "tls"
address = "127.0.0.1:16061"
backlog = 65535
[[tls.certificate]]
cert = "pki/server.pem"
key = "pki/server.key"
sni = ["sip.example.com"]
[limits]
max_handshakes_in_flight = 4096
# The generators are one address; real phones are many (the per-source cap, 64 by default,
# would measure the cap, not the storm).
max_handshakes_per_ip = 4096
max_handshakes_per_ip_per_s = 0
max_connections_per_ip = 1000000
max_connections_per_shard = 1000000
[auth]
# Routing work only, as in the Kamailio config it is compared with (and earlier figures);
# benches/auth/run.sh measures what authentication costs.
enabled = false
[admin]
address = "127.0.0.1:16060"
CFG

metric() { # metric NAME -> its total on /metrics (0 when the server is down)
  python3 - "$1" <<'PY' 2>/dev/null || echo 0
import sys, urllib.request
t = urllib.request.urlopen("http://127.0.0.1:16060/metrics", timeout=2).read().decode()
n = sys.argv[1]
# /metrics holds the totals (per-shard series are on /metrics/shards).
print(int(sum(float(l.split()[-1]) for l in t.splitlines()
              if (l.startswith(n + "{") or l.startswith(n + " ")) and 'shard="' not in l)))
PY
}
start() { SIPRING_LOG=warn taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/sipring.toml" >>"$OUT/sipring.log" 2>&1 & echo $! > "$W/pid"; }
rss_kib() { awk '/VmRSS/{print $2}' "/proc/$(cat "$W/pid")/status"; }
ticks() { awk '{print $14+$15}' "/proc/$(cat "$W/pid")/stat"; }
wait_for() { # wait_for COUNT TIMEOUT_S -> seconds until COUNT contacts are registered (or fails)
  local t0 now; t0=$(date +%s.%N)
  while [ "$(metric sipring_bindings)" -lt "$1" ]; do
    now=$(date +%s.%N)
    if python3 -c "import sys; sys.exit(0 if $now - $t0 > $2 else 1)"; then echo "timed out at $(metric sipring_bindings) of $1"; return 1; fi
    sleep 0.5
  done
  python3 -c "print(round($(date +%s.%N) - $t0, 1))"
}

start; sleep 1
rss0=$(rss_kib)
# The run phase (after setup) outlasts everything below; the generators stop at its end.
lps=()
for g in $(seq 1 "$GENS"); do
  n=$(( N / GENS + (g <= N % GENS ? 1 : 0) ))
  taskset -c "$LOAD_CPU" "$LOAD" idle --target 127.0.0.1:16061 --ca "$W/pki/ca.pem" --shards 1 --quiet \
    --users "$n" --prefix "g${g}u" --keepalive "$KEEPALIVE_S" --duration $((IDLE_S + STORM_TIMEOUT_S + 60)) \
    --warmup 0 --timeout 30 --connect-concurrency $(( 512 / GENS )) --local-addrs 127.0.0.2-127.0.0.9 --reconnect \
    --json "$OUT/storm-$g.json" --hgrm-dir "$OUT/storm-$g-hgrm" --plot "$OUT/storm-$g.svg" >"$OUT/storm-$g.txt" 2>&1 &
  lps+=($!)
done
echo "$N UAs in $GENS generator process(es) (nofile $NOFILE)"
setup=$(wait_for "$N" "$SETUP_TIMEOUT_S")
echo "setup: $N connections registered in ${setup}s"
sleep 5
rss1=$(rss_kib)
c0=$(ticks); sleep "$IDLE_S"; c1=$(ticks)
echo "server RSS $rss0 -> $rss1 KiB: $(( (rss1 - rss0) * 1024 / N )) bytes per connection"
echo "keepalive: $(python3 -c "print(round(($c1-$c0)*100/$(getconf CLK_TCK)/$IDLE_S, 2))")% of a core for $N connections (CRLF every ${KEEPALIVE_S}s)"

kill -TERM "$(cat "$W/pid")"; wait "$(cat "$W/pid")" || true
echo "server stopped (SIGTERM); restarting on the same port"
start
storm=$(wait_for "$N" "$STORM_TIMEOUT_S")
echo "reconnect storm: all $N connections back and registered ${storm}s after the restart"
sleep 3
echo "3 s later: $(metric sipring_connections) connections up, $(metric sipring_bindings) bindings"
echo "server still running: $(kill -0 "$(cat "$W/pid")" && echo yes)"
kill -TERM "${lps[@]}" 2>/dev/null || true; wait "${lps[@]}" || true
kill -TERM "$(cat "$W/pid")"; wait "$(cat "$W/pid")" || true
for g in $(seq 1 "$GENS"); do echo "== generator $g"; cat "$OUT/storm-$g.txt"; done
