"""Staging buffers: at most two, reused, and never handed out while GPU copies still use them."""

from __future__ import annotations

import torch

from recoveryd.transport._pieces import Staging, cuda_devices


class _Event:
    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


def test_a_buffer_comes_back_only_after_its_copies_finished() -> None:
    s = Staging(64, torch.device("cpu"))
    a, b = s.take(), s.take()
    assert not s.can_take()  # two at most
    pending = [_Event(), _Event()]  # one per GPU the copies ran on
    s.give(a, pending)
    assert s.can_take()
    assert [e.waited for e in pending] == [0, 0]  # not waited for until the buffer is wanted
    assert s.take() is a
    assert [e.waited for e in pending] == [1, 1]
    s.give(b)
    assert s.take() is b  # nothing to wait for


def test_the_gpus_copies_run_on_are_each_named_once() -> None:
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert cuda_devices([gpu1, cpu, gpu0, gpu1]) == (gpu0, gpu1)
    assert cuda_devices([cpu]) == ()
    assert not Staging(64, gpu0, pinned=True).pinned  # only host memory is pinned
