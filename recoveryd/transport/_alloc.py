"""Receive-side allocation that does not fall into the page-fault trap.

A freshly allocated buffer faults its 4 KiB pages in at ~1.5 GB/s on these
machines, slower than a loopback Gloo link (~3.6 GB/s), so an allocating
receive would run at a fraction of the wire. Large buffers here come from an
anonymous mapping advised with ``MADV_HUGEPAGE`` (2 MiB pages: 512 times fewer
faults) and wrapped by ``torch.frombuffer``, so each tensor still owns a storage
of exactly its own size; the mapping is unmapped when the last tensor that uses
it is freed.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

_HUGE = 2 << 20
_HAS_MADV_HUGEPAGE = hasattr(mmap, "MADV_HUGEPAGE")


def _aligned_mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """Maps ``nbytes`` (plus alignment slack); returns the mapping and the 2 MiB-aligned offset."""
    m = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    del anchor  # the mapping cannot be closed while a ctypes export is alive
    offset = (-addr) % _HUGE
    if _HAS_MADV_HUGEPAGE:
        try:
            m.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
        except OSError:
            pass  # THP disabled ("never"): plain pages still work, only slower
    return m, offset


class Arena:
    """Hands out exact-size CPU storages carved from huge-page-backed mappings.

    Args:
        hugepages: whether to use huge-page mappings at all; when false every
            request is a plain ``torch.empty``.
        min_bytes: requests smaller than this are plain ``torch.empty`` (the
            allocator's own heap serves them without fresh faults).
    """

    def __init__(self, *, hugepages: bool, min_bytes: int = 1 << 20) -> None:
        self._hugepages = hugepages
        self._min_bytes = min_bytes

    def empty(self, nbytes: int) -> torch.Tensor:
        """Returns an uninitialised 1-D uint8 CPU tensor of ``nbytes`` owning its storage."""
        if not self._hugepages or nbytes < self._min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        m, offset = _aligned_mapping(nbytes)
        return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset)

    def empty_many(self, sizes: list[int]) -> list[torch.Tensor]:
        """Like :meth:`empty` for many sizes, packing mid-size ones into shared mappings.

        Each returned tensor still has its own exact-size storage; tensors carved
        from one mapping keep it mapped until the last of them is freed.
        """
        out: list[torch.Tensor | None] = [None] * len(sizes)
        packed: list[int] = []
        for i, n in enumerate(sizes):
            if not self._hugepages or n < 64 * 1024:
                out[i] = torch.empty(n, dtype=torch.uint8)
            elif n >= self._min_bytes:
                out[i] = self.empty(n)
            else:
                packed.append(i)
        if packed:
            # 64-byte alignment keeps every dtype's natural alignment.
            offsets, total = [], 0
            for i in packed:
                offsets.append(total)
                total += (sizes[i] + 63) & ~63
            m, base = _aligned_mapping(total)
            for i, off in zip(packed, offsets, strict=True):
                out[i] = torch.frombuffer(m, dtype=torch.uint8, count=sizes[i], offset=base + off)
        return [t for t in out if t is not None]
