"""spec → libvirt domain XML: a typed model and an ordered list of configurators."""
