#!/usr/bin/env bash
# Provides what the end-to-end tests need on a fresh Debian 12 machine, as root:
#   - a QEMU >= 10.2 with vhost-user-test-device-pci: the system one if it has the device, else
#     QEMU from Debian trixie-backports in a debootstrap'ed trixie root (built once, reused);
#   - a guest kernel (Debian 6.12) and an initramfs with busybox, the virtio_balloon module and a
#     small static memory eater;
#   - our guest driver (guest/linux), built with DKMS in the trixie root against the guest
#     kernel's headers, and a second initramfs holding it instead of the stock module (with
#     null_blk for the page-cache tests). Skipped with a system QEMU (no trixie root to build in).
# Downloads only from the Debian archive. Prints the environment as shell assignments on the
# last lines of stdout (E2E_QEMU, E2E_CHROOT, E2E_KERNEL, E2E_INITRD, E2E_DRIVER_INITRD,
# E2E_DRIVER_MODULE) and writes them to $CACHE/env.sh.
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
if command -v qemu-system-x86_64 >/dev/null \
  && qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-test-device-pci; then
  QEMU="$(command -v qemu-system-x86_64)"
  log "using the system QEMU ($QEMU)"
else
  if [ ! -f "$TRIXIE/.complete" ]; then
    apt_install debootstrap
    if command -v curl >/dev/null; then
      curl -fsS -o /dev/null --max-time 20 "$MIRROR/dists/trixie/Release" \
        || fail "cannot reach the Debian archive at $MIRROR"
    fi
    rm -rf "$TRIXIE"
    log "debootstrap trixie into $TRIXIE (once; about a minute)"
    debootstrap --variant=minbase trixie "$TRIXIE" "$MIRROR" >&2 || fail "debootstrap failed"
    echo "deb $MIRROR trixie-backports main" > "$TRIXIE/etc/apt/sources.list.d/backports.list"
    chroot "$TRIXIE" apt-get update -qq >&2 || fail "apt-get update in the trixie root failed"
    log "installing QEMU from trixie-backports, the guest kernel and busybox"
    chroot "$TRIXIE" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t trixie-backports qemu-system-x86 >&2 || fail "installing qemu-system-x86 failed"
    chroot "$TRIXIE" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      linux-image-amd64 busybox-static >&2 || fail "installing the kernel and busybox failed"
    chroot "$TRIXIE" apt-get clean
    chroot "$TRIXIE" qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-test-device-pci \
      || fail "trixie-backports QEMU lacks vhost-user-test-device-pci"
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
MODULE="$(find "$SRC/lib/modules/$KVER" "$SRC/usr/lib/modules/$KVER" \
  -path '*/kernel/drivers/virtio/virtio_balloon.ko*' 2>/dev/null | head -1)"
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

# Our guest driver, as a user installs it: `make dkms-install` (fetch linux-source-6.12, extract
# virtio_balloon.c, patch, dkms add/build/install) inside the trixie root, into private DKMS
# trees so that the root's own /lib/modules (and the stock initramfs above) stay untouched.
DRIVER_INITRD=""
DRIVER_MODULE=""
if [ -n "$CHROOT" ]; then
  DRIVER_INITRD="$CACHE/initrd-driver.cpio.gz"
  DRIVER_MODULE="$CACHE/virtio_balloon-vballoon.ko"
  DSTAMP="$CACHE/initrd-driver.stamp"
  want_dstamp="$KVER $(cat "$ROOT_DIR"/guest/linux/{Makefile,Kbuild,dkms.conf,virtio_balloon-message-vq.patch} \
    "$ROOT_DIR"/scripts/{guest-init-driver.sh,eater.c,pressure-watch.c} | sha256sum | cut -c1-16)"
  if [ ! -f "$DRIVER_INITRD" ] || [ ! -f "$DRIVER_MODULE" ] ||
     [ "$(cat "$DSTAMP" 2>/dev/null)" != "$want_dstamp" ]; then
    need=()
    for p in make dkms xz-utils patch "linux-headers-$KVER"; do
      chroot "$CHROOT" dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
      log "installing ${need[*]} in the trixie root (for the guest driver)"
      chroot "$CHROOT" apt-get update -qq >&2 || fail "apt-get update in the trixie root failed"
      # pahole (from the headers) needs the libdw matching the root's backports libelf.
      extra=()
      chroot "$CHROOT" dpkg -s libelf1t64 2>/dev/null | grep -q '^Version:.*bpo' &&
        extra+=("libdw1t64/trixie-backports")
      chroot "$CHROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" "${extra[@]}" >&2 || fail "installing ${need[*]} in the trixie root failed"
      chroot "$CHROOT" apt-get clean
    fi
    log "building the guest driver with DKMS (guest/linux)"
    t0=$(date +%s)
    D=/root/vballoon-guest
    rm -rf "$CHROOT$D/src" "$CHROOT$D/dkms"
    mkdir -p "$CHROOT$D/src" "$CHROOT$D/dkms/modules/$KVER/kernel/drivers/virtio"
    cp "$ROOT_DIR"/guest/linux/{Makefile,Kbuild,dkms.conf,LICENSE,virtio_balloon-message-vq.patch} "$CHROOT$D/src/"
    # The private install tree holds the stock module, so DKMS installs over it as on a real guest.
    cp "$CHROOT/lib/modules/$KVER/kernel/drivers/virtio/"virtio_balloon.ko* \
      "$CHROOT$D/dkms/modules/$KVER/kernel/drivers/virtio/"
    cp "$CHROOT/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$CHROOT$D/dkms/modules/$KVER/"
    T="$D/dkms"
    # BUILD keeps the extracted virtio_balloon.c between runs (the 150 MB fetch happens once).
    chroot "$CHROOT" make -C "$D/src" KVER="$KVER" BUILD="$D/build" DKMS_SRC_TREE="$T/usr-src" \
      DKMS_DIRS="$T/tree $T/modules" \
      DKMS_FLAGS="--dkmstree $T/tree --sourcetree $T/usr-src --installtree $T/modules \
        --kernelsourcedir /lib/modules/$KVER/build" \
      dkms-install >&2 || fail "building the guest driver failed (guest/linux)"
    built="$(find "$CHROOT$T/modules/$KVER/updates" -name 'virtio_balloon.ko*' | head -1)"
    [ -n "$built" ] || fail "dkms installed no virtio_balloon module"
    case "$built" in
      *.xz) xz -dc "$built" > "$DRIVER_MODULE.tmp" ;;
      *) cp "$built" "$DRIVER_MODULE.tmp" ;;
    esac
    mv "$DRIVER_MODULE.tmp" "$DRIVER_MODULE"
    log "guest driver built in $(( $(date +%s) - t0 )) s: $(chroot "$CHROOT" modinfo -F vermagic "${built#"$CHROOT"}")"

    log "building the guest-driver initramfs"
    dwork="$(mktemp -d)"
    mkdir -p "$dwork"/{bin,proc,sys,dev,tmp,mnt}
    cp "$BUSYBOX" "$dwork/bin/busybox"
    cp "$DRIVER_MODULE" "$dwork/virtio_balloon.ko"
    for m in fs/configfs/configfs drivers/block/null_blk/null_blk; do
      f="$(ls "$SRC/lib/modules/$KVER/kernel/$m".ko* 2>/dev/null | head -1)"
      [ -n "$f" ] || fail "no $m module for $KVER"
      case "$f" in
        *.xz) xz -dc "$f" > "$dwork/$(basename "$m").ko" ;;
        *) cp "$f" "$dwork/$(basename "$m").ko" ;;
      esac
    done
    for prog in eater pressure-watch; do
      gcc -static -O2 -o "$dwork/bin/$prog" "$ROOT_DIR/scripts/$prog.c" || fail "cannot build $prog (gcc -static)"
    done
    cp "$ROOT_DIR/scripts/guest-init-driver.sh" "$dwork/init"
    chmod +x "$dwork/init"
    (cd "$dwork" && find . | cpio -H newc -o --quiet | gzip -1) > "$DRIVER_INITRD.tmp"
    rm -rf "$dwork"
    mv "$DRIVER_INITRD.tmp" "$DRIVER_INITRD"
    echo "$want_dstamp" > "$DSTAMP"
  fi
else
  log "a system QEMU is used: the guest driver is not built (it needs the trixie root)"
fi

cat > "$CACHE/env.sh" <<ENV
E2E_QEMU=$QEMU
E2E_CHROOT=$CHROOT
E2E_KERNEL=$CACHE/vmlinuz
E2E_INITRD=$INITRD
E2E_DRIVER_INITRD=$DRIVER_INITRD
E2E_DRIVER_MODULE=$DRIVER_MODULE
ENV
cat "$CACHE/env.sh"
