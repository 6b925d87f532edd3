"""The real test guest: a Debian cloud kernel and a busybox initramfs, built at test time."""
