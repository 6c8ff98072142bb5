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
from collections.abc import Callable
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


def _soon(seconds: float = 5) -> Deadline:
    return Deadline(timedelta(seconds=seconds))


def test_a_frame_carries_more_descriptors_than_one_message_can() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        fds = [os.dup(r) for _ in range(600)]  # > SCM_MAX_FD (253) per message
        wire.send(a, {"op": "attach", "x": 1}, b"payload", fds, deadline=_soon())
        for fd in fds:
            os.close(fd)
        got = wire.recv(
            b, deadline=Deadline(timedelta(seconds=5)), limits=wire.Limits(1024, 1024, 600)
        )
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
    limits = wire.Limits(header_bytes=1024, fds=2)
    a.sendall(struct.pack("!II", 1 << 30, 0))  # a header larger than allowed
    with pytest.raises(wire.WireError, match="too large"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=5)), limits=limits)
    a.sendall(struct.pack("!II", 5, 0) + b"{nope")
    with pytest.raises(wire.WireError, match="malformed"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=5)), limits=limits)
    t0 = time.monotonic()
    with pytest.raises(wire.WireError, match="deadline"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=0.3)), limits=limits)
    assert time.monotonic() - t0 < 2
    r, w = os.pipe()
    socket.send_fds(a, [struct.pack("!II", 100, 0)], [r, w])  # dies mid-frame, with fds
    a.close()
    with pytest.raises(wire.WireError, match="closed"):
        wire.recv(b, deadline=Deadline(timedelta(seconds=5)), limits=limits)
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
    size = frames.StateSize(layout_bytes=300, manifest_bytes=40, descriptors=1)
    requests: list[frames.Request] = [
        frames.Attach(
            version=frames.FRAMES_VERSION,
            token="t" * 20,
            token_file="/run/x.token",
            replica_id="r",
            group_rank=1,
            group_world_size=2,
            labels={"zone": "a"},
            pid=9,
            secret="s",
            state=size,
        ),
        frames.State(layout=layout),
        frames.Refresh(state=size),
        frames.Ping(),
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
        frames.Admitted(max_frame_bytes=1 << 20),
        frames.Attached(agent_id="x", rendezvous="127.0.0.1:1", metrics_address=None),
        frames.Attached(
            agent_id="x", rendezvous="h:1", metrics_address="h:2", secret="s", idle_timeout_s=9.0
        ),
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
        ({"op": "state", "layout": {"spans": [{"handle": 1, "start": 0}]}}, "lacks 'nbytes'"),
        (
            {"op": "state", "layout": {"handles": [{"id": 1, "kind": "gpu", "size": 1}]}},
            "not one of",
        ),
        ({"op": "refresh", "state": {"layout_bytes": 1, "manifest_bytes": 1}}, "lacks 'descr"),
        (
            {
                "op": "attach",
                "version": 2,
                "replica_id": "r",
                "group_rank": 0,
                "group_world_size": 1,
                "labels": {"a": 1},
                "pid": 1,
                "state": {"layout_bytes": 1, "manifest_bytes": 1, "descriptors": 0},
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
        # What a trainer of version 1 sent (its state in the attach, no token):
        # checked first, before the rest of the frame is decoded.
        wire.send(
            sock,
            {"op": "attach", "version": 1, "replica_id": "r", "layout": {}},
            deadline=_soon(),
        )
        reply = frames.decode_reply(
            wire.recv(
                sock,
                deadline=Deadline(timedelta(seconds=10)),
                limits=wire.Limits(header_bytes=1 << 20),
            ).header
        )
        assert isinstance(reply, frames.Failed)
        err = error_from_fields(reply.error)
        assert isinstance(err, ConfigError)
        assert err.field == "frames version"
        assert "run the same recoveryd version" in str(err)
        # A refused attach ends the connection: the trainer starts over.
        assert sock.recv(1) == b""
        end = time.monotonic() + 5
        while sidecar.sessions():  # ended, and counts nothing
            assert time.monotonic() < end
            time.sleep(0.02)
    finally:
        sock.close()
        sidecar.close(timedelta(seconds=5))
        t.join(5)
    assert not os.path.exists(path)
    assert not os.path.exists(path + ".token")  # the token it made goes with it


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


# ---- the socket's guards --------------------------------------------------------------


def test_a_frame_is_read_in_place_and_only_within_its_limits() -> None:
    import tracemalloc

    a, b = _pair()
    payload = b"\x07" * (32 << 20)
    body = wire.pack({"op": "state"})
    data = struct.pack("!II", len(body), len(payload)) + body + payload  # built before counting
    sender = threading.Thread(target=a.sendall, args=(data,), daemon=True)
    limits = wire.Limits(header_bytes=1024, payload_bytes=len(payload))
    try:
        tracemalloc.start()
        sender.start()
        got = wire.recv(b, deadline=Deadline(timedelta(seconds=30)), limits=limits)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        sender.join(10)
        assert got.payload == payload
        # One buffer of the payload's size; gathering chunks and joining them held it twice.
        assert peak < 1.2 * len(payload), f"peak {peak} for a {len(payload)}-byte payload"
        wire.send(a, {"op": "state"}, b"x" * 2048, deadline=_soon())
        with pytest.raises(wire.FrameTooLargeError) as err:
            wire.recv(b, deadline=Deadline(timedelta(seconds=5)), limits=wire.Limits(1024, 1024))
        assert (err.value.what, err.value.size, err.value.limit) == ("payload bytes", 2048, 1024)
        a.close()
        b.close()
        a, b = _pair()  # that stream is past use: its payload was left unread
        r, w = os.pipe()
        wire.send(a, {"op": "x"}, b"", [r, w], deadline=_soon())  # descriptors where none are taken
        os.close(r)
        os.close(w)
        before = _open_fds()
        with pytest.raises(wire.FrameTooLargeError, match="descriptors"):
            wire.recv(b, deadline=Deadline(timedelta(seconds=5)), limits=wire.Limits(1024, 1024))
        assert _open_fds() <= before  # received, and closed
    finally:
        a.close()
        b.close()


def _peak_fds_while(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """The most descriptors this process held while ``fn`` ran, and what it raised."""
    peak, done = [_open_fds()], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _open_fds())

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
        raised: BaseException | None = None
    except BaseException as err:
        raised = err
    done.set()
    t.join(5)
    return peak[0], raised


@pytest.mark.parametrize("limit", [0, 3])
def test_descriptors_past_the_limit_end_the_read_at_once_and_are_closed(limit: int) -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        # A 4-byte header, each byte (and the prefix) bringing 250 descriptors:
        # the frame's limit is passed with the first message, long before the header is in.
        socket.send_fds(a, [struct.pack("!II", 4, 0)], [r] * 250)
        for _ in range(4):
            socket.send_fds(a, [b" "], [r] * 250)
        before = _open_fds()
        limits = wire.Limits(header_bytes=64, fds=limit)
        peak, raised = _peak_fds_while(lambda: wire.recv(b, deadline=_soon(), limits=limits))
        assert isinstance(raised, wire.FrameTooLargeError), raised
        assert raised.what == "descriptors"
        assert limit < raised.size <= limit + 2  # one message, cut to one past the limit
        assert peak <= before + limit + 8, f"held {peak - before} descriptors"
        assert _pending(b), "read on past the message that broke the limit"
        assert _open_fds() <= before
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _pending(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _frame(body: bytes, fds: list[int], sock: socket.socket) -> None:
    socket.send_fds(sock, [struct.pack("!II", len(body), 0) + body], fds)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"[" * 32768 + b"]" * 32768, "nests deeper than 32 levels"),  # RecursionError in json
        (b'{"op": "x", "a": ' + b"[" * 32 + b"]" * 32 + b"}", "nests deeper than 32 levels"),
        (b'{"op": "x", "a": [[[}', "do not balance"),
        (b'{"op": "x", "nfds": [1]}', "int() argument must be"),  # a TypeError
        (b'{"op": "x", "nfds": 1e400}', "cannot convert float infinity"),  # an OverflowError
        (b'{"op": "x"}\xff', "can't decode byte 0xff"),
    ],
)
def test_a_header_too_deep_or_with_a_bad_count_is_malformed_and_its_descriptors_closed(
    body: bytes, why: str
) -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        before = _open_fds()
        _frame(body, [r, w], a)
        limits = wire.Limits(header_bytes=64 << 10, fds=2)
        with pytest.raises(wire.MalformedFrameError, match=re.escape(why)):
            wire.recv(b, deadline=_soon(), limits=limits)
        assert _open_fds() <= before
        # Read whole: the stream goes on. As deep as allowed, brackets in strings not counted.
        deepest = b'{"op": "ok", "nfds": 1, "a": ' + b"[" * 31 + b'"[[[[{{{{"' + b"]" * 31 + b"}"
        _frame(deepest, [r], a)
        got = wire.recv(b, deadline=_soon(), limits=limits)
        assert (got.op, len(got.fds)) == ("ok", 1)
        wire.close_all(got.fds)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_send_ends_at_its_deadline_when_the_peer_stops_reading() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        payload = os.urandom(8 << 20)  # far past what the socket buffers hold
        t0 = time.monotonic()
        with pytest.raises(wire.WireError, match="send failed: the peer took") as err:
            wire.send(a, {"op": "recovered"}, payload, deadline=_soon(0.5))
        assert 0.4 < time.monotonic() - t0 < 2
        assert re.search(r"the peer took \d+ of \d+ bytes within 0:00:00.5", str(err.value))
        a.close()
        b.close()
        # A peer that reads, slowly: the frame arrives whole through partial writes.
        a, b = _pair()
        got: list[wire.Frame] = []
        limits = wire.Limits(header_bytes=1024, payload_bytes=len(payload), fds=300)

        def read() -> None:
            time.sleep(0.2)
            got.append(wire.recv(b, deadline=_soon(10), limits=limits))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wire.send(a, {"op": "recovered"}, payload, [r] * 300, deadline=_soon(10))
        reader.join(10)
        (frame,) = got
        assert (frame.op, frame.payload == payload, len(frame.fds)) == ("recovered", True, 300)
        wire.close_all(frame.fds)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_socket_closed_on_this_side_counts_as_hung_up() -> None:
    # A rank's older session closes its socket before it leaves the sidecar's
    # table: an attach of the same rank in between asks whether it hung up.
    a, b = _pair()
    assert not wire.hung_up(a)
    a.close()
    assert wire.hung_up(a)
    assert wire.hung_up(b)
    b.close()


def test_what_a_trainer_shares_is_sealed_in_place() -> None:
    import fcntl

    from recoveryd.sidecar import seal

    w = torch.arange(1000, dtype=torch.float32)
    view = w[10:20]
    state = {"w": w, "view": view, "empty": torch.empty(0)}
    storage = w.untyped_storage()
    exp = Exporter().export(state)
    assert w.untyped_storage()._cdata == storage._cdata  # the same storage, new memory
    assert w.is_shared()
    assert torch.equal(w, torch.arange(1000, dtype=torch.float32))
    assert view[0] == 10.0
    w[10] = -1.0
    assert view[0] == -1.0  # views follow
    (fd,) = exp.fds
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & seal.SEALS == seal.SEALS
    assert "memfd:recoveryd" in os.readlink(f"/proc/self/fd/{fd}")
    for size in (0, 1 << 20):
        with pytest.raises(PermissionError):
            os.ftruncate(fd, size)  # neither shrinks nor grows
    old = {"w": torch.ones(4)}
    (ofd,) = Exporter(sealed=False).export(old).fds
    assert seal.seals(ofd) & fcntl.F_SEAL_SHRINK == 0  # torch's own segment: cannot be sealed


def test_the_sidecar_config_reads_its_environment_and_its_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recoveryd.sidecar.config import SidecarConfig

    path = str(tmp_path / "a.sock")
    base = SidecarConfig(coordinator="c:1", socket_path=path)
    assert (base.max_sessions, base.allowed_uids, base.require_sealed) == (64, (), True)
    assert (base.attach_timeout, base.idle_timeout) == (timedelta(seconds=5), timedelta(minutes=2))
    assert base.max_frame_bytes == 256 << 20
    assert base.token_path == path + ".token"
    for name, value in {
        "RECOVERYD_SIDECAR_TOKEN_FILE": "/etc/t",
        "RECOVERYD_SIDECAR_ALLOWED_UIDS": "1000, 1001",
        "RECOVERYD_SIDECAR_MAX_SESSIONS": "8",
        "RECOVERYD_SIDECAR_ATTACH_TIMEOUT": "1.5",
        "RECOVERYD_SIDECAR_IDLE_TIMEOUT": "600",
        "RECOVERYD_SIDECAR_MAX_FRAME_BYTES": str(1 << 20),
        "RECOVERYD_SIDECAR_REQUIRE_SEALED": "0",
    }.items():
        monkeypatch.setenv(name, value)
    env = SidecarConfig(coordinator="c:1", socket_path=path)
    assert env.token_path == "/etc/t"
    assert env.allowed_uids == (1000, 1001)
    assert (env.max_sessions, env.max_frame_bytes, env.require_sealed) == (8, 1 << 20, False)
    assert (env.attach_timeout, env.idle_timeout) == (
        timedelta(seconds=1.5),
        timedelta(seconds=600),
    )
    flags = SidecarConfig.from_flags(
        coordinator="c:1", socket_path=path, max_sessions=None, idle_timeout=30, allowed_uids="7"
    )
    assert (flags.max_sessions, flags.idle_timeout, flags.allowed_uids) == (
        8,
        timedelta(seconds=30),
        (7,),
    )
    monkeypatch.setenv("RECOVERYD_SIDECAR_ALLOWED_UIDS", "root")
    with pytest.raises(ConfigError, match="RECOVERYD_SIDECAR_ALLOWED_UIDS='root'"):
        SidecarConfig(coordinator="c:1", socket_path=path)
    monkeypatch.delenv("RECOVERYD_SIDECAR_ALLOWED_UIDS")
    with pytest.raises(ConfigError, match="max_sessions=0"):
        SidecarConfig(coordinator="c:1", socket_path=path, max_sessions=0)
    with pytest.raises(ConfigError, match="idle_timeout"):
        SidecarConfig(coordinator="c:1", socket_path=path, idle_timeout=timedelta(0))


def test_the_generated_token_is_private_and_replaces_whatever_was_there(tmp_path: Path) -> None:
    from recoveryd.sidecar import trust

    target = tmp_path / "precious"
    target.write_text("keep me")
    path = tmp_path / "a.sock.token"
    path.symlink_to(target)  # planted where the token goes
    token = trust.ensure_token(str(path), generate=True)
    assert not path.is_symlink()
    assert target.read_text() == "keep me"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert trust.read_token(str(path), what="token_file") == token
    assert len(token) >= trust.MIN_TOKEN_CHARS
    assert trust.ensure_token(str(path), generate=True) != token  # a new one per start
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="16 to 4096 printable characters"):
        trust.read_token(str(short), what="token_file")
    assert not trust.same_secret("", "")  # no secret never matches
    assert trust.same_secret("x" * 20, "x" * 20)
