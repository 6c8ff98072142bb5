"""A ProcessGroup wrapper that injects real faults into a transfer's data messages."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from recoveryd.transport import format


class _Done:
    """A work that is complete at once (for a message that is silently dropped)."""

    def wait(self, timeout: Any = None) -> bool:
        return True


class FaultyGroup:
    """Wraps a group; after ``after`` data messages it kills, silences or corrupts.

    Args:
        pg: the real group.
        after: how many data messages pass untouched first.
        mode: ``"kill"`` SIGKILLs this process when it is about to send a data
            message, ``"stop"`` SIGSTOPs it then (it hangs with its connections
            open: nothing tells its peers), ``"kill_on_recv"`` when it is about to post a receive for
            one, ``"silence"`` drops every later message (this rank stays alive
            but says nothing), ``"corrupt"`` flips one byte of a copy of the
            next data message.
    """

    def __init__(self, pg: dist.ProcessGroup, *, after: int, mode: str) -> None:
        self._pg = pg
        self._after = after
        self._mode = mode
        self._data = 0
        self._silent = False

    def rank(self) -> int:
        return self._pg.rank()

    def size(self) -> int:
        return self._pg.size()

    def name(self) -> str:
        return self._pg.name()

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        if tag == format.TAG_DATA and self._mode == "kill_on_recv":
            self._data += 1
            if self._data > self._after:
                os.kill(os.getpid(), signal.SIGKILL)
        return self._pg.recv(tensors, src, tag)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Any:
        if self._silent:
            return _Done()
        if tag == format.TAG_DATA:
            self._data += 1
            if self._data > self._after:
                if self._mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if self._mode == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                if self._mode == "silence":
                    self._silent = True
                    return _Done()
                if self._mode == "corrupt" and self._data == self._after + 1:
                    bad = tensors[0].clone()
                    bad[bad.numel() // 2] ^= 0xFF
                    return self._pg.send([bad], dst, tag)
        return self._pg.send(tensors, dst, tag)
