#!/bin/busybox sh
# /init of the guest-driver initramfs (scripts/e2e-env.sh): like guest-init.sh, but loads our
# virtio_balloon (guest/linux) with the module parameters given on the kernel command line as
# VBALLOON_MODARGS=a=1,b=2 (the kernel hands unknown a=b options to init as environment), and
# mounts debugfs and a tmpfs at /mnt/t for the pressure tests.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /mnt/t
mount -t tmpfs -o size=100% tmpfs /mnt/t
insmod /virtio_balloon.ko $(echo "${VBALLOON_MODARGS:-}" | tr , ' ')
echo "VBALLOON_GUEST_READY $(cat /proc/sys/kernel/osrelease) driver"
while read -r line; do
  eval "$line"
done
poweroff -f
