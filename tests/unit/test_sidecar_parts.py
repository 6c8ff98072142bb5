"""The sidecar's pieces in one process: socket frames, typed requests and replies, sharing storages."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import struct
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from recoveryd._time import Deadline
from recoveryd.agent.interface import RecoveryRecord
from recoveryd.errors import (
    ConfigError,
    ManifestError,
    StepMismatchError,
    UnsupportedValueError,
    error_from_fields,
    error_to_fields,
)
from recoveryd.protocol import Report
from recoveryd.sidecar import frames, wire
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


# ---- typed frames ---------------------------------------------------------------------


def _through_json(header: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = json.loads(json.dumps(header))
    return out


def test_every_request_and_reply_survives_its_codec() -> None:
    layout = frames.SharedLayout(
        handles=(frames.StorageHandle(id=3, kind="cpu", size=4096),),
        spans=(
            frames.SpanRef(handle=3, start=16, nbytes=64),
            frames.SpanRef(handle=-1, start=0, nbytes=0),
        ),
        release=(1, 2),
    )
    requests: list[frames.Request] = [
        frames.Attach(
            version=frames.FRAMES_VERSION,
            replica_id="r",
            group_rank=1,
            group_world_size=2,
            labels={"zone": "a"},
            pid=9,
            layout=layout,
        ),
        frames.Refresh(layout=layout),
        frames.Recover(timeout_s=60.0),
        frames.Step(step=12, fresh=True),
        frames.Park(timeout_s=0.2),
        frames.Close(timeout_s=5.0),
    ]
    for req in requests:
        assert frames.decode_request(_through_json(frames.encode(req))) == req
    sent = Report(
        plan_id=7,
        replica_id="r",
        group_rank=1,
        role="donor",
        result="ok",
        step=12,
        phases={"data": 0.1},
    )
    record = RecoveryRecord(outcome="recovered", step=12, donor="a", phases={"data": 0.2})
    replies: list[frames.Reply] = [
        frames.Attached(agent_id="x", rendezvous="127.0.0.1:1", metrics_address=None),
        frames.Done(),
        frames.Recovered(step=12, record=record),
        frames.Stepped(due=False, sends=(sent,)),
        frames.Parked(sends=()),
        frames.Failed(error=error_to_fields(StepMismatchError(12, 14, peer_rank=0))),
        frames.Failed(
            error=error_to_fields(StepMismatchError(12, 14, peer_rank=0)),
            record=RecoveryRecord(outcome="recovering", attempts=2, state_written=True),
        ),
    ]
    for rep in replies:
        assert frames.decode_reply(_through_json(frames.encode(rep))) == rep


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({"op": "exec", "cmd": "rm"}, "unknown op 'exec'"),
        ({"step": 1}, "unknown op None"),
        ({"op": "step"}, "lacks 'step'"),
        ({"op": "step", "step": "12"}, "step.step is str, not int"),
        ({"op": "step", "step": True}, "step.step is bool, not int"),
        ({"op": "step", "step": 1, "extra": 1}, "unknown fields"),
        ({"op": "recover", "timeout_s": None}, "recover.timeout_s is NoneType"),
        ({"op": "refresh", "layout": {"spans": [{"handle": 1, "start": 0}]}}, "lacks 'nbytes'"),
        (
            {"op": "refresh", "layout": {"handles": [{"id": 1, "kind": "gpu", "size": 1}]}},
            "not one of",
        ),
        (
            {
                "op": "attach",
                "version": 1,
                "replica_id": "r",
                "group_rank": 0,
                "group_world_size": 1,
                "labels": {"a": 1},
                "pid": 1,
                "layout": {},
            },
            "labels.a is int, not str",
        ),
    ],
)
def test_a_malformed_frame_is_a_wire_error_naming_what_is_wrong(
    header: dict[str, object], why: str
) -> None:
    with pytest.raises(wire.WireError, match=re.escape(why)):
        frames.decode_request(header)


def test_a_reply_is_not_taken_for_a_request() -> None:
    with pytest.raises(wire.WireError, match="unknown op 'done'"):
        frames.decode_request(frames.encode(frames.Done()))


def test_a_sidecar_refuses_a_trainer_of_another_frames_version(tmp_path: Path) -> None:
    from recoveryd.sidecar.server import Sidecar, SidecarConfig

    path = str(tmp_path / "agent.sock")
    sidecar = Sidecar(SidecarConfig(coordinator="127.0.0.1:9", socket_path=path))
    t = threading.Thread(target=sidecar.serve_forever, daemon=True)
    t.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        attach = frames.Attach(
            version=frames.FRAMES_VERSION + 1,
            replica_id="r",
            group_rank=0,
            group_world_size=1,
            labels={},
            pid=os.getpid(),
            layout=frames.SharedLayout(),
        )
        wire.send(sock, frames.encode(attach))
        reply = frames.decode_reply(
            wire.recv(sock, deadline=Deadline(timedelta(seconds=10))).header
        )
        assert isinstance(reply, frames.Failed)
        err = error_from_fields(reply.error)
        assert isinstance(err, ConfigError)
        assert err.field == "frames version"
        assert "run the same recoveryd version" in str(err)
        # The session is still there: a malformed request gets an answer, not a hang-up.
        wire.send(sock, {"op": "step", "step": "x"})
        reply = frames.decode_reply(
            wire.recv(sock, deadline=Deadline(timedelta(seconds=10))).header
        )
        assert isinstance(reply, frames.Failed)
        assert "step.step is str" in str(error_from_fields(reply.error))
    finally:
        sock.close()
        sidecar.close(timedelta(seconds=5))
        t.join(5)
    assert not os.path.exists(path)


def test_a_trainer_with_bad_sharding_facts_is_refused_and_the_sidecar_serves_on(
    tmp_path: Path,
) -> None:
    from recoveryd.sidecar.client import attach
    from recoveryd.sidecar.server import Sidecar, SidecarConfig
    from recoveryd.transport.tree import LocalShardedTensor
    from recoveryd.v1 import manifest_pb2 as mpb

    meta = mpb.ShardedTensorMeta(dtype=mpb.DTYPE_FLOAT32, global_size=[4, 2], local_shard=[0])
    meta.shards.add(offsets=[0, 0], sizes=[2, 2])
    meta.shards.add(offsets=[1, 0], sizes=[2, 2])  # overlaps the first
    bad = {"model": {"st": LocalShardedTensor(locals=[torch.ones(2, 2)], meta=meta)}}
    good = {"w": torch.arange(4.0)}
    path = str(tmp_path / "agent.sock")
    sidecar = Sidecar(SidecarConfig(coordinator="127.0.0.1:9", socket_path=path))
    t = threading.Thread(target=sidecar.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(ManifestError, match=re.escape("model.st: shards 0 and 1 overlap")):
            attach(path, lambda: bad, replica_id="bad", timeout=timedelta(seconds=10))
        assert bad["model"]["st"].locals[0].eq(1).all()  # nothing written
        att = attach(path, lambda: good, replica_id="good", timeout=timedelta(seconds=10))
        assert sidecar.attached() == 1
        att.close(timedelta(seconds=2))
    finally:
        sidecar.close(timedelta(seconds=5))
        t.join(5)
