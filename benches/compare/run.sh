#!/usr/bin/env bash
# sipring vs Kamailio vs the runtime ceiling, side by side, with the same load generator.
#
#   benches/compare/run.sh [OUT_DIR]        (as root on a Debian 12 host; ~10-15 minutes)
#
# Both servers get the same CPU (SERVER_CPU, default: the first this process may use) and
# the load generator another (LOAD_CPU, default: the last), both from the allowed set.
# Each server runs under `taskset -c SERVER_CPU` (sipring's shard then takes index 0 of
# that one-CPU set). Each measurement alternates A/B/C (sipring, Kamailio, reflector)
# at every step, so drift of a shared, noisy machine hits all three alike. Steps last
# STEP_S seconds (default 5). A rate "passes" with zero failures and p99 <= 10 ms.
# Everything lands in OUT_DIR (JSON per run, .hgrm, SVG plots, results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${1:-$ROOT/target/compare/$(date -u +%Y%m%dT%H%M%SZ)}
CPUS=($(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))'))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}
LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
[ "$SERVER_CPU" != "$LOAD_CPU" ] || { echo "SERVER_CPU and LOAD_CPU are both $SERVER_CPU: this needs two allowed CPUs (Cpus_allowed_list: $(python3 -c 'import os; print(sorted(os.sched_getaffinity(0)))'))" >&2; exit 2; }
STEP_S=${STEP_S:-5}
PARTS=${PARTS:-message call handshake idle}
source benches/lib.sh # threads
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-compare.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$W/run/kamailio.pid" ] && kill "$(cat "$W/run/kamailio.pid")" 2>/dev/null; rm -rf "$W"' EXIT

need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
need kamailio kamailio-tls-modules
need procps

cargo build --release -p sipring -p sipring-load >/dev/null 2>&1
SIPRING=$ROOT/target/release/sipring
LOAD=$ROOT/target/release/sipring-load
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"

"$SIPRING" certs --out "$W/pki" >/dev/null
mkdir -p "$W/run"

# --- servers -------------------------------------------------------------------------------
cat > "$W/sipring.toml" <<EOF
[server]
shards = 1
first_cpu = 0
domains = ["example.com"]
hostname = "sip.example.com"
local_hosts = ["127.0.0.1"]
[[listen]]
kind = "tls"
address = "127.0.0.1:15061"
[[tls.certificate]]
cert = "pki/server.pem"
key = "pki/server.key"
sni = ["sip.example.com"]
[limits]
max_handshakes_in_flight = 100000
max_handshakes_per_ip = 100000
max_handshakes_per_ip_per_s = 0
max_connections_per_ip = 1000000
[auth]
# Routing work only, as in the Kamailio config it is compared with (and earlier figures);
# benches/auth/run.sh measures what authentication costs.
enabled = false
[admin]
address = "127.0.0.1:15060"
EOF
sed "s|@DIR@|$W|g" benches/compare/kamailio/kamailio.cfg > "$W/kamailio.cfg"
sed "s|@DIR@|$W|g" benches/compare/kamailio/tls.cfg > "$W/tls.cfg"

start_sipring() { SIPRING_LOG=warn taskset -c "$SERVER_CPU" "$SIPRING" run --config "$W/sipring.toml" >"$W/sipring.log" 2>&1 & echo $! > "$W/sipring.pid"; sleep 1; }
stop_sipring() { kill "$(cat "$W/sipring.pid")" 2>/dev/null || true; wait "$(cat "$W/sipring.pid")" 2>/dev/null || true; }
# Kamailio 5.6 + OpenSSL 3 can crash with 2 TLS workers under concurrent handshakes
# (upstream #3791): the handshake test uses 1 worker (KAM_WORKERS=1).
start_kamailio() {
  taskset -c "$SERVER_CPU" kamailio -f "$W/kamailio.cfg" -P "$W/run/kamailio.pid" -w "$W/run" -m 2048 -M 64 -DD -E -A "TCP_CHILDREN=${KAM_WORKERS:-2}" >"$W/kamailio.log" 2>&1 &
  sleep 2
}
stop_kamailio() { [ -f "$W/run/kamailio.pid" ] && kill "$(cat "$W/run/kamailio.pid")" 2>/dev/null || true; sleep 1; pkill -f "kamailio -f $W" 2>/dev/null || true; sleep 0.5; }
start_reflect() { taskset -c "$SERVER_CPU" "$LOAD" reflect --listen 127.0.0.1:15081 --cert "$W/pki/server.pem" --key "$W/pki/server.key" --shards 1 >"$W/reflect.log" 2>&1 & echo $! > "$W/reflect.pid"; sleep 1; }
stop_reflect() { kill "$(cat "$W/reflect.pid")" 2>/dev/null || true; wait "$(cat "$W/reflect.pid")" 2>/dev/null || true; }

port_of() { case $1 in sipring) echo 15061;; kamailio) echo 15071;; reflect) echo 15081;; esac; }
pid_of() { case $1 in sipring) cat "$W/sipring.pid";; kamailio) pgrep -f "kamailio -f $W" | tr '\n' ' ';; reflect) cat "$W/reflect.pid";; esac; }

load() { # load SERVER TAG SCENARIO ARGS... -> JSON in $OUT/TAG.json, exit status of sipring-load
  local srv=$1 tag=$2; shift 2
  taskset -c "$LOAD_CPU" "$LOAD" "$@" --target "127.0.0.1:$(port_of "$srv")" --ca "$W/pki/ca.pem" --shards 1 --quiet \
    --json "$OUT/$tag.json" --hgrm-dir "$OUT/$tag-hgrm" >"$OUT/$tag.txt" 2>&1 &
  local lp=$!
  sleep 1 # each thread's allowed CPUs, server and generator, once it runs
  echo "$tag server: $(threads $(pid_of "$srv")) generator: $(threads "$lp")" >> "$OUT/placement.txt"
  wait "$lp"
}

passes() { # passes JSON KIND -> exit 0 if no failures and p99 <= 10 ms
  python3 - "$1" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1])); k = s["kinds"].get(sys.argv[2])
sys.exit(0 if k and s["failed"] == 0 and k["p99_ms"] <= 10.0 and k["count"] > 0 else 1)
PY
}

cpu_ticks() { local t=0; for p in $(pid_of "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
rss_kib() { local t=0; for p in $(pid_of "$1"); do t=$((t + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done; echo "$t"; }

with_server() { # with_server NAME CMD...
  local s=$1; shift
  "start_$s"; "$@" || true; "stop_$s"
}

sweep() { # sweep SCENARIO KIND "RATES" EXTRA... -> best passing rate per server in $OUT/best-SCENARIO-SERVER
  local scen=$1 kind=$2 rates=$3; shift 3
  local -A best=() stopped=()
  local s r tag
  for s in sipring kamailio reflect; do best[$s]=0; stopped[$s]=0; done
  # The reflector answers everything with a bare 200: meaningful for MESSAGE and handshakes,
  # not for calls (no 180, no Contact, no second hop).
  [ "$scen" = call ] && stopped[reflect]=1
  for r in $rates; do
    for s in sipring kamailio reflect; do
      [ "${stopped[$s]}" = 1 ] && continue
      tag="$scen-$s-$r"
      with_server "$s" load "$s" "$tag" "$scen" --rate "$r" --duration "$STEP_S" --warmup 1 "$@"
      if [ -f "$OUT/$tag.json" ] && passes "$OUT/$tag.json" "$kind"; then
        best[$s]=$r; echo "$scen $s $r/s: pass"
      else
        stopped[$s]=1; echo "$scen $s $r/s: fail"
      fi
    done
  done
  for s in sipring kamailio reflect; do echo "${best[$s]}" > "$OUT/best-$scen-$s"; done
}

has message && echo "== MESSAGE/s (200 users, p99 <= 10 ms, no failures)"
has message && sweep message message "2000 4000 6000 8000 10000 12000 14000 16000 20000 24000 28000 32000" --users 200
has call && echo "== calls/s (200 users, 1 s hold)"
has call && sweep call invite_200 "250 500 1000 1500 2000 2500 3000 4000" --users 200 --hold 1 --max-concurrent 100000
has handshake && echo "== TLS handshakes/s on one server core (no resumption)"
has handshake && KAM_WORKERS=1 sweep handshake options "250 500 1000 1500 2000 3000 4000" --no-resume --tls-version 1.3

has idle && echo "== idle memory per TLS connection (10k) and CPU per call"
has idle && for s in sipring kamailio; do
  "start_$s"
  before=$(rss_kib "$s")
  # Two generator processes of 5,000 UAs: the generator uses two descriptors per connection
  # and a process here may hold 20,000 (the server: one per connection).
  lps=()
  for half in a b; do
    taskset -c "$LOAD_CPU" "$LOAD" idle --target "127.0.0.1:$(port_of "$s")" --ca "$W/pki/ca.pem" --shards 1 --quiet --users 5000 --prefix "idle$half" --duration 60 --warmup 0 --keepalive 30 --connect-concurrency 256 --json "$OUT/idle-$s-$half.json" >"$OUT/idle-$s-$half.txt" 2>&1 &
    lps+=($!)
  done
  # Wait until the server holds all 10,000 (established TCP connections on its port).
  for _ in $(seq 1 120); do
    up=$(ss -Htn state established "( sport = :$(port_of "$s") )" | wc -l)
    [ "$up" -ge 10000 ] && break
    sleep 1
  done
  sleep 3; after=$(rss_kib "$s")
  kill -TERM "${lps[@]}" 2>/dev/null || true; wait "${lps[@]}" || true
  echo "$(( (after - before) * 1024 / up ))" > "$OUT/idle-bytes-$s"
  echo "idle $s: $(cat "$OUT/idle-bytes-$s") bytes per connection over $up connections (RSS $before -> $after KiB)"
  c0=$(cpu_ticks "$s")
  load "$s" "cpu-call-$s" call --rate 500 --duration 10 --warmup 0 --users 200 --hold 0.5 || true
  c1=$(cpu_ticks "$s")
  calls=$(python3 -c "import json;print(json.load(open('$OUT/cpu-call-$s.json'))['kinds']['invite_200']['count'])")
  echo "$(python3 -c "print(round(($c1-$c0)*1e6/$(getconf CLK_TCK)/max($calls,1),1))")" > "$OUT/cpu-us-per-call-$s"
  echo "cpu $s: $(cat "$OUT/cpu-us-per-call-$s") us per call"
  "stop_$s"
done

# --- plots and the table -----------------------------------------------------------------
best() { cat "$OUT/best-$1-$2"; }
for scen in message:message call:invite_200 handshake:options; do
  s=${scen%%:*}; k=${scen##*:}
  has "$s" || continue
  files=()
  for srv in sipring kamailio reflect; do r=$(best "$s" "$srv"); [ "$r" != 0 ] && files+=("$OUT/$s-$srv-$r.json"); done
  [ ${#files[@]} -gt 0 ] && "$LOAD" compare --kind "$k" --plot "$OUT/$s.svg" "${files[@]}" > "$OUT/$s-compare.txt" || true
done
pct() { python3 -c "import json;k=json.load(open('$1'))['kinds']['$2'];print(f\"{k['p50_ms']:.2f} / {k['p99_ms']:.2f} / {k['p999_ms']:.2f}\")" 2>/dev/null || echo "-"; }
{
  echo "| measure | sipring | Kamailio 5.6 | ceiling (reflector) | sipring / Kamailio |"
  echo "| --- | --- | --- | --- | --- |"
  for row in "message:message:MESSAGE/s" "call:invite_200:calls/s" "handshake:options:TLS 1.3 handshakes/s (1 core)"; do
    IFS=: read -r s k label <<<"$row"
    has "$s" || continue
    a=$(best "$s" sipring); b=$(best "$s" kamailio); c=$(best "$s" reflect)
    ratio=$(python3 -c "print(f'{$a/$b:.2f}x' if $b else 'n/a')")
    echo "| $label, max with 0 failures and p99 <= 10 ms | $a | $b | $c | $ratio |"
    [ "$a" != 0 ] && pa=$(pct "$OUT/$s-sipring-$a.json" "$k") || pa=-
    [ "$b" != 0 ] && pb=$(pct "$OUT/$s-kamailio-$b.json" "$k") || pb=-
    echo "| $label: p50 / p99 / p99.9 ms at that rate | $pa | $pb | | |"
  done
  if has idle; then
  ia=$(cat "$OUT/idle-bytes-sipring"); ib=$(cat "$OUT/idle-bytes-kamailio")
  echo "| userspace memory per idle TLS connection (10k) | $ia B | $ib B | | $(python3 -c "print(f'{$ia/$ib:.2f}x' if $ib else 'n/a')") |"
  ca=$(cat "$OUT/cpu-us-per-call-sipring"); cb=$(cat "$OUT/cpu-us-per-call-kamailio")
  echo "| server CPU per call at 500 calls/s | $ca us | $cb us | | $(python3 -c "print(f'{$ca/$cb:.2f}x' if $cb else 'n/a')") |"
  fi
} > "$OUT/results.md"
cat "$OUT/results.md"
echo "results in $OUT"
