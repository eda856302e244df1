#!/usr/bin/env bash
# Adds libvirt 11.3 (Debian trixie: libvirtd, virtlogd, virsh, the QEMU driver) to the end-to-end trixie
# root that scripts/e2e-env.sh builds, and a `libvirt-qemu` user there (libvirt-daemon-system,
# which creates it on a real host, drags in systemd and polkit and is not needed for the test).
# Idempotent and cached: a stamp file records what was installed. Run as root, after
# scripts/e2e-env.sh. Downloads only from the Debian archive. Another job may be installing
# packages into the same root at the same time: apt waits for its lock instead of failing.
set -euo pipefail

ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${VBALLOON_E2E_CACHE:-$ROOT_DIR/.cache/e2e}"
TRIXIE="$CACHE/trixie-root"
PACKAGES="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils"
STAMP="$TRIXIE/.vballoon-libvirt"

fail() { echo "libvirt-env: $*" >&2; exit 1; }
log() { echo "libvirt-env: $*" >&2; }

[ "$(id -u)" = 0 ] || fail "must run as root (chroot)"
[ -f "$TRIXIE/.complete" ] || fail "no trixie root in $TRIXIE (run scripts/e2e-env.sh first)"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$PACKAGES" ]; then
  log "installing $PACKAGES into $TRIXIE (once)"
  chroot "$TRIXIE" apt-get -o DPkg::Lock::Timeout=900 update -qq >&2 || fail "apt-get update in the trixie root failed"
  chroot "$TRIXIE" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq \
    --no-install-recommends $PACKAGES >&2 || fail "installing $PACKAGES failed"
  chroot "$TRIXIE" apt-get -o DPkg::Lock::Timeout=900 clean
  echo "$PACKAGES" > "$STAMP"
fi
if ! chroot "$TRIXIE" getent passwd libvirt-qemu >/dev/null; then
  log "creating the libvirt-qemu user in the trixie root"
  chroot "$TRIXIE" groupadd --system libvirt-qemu 2>/dev/null || true
  chroot "$TRIXIE" useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --shell /usr/sbin/nologin \
    libvirt-qemu
fi
# libvirt looks the host name up on every define and start; a root without /etc/hosts waits for a
# DNS timeout each time. scripts/libvirt-sandbox.sh mounts a filled-in copy over this file.
[ -e "$TRIXIE/etc/hosts" ] || printf '127.0.0.1 localhost\n' > "$TRIXIE/etc/hosts"
for tool in libvirtd virtlogd virsh virt-xml-validate; do
  [ -x "$TRIXIE/usr/sbin/$tool" ] || [ -x "$TRIXIE/usr/bin/$tool" ] || fail "$tool missing in $TRIXIE"
done
echo "LIBVIRT_ROOT=$TRIXIE"
echo "LIBVIRT_VERSION=$(chroot "$TRIXIE" virsh --version)"
echo "LIBVIRT_QEMU_UID=$(chroot "$TRIXIE" id -u libvirt-qemu)"
echo "LIBVIRT_QEMU_GID=$(chroot "$TRIXIE" id -g libvirt-qemu)"
