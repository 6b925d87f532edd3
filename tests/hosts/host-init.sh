#!/bin/sh
# Becomes one test host: run by tests/hosts/daemons.py in the host's network namespace, in a
# fresh mount + uts + cgroup namespace (unshare), after joining the host's cgroups.
#
#   HM_DIR=... HM_HOSTNAME=... HM_BINDS="sub:/path ..." HM_CGROUPS="fstype:options:mountpoint ..." \
#       host-init.sh
#
# It gives the host its own /sys (this netns's interfaces), cgroup mounts (rooted at the host's
# cgroup), private dirs bound over the libvirt and agent paths and /etc/hosts, a /dev/kvm node
# as udev makes it; starts virtlogd and libvirtd; prints READY; then stays as the process that
# holds the namespaces (`nsenter -t <this pid>` runs a command on the host).
set -eu
umask 022

hostname "$HM_HOSTNAME"

# /sys shows the network namespace that mounted it: remount it for ours. That drops the
# cgroup mounts under it, so mount each hierarchy again; inside our cgroup namespace each
# one's root is the host's own cgroup.
umount -l /sys
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755,size=64k cgroup /sys/fs/cgroup
for spec in $HM_CGROUPS; do
    fstype=${spec%%:*} rest=${spec#*:}
    opts=${rest%%:*} point=${rest#*:}
    mkdir -p "$point"
    if [ "$fstype" = cgroup2 ]; then
        mount -t cgroup2 cgroup2 "$point"
    else
        mount -t cgroup -o "$opts" cgroup "$point"
    fi
done

# Private state for this host's libvirt and agent, at the paths a real host has them.
for bind in $HM_BINDS; do
    mount --bind "$HM_DIR/${bind%%:*}" "${bind#*:}"
done

# /dev/kvm as udev leaves it on a real host (root:kvm 0660). Without udev it is root-only
# and libvirt discards its qemu capabilities cache on every lookup (seconds per call).
if [ -c /dev/kvm ]; then
    mount -t tmpfs -o mode=0755,size=64k devnodes "$HM_DIR/dev"
    mknod -m 0660 "$HM_DIR/dev/kvm" c 10 232
    chgrp kvm "$HM_DIR/dev/kvm"
    mount --bind "$HM_DIR/dev/kvm" /dev/kvm
fi

virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d --listen -p /run/libvirt/libvirtd.pid
echo READY
exec sleep infinity
