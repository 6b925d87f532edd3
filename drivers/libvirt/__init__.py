"""The libvirt driver: connection, domain XML, storage, seed, consoles."""
