#!/bin/sh
# /init of the testbed guest: load the virtio and vfat modules in the order
# the build computed (the .deb has no modules.dep, so no modprobe), wait for
# the disk under test, and give a shell on the console.  Nothing from the
# disk is mounted: the host decides what the guest does with it.
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "TESTBED-GUEST: init, kernel $(uname -r)"
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || echo "TESTBED-GUEST: insmod $mod failed"
done < /etc/modules.load
# The disk is probed asynchronously after virtio_blk loads.
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
if [ -b /dev/vda ]; then
    echo "TESTBED-GUEST: disk /dev/vda $(cat /sys/block/vda/size) sectors"
else
    echo "TESTBED-GUEST: no /dev/vda"
fi
# No echo, so the host's expect patterns only ever match guest output.
stty -echo 2>/dev/null
export PS1='tb# '
echo "TESTBED-GUEST: ready"
exec setsid cttyhack sh
