"""Hypervisor drivers behind the small interface in drivers.base."""
