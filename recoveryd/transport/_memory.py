"""Receive-side allocation that does not fall into the page-fault trap.

Received bytes written into fresh memory pay for its page faults inside the
wire's critical path. Measured on these machines (2-core VMs, 1 GiB into a
fresh process, bench/RESULTS.md): plain pages faulted by the receive 1.0 s,
``MADV_HUGEPAGE`` mappings 2.0-2.6 s (first touch of never-used guest memory,
in 2 MiB blocks), pages populated by a thread running ahead of the wire
(``MADV_POPULATE_WRITE``) 0.63-0.78 s. So buffers here are anonymous mappings
that a background :class:`Prefaulter` populates in stream order while earlier
messages are still on the wire. Huge pages stay available as an option for
hosts where they pay (warm memory, large pages backed by the host).

Buffers are wrapped by ``torch.frombuffer``, so each tensor still owns a
storage of exactly its own size; a mapping is unmapped when the last tensor
that uses it is freed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from recoveryd._format import human_bytes
from recoveryd.errors import ManifestError
from recoveryd.transport._pieces import Message

logger = logging.getLogger(__name__)

_HUGE = 2 << 20
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL
_CHUNK = 16 << 20

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux/glibc: no prefaulting
    _libc = None


def _mapping(nbytes: int, hugepages: bool) -> tuple[mmap.mmap, int]:
    """Maps ``nbytes`` (plus alignment slack); returns the mapping and a 2 MiB-aligned offset."""
    m = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(anchor)
    del anchor  # the mapping cannot be closed while a ctypes export is alive
    offset = (-addr) % _HUGE
    if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
        except OSError:
            pass  # THP disabled ("never"): plain pages still work
    return m, offset


def _carve(mapping: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)


class Prefaulter:
    """Populates fresh buffers' pages in a background thread, in stream order.

    The wire then writes into memory that is already there. If the wire
    catches up, it faults pages in itself as usual; nothing waits on this.
    A context manager: leaving the block stops and joins the thread, so it
    never touches the buffers after the receive ends, however it ends::

        with Prefaulter() as prefaulter:
            prefaulter.start(buffers)
            ...  # receive into the buffers
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._buffers: list[torch.Tensor] = []
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefaulter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, buffers: list[torch.Tensor]) -> None:
        """Starts populating ``buffers`` (CPU ones with bytes), first to last."""
        assert self._thread is None, "a prefaulter runs once"
        self._buffers = [b for b in buffers if b.numel() and b.device.type == "cpu"]
        if self._buffers:
            self._thread = threading.Thread(
                target=self._run, name="recoveryd-prefault", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            self._populate()
        except BaseException as e:  # recorded, reported by stop(); the wire does not need it
            self.error = e

    def _populate(self) -> None:
        if _libc is None:
            return
        for buf in self._buffers:
            start, end = buf.data_ptr(), buf.data_ptr() + buf.numel()
            for lo in range(start, end, _CHUNK):
                if self._stop.is_set():
                    return
                hi = min(lo + _CHUNK, end)
                base = lo - lo % _PAGE
                # Populating never changes contents, so it is safe while the wire
                # writes into the same pages. Kernels before 5.14 refuse it; then
                # the wire faults pages in itself (writing zeros here instead
                # could overwrite bytes that already arrived).
                if _libc.madvise(base, hi - base, _MADV_POPULATE_WRITE) != 0:
                    return

    def stop(self, timeout: timedelta = timedelta(seconds=5)) -> None:
        """Stops and joins the thread (it never touches memory after this returns)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout.total_seconds())
            if self._thread.is_alive():
                logger.warning("prefault thread did not stop within %s", timeout)
        if self.error is not None:
            # Only a speed-up failed: the receive faulted its pages in itself.
            logger.warning("prefaulting receive buffers failed: %r", self.error)


class Arena:
    """Hands out exact-size CPU storages carved from anonymous mappings.

    Args:
        hugepages: advise mappings with ``MADV_HUGEPAGE``.
        min_bytes: requests smaller than this are plain ``torch.empty`` (the
            allocator's heap serves them from warm memory).
    """

    def __init__(self, *, hugepages: bool, min_bytes: int = 1 << 20) -> None:
        self._hugepages = hugepages
        self._min_bytes = min_bytes

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised 1-D uint8 CPU tensor of ``nbytes`` owning its storage."""
        if nbytes < self._min_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)
        m, offset = _mapping(nbytes, self._hugepages)
        return _carve(m, offset, nbytes)

    def for_stream(
        self, sizes: list[int], messages: list[Message]
    ) -> tuple[SpanBuffers, list[torch.Tensor | None]]:
        """Span buffers for an allocating receive, laid out so packed messages land in place.

        The spans of each packed message are carved, in stream order, from one
        region of a shared mapping, so the message is received straight into
        them with no scatter copy; each span still gets its own exact-size
        storage. Spans sent in messages of their own get their own mapping.

        Returns:
            The span buffers, and per message the buffer to receive it into
            (``None`` when it must be staged and scattered).
        """
        buffers = SpanBuffers(sizes, self)
        landing: list[torch.Tensor | None] = [None] * len(messages)
        # A packed message lands in place when every span in it starts 16-byte
        # aligned (the largest itemsize) within the message.
        carve = [
            i
            for i, m in enumerate(messages)
            if not m.direct and all(n % 16 == 0 for n in m.sizes[:-1])
        ]
        total = sum((messages[i].nbytes + 63) & ~63 for i in carve)
        if total >= self._min_bytes:
            mapping, base = _mapping(total, self._hugepages)
            for i in carve:
                m = messages[i]
                landing[i] = _carve(mapping, base, m.nbytes)
                pos = base
                for s, n in zip(m.span_ids, m.sizes, strict=True):
                    buffers.carved[s] = (mapping, pos)
                    pos += n
                base += (m.nbytes + 63) & ~63
        for i, m in enumerate(messages):
            if m.direct:
                buf = buffers[m.span_ids[0]]
                whole = m.sizes[0] == buf.numel()  # no view object per one-message span
                landing[i] = buf if whole else buf.narrow(0, m.offsets[0], m.sizes[0])
        return buffers, landing


class SpanBuffers:
    """The span buffers of an allocating receive, made when first asked for.

    Spans carved from a shared mapping are not wrapped as uint8 tensors unless
    something needs them so: a span holding one tensor becomes that tensor
    straight from the mapping (one ``frombuffer`` instead of three calls).
    """

    def __init__(
        self, sizes: list[int], arena: Arena, *, device: torch.device | None = None
    ) -> None:
        self._sizes = sizes
        self._arena = arena
        self._device = device
        self._made: list[torch.Tensor | None] = [None] * len(sizes)
        self.carved: dict[int, tuple[mmap.mmap, int]] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, s: int) -> torch.Tensor:
        t = self._made[s]
        if t is None:
            where = self.carved.get(s)
            n = self._sizes[s]
            if where is not None:
                t = _carve(where[0], where[1], n)
            elif self._device is not None and self._device.type != "cpu":
                t = torch.empty(n, dtype=torch.uint8, device=self._device)
            else:
                t = self._arena.empty(n)
            self._made[s] = t
        return t

    def sole_tensor(self, s: int, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        """The span's only tensor, typed and flat, if the span is carved and not yet wrapped."""
        where = self.carved.get(s)
        if where is None or self._made[s] is not None:
            return None
        return torch.frombuffer(where[0], dtype=dtype, count=numel, offset=where[1])


AVAILABLE_SHARE = 0.75
"""The share of the available memory a receive may allocate by default (see
``TransferConfig.max_alloc_bytes`` for why a quarter is left)."""


@dataclass(frozen=True, slots=True)
class AllocLimit:
    """The most bytes one receive may allocate, and where that number comes from."""

    nbytes: int
    source: str

    def check(self, nbytes: int, src: int, what: str) -> None:
        """Refuses an offer that needs more than the limit, before anything is allocated.

        Raises:
            ManifestError: naming the bytes needed, the limit and the knob.
        """
        if nbytes > self.nbytes:
            raise ManifestError(
                f"rank {src}'s offer would have this joiner allocate {nbytes} bytes "
                f"({human_bytes(nbytes)}: {what}), over its limit of {self.nbytes} bytes "
                f"({human_bytes(self.nbytes)}, {self.source}); nothing was allocated. Set "
                "RECOVERYD_MAX_ALLOC_BYTES (TransferConfig.max_alloc_bytes) higher if this host "
                "has the memory",
                peer_rank=src,
            )


def alloc_limit(configured: int | None, device: torch.device) -> AllocLimit:
    """``configured``, or the default share of the memory available now on ``device``."""
    if configured is not None:
        return AllocLimit(configured, "max_alloc_bytes")
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        free, where = host_available(), "available on this host"
    share = int(free * AVAILABLE_SHARE)
    return AllocLimit(share, f"{AVAILABLE_SHARE:.0%} of the {human_bytes(free)} {where}")


def host_available() -> int:
    """The host memory a process can allocate now without swapping or the OOM killer.

    ``MemAvailable``, or less when this process's cgroup (v2 or v1) has less
    left under its limit, counting its inactive file pages as free as the
    kubelet does; physical memory where neither is readable.
    """
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for base, limit, usage, inactive in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
        (
            "/sys/fs/cgroup/memory",
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        ),
    ):
        try:
            cap = int(Path(base, limit).read_text())
            used = int(Path(base, usage).read_text())
            lines = Path(base, "memory.stat").read_text().splitlines()
            stat = {k: int(v) for k, v in (line.split() for line in lines)}
            found.append(cap - used + stat.get(inactive, 0))
            break
        except (OSError, ValueError):
            continue  # no such cgroup version here, or no limit ("max")
    if not found:
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 1 << 50  # unknown: no practical limit
    return max(0, min(found))
