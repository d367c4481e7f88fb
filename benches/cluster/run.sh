#!/usr/bin/env bash
# The cluster, measured on one machine: registrations/s and calls/s through 3 sipring nodes
# (1 shard each) sharing a Redis Cluster of 3 masters + 3 replicas, beside 1 node alone and 1
# node writing through to the same store; MESSAGE latency at one rate with 1 node and with 3
# (where 2 in 3 requests cross nodes: the p99 a hop adds); the store's memory per binding;
# and how long the UAs of a killed node take to register again on the others.
#
#   benches/cluster/run.sh [OUT_DIR]            (~4 minutes)
#
#   BIN=DIR             prebuilt sipring and sipring-load (default: cargo build --release)
#   STEP_S=S            seconds measured per step (default 4, plus 1 s warm-up)
#   REG_RATES, CALL_RATES   the ladders (a rate passes with no failure and p99 <= 10 ms)
#   MSG_RATE            the MESSAGE rate of the latency comparison (default 500)
#   USERS               UAs of the memory and node-loss steps (default 3000)
#   PARTS               which parts run (default "ladders message loss"); results.md is built
#                       from whatever OUT_DIR holds, so a part can be rerun into it alone
#
# Everything shares this machine's CPUs (servers, six redis-server, the generator): figures
# are comparisons within one run, not capacities.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-cluster/$(date -u +%Y%m%dT%H%M%SZ)}
STEP_S=${STEP_S:-4}
REG_RATES=${REG_RATES:-"500 1000 2000 3000 4000 6000"}
CALL_RATES=${CALL_RATES:-"100 200 300 400 600"}
MSG_RATE=${MSG_RATE:-500}
USERS=${USERS:-3000}
PARTS=${PARTS:-ladders message loss}
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT/logs"
dpkg-query -W -f='${Status}' redis-server 2>/dev/null | grep -q "install ok installed" ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
if [ -n "${BIN:-}" ]; then
  SIPRING=$BIN/sipring; LOAD=$BIN/sipring-load
else
  cargo build --release -q -p sipring -p sipring-load
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
  SIPRING=$TARGET/release/sipring; LOAD=$TARGET/release/sipring-load
fi
W=$(mktemp -d /tmp/sipring-cluster.XXXXXX)
RPORTS=(27101 27102 27103 27104 27105 27106)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  pkill -f "sipring run --config $W" 2>/dev/null || true
  for p in "${RPORTS[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$W"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
T0=$(date +%s)

# The store: six redis-server in cluster mode, three masters with a replica each.
for p in "${RPORTS[@]}"; do
  mkdir -p "$W/redis-$p"
  redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-node-timeout 1000 \
    --cluster-config-file "$W/redis-$p/nodes.conf" --dir "$W/redis-$p" --save '' --appendonly no \
    --daemonize yes --logfile "$W/redis-$p/log"
done
for p in "${RPORTS[@]}"; do for _ in $(seq 50); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done; done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${RPORTS[@]}") --cluster-replicas 1 --cluster-yes >/dev/null
for _ in $(seq 100); do
  redis-cli -p "${RPORTS[0]}" cluster info | grep -q cluster_state:ok && break; sleep 0.2
done
SEEDS=$(printf '"127.0.0.1:%s",' "${RPORTS[@]}"); SEEDS="[${SEEDS%,}]"
masters() { redis-cli -p "${RPORTS[0]}" cluster nodes | awk '/master/ && !/fail/ {split($2, a, "[:@]"); print a[2]}'; }
store_mem() { local t=0 p; for p in $(masters); do
  t=$(( t + $(redis-cli -p "$p" info memory | awk -F: '/^used_memory:/{print $2}' | tr -d '\r') )); done; echo "$t"; }

"$SIPRING" certs --out "$W/pki" --node node-a --node node-b --node node-c >/dev/null
NAMES=(node-a node-b node-c); IPS=(127.0.0.2 127.0.0.3 127.0.0.4)
node_cfg() { # node_cfg INDEX CLUSTER(0|1)
  local n=${NAMES[$1]} ip=${IPS[$1]} j
  {
    cat <<EOF
[server]
shards = 1
domains = ["example.com"]
hostname = "$n.example.com"
local_hosts = ["$ip"]
[[listen]]
kind = "tls"
address = "$ip:15061"
[[listen]]
kind = "mtls"
address = "$ip:15062"
[[tls.certificate]]
cert = "$W/pki/$n.pem"
key = "$W/pki/$n.key"
sni = ["sip.example.com"]
[limits]
max_handshakes_in_flight = 100000
max_handshakes_per_ip = 100000
max_handshakes_per_ip_per_s = 0
max_connections_per_ip = 1000000
[auth]
enabled = false
[admin]
address = "$ip:15060"
EOF
    if [ "$2" = 1 ]; then
      cat <<EOF
[cluster]
node = "$n"
store = $SEEDS
roots = "$W/pki/ca.pem"
EOF
      for j in 0 1 2; do
        printf '[[cluster.nodes]]\nname = "%s"\naddress = "%s:15062"\nidentity = "%s.example.com"\n' \
          "${NAMES[$j]}" "${IPS[$j]}" "${NAMES[$j]}"
      done
    else
      # A lone node still needs a partner for its mtls listener.
      printf '[[peer]]\nname = "none"\nserver_name = "none.example.com"\nroots = "%s"\n' "$W/pki/ca.pem"
    fi
  } > "$W/$n.toml"
}
PIDS=()
start_nodes() { # start_nodes COUNT CLUSTER(0|1)
  PIDS=()
  local i
  for i in $(seq 0 $(( $1 - 1 ))); do
    node_cfg "$i" "$2"
    SIPRING_LOG=warn "$SIPRING" run --config "$W/${NAMES[$i]}.toml" >>"$OUT/logs/${NAMES[$i]}.log" 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq 0 $(( $1 - 1 ))); do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/${IPS[$i]}/15061") 2>/dev/null && break; sleep 0.1; done
  done
  [ "$2" = 1 ] && sleep 2 # the nodes see each other alive
  return 0
}
stop_nodes() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }
targets() { local i t=""; for i in $(seq 0 $(( $1 - 1 ))); do t+="${IPS[$i]}:15061,"; done; echo "${t%,}"; }
load() { # load TAG NODES SCENARIO ARGS...
  local tag=$1 n=$2; shift 2
  "$LOAD" "$@" --target "$(targets "$n")" --server-name sip.example.com --ca "$W/pki/ca.pem" --shards 1 --quiet \
    --warmup 1 --timeout 5 --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1 || true
}
field() { # field JSON KIND FIELD
  python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); k=s["kinds"].get(sys.argv[2]) or {}; print(k.get(sys.argv[3], "-"))' "$@" 2>/dev/null || echo -
}
passes() { # passes JSON KIND
  python3 - "$1" "$2" <<'PY'
import json, sys
try: s = json.load(open(sys.argv[1]))
except Exception: sys.exit(1)
k = s["kinds"].get(sys.argv[2])
sys.exit(0 if k and s["failed"] == 0 and k["p99_ms"] <= 10.0 and k["count"] > 0 else 1)
PY
}
ladder() { # ladder NAME NODES CLUSTER SCENARIO KIND "RATES" ARGS...
  local name=$1 n=$2 cl=$3 scen=$4 kind=$5 rates=$6; shift 6
  local best=0 r
  for r in $rates; do
    start_nodes "$n" "$cl"
    load "$name-$r" "$n" "$scen" --rate "$r" --duration "$STEP_S" "$@"
    stop_nodes
    if passes "$OUT/$name-$r.json" "$kind"; then best=$r; else break; fi
  done
  echo "$best" > "$OUT/best-$name"
  echo "$name: $best/s ($(( $(date +%s) - T0 )) s so far)"
}

if part ladders; then
  echo "== registrations/s and calls/s: 1 node, 1 node + store, 3 nodes + store"
  ladder reg-1 1 0 register register "$REG_RATES" --users 3000 --expires 600
  ladder reg-1s 1 1 register register "$REG_RATES" --users 3000 --expires 600
  ladder reg-3 3 1 register register "$REG_RATES" --users 3000 --expires 600
  ladder call-1 1 0 call invite_200 "$CALL_RATES" --users 600 --hold 1
  ladder call-1s 1 1 call invite_200 "$CALL_RATES" --users 600 --hold 1
  ladder call-3 3 1 call invite_200 "$CALL_RATES" --users 600 --hold 1
fi

if part message; then
  echo "== MESSAGE at $MSG_RATE/s: 1 node vs 3 (2 in 3 requests cross nodes)"
  for n in 1 3; do
    start_nodes "$n" 1
    load "msg-$n" "$n" message --rate "$MSG_RATE" --duration "$STEP_S" --users 300
    stop_nodes
  done
fi

before=0; after=0; keys=0
if part loss; then
  echo "== store memory per binding ($USERS UAs over 3 nodes) and re-registration after a node loss"
  start_nodes 3 1
  before=$(store_mem)
  # Long enough for the setup of every UA, the kill, and every re-registration after it.
  "$LOAD" idle --target "$(targets 3)" --server-name sip.example.com --ca "$W/pki/ca.pem" --shards 1 --quiet \
    --users "$USERS" --expires 600 --duration 50 --reconnect --timeout 5 --connect-concurrency 64 \
    --json "$OUT/node-loss.json" >"$OUT/node-loss.txt" 2>&1 &
  HOLD=$!
  for _ in $(seq 80); do # until every UA is registered (bindings in the store)
    sleep 0.5
    keys=0; for p in $(masters); do keys=$(( keys + $(redis-cli -p "$p" dbsize) )); done
    [ "$keys" -ge "$USERS" ] && break
  done
  sleep 1
  after=$(store_mem)
  keys=0; for p in $(masters); do keys=$(( keys + $(redis-cli -p "$p" dbsize) )); done
  echo "$before $after $keys" > "$OUT/store-memory"
  kill -9 "${PIDS[0]}"
  wait "$HOLD" || true
  stop_nodes
fi
[ -f "$OUT/store-memory" ] && read -r before after keys < "$OUT/store-memory"

python3 - "$OUT" "$STEP_S" "$MSG_RATE" "$USERS" "$before" "$after" "$keys" <<'PY' | tee "$OUT/results.md"
import json, os, sys
out, step, msg_rate, users, before, after, keys = sys.argv[1:8]
def best(n):
    try: return open(f"{out}/best-{n}").read().strip()
    except OSError: return "-"
def j(tag):
    try: return json.load(open(f"{out}/{tag}.json"))
    except Exception: return None
def at(tag, kind):
    s = j(tag)
    k = s and s["kinds"].get(kind)
    return f"p50 {k['p50_ms']:.2f} / p99 {k['p99_ms']:.2f} ms, {s['failed']} failed" if k else "-"
print(f"host: {os.cpu_count()} CPUs shared by the nodes, six redis-server and the generator; {step} s per step")
print()
print("| | 1 node | 1 node + store | 3 nodes + store |")
print("| --- | --- | --- | --- |")
print(f"| REGISTER/s passed (p99 <= 10 ms, 0 failed) | {best('reg-1')} | {best('reg-1s')} | {best('reg-3')} |")
print(f"| calls/s passed (INVITE..BYE, 1 s hold) | {best('call-1')} | {best('call-1s')} | {best('call-3')} |")
print()
print(f"MESSAGE at {msg_rate}/s, 300 UAs: 1 node {at('msg-1', 'message')}; 3 nodes {at('msg-3', 'message')}")
print()
n = int(users)
print(f"store: {int(keys)} keys for {n} UAs; used_memory of the masters {before} -> {after} B: "
      f"{(int(after) - int(before)) / n:.0f} B per binding (one copy; the replicas hold as much again)")
s = j("node-loss")
k = s and s["kinds"].get("reconnect")
if k:
    print(f"node-a killed with ~{n // 3} of {n} UAs on it: {k['count']} re-registered on the other nodes; "
          f"loss -> 200 OK of the new REGISTER p50 {k['p50_ms']:.0f} ms, p99 {k['p99_ms']:.0f} ms, max {k['max_ms']:.0f} ms")
else:
    print("node loss: no reconnect samples")
PY
echo "($(( $(date +%s) - T0 )) s; raw files in $OUT)"
