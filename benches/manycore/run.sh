#!/usr/bin/env bash
# Many cores, from prebuilt binaries, in about 8 minutes: sipring vs Kamailio vs the
# reflector (the runtime's ceiling) on one server core — MESSAGE, calls, TLS handshakes —
# then sipring's MESSAGE and calls at 1, 2, 4 and 8 shards, with the load generator always on
# CPUs of its own.
#
#   benches/manycore/run.sh [OUT_DIR]
#
#   BIN=DIR            sipring and sipring-load (default: cargo build --release here)
#   KAMAILIO_ROOT=DIR  Kamailio as extracted Debian packages (dpkg-deb -x kamailio*.deb
#                      kamailio-tls-modules*.deb DIR): DIR/usr/sbin/kamailio and its modules;
#                      default: the installed kamailio; none: that part is skipped, said so
#   GEN_CPUS=N         CPUs for the generator (default: half of the allowed set, at least 1)
#   STEP_S=S           seconds measured per step (default 3, plus 1 s warm-up)
#   SHARDS="1 2 4 8"   shard counts for the scaling part (those that fit are run)
#   MESSAGE_RATES, CALL_RATES, HANDSHAKE_RATES   the one-core ladders (see below)
#
# Placement: the process's allowed CPU set (sched_getaffinity, so `taskset`/cpusets are
# obeyed) is split: servers on its first CPUs, the generator on its last GEN_CPUS, each
# started under taskset; every thread's Cpus_allowed_list goes to placement.txt. A rate
# passes with no failure and p99 <= 10 ms; each ladder stops at its first failure. With
# fewer than 3 allowed CPUs the scaling part has only 1 shard and results.md says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/bench-manycore/$(date -u +%Y%m%dT%H%M%SZ)}
STEP_S=${STEP_S:-3}
CPUS=($(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'))
NCPU=${#CPUS[@]}
[ "$NCPU" -ge 2 ] || { echo "need at least 2 allowed CPUs (have ${CPUS[*]})"; exit 1; }
GEN_CPUS=${GEN_CPUS:-$(( NCPU / 2 > 0 ? NCPU / 2 : 1 ))}
SRV_N=$(( NCPU - GEN_CPUS ))
join() { local IFS=,; echo "$*"; }
SRV_LIST=$(join "${CPUS[@]:0:$SRV_N}")
GEN_LIST=$(join "${CPUS[@]:$SRV_N}")
ONE_CPU=${CPUS[0]}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-manycore.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; pkill -f "kamailio -f $W" 2>/dev/null || true; rm -rf "$W"' EXIT
T0=$(date +%s)

if [ -n "${BIN:-}" ]; then
  SIPRING=$BIN/sipring; LOAD=$BIN/sipring-load
else
  cargo build --release -q -p sipring -p sipring-load
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
  SIPRING=$TARGET/release/sipring; LOAD=$TARGET/release/sipring-load
fi
KAM=""
if [ -n "${KAMAILIO_ROOT:-}" ]; then
  KAM=$KAMAILIO_ROOT/usr/sbin/kamailio
  KAM_MODULES=$(dirname "$(find "$KAMAILIO_ROOT" -name tls.so -path '*kamailio/modules*' | head -1)")
  export LD_LIBRARY_PATH=$KAMAILIO_ROOT/usr/lib/x86_64-linux-gnu:$KAMAILIO_ROOT/usr/lib/x86_64-linux-gnu/kamailio${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
elif command -v kamailio >/dev/null; then
  KAM=$(command -v kamailio); KAM_MODULES=/usr/lib/x86_64-linux-gnu/kamailio/modules
fi
ulimit -n "$(ulimit -Hn)"
"$SIPRING" certs --out "$W/pki" >/dev/null
mkdir -p "$W/run"
{
  echo "host: $(nproc) CPUs online, allowed ${CPUS[*]}; $(uname -r); $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo)"
  echo "servers on CPUs $SRV_LIST (one-core part: $ONE_CPU), generator on $GEN_LIST ($GEN_CPUS shards)"
  echo "sipring $("$SIPRING" --version 2>/dev/null || echo '?'); kamailio: ${KAM:-none}"
} > "$OUT/host.txt"
cat "$OUT/host.txt"

sipring_cfg() { # sipring_cfg SHARDS
  cat > "$W/sipring.toml" <<EOF
[server]
shards = $1
domains = ["example.com"]
hostname = "sip.example.com"
local_hosts = ["127.0.0.1"]
mesh_capacity = 16384
[[listen]]
kind = "tls"
address = "127.0.0.1:15061"
[[tls.certificate]]
cert = "$W/pki/server.pem"
key = "$W/pki/server.key"
sni = ["sip.example.com"]
[limits]
max_handshakes_in_flight = 100000
max_handshakes_per_ip = 100000
max_handshakes_per_ip_per_s = 0
max_connections_per_ip = 1000000
[auth]
enabled = false
[admin]
address = "127.0.0.1:15060"
EOF
}
if [ -n "$KAM" ]; then
  sed -e "s|@DIR@|$W|g" -e "s|^mpath=.*|mpath=\"$KAM_MODULES/\"|" benches/compare/kamailio/kamailio.cfg > "$W/kamailio.cfg"
  sed "s|@DIR@|$W|g" benches/compare/kamailio/tls.cfg > "$W/tls.cfg"
fi

SRV_PID=""
start() { # start SERVER CPULIST [SHARDS]
  case $1 in
    sipring)
      sipring_cfg "${3:-1}"
      SIPRING_LOG=warn taskset -c "$2" "$SIPRING" run --config "$W/sipring.toml" >"$W/sipring.log" 2>&1 &
      SRV_PID=$!; PORT=15061 ;;
    kamailio)
      taskset -c "$2" "$KAM" -f "$W/kamailio.cfg" -P "$W/run/kamailio.pid" -w "$W/run" -m 2048 -M 64 -DD -E -A "TCP_CHILDREN=${KAM_WORKERS:-2}" >"$W/kamailio.log" 2>&1 &
      SRV_PID=$!; PORT=15071 ;;
    reflect)
      taskset -c "$2" "$LOAD" reflect --listen 127.0.0.1:15081 --cert "$W/pki/server.pem" --key "$W/pki/server.key" --shards 1 >"$W/reflect.log" 2>&1 &
      SRV_PID=$!; PORT=15081 ;;
  esac
  sleep 1
}
stop() {
  kill "$SRV_PID" 2>/dev/null || true; wait "$SRV_PID" 2>/dev/null || true
  pkill -f "kamailio -f $W" 2>/dev/null || true
}
threads() { for t in /proc/"$1"/task/*; do printf '%s=%s ' "$(cat "$t/comm" 2>/dev/null)" "$(awk '/Cpus_allowed_list/{print $2}' "$t/status" 2>/dev/null)"; done; }
load() { # load TAG SCENARIO ARGS...
  local tag=$1; shift
  taskset -c "$GEN_LIST" "$LOAD" "$@" --target "127.0.0.1:$PORT" --ca "$W/pki/ca.pem" --shards "$GEN_CPUS" --quiet \
    --duration "$STEP_S" --warmup 1 --timeout 5 --json "$OUT/$tag.json" >"$OUT/$tag.txt" 2>&1 &
  local lp=$!
  sleep 0.5
  echo "$tag server: $(threads "$SRV_PID")" >> "$OUT/placement.txt"
  echo "$tag generator: $(threads "$lp")" >> "$OUT/placement.txt"
  wait $lp || true
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
ladder() { # ladder NAME SERVER CPULIST SHARDS SCENARIO KIND "RATES" ARGS... -> best rate in $OUT/best-NAME
  local name=$1 srv=$2 cpus=$3 shards=$4 scen=$5 kind=$6 rates=$7; shift 7
  local best=0 r
  for r in $rates; do
    start "$srv" "$cpus" "$shards"
    load "$name-$r" "$scen" --rate "$r" "$@"
    stop
    if passes "$OUT/$name-$r.json" "$kind"; then best=$r; else break; fi
  done
  echo "$best" > "$OUT/best-$name"
  echo "$name: $best/s ($(( $(date +%s) - T0 )) s so far)"
}

echo "== one server core (CPU $ONE_CPU)"
servers="sipring reflect"; [ -n "$KAM" ] && servers="sipring kamailio reflect"
for s in $servers; do
  ladder "one-message-$s" "$s" "$ONE_CPU" 1 message message "${MESSAGE_RATES:-1000 2000 4000 6000 8000 10000 12000 16000 20000 24000 30000}" --users 200
done
for s in sipring ${KAM:+kamailio}; do
  ladder "one-call-$s" "$s" "$ONE_CPU" 1 call invite_200 "${CALL_RATES:-250 500 1000 1500 2000 3000 4000 5000 6000}" --users 200 --hold 1 --max-concurrent 100000
done
for s in $servers; do
  KAM_WORKERS=1 ladder "one-handshake-$s" "$s" "$ONE_CPU" 1 handshake options "${HANDSHAKE_RATES:-250 500 1000 1500 2000 2500 3000 4000}" --no-resume --tls-version 1.3
done

echo "== sipring by shards (CPUs $SRV_LIST)"
m1=$(cat "$OUT/best-one-message-sipring"); c1=$(cat "$OUT/best-one-call-sipring")
[ "$m1" -gt 0 ] || m1=5000; [ "$c1" -gt 0 ] || c1=1000
for n in ${SHARDS:-1 2 4 8}; do
  [ "$n" -le "$SRV_N" ] || { echo "$n shards: skipped ($SRV_N server CPUs)"; continue; }
  # From 0.7 x n x one shard's best, up to 1.1 x: scaling shows as the best passing step.
  rates=$(python3 -c "print(*[int($m1*$n*f) for f in (0.7, 0.85, 1.0, 1.1)])")
  ladder "shards$n-message" sipring "$SRV_LIST" "$n" message message "$rates" --users $((200 * n))
  rates=$(python3 -c "print(*[int($c1*$n*f) for f in (0.7, 0.85, 1.0, 1.1)])")
  ladder "shards$n-call" sipring "$SRV_LIST" "$n" call invite_200 "$rates" --users $((200 * n)) --hold 1 --max-concurrent 100000
done

python3 - "$OUT" "$SRV_N" "${SHARDS:-1 2 4 8}" <<'PY' | tee "$OUT/results.md"
import json, os, sys
out, srv_n, shards = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split()]
def best(n):
    p = f"{out}/best-{n}"
    return int(open(p).read()) if os.path.exists(p) else None
def pct(n, kind):
    b = best(n)
    if not b: return "-"
    try: k = json.load(open(f"{out}/{n}-{b}.json"))["kinds"][kind]
    except Exception: return "-"
    return f"{k['p50_ms']:.2f} / {k['p99_ms']:.2f}"
print(open(f"{out}/host.txt").read())
print("| one server core | sipring | Kamailio | reflector | sipring / Kamailio |")
print("| --- | --- | --- | --- | --- |")
for scen, kind, label in (("message", "message", "MESSAGE/s"), ("call", "invite_200", "calls/s (1 s hold)"), ("handshake", "options", "TLS 1.3 handshakes/s")):
    a, b, c = best(f"one-{scen}-sipring"), best(f"one-{scen}-kamailio"), best(f"one-{scen}-reflect")
    r = f"{a/b:.1f}x" if a and b else "n/a"
    f = lambda v: "-" if v is None else str(v)
    print(f"| {label} (p50 / p99 ms) | {f(a)} ({pct(f'one-{scen}-sipring', kind)}) | {f(b)} ({pct(f'one-{scen}-kamailio', kind)}) | {f(c)} | {r} |")
print()
print("| sipring shards | " + " | ".join(str(n) for n in shards) + " |")
print("| --- |" + " --- |" * len(shards))
for scen, kind, label in (("message", "message", "MESSAGE/s"), ("call", "invite_200", "calls/s")):
    cells, base = [], best(f"shards1-{scen}")
    for n in shards:
        v = best(f"shards{n}-{scen}")
        if v is None: cells.append("skipped"); continue
        eff = f", {v/(base*n):.2f} x N" if base and n > 1 else ""
        cells.append(f"{v}{eff}")
    print(f"| {label} | " + " | ".join(cells) + " |")
if srv_n < 2:
    print(f"\nOnly {srv_n} server CPU here: no scaling curve; run on a many-core host.")
PY
echo "results in $OUT ($(( $(date +%s) - T0 )) s)"
