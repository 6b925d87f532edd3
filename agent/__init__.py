"""herdsman: the host agent (everything that is not hypervisor-specific)."""

__version__ = "0.1.0"
