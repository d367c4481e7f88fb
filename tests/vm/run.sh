#!/usr/bin/env bash
# Kernel-TLS tests for real: this host's kernel has no TLS (CONFIG_TLS unset), so the tests
# run inside a throw-away QEMU VM (TCG) booting a Debian kernel that has it. The host root is
# shared read-only over 9p, so the test binary built here runs there unchanged.
#
#   tests/vm/run.sh          # setup on first use (apt packages, kernel: cached), then:
#                            #   1. the raw kTLS self-test (tests/vm/ktlstest),
#                            #   2. tests/ktls.rs with SIPRING_EXPECT_KTLS=1: every
#                            #      connection must run in kernel mode.
set -euo pipefail
cd "$(dirname "$0")/../.."
VM="bash tests/vm/ktls-vm.sh"
D=${KTLSVM_DIR:-/var/cache/sipring/ktlsvm}
export KTLSVM_DIR=$D

if [ ! -s "$D/vmlinux" ] || [ ! -s "$D/initramfs.cpio.gz" ] || [ ! -x "$D/initramfs/bin/ktlstest" ] \
   || ! command -v qemu-system-x86_64 >/dev/null; then
  echo "ktls-vm: first use, setting up in $D"
  $VM setup
fi

echo "ktls-vm: raw kernel TLS self-test"
$VM selftest | tail -n 3

echo "ktls-vm: building the kTLS test binary"
BIN=$(cargo test -p sipring-tests --test ktls --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "ktls" and m.get("executable"):
        print(m["executable"])')
[ -x "$BIN" ] || { echo "ktls-vm: test binary not found" >&2; exit 1; }

echo "ktls-vm: running $BIN in the VM (kernel mode required)"
export SIPRING_EXPECT_KTLS=1 RUST_BACKTRACE=1
KTLSVM_ENV="SIPRING_EXPECT_KTLS RUST_BACKTRACE" $VM run -- "$BIN" --test-threads=1
