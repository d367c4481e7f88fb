#!/usr/bin/env bash
# Userspace memory per idle TLS connection, kernel TLS vs userspace TLS, measured inside the
# kTLS VM (this host's kernel has no TLS). N idle registered connections are opened with
# sipring-load; the server's RSS before and while they are held gives bytes per connection.
#
#   benches/ktls/idle-memory.sh [N]          (default N=10000; release binaries are built)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10000}
if [ "${INSIDE_KTLS_VM:-0}" != 1 ]; then
  cargo build --release -p sipring -p sipring-load >/dev/null 2>&1
  export KTLSVM_MEM=${KTLSVM_MEM:-3072} KTLSVM_TIMEOUT=${KTLSVM_TIMEOUT:-900}
  [ -s "${KTLSVM_DIR:-/var/cache/sipring/ktlsvm}/vmlinux" ] || bash tests/vm/ktls-vm.sh setup
  INSIDE_KTLS_VM=1 KTLSVM_ENV="INSIDE_KTLS_VM" exec bash tests/vm/ktls-vm.sh run -- bash "$PWD/benches/ktls/idle-memory.sh" "$N"
fi
ulimit -n $((N * 2 + 1000))
W=$(mktemp -d)
target/release/sipring certs --out "$W/pki" >/dev/null
for mode in kernel userspace; do
  ktls=true; [ $mode = userspace ] && ktls=false
  cat > "$W/s.toml" <<CFG
[server]
shards = 1
hostname = "sip.example.com"
local_hosts = ["127.0.0.1"]
[[listen]]
kind = "tls"
address = "127.0.0.1:15061"
[[tls.certificate]]
cert = "$W/pki/server.pem"
key = "$W/pki/server.key"
[tls]
ktls = $ktls
ktls_tls13_without_rekey = true
[limits]
max_connections_per_ip = 1000000
[auth]
# Routing work only, as in the Kamailio config it is compared with (and earlier figures);
# benches/auth/run.sh measures what authentication costs.
enabled = false
[admin]
address = "127.0.0.1:15060"
CFG
  SIPRING_LOG=warn target/release/sipring run --config "$W/s.toml" > "$W/$mode.log" 2>&1 &
  spid=$!
  sleep 2
  before=$(awk '/VmRSS/{print $2}' /proc/$spid/status)
  target/release/sipring-load idle --target 127.0.0.1:15061 --ca "$W/pki/ca.pem" --users "$N" --duration 20 --warmup 0 \
    --keepalive 60 --shards 1 --quiet --connect-concurrency ${CC:-128} --timeout 120 > "$W/load-$mode.txt" 2>&1 &
  lpid=$!
  # Wait until all connections are up, then read the RSS while they idle.
  for _ in $(seq 1 600); do
    up=$(wget -qO- http://127.0.0.1:15060/metrics 2>/dev/null | awk '$1=="sipring_connections{kind=\"tls\"}"{print $2}')
    [ "${up:-0}" -ge "$N" ] && break
    sleep 1
  done
  sleep 3
  after=$(awk '/VmRSS/{print $2}' /proc/$spid/status)
  layer=$(wget -qO- http://127.0.0.1:15060/metrics | grep '^sipring_connections_total{kind="tls"' | head -1)
  echo "IDLE mode=$mode conns=$up rss_before_kib=$before rss_after_kib=$after bytes_per_conn=$(( (after - before) * 1024 / N )) [$layer]"
  wait $lpid || true
  kill $spid; wait $spid || true
done
