#!/bin/bash
# ktls-vm.sh - run a command inside a throw-away QEMU VM whose (Debian 6.1)
# kernel has CONFIG_TLS=m, for hosts whose own kernel lacks kTLS.
#
#   ktls-vm.sh setup                 # once: apt packages, kernel, initramfs
#   ktls-vm.sh selftest              # boots, runs the built-in static test binary
#   ktls-vm.sh run [--share DIR] -- CMD [ARGS...]
#        host "/" is mounted read-only over 9p and used as the VM's root
#        (chroot), so dynamically linked host binaries just work; DIR
#        (default: $PWD) is additionally mounted read-write at the same path.
#        Exit status of CMD is propagated. PATH, HOME and the variables
#        named in $KTLSVM_ENV are passed through.
#
# Env: KTLSVM_DIR (default /var/cache/sipring/ktlsvm), KTLSVM_TIMEOUT (default 600 s),
#      KTLSVM_MEM (MiB, default 512), KTLSVM_CPUS (default 1),
#      KTLSVM_ACCEL (default tcg; "kvm" does NOT work on the PVM-based hosts).
set -euo pipefail
D=${KTLSVM_DIR:-/var/cache/sipring/ktlsvm}
ACCEL=${KTLSVM_ACCEL:-tcg}
TIMEOUT=${KTLSVM_TIMEOUT:-600}
SELF=$(readlink -f "$0")

apt_retry() { # apt-get with retry while another apt/dpkg holds the lock
  local i
  for i in $(seq 1 90); do
    if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 "$@"; then return 0; fi
    sleep 10
  done
  return 1
}

setup() {
  mkdir -p "$D" && cd "$D"
  apt_retry update -qq
  # qemu: take it from bookworm-backports (10.0.x) through a private source
  # list; plain bookworm qemu-system-x86 7.2 conflicts with the backports
  # qemu-utils 10.0.2 preinstalled on these images and apt would REMOVE it.
  mkdir -p apt/lists/partial apt/archives/partial
  # Same mirrors as the machine's own apt sources, plus the backports suite.
  local debian security
  debian=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  security=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  {
    echo "deb $debian bookworm main"
    echo "deb $debian bookworm-updates main"
    echo "deb $debian bookworm-backports main"
    [ -n "$security" ] && echo "deb $security bookworm-security main"
  } > apt/sources.list
  local A=(-o Dir::Etc::sourcelist="$D/apt/sources.list" -o Dir::Etc::sourceparts=-
           -o Dir::State::lists="$D/apt/lists" -o Dir::Cache::archives="$D/apt/archives"
           -o APT::Sandbox::User=root)
  apt_retry "${A[@]}" update -qq
  apt_retry "${A[@]}" install -y -qq --no-install-recommends --no-remove \
      -t bookworm-backports qemu-system-x86
  apt_retry install -y -qq --no-install-recommends --no-remove busybox-static cpio kmod

  # Kernel: whatever ABI linux-image-amd64 currently points at (e.g. 6.1.0-56-amd64).
  # NOT the -cloud flavour: it has CONFIG_TLS=m but no 9p.
  local PKG KV
  PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  KV=${PKG#linux-image-}
  rm -rf kpkg && mkdir kpkg
  (cd kpkg && apt-get download "$PKG" >/dev/null 2>&1) # downloads as root (warning is harmless)
  dpkg-deb -x kpkg/*.deb kpkg/root
  grep -q '^CONFIG_TLS=[ym]' kpkg/root/boot/config-"$KV"
  depmod -b kpkg/root "$KV"
  echo "$KV" > kver
  # Uncompressed vmlinux with PVH entry: qemu boots it directly (no bootloader,
  # no xz decompression in TCG) - 2-3x faster than booting the bzImage.
  python3 - kpkg/root/boot/vmlinuz-"$KV" vmlinux <<'EOF'
import lzma, sys
d = open(sys.argv[1], 'rb').read()
off = d.find(b'\xfd7zXZ\x00')
assert off > 0, "no xz payload in bzImage"
open(sys.argv[2], 'wb').write(lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(d[off:]))
EOF

  # Static (musl) self-test binary
  rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || true
  if [ -d "$(dirname "$SELF")/ktlstest" ]; then
    (cd "$(dirname "$SELF")/ktlstest" && cargo build -q --release --target x86_64-unknown-linux-musl)
  fi

  # Initramfs: busybox + modules (+ self-test). Built once, reused for every run.
  rm -rf initramfs && mkdir -p initramfs/{bin,proc,sys,dev,host,mods}
  cp /bin/busybox initramfs/bin/
  for m in tls gcm ghash-generic ghash-clmulni-intel aesni-intel ctr chacha20poly1305 \
           9p 9pnet_virtio virtio_pci; do
    modprobe -d kpkg/root -S "$KV" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' > mods.list
  while read -r p; do cp "$p" initramfs/mods/; done < mods.list
  xargs -n1 basename < mods.list > initramfs/mods/order
  # Where cargo put it: CARGO_TARGET_DIR (CI sets one) or the crate's own target/.
  local T; T=${CARGO_TARGET_DIR:-$(dirname "$SELF")/ktlstest/target}/x86_64-unknown-linux-musl/release/ktlstest
  if [ -d "$(dirname "$SELF")/ktlstest" ]; then
    [ -x "$T" ] || { echo "ktls-vm: self-test binary not built at $T" >&2; exit 1; }
    cp "$T" initramfs/bin/ktlstest
  fi
  cat > initramfs/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
ip link set lo up
if [ -n "$ktlsvm_share" ]; then       # 9p mode (set via kernel cmdline)
  O=trans=virtio,version=9p2000.L,msize=262144
  mount -t 9p -o $O,ro hostroot /host || echo "KTLSVM: 9p mount failed"
  mount -t proc proc /host/proc; mount -t sysfs sys /host/sys
  mount -t devtmpfs dev /host/dev; mount -t tmpfs tmp /host/tmp; mount -t tmpfs run /host/run
  mkdir -p /host$ktlsvm_share; mount -t 9p -o $O share /host$ktlsvm_share
  chroot /host /bin/sh "$ktlsvm_share/.ktlsvm-cmd.sh"; rc=$?
else
  /bin/ktlstest; rc=$?
fi
echo "KTLSVM-EXIT=$rc"
poweroff -f
EOF
  chmod +x initramfs/init
  (cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) > initramfs.cpio.gz
  echo "setup done: kernel $KV in $D"
}

boot() { # boot [extra qemu args] -- [extra kernel args]
  local qa=() ka=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do qa+=("$1"); shift; done
  [ $# -gt 0 ] && shift; ka=("$@")
  local cpu=max; [ "$ACCEL" = kvm ] && cpu=host
  local log; log=$(mktemp)
  timeout "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -cpu "$cpu" -m "${KTLSVM_MEM:-512}" -smp "${KTLSVM_CPUS:-1}" \
      -nodefaults -no-user-config -display none -serial stdio -no-reboot \
      -kernel "$D/vmlinux" -initrd "$D/initramfs.cpio.gz" \
      -append "console=ttyS0 quiet loglevel=3 panic=-1 ${ka[*]}" \
      "${qa[@]}" < /dev/null | tr -d '\r' | tee "$log" || echo "ktls-vm: qemu/timeout status $?" >&2
  local rc
  rc=$(sed -n 's/^KTLSVM-EXIT=\([0-9]*\)$/\1/p' "$log" | tail -1); rm -f "$log"
  [ -n "$rc" ] || { echo "ktls-vm: VM did not report an exit status" >&2; return 125; }
  return "$rc"
}

cmd=${1:-}; shift || true
case "$cmd" in
  setup) setup ;;
  selftest) boot ;;
  run)
    share=$PWD
    if [ "${1:-}" = --share ]; then share=$(readlink -f "$2"); shift 2; fi
    [ "${1:-}" = -- ] && shift
    { for v in PATH HOME ${KTLSVM_ENV:-}; do [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"; done
      printf 'cd %q || exit 126\nexec' "$PWD"; printf ' %q' "$@"; printf '\n'; } > "$share/.ktlsvm-cmd.sh"
    boot -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on \
         -virtfs "local,path=$share,mount_tag=share,security_model=none" \
         -- "ktlsvm_share=$share" && rc=0 || rc=$?
    rm -f "$share/.ktlsvm-cmd.sh"; exit "$rc"
    ;;
  *) sed -n '2,14p' "$SELF"; exit 2 ;;
esac
