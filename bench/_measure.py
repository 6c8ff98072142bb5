"""What the benchmark measures inside a rank: peak RSS, and bytes put on / taken off the wire.

* :class:`RssSampler` samples the process RSS every ~5 ms in a thread and also reads
  ``ru_maxrss``: if the lifetime maximum grew during the window, that growth happened inside the
  window, so it is an exact peak that a 5 ms sampler could have missed.
* :class:`CountingProcessGroup` forwards every call to a ProcessGroup and sums the nbytes of the
  tensors handed to ``send``/``recv``; other calls are counted by name so the report can say when
  a transport moved bytes the count does not see (e.g. through a collective).
* :class:`SocketByteCounter` counts bytes read from / written to Python socket files
  (``socket.SocketIO``), which is how ``http.server`` and ``urllib`` move HTTP bodies.
"""

from __future__ import annotations

import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import psutil  # type: ignore[import-untyped]
import torch

_SAMPLE_INTERVAL_S = 0.005


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    return int(psutil.Process().memory_info().rss)


def _ru_maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak RSS over a window: a 5 ms sampling thread plus the ``ru_maxrss`` high-water mark."""

    def __init__(self, interval_s: float = _SAMPLE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._error: BaseException | None = None
        self.baseline_rss = 0
        self.peak_rss = 0
        self.samples = 0
        self.peak_source = "sampler"
        self._ru_before = 0

    def start(self) -> None:
        """Records the baseline and starts sampling."""
        self._ru_before = _ru_maxrss_bytes()
        self.baseline_rss = int(self._proc.memory_info().rss)
        self._peak = self.baseline_rss
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval_s):
                rss = int(self._proc.memory_info().rss)
                self.samples += 1
                if rss > self._peak:
                    self._peak = rss
        except BaseException as e:  # recorded and raised by stop()
            self._error = e

    def stop(self) -> int:
        """Stops sampling; returns (and stores in ``peak_rss``) the window's peak RSS in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._error is not None:
            raise RuntimeError("RSS sampler thread failed") from self._error
        peak = max(self._peak, int(self._proc.memory_info().rss))
        ru_after = _ru_maxrss_bytes()
        if ru_after > self._ru_before and ru_after > peak:
            peak = ru_after
            self.peak_source = "ru_maxrss"
        self.peak_rss = peak
        return peak

    def __enter__(self) -> RssSampler:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _tensors_nbytes(tensors: Any) -> int:
    if isinstance(tensors, torch.Tensor):
        return int(tensors.nbytes)
    if isinstance(tensors, Sequence):
        return sum(int(t.nbytes) for t in tensors if isinstance(t, torch.Tensor))
    return 0


class CountingProcessGroup:
    """A ProcessGroup proxy that counts point-to-point bytes; everything else is forwarded."""

    def __init__(self, pg: Any) -> None:
        self._pg = pg
        self.sent_bytes = 0
        self.recv_bytes = 0
        self.sends = 0
        self.recvs = 0
        self.other_calls: Counter[str] = Counter()

    @property
    def wrapped(self) -> Any:
        """The ProcessGroup being counted."""
        return self._pg

    def reset(self) -> None:
        """Zeroes every counter."""
        self.sent_bytes = self.recv_bytes = self.sends = self.recvs = 0
        self.other_calls.clear()

    def _tensors_arg(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[0] if args else kwargs.get("tensors")

    def send(self, *args: Any, **kwargs: Any) -> Any:
        """``pg.send`` with its tensors' nbytes added to ``sent_bytes``."""
        self.sent_bytes += _tensors_nbytes(self._tensors_arg(args, kwargs))
        self.sends += 1
        return self._pg.send(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> Any:
        """``pg.recv`` with its buffers' nbytes added to ``recv_bytes``."""
        self.recv_bytes += _tensors_nbytes(self._tensors_arg(args, kwargs))
        self.recvs += 1
        return self._pg.recv(*args, **kwargs)

    def recv_anysource(self, *args: Any, **kwargs: Any) -> Any:
        """``pg.recv_anysource``, counted like :meth:`recv`."""
        self.recv_bytes += _tensors_nbytes(self._tensors_arg(args, kwargs))
        self.recvs += 1
        return self._pg.recv_anysource(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._pg, name)
        if callable(attr) and not name.startswith("_") and name not in ("rank", "size"):
            counter = self.other_calls

            def forward(*args: Any, **kwargs: Any) -> Any:
                counter[name] += 1
                return attr(*args, **kwargs)

            return forward
        return attr


class SocketByteCounter:
    """Counts bytes through ``socket.SocketIO`` (HTTP bodies) while installed; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_bytes = 0
        self.written_bytes = 0
        self._orig_readinto: Callable[..., Any] | None = None
        self._orig_write: Callable[..., Any] | None = None

    def reset(self) -> None:
        """Zeroes the counters."""
        with self._lock:
            self.read_bytes = self.written_bytes = 0

    def install(self) -> None:
        """Patches ``socket.SocketIO.readinto``/``write`` in this process."""
        orig_readinto = socket.SocketIO.readinto
        orig_write = socket.SocketIO.write
        self._orig_readinto, self._orig_write = orig_readinto, orig_write
        counter = self

        def readinto(sio: socket.SocketIO, b: Any) -> int | None:
            n = orig_readinto(sio, b)
            if n:
                with counter._lock:
                    counter.read_bytes += n
            return n

        def write(sio: socket.SocketIO, b: Any) -> int | None:
            n = orig_write(sio, b)
            if n:
                with counter._lock:
                    counter.written_bytes += n
            return n

        socket.SocketIO.readinto = readinto  # type: ignore[method-assign,assignment]
        socket.SocketIO.write = write  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        """Restores the original ``socket.SocketIO`` methods."""
        if self._orig_readinto is not None and self._orig_write is not None:
            socket.SocketIO.readinto = self._orig_readinto  # type: ignore[method-assign]
            socket.SocketIO.write = self._orig_write  # type: ignore[method-assign]
            self._orig_readinto = self._orig_write = None


def monotonic_s() -> float:
    """``time.perf_counter()``; one name for the clock every timing uses."""
    return time.perf_counter()
