#!/usr/bin/env bash
# The instruction-count gate: callgrind counts the instructions of one SIP parse+validate
# (INVITE + REGISTER + 200 OK), of one INVITE parsed, validated and forwarded (the proxy's
# edit), and of one full in-memory TLS 1.3 handshake (client + server),
# and compares them with benches/icount/baseline.txt. Instruction counts do not depend on
# how busy the machine is, so CI can flag a regression that a timed benchmark would drown
# in noise.
#
#   benches/icount/run.sh            check (exit 1 when a count exceeds baseline × (1 + TOL))
#   UPDATE=1 benches/icount/run.sh   write the measured counts as the new baseline
#   BASELINE=FILE                    another baseline file
#
# The baseline holds, per workload, the count and the tolerance: parse and forward are
# deterministic (2 %);
# a handshake is not quite (random keys and nonces move it by a few percent), so 8 %.
#
# Each workload runs twice under callgrind (N = 0 and N = K); (Ir(K) - Ir(0)) / K is the
# per-operation count, so start-up and fixture set-up cancel out.
set -euo pipefail
cd "$(dirname "$0")/../.."
BASELINE=${BASELINE:-benches/icount/baseline.txt}
command -v valgrind >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
}
cargo build --release -q -p sipring-benches --example icount
BIN=${CARGO_TARGET_DIR:-target}/release/examples/icount

ir() { # ir WORKLOAD N -> instructions executed; fails when the workload does (a panic
  # still leaves callgrind's "Collected :" line, and a tiny count would pass as faster)
  local out
  out=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null --error-exitcode=99 \
    "$BIN" "$1" "$2" 2>&1) || { echo "icount: workload $1 $2 failed:" >&2; echo "$out" | tail -20 >&2; return 1; }
  echo "$out" | awk '/Collected :/ { print $NF }'
}
per_op() { # per_op WORKLOAD K
  local a b
  a=$(ir "$1" 0) || return 1
  b=$(ir "$1" "$2") || return 1
  [ -n "$a" ] && [ -n "$b" ] || { echo "callgrind gave no count for $1" >&2; return 1; }
  [ "$b" -gt "$a" ] || { echo "icount: $1 $2 counted no more than $1 0 ($b <= $a)" >&2; return 1; }
  echo $(( (b - a) / $2 ))
}

# `x=$(f)` ignores a failure inside f under plain `set -e`: checked here.
declare -A got
got[parse]=$(per_op parse 2000) || exit 1
got[forward]=$(per_op forward 2000) || exit 1
got[handshake]=$(per_op handshake 50) || exit 1

if [ "${UPDATE:-0}" = 1 ]; then
  { echo "# instructions per operation (callgrind Ir), release profile; benches/icount/run.sh"
    echo "rustc $(rustc --version | awk '{print $2}')"
    echo "parse ${got[parse]} 0.02"
    echo "forward ${got[forward]} 0.02"
    echo "handshake ${got[handshake]} 0.08"; } > "$BASELINE"
  cat "$BASELINE"; exit 0
fi

# Counts belong to a compiler: with another rustc they are printed, not judged.
want_rustc=$(awk '$1 == "rustc" { print $2 }' "$BASELINE")
have_rustc=$(rustc --version | awk '{print $2}')
judge=1
if [ "$want_rustc" != "$have_rustc" ]; then
  # Not pinned by a rust-toolchain file: rustup could not fetch another toolchain on a
  # machine that reaches only the package registries. Loud, and strict where asked.
  echo "icount: WARNING: NOT JUDGED: baseline is for rustc $want_rustc, this is $have_rustc (UPDATE=1 to re-baseline; ICOUNT_STRICT=1 fails here)"
  [ "${ICOUNT_STRICT:-0}" = 1 ] && exit 1
  judge=0
fi
status=0
for k in parse forward handshake; do
  base=$(awk -v k="$k" '$1 == k { print $2 }' "$BASELINE")
  tol=$(awk -v k="$k" '$1 == k { print $3 }' "$BASELINE")
  [ -n "$base" ] || { echo "icount: $k missing from $BASELINE"; status=1; continue; }
  verdict=$(python3 -c "
g, b, t = ${got[$k]}, $base, ${tol:-0.05}
r = g / b
print(f'{r:.3f}', 'REGRESSION' if r > 1 + t else ('faster: UPDATE=1 to lower the baseline' if r < 1 - t else 'ok'))")
  echo "icount $k: ${got[$k]} instructions per op, baseline $base, ratio $verdict"
  case $verdict in *REGRESSION*) [ $judge = 1 ] && status=1;; esac
done
exit $status
