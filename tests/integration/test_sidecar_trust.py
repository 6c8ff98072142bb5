"""The sidecar's socket against hostile or buggy local processes, with real sockets and processes.

One attack per test, each as a local process would mount it: another uid,
no token, a flood of idle connections, a silent session, a trainer that stops
reading its replies, connections past the sidecar's descriptors, an oversized
frame, descriptors or a deeply nested header before the token, a descriptor
that lies about its size or is not shared memory, a trainer that shrinks its
shared memory under the sidecar. Each asserts what the
sidecar did (the error and its message, the trainer's file untouched, the
threads it held, the sidecar alive and serving another rank).
Most run the sidecar in this process (its threads are counted here); the
crash tests run it as its own process, so that a crash shows as one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import recoveryd
from recoveryd._time import Deadline
from recoveryd.agent.agent import Agent
from recoveryd.agent.config import AgentConfig
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.errors import (
    ConfigError,
    LimitExceededError,
    ManifestError,
    PermissionDeniedError,
    error_from_fields,
)
from recoveryd.sidecar import frames, wire
from recoveryd.sidecar.server import Sidecar, SidecarConfig
from recoveryd.sidecar.share import Exporter

pytestmark = pytest.mark.integration

NOWHERE = "127.0.0.1:9"  # no coordinator: these sidecars never need one
REPLY = wire.Limits(header_bytes=1 << 20, payload_bytes=1 << 20)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    """Starts sidecars in this process (``serve(**config)``), closed after the test."""
    started: list[tuple[Sidecar, threading.Thread]] = []

    def start(socket_dir: Path = tmp_path, **config: Any) -> Sidecar:
        path = str(socket_dir / f"agent{len(started)}.sock")
        sidecar = Sidecar(SidecarConfig(coordinator=NOWHERE, socket_path=path, **config))
        t = threading.Thread(target=sidecar.serve_forever, daemon=True)
        t.start()
        started.append((sidecar, t))
        return sidecar

    yield start
    for sidecar, t in started:
        sidecar.close(timedelta(seconds=5))
        t.join(5)


def _soon(seconds: float = 10) -> Deadline:
    return Deadline(timedelta(seconds=seconds))


def _reply(sock: socket.socket, timeout_s: float = 10) -> frames.Reply:
    frame = wire.recv(sock, deadline=Deadline(timedelta(seconds=timeout_s)), limits=REPLY)
    return frames.decode_reply(frame.header)


def _failure(reply: frames.Reply) -> Exception:
    assert isinstance(reply, frames.Failed), reply
    return error_from_fields(reply.error)


def _raw_attach(
    path: str,
    token: str,
    layout: frames.SharedLayout,
    manifest: bytes,
    fds: list[int],
    *,
    replica_id: str = "raw",
) -> tuple[socket.socket, frames.Reply]:
    """An attach as a hand-written client makes it: the frames, the state as given."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    body = wire.pack(frames.encode(frames.State(layout=layout)), len(fds))
    size = frames.StateSize(
        layout_bytes=len(body), manifest_bytes=len(manifest), descriptors=len(fds)
    )
    attach = frames.Attach(
        version=frames.FRAMES_VERSION,
        token=token,
        replica_id=replica_id,
        group_rank=0,
        group_world_size=1,
        labels={},
        pid=os.getpid(),
        state=size,
    )
    wire.send(sock, frames.encode(attach), deadline=_soon())
    reply = _reply(sock)
    if isinstance(reply, frames.Admitted):
        wire.send(sock, body, manifest, fds, deadline=_soon())
        reply = _reply(sock)
    return sock, reply


def _closed(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (waiting up to 10 s)."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # it closed with our bytes unread
        return True


def _pending(sock: socket.socket) -> bool:
    """Whether ``sock`` has bytes to read now."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _token(sidecar: Sidecar) -> str:
    return Path(sidecar.config.token_path).read_text().strip()


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


# ---- 1. who connects --------------------------------------------------------------------


_OTHER_UID = 65534  # nobody


def _as_other_uid(script: str) -> subprocess.CompletedProcess[str]:
    """Runs ``script`` as uid 65534 in this process's group (the socket's group).

    It imports what it needs first, as this uid (the interpreter may live
    where 65534 cannot read), then drops to 65534: the uid a connection
    carries is the one of the process when it connects.
    """
    prelude = (
        "import os, torch, recoveryd\n"
        "from recoveryd.sidecar.client import attach\n"
        f"os.setgroups([])\nos.setgid({os.getgid()})\nos.setuid({_OTHER_UID})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another uid")
def test_a_process_of_another_uid_is_refused_and_counts_nothing(
    serve: Callable[..., Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    # A directory the socket's group may enter: the peer passes the file
    # permissions (same group), and only the sidecar's own check stops it.
    shared = Path(tempfile.mkdtemp(prefix="recoveryd-uid-"))
    try:
        os.chmod(shared, 0o750)
        sidecar = serve(socket_dir=shared)
        given = shared / "given.token"  # an operator handed the token over, not the uid
        shutil.copy(sidecar.config.token_path, given)
        os.chmod(given, 0o644)
        caplog.set_level(logging.WARNING, logger="recoveryd.sidecar")
        attach = f"""
            import recoveryd, torch
            from datetime import timedelta
            try:
                recoveryd.attach({sidecar.config.socket_path!r}, lambda: {{"w": torch.ones(4)}},
                                 replica_id="r", timeout=timedelta(seconds=10), token_file=TOKEN)
                print("ATTACHED")
            except recoveryd.RecoverydError as err:
                print(type(err).__name__, err)
        """
        done = _as_other_uid(attach.replace("TOKEN", repr(str(given))))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"ConfigError invalid uid={_OTHER_UID}"), done.stdout
        assert f"serves processes of uid {os.getuid()} only" in done.stdout
        assert "RECOVERYD_SIDECAR_ALLOWED_UIDS" in done.stdout
        assert f"(uid {_OTHER_UID}, gid {os.getgid()})" in caplog.text
        assert "refused a connection from pid " in caplog.text
        assert sidecar.sessions() == 0
        assert sidecar.attached() == 0

        # Allowed, the same uid still cannot read the sidecar's own token
        # (0600): the error says which file, and how to share one.
        allowing = serve(socket_dir=shared, allowed_uids=(_OTHER_UID,))
        done = _as_other_uid(
            attach.replace("TOKEN", "None").replace(
                repr(sidecar.config.socket_path), repr(allowing.config.socket_path)
            )
        )
        assert done.returncode == 0, done.stderr
        want = f"ConfigError invalid token_file={allowing.config.token_path!r}: cannot be read"
        assert done.stdout.startswith(want), done.stdout
        assert "give both the same token file" in done.stdout
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ---- 2. the attach token -----------------------------------------------------------------


def test_an_attach_without_the_token_is_refused_naming_the_file(
    serve: Callable[..., Sidecar], tmp_path: Path
) -> None:
    sidecar = serve()
    path = sidecar.config.socket_path
    assert Path(sidecar.config.token_path) == Path(path + ".token")
    assert os.stat(sidecar.config.token_path).st_mode & 0o777 == 0o600
    state = {"w": torch.arange(8.0)}
    wrong = tmp_path / "wrong.token"
    wrong.write_text("x" * 32 + "\n")
    with pytest.raises(PermissionDeniedError) as refused:
        recoveryd.attach(path, lambda: state, replica_id="a", token_file=str(wrong))
    assert refused.value.replica_id == "a"
    assert f"refused the token read from {wrong}" in str(refused.value)
    assert f"present the token in {sidecar.config.token_path}" in str(refused.value)
    missing = tmp_path / "missing.token"
    with pytest.raises(ConfigError) as unread:
        recoveryd.attach(path, lambda: state, replica_id="a", token_file=str(missing))
    assert unread.value.field == "token_file"
    assert "No such file or directory" in str(unread.value)
    assert f"writes a new one to {path}.token" in str(unread.value)
    _wait(lambda: sidecar.sessions() == 0, 5, "refused sessions remain")
    with recoveryd.attach(path, lambda: state, replica_id="a") as att:  # the file by the socket
        assert att.token_file == path + ".token"
        assert sidecar.attached() == 1
        att.step(1)


# ---- 3. idle connections and silent sessions --------------------------------------------


def test_a_flood_of_idle_connections_holds_a_bounded_number_of_threads(
    serve: Callable[..., Sidecar],
) -> None:
    sidecar = serve(max_sessions=8, attach_timeout=timedelta(seconds=1))
    before = threading.active_count()
    conns = []
    try:
        for _ in range(200):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sidecar.config.socket_path)
            conns.append(c)
        time.sleep(0.3)
        assert threading.active_count() <= before + 8 + 1, "a thread per idle connection"
        assert sidecar.sessions() <= 8
        # The ones past the limit were told why, and closed at once.
        refused = [c for c in conns if _pending(c)]
        assert len(refused) >= 192
        err = _failure(_reply(refused[-1]))
        assert isinstance(err, LimitExceededError)
        assert err.limit == "RECOVERYD_SIDECAR_MAX_SESSIONS"
        assert err.maximum == 8
        # The ones it served never attached: closed after attach_timeout, unanswered.
        _wait(lambda: sidecar.sessions() == 0, 5, "idle connections still open")
        for c in conns:
            if c not in refused:
                assert _closed(c)
    finally:
        for c in conns:
            c.close()
    _wait(lambda: threading.active_count() <= before, 5, "session threads left behind")
    with recoveryd.attach(
        sidecar.config.socket_path, lambda: {"w": torch.ones(4)}, replica_id="a"
    ) as att:
        att.step(1)  # the sidecar serves on


def test_a_silent_session_is_ended_and_a_pinging_one_is_not(
    serve: Callable[..., Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = serve(idle_timeout=timedelta(seconds=1))
    caplog.set_level(logging.WARNING, logger="recoveryd.sidecar")
    state = {"w": torch.arange(16.0)}
    exp = Exporter().export(state)
    sock, reply = _raw_attach(
        sidecar.config.socket_path, _token(sidecar), exp.layout, exp.manifest, exp.fds
    )
    assert isinstance(reply, frames.Attached)
    assert reply.idle_timeout_s == 1.0
    live = {"v": torch.arange(4.0)}
    att = recoveryd.attach(sidecar.config.socket_path, lambda: live, replica_id="b")
    try:
        t0 = time.monotonic()
        assert _closed(sock)  # the raw session said nothing: ended
        assert time.monotonic() - t0 < 4
        assert "raw/0: silent for 1 s (idle_timeout" in caplog.text
        time.sleep(2.5)  # the attachment pings every 0.25 s while the trainer is away
        assert att.step(1) is False
        assert sidecar.attached() == 1
    finally:
        sock.close()
        att.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Sends ``data`` until the peer closes (a flood that does not care how it ends)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_a_trainer_that_stops_reading_its_replies_is_ended_as_gone(
    serve: Callable[..., Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    # A reply must be taken within the request timeout, or idle_timeout if shorter.
    sidecar = serve(idle_timeout=timedelta(seconds=1))
    caplog.set_level(logging.WARNING, logger="recoveryd.sidecar")
    state = {"w": torch.arange(16.0)}
    exp = Exporter().export(state)
    sock, reply = _raw_attach(
        sidecar.config.socket_path, _token(sidecar), exp.layout, exp.manifest, exp.fds
    )
    assert isinstance(reply, frames.Attached)
    # Pings whose replies it never reads: they fill the socket, as a Recovered
    # reply (megabytes of manifest) does for a trainer stopped in the middle of it.
    ping = wire.pack(frames.encode(frames.Ping()))
    flood = (struct.pack("!II", len(ping), 0) + ping) * 20000
    sender = threading.Thread(target=_send_quietly, args=(sock, flood), daemon=True)
    try:
        t0 = time.monotonic()
        sender.start()
        _wait(lambda: sidecar.sessions() == 0, 8, "a session stuck sending its reply lives on")
        assert time.monotonic() - t0 < 5
        assert "raw/0: trainer gone (send failed: the peer took " in caplog.text
        assert "within 0:00:01: it stopped reading (stopped or wedged)): dropping" in caplog.text
    finally:
        sock.close()
        sender.join(5)
    with recoveryd.attach(
        sidecar.config.socket_path, lambda: {"w": torch.ones(4)}, replica_id="raw"
    ) as att:
        att.step(1)  # the rank is free again, and the sidecar serves on


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_out_of_descriptors_the_sidecar_pauses_accepting_and_serves_its_ranks_on(
    serve: Callable[..., Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = serve(attach_timeout=timedelta(seconds=1))
    path = sidecar.config.socket_path
    caplog.set_level(logging.WARNING, logger="recoveryd.sidecar")
    state = {"w": torch.arange(8.0)}
    with recoveryd.attach(path, lambda: state, replica_id="a") as att:
        att.step(1)
        conns = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(24)]
        try:
            # This process (the sidecar's) may open a few more descriptors only:
            # connections past them wait in the listen backlog, accept() fails.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 8, hard))
            try:
                for c in conns:
                    c.connect(path)
                _wait(lambda: "EMFILE" in caplog.text, 5, "accept() never ran out")
                time.sleep(1)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            log = caplog.text
            assert log.count("cannot accept a connection") == 1, log  # throttled
            assert "(EMFILE: Too many open files): this process is out of file descriptors" in log
            assert "raise its limit (ulimit -n, RLIMIT_NOFILE)" in log
            assert att.step(2) is False  # served on
            assert sidecar.attached() == 1
            for c in conns:  # each accepted in the end; none attached, closed after 1 s
                assert _closed(c)
        finally:
            for c in conns:
                c.close()
        with recoveryd.attach(
            path, lambda: {"v": torch.ones(2)}, replica_id="b", timeout=timedelta(seconds=5)
        ) as other:
            other.step(1)
        assert att.step(3) is False


# ---- 4. frames sized to the session -------------------------------------------------------


def test_frames_before_the_attach_are_small_and_a_state_is_taken_at_its_announced_size(
    serve: Callable[..., Sidecar],
) -> None:
    sidecar = serve(max_frame_bytes=1 << 20)
    path = sidecar.config.socket_path
    # A prefix announcing 64 MiB before any token: refused from its 8 bytes.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    t0 = time.monotonic()
    sock.sendall(struct.pack("!II", 64 << 20, 0))
    err = _failure(_reply(sock, timeout_s=5))
    assert time.monotonic() - t0 < 2
    assert isinstance(err, LimitExceededError)
    assert (err.value, err.maximum) == (64 << 20, 64 << 10)
    assert _closed(sock)
    sock.close()
    # A state larger than the sidecar takes: refused at the attach, before it is sent.
    base = torch.zeros(60000)  # one storage, 60000 tensors: a manifest over 1 MiB
    big = {f"t{i}": base[i : i + 1] for i in range(base.numel())}
    with pytest.raises(LimitExceededError) as over:
        recoveryd.attach(path, lambda: big, replica_id="big")
    assert over.value.limit == "RECOVERYD_SIDECAR_MAX_FRAME_BYTES"
    assert over.value.maximum == 1 << 20
    # A state frame larger than its announcement: the session ends, unread.
    small = {"w": torch.ones(8)}  # held: its storage owns the descriptor
    exp = Exporter().export(small)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    body = wire.pack(frames.encode(frames.State(layout=exp.layout)), len(exp.fds))
    attach = frames.Attach(
        version=frames.FRAMES_VERSION,
        token=_token(sidecar),
        replica_id="liar",
        group_rank=0,
        group_world_size=1,
        labels={},
        pid=os.getpid(),
        state=frames.StateSize(layout_bytes=len(body), manifest_bytes=10, descriptors=1),
    )
    wire.send(sock, frames.encode(attach), deadline=_soon())
    assert isinstance(_reply(sock), frames.Admitted)
    wire.send(sock, body, exp.manifest + b"\0" * (16 << 10), exp.fds, deadline=_soon())
    assert _closed(sock)
    sock.close()
    _wait(lambda: sidecar.sessions() == 0, 5, "the lying session is still open")


def test_before_the_token_a_frame_brings_no_descriptors_and_no_deep_header(
    serve: Callable[..., Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = serve()
    path = sidecar.config.socket_path
    caplog.set_level(logging.WARNING, logger="recoveryd")
    r, w = os.pipe()
    before = _open_fds()  # the sidecar's descriptors are this process's
    try:
        # A header of 200 bytes, each with 250 descriptors: refused at the first 250.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        with contextlib.suppress(OSError):  # it may be closed before the last are sent
            socket.send_fds(sock, [struct.pack("!II", 200, 0)], [r] * 250)
            for _ in range(8):
                socket.send_fds(sock, [b" "], [r] * 250)
        err = _failure(_reply(sock))
        assert isinstance(err, LimitExceededError)
        assert (err.value, err.maximum) == (2, 0)  # cut by the kernel to one past the limit
        assert "the descriptors of an attach" in str(err)
        assert _closed(sock)
        sock.close()
        # A 64 KiB header of brackets: refused as malformed, unparsed, no traceback.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        body = b"[" * (32 << 10) + b"]" * (32 << 10)
        sock.sendall(struct.pack("!II", len(body), 0) + body)
        err = _failure(_reply(sock))
        assert "its header nests deeper than 32 levels" in str(err)
        assert _closed(sock)
        sock.close()
        _wait(lambda: sidecar.sessions() == 0, 5, "refused sessions remain")
        assert _open_fds() <= before
        assert "Traceback" not in caplog.text
        assert "refused the attach of pid " in caplog.text
    finally:
        os.close(r)
        os.close(w)
    with recoveryd.attach(path, lambda: {"w": torch.ones(4)}, replica_id="a") as att:
        att.step(1)  # the sidecar serves on


# ---- 5. descriptors -------------------------------------------------------------------------


def _one_handle(layout: frames.SharedLayout, **change: Any) -> frames.SharedLayout:
    (h,) = layout.handles
    return dataclasses.replace(layout, handles=(dataclasses.replace(h, **change),))


def test_a_descriptor_is_mapped_only_as_the_shared_memory_it_claims_to_be(
    serve: Callable[..., Sidecar], tmp_path: Path
) -> None:
    sidecar = serve()
    path, token = sidecar.config.socket_path, _token(sidecar)
    state = {"w": torch.arange(1024.0)}  # held: its storage owns the descriptor
    exp = Exporter().export(state)  # one sealed 4 KiB segment
    (fd,) = exp.fds

    # Claims 64 MiB of a 4 KiB file: mapping it would have grown the trainer's file.
    sock, reply = _raw_attach(
        path, token, _one_handle(exp.layout, size=64 << 20), exp.manifest, [fd]
    )
    err = _failure(reply)
    assert isinstance(err, ManifestError)
    assert "handle says 67108864 bytes but the file holds 4096" in str(err)
    assert os.fstat(fd).st_size == 4096
    sock.close()

    # Not a file at all.
    r, w = os.pipe()
    sock, reply = _raw_attach(path, token, exp.layout, exp.manifest, [r])
    assert "its descriptor is a pipe, not shared memory" in str(_failure(reply))
    sock.close()
    os.close(r)
    os.close(w)

    # torch's own /dev/shm segment: it can be shrunk under the sidecar.
    old = {"w": torch.arange(1024.0)}
    unsealed = Exporter(sealed=False).export(old)
    sock, reply = _raw_attach(path, token, unsealed.layout, unsealed.manifest, unsealed.fds)
    err = _failure(reply)
    assert "not sealed against shrinking (F_SEAL_SHRINK)" in str(err)
    assert "RECOVERYD_SIDECAR_REQUIRE_SEALED=0" in str(err)
    sock.close()

    # Accepting unsealed memory still means /dev/shm's, not any file of the trainer's.
    lenient = serve(require_sealed=False)
    disk = tmp_path / "on-disk"
    disk.write_bytes(b"\0" * 4096)
    dfd = os.open(disk, os.O_RDWR)
    try:
        sock, reply = _raw_attach(
            lenient.config.socket_path, _token(lenient), exp.layout, exp.manifest, [dfd]
        )
        assert "its unsealed file is not in this host's /dev/shm" in str(_failure(reply))
        sock.close()
    finally:
        os.close(dfd)
    _wait(lambda: sidecar.sessions() + lenient.sessions() == 0, 5, "refused sessions remain")

    # What attach shares is sealed: the trainer itself cannot shrink it.
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)


# ---- 6. a trainer that shrinks its shared memory -------------------------------------------


_W = 1 << 18  # floats: 1 MiB of state


def _shrinking_trainer(socket_path: str, name: str, events: Any, stop: Any, sealed: bool) -> None:
    """Attaches, cuts its shared memory to nothing, then steps (never touching it again)."""
    import recoveryd
    from recoveryd.sidecar import seal

    if not sealed:  # torch's own /dev/shm segments, as a trainer without memfd sealing has
        seal.can_seal = lambda: False  # type: ignore[assignment]
    w = torch.arange(_W, dtype=torch.float32)
    progress = {"step": 0}

    def state() -> dict[str, Any]:
        return {"w": w, "progress": progress}

    try:
        att = recoveryd.attach(socket_path, state, replica_id=name, timeout=timedelta(seconds=60))
        try:
            os.ftruncate(w.untyped_storage()._get_shared_fd(), 0)
            shrunk = "yes"
        except OSError as err:
            shrunk = repr(err)
        events.put(("shrunk", name, {"result": shrunk}))
        step = 0
        while not stop.is_set():
            step += 1
            progress["step"] = step
            try:
                if att.step(step):
                    events.put(("sent", name, {"step": step}))
            except recoveryd.RecoverydError as err:
                events.put(("refused", name, {"error": f"{type(err).__name__}: {err}"}))
                break
            time.sleep(0.02)
    except BaseException as err:
        events.put(("error", name, {"error": repr(err)}))
    finally:
        events.close()
        events.join_thread()
        os._exit(0)


def _wait_event(q: Any, kind: str, timeout_s: float = 90) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while True:
        left = end - time.monotonic()
        assert left > 0, f"no {kind}"
        try:
            k, _name, d = q.get(timeout=min(left, 1))
        except queue.Empty:
            continue
        assert k != "error", d
        if k == kind:
            return d


def _sidecar_process(socket_path: str, coordinator: str, log: Path, **env: str) -> Any:
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "recoveryd", "agent", "--coordinator", coordinator,
             "--socket", socket_path],
            env={**os.environ, "RECOVERYD_HOST": "127.0.0.1", **env},
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _stop(proc: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_trainer_cannot_shrink_memory_it_shared_and_the_sidecar_serves_on(
    tmp_path: Path,
) -> None:
    coord = Coordinator(
        "127.0.0.1:0",
        CoordinatorConfig(
            heartbeat_interval=timedelta(seconds=0.2),
            heartbeat_timeout=timedelta(seconds=10),
            warmup=timedelta(seconds=0.2),
        ),
    ).start()
    path = str(tmp_path / "s.sock")
    log = tmp_path / "sidecar.log"
    sidecar = _sidecar_process(path, coord.address, log)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    hostile = ctx.Process(target=_shrinking_trainer, args=(path, "h", q, stop, True), daemon=True)
    hostile.start()
    other = None
    joiner = None
    try:
        # Another rank served by the same sidecar: it must not pay for h.
        other = recoveryd.attach(
            path, lambda: {"g": torch.ones(16)}, replica_id="g", timeout=timedelta(seconds=60)
        )
        assert "PermissionError" in _wait_event(q, "shrunk")["result"]  # EPERM: sealed
        # A joiner with h's layout: h's sidecar sends from h's memory.
        live = {"w": torch.zeros(_W), "progress": {"step": 0}}
        joiner = Agent(
            AgentConfig(coordinator=coord.address, replica_id="j", host="127.0.0.1"),
            lambda: live,
        )
        got = joiner.recover(live, timeout=timedelta(seconds=90))
        assert got is not None, joiner.last_recovery
        assert torch.equal(live["w"], torch.arange(_W, dtype=torch.float32))
        assert sidecar.poll() is None, log.read_text()
        assert other.step(1) is False  # still served
    finally:
        stop.set()
        hostile.join(10)
        if joiner is not None:
            joiner.close()
        if other is not None:
            other.close()
        _stop(sidecar)
        coord.stop()


def test_an_unsealed_segment_that_shrank_is_never_touched_and_the_sidecar_serves_on(
    serve: Callable[..., Sidecar],
) -> None:
    # The sidecar runs in this process: if it touched the cut memory, the test would die.
    sidecar = serve(require_sealed=False)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    other = recoveryd.attach(
        sidecar.config.socket_path, lambda: {"g": torch.ones(16)}, replica_id="g"
    )
    hostile = ctx.Process(
        target=_shrinking_trainer,
        args=(sidecar.config.socket_path, "h", q, stop, False),
        daemon=True,
    )
    hostile.start()
    try:
        assert _wait_event(q, "shrunk")["result"] == "yes"  # unsealed: the cut worked
        refused = _wait_event(q, "refused")["error"]
        assert refused.startswith("ManifestError")
        assert "shrank from 1048576 to 0 bytes after it was shared" in refused
        _wait(lambda: sidecar.attached() == 1, 10, "h's session did not end")
        assert other.step(1) is False  # g is still served
    finally:
        stop.set()
        hostile.join(10)
        other.close()
