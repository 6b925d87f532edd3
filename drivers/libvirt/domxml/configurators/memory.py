"""Guest RAM and the docker-style memory / memorySwap limits (<memtune>)."""

from __future__ import annotations

from drivers.libvirt.domxml.inputs import RenderInput
from drivers.libvirt.domxml.model import Domain


def configure(inp: RenderInput, dom: Domain) -> None:
    spec = inp.spec
    dom.memory_kib = spec.memory_mb * 1024
    if spec.memory is not None:
        dom.hard_limit_kib = spec.memory // 1024
        if spec.memory_swap is not None and spec.memory_swap != -1:
            # docker: memorySwap is memory + swap; libvirt: swap_hard_limit is the same sum.
            # -1 (unlimited swap) is libvirt's default, so it writes nothing.
            dom.swap_hard_limit_kib = spec.memory_swap // 1024
