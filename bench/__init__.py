"""herdsman's benchmarks: `python -m bench [--quick] [NAME...]` (see bench/README.md)."""
