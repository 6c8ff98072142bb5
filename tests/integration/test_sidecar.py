"""The sidecar agent (`recoveryd agent`) and trainers attached to it, as real processes.

Each "pod" is a sidecar process and a trainer process attached to it over a
Unix socket; the coordinator runs in the test. The trainers train a small
seeded MLP with Adam whose moments are created lazily by the first step (so
the attachment must pick up new tensors after attaching), plus a large
tensor that makes a copy show in the sidecar's memory; sharded, the MLP is
FSDP2 over the trainer's own one-rank world (DTensor state).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.demo.trainer import state_digest
from recoveryd.testing import run_ranks

pytestmark = pytest.mark.integration

BIG = 64 << 20  # bytes of the extra tensor: a copy of it would show in the sidecar's RSS


class Job:
    """The training: deterministic, so any two replicas agree at every step."""

    def __init__(self, *, lazy_adam: bool, device: str = "cpu", sharded: bool = False) -> None:
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        ).to(self.device)
        if sharded:  # FSDP2 over a world of this one rank: the state is DTensors
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            if not dist.is_initialized():
                backend = "nccl" if device == "cuda" else "gloo"
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            mesh = init_device_mesh(device, (1,))
            for layer in self.model.children():
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        if not lazy_adam:  # a joiner's layout must be the donors' before it recovers
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.progress = {"step": 0}
        self.big = torch.zeros(BIG // 4, device=self.device)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optim": self.opt.state_dict(),
            "progress": self.progress,
            "big": self.big,
        }

    def train(self, step: int) -> None:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 64, generator=g).to(self.device)
        loss = torch.nn.functional.mse_loss(self.model(x), x[:, :1])
        loss.backward()  # type: ignore[no-untyped-call]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.big[step % self.big.numel()] = float(step)
        self.progress["step"] = step


def trainer(
    socket_path: str,
    name: str,
    events: Any,
    stop: Any,
    lazy_adam: bool,
    die_in_send: bool,
    device: str,
    sharded: bool = False,
) -> None:
    """One trainer rank attached to its sidecar; reports what happens on ``events``."""
    import recoveryd

    job = Job(lazy_adam=lazy_adam, device=device, sharded=sharded)
    opt, progress, big, state = job.opt, job.progress, job.big, job.state

    try:
        att = recoveryd.attach(socket_path, state, replica_id=name, timeout=timedelta(seconds=60))
        if die_in_send:  # fault injection: SIGKILL 20 ms after asking the sidecar to send
            call = att._call

            def dying_call(request: Any, *a: Any, **k: Any) -> Any:
                if getattr(request, "fresh", False):  # the Step that sends
                    threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()
                return call(request, *a, **k)

            att._call = dying_call  # type: ignore[method-assign]
        live = state()
        ptr = big.data_ptr()
        got = att.recover(live, timeout=timedelta(seconds=60))
        if got is not None:
            opt.load_state_dict(live["optim"])
        events.put(
            (
                "start",
                name,
                {
                    "step": got,
                    "pid": os.getpid(),
                    "shared": big.is_shared() or big.is_cuda,
                    "in_place": big.data_ptr() == ptr,
                    "progress": progress["step"],
                    "digest": state_digest(state()) if got is not None else "",
                },
            )
        )
        step = got or 0
        while not stop.is_set():
            step += 1
            job.train(step)
            try:
                if att.step(step):  # sent: the state as it went (the trainer was held)
                    events.put(("sent", name, {"step": step, "digest": state_digest(state())}))
            except recoveryd.SidecarLostError as err:
                events.put(("lost", name, {"step": step, "error": str(err)}))
            if step % 20 == 0:
                events.put(("digest", name, {"step": step, "digest": state_digest(state())}))
            if att.lost and step % 20 == 0:
                events.put(("training_on", name, {"step": step}))
            time.sleep(0.01)
        att.close()
    except BaseException as err:
        events.put(("error", name, {"error": repr(err)}))
    finally:
        events.close()
        events.join_thread()
        os._exit(0)


class Pod:
    """A sidecar process and, when started, its attached trainer."""

    def __init__(self, name: str, coordinator: str, tmp: Path, ctx: Any, events: Any) -> None:
        self.name = name
        self.socket = str(tmp / f"{name}.sock")
        self.log = tmp / f"{name}-sidecar.log"
        self.ctx, self.events = ctx, events
        self.stop = ctx.Event()
        env = {**os.environ, "RECOVERYD_HOST": "127.0.0.1"}
        with self.log.open("wb") as f:
            self.sidecar = subprocess.Popen(
                [sys.executable, "-m", "recoveryd", "agent", "--coordinator", coordinator,
                 "--socket", self.socket, "--metrics-port", "0"],
                env=env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.trainer: Any = None

    def start_trainer(
        self,
        *,
        lazy_adam: bool,
        die_in_send: bool = False,
        device: str = "cpu",
        sharded: bool = False,
    ) -> None:
        self.stop = self.ctx.Event()
        self.trainer = self.ctx.Process(
            target=trainer,
            args=(
                self.socket,
                self.name,
                self.events,
                self.stop,
                lazy_adam,
                die_in_send,
                device,
                sharded,
            ),
            daemon=True,
        )
        self.trainer.start()

    def close(self) -> None:
        self.stop.set()
        if self.trainer is not None:
            self.trainer.join(10)
            if self.trainer.is_alive():
                self.trainer.kill()
        if self.sidecar.poll() is None:
            self.sidecar.send_signal(signal.SIGTERM)
            try:
                self.sidecar.wait(15)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()


class Events:
    def __init__(self, q: Any) -> None:
        self.q = q
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def wait(self, kind: str, name: str, timeout_s: float = 90, **match: object) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while True:
            for k, n, d in self.seen:
                if k == kind and n == name and all(d.get(a) == b for a, b in match.items()):
                    return d
            errors = [d for k, _, d in self.seen if k == "error"]
            assert not errors, errors
            assert time.monotonic() < end, f"no {kind} from {name}; saw {self.seen[-6:]}"
            try:
                self.seen.append(self.q.get(timeout=0.2))
            except queue.Empty:
                pass


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Coordinator, Any, Events, list[Pod]]]:
    coord = Coordinator(
        "127.0.0.1:0",
        CoordinatorConfig(
            heartbeat_interval=timedelta(seconds=0.2),
            heartbeat_timeout=timedelta(seconds=10),  # long: "unhealthy" must come from the sidecar
            warmup=timedelta(seconds=0.2),
        ),
    ).start()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pods: list[Pod] = []
    yield coord, ctx, Events(q), pods
    for p in pods:
        p.close()
    coord.stop()


def _pods(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path, *names: str
) -> list[Pod]:
    """Sidecars for ``names`` (trainers not started yet), closed with the cluster."""
    coord, ctx, ev, pods = cluster
    new = [Pod(n, coord.address, tmp_path, ctx, ev.q) for n in names]
    pods += new
    return new


def _rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon")


def _healthy(coord: Coordinator, name: str) -> bool | None:
    client = CoordinatorClient(coord.address)
    try:
        for r in client.status().replicas:
            if r.replica_id == name:
                return r.healthy
        return None
    finally:
        client.close()


def test_attached_trainers_donate_and_receive_through_their_sidecars(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path
) -> None:
    _, _, ev, _ = cluster
    a, b = _pods(cluster, tmp_path, "a", "b")
    a.start_trainer(lazy_adam=True)  # Adam's moments appear after attaching
    first = ev.wait("start", "a")
    assert first["step"] is None
    assert first["shared"] is True
    ev.wait("digest", "a", step=40)
    base_kib = _rss_anon_kib(b.sidecar.pid)
    b.start_trainer(lazy_adam=False)
    got = ev.wait("start", "b")
    assert got["step"] is not None
    assert got["step"] >= 40
    assert got["in_place"] is True  # received into the trainer's own tensor
    assert got["progress"] == got["step"]  # plain values came back over the socket
    # Same state as the donor at that step, and from then on.
    at = (got["step"] // 20 + 1) * 20
    assert ev.wait("digest", "b", step=at)["digest"] == ev.wait("digest", "a", step=at)["digest"]
    # Shared, not copied: 64 MiB went through sidecar b into trainer b's memory,
    # and sidecar b's private memory did not grow by it.
    grown = _rss_anon_kib(b.sidecar.pid) - base_kib
    assert grown < BIG // 1024 // 4, f"sidecar b grew by {grown} KiB of private memory"
    log = a.log.read_text()
    assert "a/0 attached" in log
    assert "sent step" in log


def test_a_killed_trainer_is_reported_at_once_and_its_restart_recovers(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path
) -> None:
    coord, _, ev, _ = cluster
    a, b = _pods(cluster, tmp_path, "a", "b")
    a.start_trainer(lazy_adam=False)
    ev.wait("digest", "a", step=20)
    b.start_trainer(lazy_adam=False)
    ev.wait("digest", "b", step=ev.wait("start", "b")["step"] // 20 * 20 + 40)
    assert _healthy(coord, "b") is True
    os.kill(b.trainer.pid, signal.SIGKILL)
    killed = time.monotonic()
    while _healthy(coord, "b") is not False:
        # Well under the coordinator's 10 s heartbeat timeout: the sidecar said so.
        assert time.monotonic() - killed < 5, "the coordinator still thinks b is healthy"
        time.sleep(0.1)
    assert b.sidecar.poll() is None  # the sidecar outlives its trainer
    ev.seen = [e for e in ev.seen if e[1] != "b"]
    b.start_trainer(lazy_adam=False)
    again = ev.wait("start", "b")
    assert again["step"] is not None
    assert again["in_place"] is True
    assert "trainer gone" in b.log.read_text()


def test_a_killed_sidecar_is_one_clear_error_then_training_goes_on(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path
) -> None:
    _, _, ev, _ = cluster
    (a,) = _pods(cluster, tmp_path, "a")
    a.start_trainer(lazy_adam=False)
    ev.wait("digest", "a", step=20)
    a.sidecar.kill()
    lost = ev.wait("lost", "a")
    assert "sidecar" in lost["error"]
    assert a.socket in lost["error"]
    on = ev.wait("training_on", "a")
    assert on["step"] > lost["step"]
    assert [e for e in ev.seen if e[0] == "lost"] == [("lost", "a", lost)]  # raised once


def _reference_digest(rank: int, world: int, pg: Any, store: Any, steps: int, sharded: bool) -> str:
    """The state a replica holds after ``steps``, trained in a process of its own."""
    job = Job(lazy_adam=False, sharded=sharded)
    for step in range(1, steps + 1):
        job.train(step)
    return state_digest(job.state())


@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "fsdp2"])
def test_a_donor_trainer_killed_mid_send_never_leaves_a_corrupt_state(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path, sharded: bool
) -> None:
    _, _, ev, _ = cluster
    a, b = _pods(cluster, tmp_path, "a", "b")
    a.start_trainer(lazy_adam=False, die_in_send=True, sharded=sharded)
    ev.wait("digest", "a", step=20)
    b.start_trainer(lazy_adam=False, sharded=sharded)
    got = ev.wait("start", "b")
    a.trainer.join(30)
    assert a.trainer.exitcode == -signal.SIGKILL  # it did die in its send
    # Whatever b got (the sidecar finishing the send of the held, consistent
    # state, or a fresh start after a failed plan), b's state is exactly a
    # replica's at every later step: compare with the same training elsewhere.
    at = ((got["step"] or 0) // 20 + 2) * 20
    seen = ev.wait("digest", "b", step=at)["digest"]
    [want] = run_ranks(_reference_digest, 1, args=(at, sharded), timeout=timedelta(seconds=120))
    assert seen == want
    assert "trainer gone" in a.log.read_text()


@pytest.mark.parametrize("sealed", [True, False], ids=["memfd", "dev-shm"])
def test_a_dev_shm_too_small_for_the_state_is_a_clear_error_or_no_matter(
    tmp_path: Path, sealed: bool
) -> None:
    # A private mount namespace with a 1 MiB /dev/shm (root only; CI runs as root).
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    script = tmp_path / "attach.py"
    script.write_text(
        "import torch, recoveryd\n"
        "from datetime import timedelta\n"
        "from recoveryd.sidecar import seal\n"
        f"if not {sealed}:\n"
        "    seal.can_seal = lambda: False  # torch's own /dev/shm segments\n"
        "big = torch.zeros(4 << 20)\n"
        "try:\n"
        f"    recoveryd.attach({str(tmp_path / 'none.sock')!r}, lambda: {{'big': big}},\n"
        "                     replica_id='r', timeout=timedelta(seconds=1))\n"
        "except recoveryd.RecoverydError as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} {script}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    if sealed:  # memfds are not in /dev/shm: the state is shared, and no sidecar answers
        assert done.stdout.startswith("SidecarLostError"), done.stdout
        return
    assert done.stdout.startswith("ConfigError invalid /dev/shm='16777216 bytes of CPU state'")
    assert "No space left on device" in done.stdout
    assert "emptyDir with medium: Memory" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (NCCL between two ranks)")
def test_cuda_tensors_are_shared_by_ipc_and_recovered_over_nccl(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path
) -> None:
    coord, _, ev, _ = cluster
    a, b = _pods(cluster, tmp_path, "a", "b")
    a.start_trainer(lazy_adam=False, device="cuda")
    ev.wait("digest", "a", step=20)
    b.start_trainer(lazy_adam=False, device="cuda")
    got = ev.wait("start", "b")
    assert got["step"] is not None
    assert got["in_place"] is True
    at = (got["step"] // 20 + 1) * 20
    assert ev.wait("digest", "b", step=at)["digest"] == ev.wait("digest", "a", step=at)["digest"]
    client = CoordinatorClient(coord.address)
    try:
        assert {k.device_kind for r in client.status().replicas for k in r.ranks} == {"cuda"}
    finally:
        client.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sharded", [False, True], ids=["plain", "fsdp2"])
def test_cuda_state_shared_by_ipc_recovers_in_place_from_a_cpu_donor(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path, sharded: bool
) -> None:
    # One GPU: the joiner's tensors (plain, or FSDP2's DTensor shards) are
    # CUDA memory its sidecar maps by IPC; the donor trains on the CPU, so the
    # plan runs over Gloo and the joiner's sidecar stages through pinned memory.
    coord, _, ev, _ = cluster
    a, b = _pods(cluster, tmp_path, "a", "b")
    a.start_trainer(lazy_adam=False, sharded=sharded)
    ev.wait("digest", "a", step=20)
    b.start_trainer(lazy_adam=False, device="cuda", sharded=sharded)
    got = ev.wait("start", "b")
    assert got["step"] is not None
    assert got["in_place"] is True
    assert got["shared"] is True  # CUDA memory, shared by IPC
    sent = ev.wait("sent", "a", step=got["step"])
    assert got["digest"] == sent["digest"]  # every byte as the CPU donor sent it
    client = CoordinatorClient(coord.address)
    try:
        kinds = {r.replica_id: {k.device_kind for k in r.ranks} for r in client.status().replicas}
        assert kinds == {"a": {"cpu"}, "b": {"cuda"}}
    finally:
        client.close()


def test_a_trainer_killed_while_recovering_ends_its_request_at_once(tmp_path: Path) -> None:
    # A long warm-up holds the joiner in recover(): no donor, and the
    # coordinator waits for agents to register again before saying so.
    coord = Coordinator(
        "127.0.0.1:0",
        CoordinatorConfig(
            heartbeat_interval=timedelta(seconds=0.2),
            heartbeat_timeout=timedelta(seconds=10),
            warmup=timedelta(seconds=120),
        ),
    ).start()
    ctx = mp.get_context("spawn")
    pod = Pod("a", coord.address, tmp_path, ctx, ctx.Queue())
    try:
        pod.start_trainer(lazy_adam=False)
        end = time.monotonic() + 90
        while "a/0 attached" not in pod.log.read_text():
            assert time.monotonic() < end, pod.log.read_text()
            time.sleep(0.1)
        time.sleep(1)  # in recover() now
        os.kill(pod.trainer.pid, signal.SIGKILL)
        killed = time.monotonic()
        while "trainer gone during a request" not in pod.log.read_text():
            assert time.monotonic() - killed < 5, pod.log.read_text()
            time.sleep(0.1)
        while _healthy(coord, "a") is not False:
            assert time.monotonic() - killed < 5, "the coordinator still thinks a is healthy"
            time.sleep(0.1)
        assert pod.sidecar.poll() is None
    finally:
        pod.close()
        coord.stop()


def _hold_rank(socket_path: str, name: str, events: Any, stop: Any) -> None:
    """Holds rank 0 of ``name``: attaches twice (the second takes the rank from the first,
    in the same process), lets a child keep the socket open beyond this process's
    life (as a forked data-loader worker would), then steps until stopped."""
    import recoveryd

    state = {"w": torch.arange(8, dtype=torch.float32)}
    try:
        first = recoveryd.attach(socket_path, lambda: state, replica_id=name)
        second = recoveryd.attach(socket_path, lambda: state, replica_id=name)
        try:
            first.step(1)
            replaced = False
        except recoveryd.SidecarLostError:
            replaced = True
        keeper = subprocess.Popen(["sleep", "300"], pass_fds=[second._channel._sock.fileno()])
        events.put(("held", name, {"pid": os.getpid(), "keeper": keeper.pid, "replaced": replaced}))
        step = 1
        while not stop.is_set():
            step += 1
            second.step(step)
            if step % 10 == 0:
                events.put(("stepped", name, {"step": step}))
            time.sleep(0.02)
    except BaseException as err:
        events.put(("error", name, {"error": repr(err)}))
    finally:
        events.close()
        events.join_thread()
        os._exit(0)


def test_a_live_attachment_keeps_its_rank_and_a_dead_one_is_replaced_at_once(
    cluster: tuple[Coordinator, Any, Events, list[Pod]], tmp_path: Path
) -> None:
    import recoveryd
    from recoveryd.errors import PermissionDeniedError

    coord, ctx, ev, _ = cluster
    (a,) = _pods(cluster, tmp_path, "a")
    stop = ctx.Event()  # held: a child unpickles it after start()
    holder = ctx.Process(target=_hold_rank, args=(a.socket, "a", ev.q, stop), daemon=True)
    holder.start()
    held = ev.wait("held", "a")
    assert held["replaced"] is True  # its own second attach took it (it holds the secret)
    state = {"w": torch.arange(8, dtype=torch.float32)}
    try:
        # Another process: the live holder keeps its rank, and trains on.
        with pytest.raises(PermissionDeniedError) as refused:
            recoveryd.attach(a.socket, lambda: state, replica_id="a")
        assert (refused.value.replica_id, refused.value.group_rank) == ("a", 0)
        assert f"a live trainer (pid {held['pid']}, uid {os.getuid()}) holds it" in str(
            refused.value
        )
        ev.seen.clear()
        ev.wait("stepped", "a")
        # Dead, with its socket still open (the keeper holds it): replaced at once.
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        t0 = time.monotonic()
        new = recoveryd.attach(a.socket, lambda: state, replica_id="a")
        try:
            assert time.monotonic() - t0 < 5
            new.step(1)
            assert f"its trainer, pid {held['pid']}, has exited" in a.log.read_text()
            end = time.monotonic() + 10
            while _healthy(coord, "a") is not True:
                assert time.monotonic() < end, "the new attachment never showed healthy"
                time.sleep(0.1)
        finally:
            new.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(held["keeper"], signal.SIGKILL)
