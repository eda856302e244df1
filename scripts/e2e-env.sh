#!/usr/bin/env bash
# Provides what the end-to-end tests need on a fresh Debian 12 machine, as root:
#   - a QEMU >= 10.2 with vhost-user-test-device-pci: the system one if it has the device, else
#     QEMU from Debian trixie-backports in a debootstrap'ed trixie root (built once, reused);
#   - a guest kernel (Debian 6.12) and an initramfs with busybox, the virtio_balloon module and a
#     small static memory eater.
# Downloads only from the Debian archive. Prints the environment as shell assignments on the
# last lines of stdout (E2E_QEMU, E2E_CHROOT, E2E_KERNEL, E2E_INITRD) and writes them to
# $CACHE/env.sh.
set -euo pipefail

ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${VBALLOON_E2E_CACHE:-$ROOT_DIR/.cache/e2e}"
MIRROR="${VBALLOON_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TRIXIE="$CACHE/trixie-root"
NEED_MB=3000

fail() { echo "e2e-env: $*" >&2; exit 1; }
log() { echo "e2e-env: $*" >&2; }

[ "$(id -u)" = 0 ] || fail "must run as root (debootstrap, chroot and bind mounts need it)"
mkdir -p "$CACHE"
avail_mb=$(df -Pm "$CACHE" | awk 'NR==2 {print $4}')
if [ ! -f "$TRIXIE/.complete" ] && [ "$avail_mb" -lt "$NEED_MB" ]; then
  fail "only ${avail_mb} MB free in $CACHE; need about ${NEED_MB} MB for the trixie root"
fi

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} from the Debian archive"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || fail "cannot reach the Debian archive (apt-get update failed)"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || fail "apt-get install ${missing[*]} failed"
}

# The host tools: cpio and xz for the initramfs, a static libc for the eater.
apt_install cpio xz-utils libc6-dev gcc

QEMU=""
CHROOT=""
if command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-test-device-pci; then
  QEMU="$(command -v qemu-system-x86_64)"
  log "using the system QEMU ($QEMU)"
else
  if [ ! -f "$TRIXIE/.complete" ]; then
    apt_install debootstrap
    if command -v curl >/dev/null; then
      curl -fsS -o /dev/null --max-time 20 "$MIRROR/dists/trixie/Release" || fail "cannot reach the Debian archive at $MIRROR"
    fi
    rm -rf "$TRIXIE"
    log "debootstrap trixie into $TRIXIE (once; about a minute)"
    debootstrap --variant=minbase trixie "$TRIXIE" "$MIRROR" >&2 || fail "debootstrap failed"
    echo "deb $MIRROR trixie-backports main" > "$TRIXIE/etc/apt/sources.list.d/backports.list"
    chroot "$TRIXIE" apt-get update -qq >&2 || fail "apt-get update in the trixie root failed"
    log "installing QEMU from trixie-backports, the guest kernel and busybox"
    chroot "$TRIXIE" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86 >&2 || fail "installing qemu-system-x86 failed"
    chroot "$TRIXIE" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-image-amd64 busybox-static >&2 || fail "installing the kernel and busybox failed"
    chroot "$TRIXIE" apt-get clean
    chroot "$TRIXIE" qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-test-device-pci || fail "trixie-backports QEMU lacks vhost-user-test-device-pci"
    touch "$TRIXIE/.complete"
  fi
  QEMU="/usr/bin/qemu-system-x86_64"
  CHROOT="$TRIXIE"
  log "using QEMU $(chroot "$TRIXIE" qemu-system-x86_64 --version | head -1) in $TRIXIE"
fi

# Guest kernel, module and busybox: from the trixie root (or the host's trixie-like packages).
SRC="${CHROOT:-/}"
KERNEL="$(ls "$SRC"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -1)"
[ -n "$KERNEL" ] || fail "no guest kernel in $SRC/boot (install linux-image-amd64 there)"
KVER="${KERNEL##*/vmlinuz-}"
MODULE="$(find "$SRC/lib/modules/$KVER" "$SRC/usr/lib/modules/$KVER" -name 'virtio_balloon.ko*' 2>/dev/null | head -1)"
[ -n "$MODULE" ] || fail "no virtio_balloon module for $KVER"
BUSYBOX="$SRC/bin/busybox"
[ -x "$BUSYBOX" ] || BUSYBOX="$SRC/usr/bin/busybox"
[ -x "$BUSYBOX" ] || fail "no busybox in $SRC"

INITRD="$CACHE/initrd.cpio.gz"
STAMP="$CACHE/initrd.stamp"
want_stamp="$KVER $(sha256sum "$ROOT_DIR/scripts/guest-init.sh" "$ROOT_DIR/scripts/eater.c" | sha256sum | cut -c1-16)"
if [ ! -f "$INITRD" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want_stamp" ]; then
  log "building the guest initramfs"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work"/{bin,proc,sys,dev,tmp}
  cp "$BUSYBOX" "$work/bin/busybox"
  case "$MODULE" in
    *.xz) xz -dc "$MODULE" > "$work/virtio_balloon.ko" ;;
    *.zst) zstd -dc "$MODULE" > "$work/virtio_balloon.ko" ;;
    *) cp "$MODULE" "$work/virtio_balloon.ko" ;;
  esac
  gcc -static -O2 -o "$work/bin/eater" "$ROOT_DIR/scripts/eater.c" || fail "cannot build the memory eater (gcc -static)"
  cp "$ROOT_DIR/scripts/guest-init.sh" "$work/init"
  chmod +x "$work/init"
  (cd "$work" && find . | cpio -H newc -o --quiet | gzip -1) > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  echo "$want_stamp" > "$STAMP"
fi
cp "$KERNEL" "$CACHE/vmlinuz"

cat > "$CACHE/env.sh" <<ENV
E2E_QEMU=$QEMU
E2E_CHROOT=$CHROOT
E2E_KERNEL=$CACHE/vmlinuz
E2E_INITRD=$INITRD
ENV
cat "$CACHE/env.sh"
