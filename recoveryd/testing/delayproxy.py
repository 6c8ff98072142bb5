"""A TCP proxy that delays every byte, for links whose kernel has no netem (tests only).

Run by :meth:`recoveryd.testing.netlab.NetLab.delay` in the hub namespace;
nftables redirects a party's TCP connections to it, and it connects on to
the original destination (``SO_ORIGINAL_DST``). Each direction's bytes are
held ``delay + U(0, jitter)`` and delivered in order; at most
:data:`_WINDOW_BYTES` are held per direction (a bandwidth-delay window), so
a fast sender is slowed rather than buffered without bound. The proxy exits
after ``--max-s`` whatever happens.

    python -m recoveryd.testing.delayproxy --port P --delay-ms 50 --jitter-ms 10 --max-s 120
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import socket
import struct
import sys
import threading
import time

_SO_ORIGINAL_DST = 80
_CHUNK = 64 * 1024
_WINDOW_BYTES = 8 * 1024 * 1024
_CONNECT_TIMEOUT_S = 10.0


class _Pipe:
    """One direction of one connection: read, hold, deliver in order."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, jitter_s: float):
        self._src, self._dst = src, dst
        self._delay_s, self._jitter_s = delay_s, jitter_s
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._held = 0
        self._eof = False
        self._dead = False
        """The writing side failed: nothing drains the queue any more."""
        self._cond = threading.Condition()
        self._last_due = 0.0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while not self._dead:
                data = self._src.recv(_CHUNK)
                if not data:
                    break
                due = time.monotonic() + self._delay_s + random.uniform(0, self._jitter_s)
                with self._cond:
                    self._last_due = due = max(due, self._last_due)  # in order
                    self._queue.append((due, data))
                    self._held += len(data)
                    self._cond.notify_all()
                    while self._held > _WINDOW_BYTES and not self._dead:
                        self._cond.wait(1.0)
        except OSError:
            pass
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._eof:
                        self._cond.wait(1.0)
                    if not self._queue:
                        break
                    due, data = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._dst.sendall(data)
                with self._cond:
                    self._queue.popleft()
                    self._held -= len(data)
                    self._cond.notify_all()
            self._dst.shutdown(socket.SHUT_WR)
        except OSError:
            with self._cond:
                self._dead = True
                self._cond.notify_all()
            for s in (self._src, self._dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def _serve(conn: socket.socket, delay_s: float, jitter_s: float) -> None:
    try:
        out = socket.create_connection(_original_dst(conn), timeout=_CONNECT_TIMEOUT_S)
    except OSError:
        conn.close()
        return
    out.settimeout(None)
    for s in (conn, out):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _Pipe(conn, out, delay_s, jitter_s).start()
    _Pipe(out, conn, delay_s, jitter_s).start()


def main(argv: list[str] | None = None) -> int:
    """Serves until ``--max-s`` passes (or the process is killed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--max-s", type=float, default=120.0)
    args = p.parse_args(argv)
    if not (0 <= args.delay_ms <= 10_000 and 0 <= args.jitter_ms <= 10_000 and args.max_s > 0):
        p.error("delay and jitter must be 0..10000 ms, max-s positive")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(128)
    timer = threading.Timer(args.max_s, lambda: os._exit(0))
    timer.daemon = True
    timer.start()
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=_serve,
            args=(conn, args.delay_ms / 1e3, args.jitter_ms / 1e3),
            daemon=True,
        ).start()


if __name__ == "__main__":
    sys.exit(main())
