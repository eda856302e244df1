#!/bin/busybox sh
# /init of the end-to-end test guest: mount the basics, load virtio_balloon, then run the
# commands the test harness sends on the serial console (each framed by markers).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
insmod /virtio_balloon.ko
echo "VBALLOON_GUEST_READY $(cat /proc/sys/kernel/osrelease)"
# A command loop on the console: the harness writes one line per command.
while read -r line; do
  eval "$line"
done
poweroff -f
