#!/usr/bin/env bash
# sipring's test command (the one README.md names and .ci/run calls).
# Installs what the tests need when it is missing, then: rustfmt check, clippy with
# warnings as errors, the whole test suite, the cluster suite (a Redis Cluster and three
# nodes), the interop suite (Kamailio, baresip, SIPp from Debian's packages), the
# instruction-count gate, and the kernel-TLS tests inside a QEMU VM.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Installed, not merely known to dpkg (a removed package keeps its config files).
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() { # apt_install PKG... (only the missing ones)
  local missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq --no-install-recommends "${missing[@]}"
}

step "toolchain"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version
# openssl: the non-rustls peer in the TLS tests; valgrind: the instruction-count gate;
# redis-server (with redis-cli): the cluster suite's location store; iproute2: the network
# namespaces of the netns suite.
apt_install openssl ca-certificates valgrind redis-server iproute2
# Debian starts a redis-server on 6379 when it installs one; the tests start their own.
systemctl disable --now redis-server >/dev/null 2>&1 || true

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings (with the cluster and netns suites)"
cargo clippy --all-targets --features sipring-tests/cluster-suite,sipring-tests/netns-suite -- -D warnings

step "cargo build (binaries used by the process and load-generator tests)"
cargo build -p sipring -p sipring-load --bins

step "cargo test --workspace"
cargo test --workspace

step "cluster: 3 sipring nodes and a Redis Cluster of 3 masters + 3 replicas (tests/cluster.rs)"
cargo test -p sipring-tests --features cluster-suite --test cluster

step "netns: a vanished peer, in network namespaces of its own (tests/netns.rs, root)"
cargo test -p sipring-tests --features netns-suite --test netns

step "interop: Kamailio (MTLS federation), baresip (TLS), SIPp (TCP)"
tests/interop/run.sh

step "instruction-count gate (callgrind): parse, forward and handshake vs benches/icount/baseline.txt"
benches/icount/run.sh

if [ "${SIPRING_SKIP_VM:-0}" = 1 ]; then
  # For a developer's quick run only: CI never sets it, and says so loudly if it did.
  echo "==> kernel TLS tests in a VM: SKIPPED (SIPRING_SKIP_VM=1): kTLS is NOT tested by this run" >&2
else
  step "kernel TLS tests in a VM"
  bash tests/vm/run.sh
fi
