#!/usr/bin/env bash
# The interop suite (tests/interop/run.py): sipring against Kamailio (federation over mutual
# TLS, both directions), baresip (TLS, with and without an outbound proxy) and SIPp (TCP);
# and Prometheus's promtool against its /metrics.
# Installs what it needs from Debian's packages when missing; uses the debug `sipring`
# binary (built here if absent). Loopback only; about half a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Installed, not merely known to dpkg (a removed package keeps its config files).
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
# prometheus: its promtool lints sipring's /metrics.
for p in kamailio kamailio-tls-modules baresip sip-tester prometheus; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "interop: installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a system Kamailio and Prometheus on install (where systemd runs): the suite
# runs its own Kamailio and needs only promtool.
as_root systemctl disable --now kamailio prometheus >/dev/null 2>&1 || true

cargo build -q -p sipring --bins
exec python3 tests/interop/run.py "$@"
