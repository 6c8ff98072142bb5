"""The sidecar's pieces in one process: socket frames, and sharing a state's storages."""

from __future__ import annotations

import gc
import os
import socket
import struct
import time
from datetime import timedelta

import pytest
import torch

from recoveryd._time import Deadline
from recoveryd.errors import ManifestError, UnsupportedValueError
from recoveryd.sidecar import wire
from recoveryd.sidecar.share import Exporter, SharedState, signature


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_frame_carries_more_descriptors_than_one_message_can() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        fds = [os.dup(r) for _ in range(600)]  # > SCM_MAX_FD (253) per message
        wire.send(a, {"op": "attach", "x": 1}, b"payload", fds)
        for fd in fds:
            os.close(fd)
        got = wire.recv(b, deadline=Deadline(timedelta(seconds=5)))
        assert (got.op, got.header["x"], got.payload, len(got.fds)) == (
            "attach",
            1,
            b"payload",
            600,
        )
        os.write(w, b"!")
        assert os.read(got.fds[-1], 1) == b"!"  # real descriptors of the pipe
        wire.close_all(got.fds)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def test_bad_frames_and_a_silent_peer_are_wire_errors_that_leak_nothing() -> None:
    a, b = _pair()
    before = _open_fds()
    a.sendall(struct.pack("!II", 1 << 30, 0))  # a header larger than allowed
    with pytest.raises(wire.WireError, match="too large"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=5)))
    a.sendall(struct.pack("!II", 5, 0) + b"{nope")
    with pytest.raises(wire.WireError, match="malformed"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=5)))
    t0 = time.monotonic()
    with pytest.raises(wire.WireError, match="deadline"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=0.3)))
    assert time.monotonic() - t0 < 2
    r, w = os.pipe()
    socket.send_fds(a, [struct.pack("!II", 100, 0)], [r, w])  # dies mid-frame, with fds
    a.close()
    with pytest.raises(wire.WireError, match="closed"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=5)))
    os.close(r)
    os.close(w)
    b.close()
    assert _open_fds() <= before


def _dup(fds: list[int]) -> list[int]:
    """What the receiver gets over SCM_RIGHTS: its own copies (the storages keep theirs)."""
    return [os.dup(fd) for fd in fds]


def _state() -> dict[str, object]:
    w = torch.arange(12, dtype=torch.float32)
    return {
        "w": w,
        "tied": w[2:6],  # a view of the same storage
        "t": torch.ones(3, 4, dtype=torch.bfloat16).t(),  # non-contiguous
        "step": torch.tensor(7.0),  # 0-dim, as Adam's
        "empty": torch.empty(0),
        "values": {"n": 3, "name": "x", "nested": [1.5, None]},
    }


def test_the_sidecar_side_aliases_the_trainers_bytes() -> None:
    state = _state()
    ex, shared = Exporter(), SharedState()
    exp = ex.export(state)
    assert exp.layout.release == ()
    shared.add(exp.layout.handles, _dup(exp.fds))  # as the kernel duplicates them
    got = shared.state(exp.manifest, exp.layout.spans)
    assert isinstance(got, dict)
    assert got["values"] == state["values"]
    for key in ("w", "tied", "t", "step", "empty"):
        assert torch.equal(got[key], state[key]), key
    got["w"][3] = 99.0  # written on the sidecar's side...
    assert state["w"][3] == 99.0  # ...seen by the trainer
    assert state["tied"][1] == 99.0  # and by its views
    assert got["tied"].data_ptr() == got["w"].data_ptr() + 8  # aliasing kept


def test_a_replaced_tensor_is_shared_anew_and_the_old_one_released() -> None:
    state = _state()
    ex, shared = Exporter(), SharedState()
    first = ex.export(state)
    shared.add(first.layout.handles, _dup(first.fds))
    sig = signature(state)
    old_ids = {h.id for h in first.layout.handles}
    for _ in range(5):  # freed memory is often reused at the same address
        state["w"] = torch.full((12,), 2.0)
        state["tied"] = state["w"][2:6]
        gc.collect()
        exp = ex.export(state)
        assert signature(state) != sig
        assert len(exp.layout.handles) == 1  # the new storage, never mistaken for the old
        assert exp.layout.handles[0].id not in old_ids
        shared.add(exp.layout.handles, _dup(exp.fds))
        shared.release(exp.layout.release)
        got = shared.state(exp.manifest, exp.layout.spans)
        assert isinstance(got, dict)
        state["w"][0] = 5.0
        assert got["w"][0] == 5.0  # the sidecar reads the live tensor
        old_ids |= {h.id for h in exp.layout.handles}
        sig = signature(state)
    assert len(first.layout.release) == 0
    assert exp.layout.release  # the previous w went away
    with pytest.raises(ManifestError, match="released"):
        shared.state(first.manifest, first.layout.spans)


def test_sharded_state_is_refused_by_path() -> None:
    class NotPlain(torch.Tensor):
        pass

    with pytest.raises(UnsupportedValueError):
        Exporter().export({"x": torch.zeros(2).as_subclass(NotPlain)})
