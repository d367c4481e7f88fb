# Shared by benches/handshake/run.sh and ops.sh (source it after `cd` to the repository
# root, with OUT set): the same servers under the same handshake load.
#   SERVER_CPU, LOAD_CPU      the server's CPU and the generator's (first and last allowed)
#   W                          a work folder, removed (with every background job) on exit
#   SIPRING, LOAD              the release binaries (built); $W/pki a demo PKI
#   handshake_load PORT RATE SECONDS TAG
#                              in the background, on LOAD_CPU: full TLS 1.3 handshakes with
#                              X25519, one OPTIONS each, close; $OUT/TAG.json and TAG.txt
#   start_reflector PORT       in the background, on SERVER_CPU: the minimal server
source benches/lib.sh
CPUS=($(allowed_cpus))
SERVER_CPU=${SERVER_CPU:-${CPUS[0]}}
LOAD_CPU=${LOAD_CPU:-${CPUS[-1]}}
mkdir -p "$OUT"
W=$(mktemp -d /tmp/sipring-bench-handshake.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
build_bins
ulimit -n "$(ulimit -Hn)"
"$SIPRING" certs --out "$W/pki" >/dev/null

handshake_load() { # PORT RATE SECONDS TAG
  taskset -c "$LOAD_CPU" "$LOAD" handshake --target "127.0.0.1:$1" --ca "$W/pki/ca.pem" --shards 1 --quiet \
    --rate "$2" --duration "$3" --warmup 0 --timeout 5 --no-resume --tls-version 1.3 --groups X25519 \
    --json "$OUT/$4.json" >"$OUT/$4.txt" 2>&1 &
}

start_reflector() { # PORT
  taskset -c "$SERVER_CPU" "$LOAD" reflect --listen "127.0.0.1:$1" --shards 1 \
    --cert "$W/pki/server.pem" --key "$W/pki/server.key" >"$W/reflector.log" 2>&1 &
}
