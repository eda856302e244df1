#!/usr/bin/env bash
# Runs the real libvirt daemon (libvirtd 11.3 from the end-to-end trixie root) for one test, in a
# private mount namespace so that nothing it writes lands in the shared root:
#   unshare -m --propagation private bash scripts/libvirt-sandbox.sh ROOT WORKDIR [CACHEDIR]
# ROOT is the trixie root (scripts/libvirt-env.sh installed libvirt there); WORKDIR a host folder
# that appears at the same path inside the root (sockets, kernel, initrd, domain XML); CACHEDIR
# keeps libvirt's QEMU capabilities cache between runs (probing QEMU under TCG takes ~50 s).
# libvirt's state, run and log folders are tmpfs/WORKDIR mounts; qemu.conf is ours: QEMU runs as
# libvirt-qemu (as on Debian), without cgroups (no systemd here), without a security driver
# (no AppArmor here), with QEMU's output in a file instead of virtlogd. The process execs into
# libvirtd in the foreground: its pid is the daemon's, `nsenter -t PID -m` reaches its mounts.
set -euo pipefail
R="$1"
W="$2"
C="${3:-}"
[ -x "$R/usr/sbin/libvirtd" ] || { echo "libvirt-sandbox: no libvirtd in $R (scripts/libvirt-env.sh)" >&2; exit 1; }
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
# /dev/kvm opens for root but not for libvirt-qemu, and KVM does not work nested here anyway
# (docs: qemu-e2e): libvirt would find its capabilities cache "KVM enabled when probed, not
# usable now" and re-probe QEMU (4 s) on every lookup. Hide it: TCG throughout, cache valid.
if [ -e "$R/dev/kvm" ]; then
  : > "$W/no-kvm"
  chmod 000 "$W/no-kvm"
  mount --bind "$W/no-kvm" "$R/dev/kvm"
fi
mount -t tmpfs tmpfs "$R/tmp"
if [ -n "$C" ]; then
  mkdir -p "$C" "$R/var/cache/libvirt"
  mount --bind "$C" "$R/var/cache/libvirt"
fi
# /etc/libvirt/qemu holds the persistent domain definitions: per test, not in the shared root.
for d in /etc/libvirt/qemu /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /var/run; do
  mountpoint -q "$R$d" && continue
  [ -L "$R$d" ] && continue
  mkdir -p "$R$d"
  mount -t tmpfs tmpfs "$R$d"
done
mkdir -p "$R$W"
mount --bind "$W" "$R$W"
cat > "$W/qemu.conf" <<CONF
user = "libvirt-qemu"
group = "libvirt-qemu"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
mount --bind "$W/qemu.conf" "$R/etc/libvirt/qemu.conf"
# libvirt resolves the host name on define and start: without it in /etc/hosts every call waits
# for a DNS timeout (a minute here, no resolver).
cp /etc/hosts "$W/hosts"
echo "127.0.0.1 $(hostname)" >> "$W/hosts"
mount --bind "$W/hosts" "$R/etc/hosts"
exec chroot "$R" /usr/sbin/libvirtd
