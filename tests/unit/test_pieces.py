"""Staging buffers: at most two, reused, and never handed out while GPU copies still use them."""

from __future__ import annotations

import torch

from recoveryd.transport._pieces import Staging, needs_pinning


class _Event:
    def __init__(self) -> None:
        self.waited = 0

    def synchronize(self) -> None:
        self.waited += 1


def test_a_buffer_comes_back_only_after_its_copies_finished() -> None:
    s = Staging(64, torch.device("cpu"))
    a, b = s.take(), s.take()
    assert not s.can_take()  # two at most
    pending = _Event()
    s.give(a, pending)
    assert s.can_take()
    assert pending.waited == 0  # not waited for until the buffer is wanted again
    assert s.take() is a
    assert pending.waited == 1
    s.give(b)
    assert s.take() is b  # nothing to wait for


def test_pinned_staging_is_asked_for_where_a_cpu_wire_meets_the_gpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert needs_pinning(cpu, [cpu, gpu])
    assert not needs_pinning(cpu, [cpu])
    assert not needs_pinning(gpu, [gpu, cpu])  # an NCCL wire: buffers live on the GPU
    assert not Staging(64, gpu, pinned=True).pinned  # only host memory is pinned
