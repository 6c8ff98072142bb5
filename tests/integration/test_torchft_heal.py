"""torchft heals a replica group through the checkpoint transport under test.

A real torchft Lighthouse runs in the test process; two replica groups of one rank
each train a small model, each in its own spawned process, with torchft's Manager,
OptimizerWrapper and ProcessGroupGloo (gradients averaged by ``Manager.allreduce``).
The transport is built on the Manager's own process group, which the Manager
reconfigures on every new quorum (replica rank, replica world size), as torchft's
``train_ddp.py`` does.

Replica 1 is SIGKILLed in the middle of a step (after its forward pass, while
replica 0 waits for it in the gradient allreduce), then restarted from a different
seed. The restarted Manager must heal it through ``recv_checkpoint`` at the step
replica 0 stands at, after which both replicas must hold bit-identical parameters
and optimizer state at every step they share.

A thin recording wrapper around each transport logs every ``send_checkpoint`` and
``recv_checkpoint`` call, with the inner transport's class, and saves what it
received, so the test can tell the heal went through the transport under test.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import torch
from torch import nn
from torchft.checkpointing.transport import CheckpointTransport

from ._torchft_harness import Children, Deadline

if TYPE_CHECKING:
    from torchft.manager import Manager

T = TypeVar("T")

TOTAL_STEPS = 8
# Replica 1's first life hangs (and is killed) while trying to commit step KILL_STEP + 1.
KILL_STEP = 3
# Gloo collectives and the transport; a killed peer normally fails them at once.
PG_TIMEOUT = timedelta(seconds=10)
# Manager RPCs and checkpoint transfers.
MANAGER_TIMEOUT = timedelta(seconds=20)
# Replica 0 waits this long in quorum for the restarted replica (two torch imports).
QUORUM_TIMEOUT = timedelta(seconds=40)
# Every wait of one case shares this budget; the pytest timeout is a backstop above it.
SCENARIO_TIMEOUT = timedelta(seconds=75)
CHILD_LIFETIME = timedelta(seconds=85)
# How long the doomed replica waits to be killed before giving up with an error.
HANG_TIMEOUT = timedelta(seconds=60)
LIGHTHOUSE_HEARTBEAT_TIMEOUT = timedelta(seconds=1)
LIGHTHOUSE_JOIN_TIMEOUT = timedelta(seconds=2)
_HANG_EXIT_CODE = 3


# --- transports under test -------------------------------------------------------------


# name -> "module:Class" of a CheckpointTransport built as Class(pg, timeout=, device=, state_dict=)
TRANSPORTS: dict[str, str] = {
    "torchft-pg": "torchft.checkpointing.pg_transport:PGTransport",
    "recoveryd": "recoveryd.transport:TorchftTransport",
}


def _transport_class(name: str) -> type[CheckpointTransport[Any]]:
    module, _, attr = TRANSPORTS[name].partition(":")
    cls: type[CheckpointTransport[Any]] = getattr(importlib.import_module(module), attr)
    return cls


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# --- what runs in each replica process --------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class _ReplicaSpec:
    """One life of one replica group (picklable: it crosses the spawn boundary)."""

    replica: int
    """Replica group index, 0 or 1."""
    life: int
    """0 for the first process of this replica group, 1 for its restart."""
    seed: int
    """Seeds the model's initial weights; different for every life."""
    lighthouse_addr: str
    transport: str
    """A key of TRANSPORTS."""
    out_dir: str
    """Where this life writes its state files, transport events and markers."""
    hang_at_step: int | None
    """If set, stop after the forward pass of the iteration that starts at this step."""


def _tag(replica: int, life: int) -> str:
    return f"replica{replica}-life{life}"


def _make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Same batch for a given (replica, step) in every life; different across replicas.
    gen = torch.Generator().manual_seed(10_000 * (replica + 1) + step)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)


def _save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _RecordingTransport(CheckpointTransport[T]):
    """Delegates to ``inner`` and logs each send/recv (and saves what was received)."""

    def __init__(self, inner: CheckpointTransport[T], out_dir: Path) -> None:
        self._inner = inner
        self._out_dir = out_dir
        self._inner_name = _class_name(type(inner))

    def _log(self, **event: object) -> None:
        event = {"transport": self._inner_name, "t": time.time(), **event}
        with open(self._out_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")

    def metadata(self) -> str:
        meta: str = self._inner.metadata()
        return meta

    def send_checkpoint(
        self, dst_ranks: list[int], step: int, state_dict: T, timeout: timedelta
    ) -> None:
        self._log(op="send_start", dst_ranks=list(dst_ranks), step=step)
        try:
            self._inner.send_checkpoint(dst_ranks, step, state_dict, timeout)
        except BaseException as e:
            self._log(op="send_error", step=step, error=repr(e))
            raise
        self._log(op="send", dst_ranks=list(dst_ranks), step=step)

    def disallow_checkpoint(self) -> None:
        self._inner.disallow_checkpoint()

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> T:
        self._log(op="recv_start", src_rank=src_rank, step=step)
        try:
            state: T = self._inner.recv_checkpoint(src_rank, metadata, step, timeout)
        except BaseException as e:
            self._log(op="recv_error", src_rank=src_rank, step=step, error=repr(e))
            raise
        _save(state, self._out_dir / f"recv-step-{step:03d}.pt")
        self._log(op="recv", src_rank=src_rank, step=step)
        return state

    def shutdown(self, wait: bool = True) -> None:
        self._inner.shutdown(wait=wait)


def _allreduce_grads(manager: Manager, model: nn.Module) -> None:
    """Average gradients across replica groups; a failed collective marks the step errored.

    torchft 0.2.0's DistributedDataParallel cannot take a peer dying mid-allreduce: its
    comm hook asserts ``fut._fut`` (torchft/ddp.py:76), which is never set when the
    Gloo work raises. ``Manager.allreduce(...).wait()`` reports the error instead, and
    the Manager then refuses to commit the step, which is the behaviour under test.
    """
    works = [manager.allreduce(p.grad) for p in model.parameters() if p.grad is not None]
    for work in works:
        work.wait()


def _replica_main(spec: _ReplicaSpec) -> None:
    """Train with torchft until TOTAL_STEPS, writing the state after every step."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)

    from torch.distributed import TCPStore
    from torchft.manager import Manager
    from torchft.optim import OptimizerWrapper
    from torchft.process_group import ProcessGroupGloo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_dir = Path(spec.out_dir) / _tag(spec.replica, spec.life)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(spec.seed)
    model = _make_model()
    inner_opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def state_dict() -> dict[str, object]:
        return {"model": model.state_dict(), "optim": inner_opt.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        model.load_state_dict(sd["model"])
        inner_opt.load_state_dict(sd["optim"])

    _save(state_dict(), out_dir / "init.pt")

    # This replica group's own store (one rank); the Manager publishes it in the quorum
    # and the Manager configures `pg` on it per quorum, under a quorum-specific prefix.
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pg = ProcessGroupGloo(timeout=PG_TIMEOUT)
    inner = _transport_class(spec.transport)(
        pg, timeout=MANAGER_TIMEOUT, device=torch.device("cpu"), state_dict=None
    )
    transport: CheckpointTransport[Any] = _RecordingTransport(inner, out_dir)
    manager = Manager(
        pg=pg,
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=2,
        timeout=MANAGER_TIMEOUT,
        quorum_timeout=QUORUM_TIMEOUT,
        connect_timeout=MANAGER_TIMEOUT,
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=spec.lighthouse_addr,
        replica_id=f"replica_{spec.replica}",
        hostname="127.0.0.1",
        checkpoint_transport=transport,
    )
    try:
        optimizer = OptimizerWrapper(manager, inner_opt)
        loss_fn = nn.MSELoss()
        # Uncommitted iterations (a failed peer, a heal) are allowed, but not forever.
        for _ in range(4 * TOTAL_STEPS):
            step = manager.current_step()
            if step >= TOTAL_STEPS:
                break
            inputs, targets = _batch(spec.replica, step)
            optimizer.zero_grad()  # starts the (async) quorum, and with it any heal
            out = model(inputs)
            if spec.hang_at_step == step:
                (out_dir / "hanging").write_text(str(step))
                print(f"hanging at step {step} until killed", flush=True)
                time.sleep(HANG_TIMEOUT.total_seconds())
                print("was not killed", flush=True)
                os._exit(_HANG_EXIT_CODE)
            loss_fn(out, targets).backward()
            _allreduce_grads(manager, model)
            optimizer.step()  # applies a pending heal, then commits if the quorum allows
            if manager.current_step() != step:
                _save(state_dict(), out_dir / f"step-{manager.current_step():03d}.pt")
        else:
            raise RuntimeError(f"did not reach step {TOTAL_STEPS}: at {manager.current_step()}")
        print(f"done at step {manager.current_step()}", flush=True)
    finally:
        manager.shutdown(wait=False)


# --- checks in the test process ---------------------------------------------------------


def _events(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _step_files(out_dir: Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in out_dir.glob("step-*.pt")}


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def _leaves(obj: object, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{path}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _bitwise_diff(a: object, b: object) -> list[str]:
    """Paths where ``a`` and ``b`` differ (tensors compared byte for byte, dtype and shape)."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    diffs = [f"{p}: only on one side" for p in sorted(la.keys() ^ lb.keys())]
    for p in sorted(la.keys() & lb.keys()):
        x, y = la[p], lb[p]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bytes(x), _bytes(y))
        else:
            same = type(x) is type(y) and x == y
        if not same:
            diffs.append(f"{p}: {x!r} != {y!r}")
    return diffs


@pytest.fixture
def lighthouse_addr() -> Iterator[str]:
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(
        bind="127.0.0.1:0",
        min_replicas=2,
        join_timeout_ms=int(LIGHTHOUSE_JOIN_TIMEOUT.total_seconds() * 1000),
        heartbeat_timeout_ms=int(LIGHTHOUSE_HEARTBEAT_TIMEOUT.total_seconds() * 1000),
    )
    try:
        # address() names the host; dial loopback explicitly, which is what it is bound to.
        port = int(server.address().rsplit(":", 1)[1])
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "transport",
    [
        pytest.param("torchft-pg", id="torchft-pg"),
        pytest.param("recoveryd", id="recoveryd"),
    ],
)
def test_manager_heals_killed_replica_through_transport(
    transport: str, lighthouse_addr: str, tmp_path: Path
) -> None:
    deadline = Deadline.after(SCENARIO_TIMEOUT)

    def spec(replica: int, life: int, hang_at_step: int | None = None) -> _ReplicaSpec:
        return _ReplicaSpec(
            replica=replica,
            life=life,
            seed=100 * replica + life,
            lighthouse_addr=lighthouse_addr,
            transport=transport,
            out_dir=str(tmp_path),
            hang_at_step=hang_at_step,
        )

    def transport_failed() -> str | None:
        # Nothing in this scenario kills a rank during a transfer, so any transport error
        # is a failure: report it now instead of waiting for torchft to time out.
        errors = [e for d in tmp_path.glob("replica*") for e in _events(d) if "error" in e]
        return f"transport calls failed: {errors}" if errors else None

    healthy_dir = tmp_path / _tag(0, 0)
    doomed_dir = tmp_path / _tag(1, 0)
    healed_dir = tmp_path / _tag(1, 1)

    with Children(tmp_path / "logs", lifetime=CHILD_LIFETIME) as children:
        healthy = children.spawn(_tag(0, 0), _replica_main, spec(0, 0))
        doomed = children.spawn(_tag(1, 0), _replica_main, spec(1, 0, hang_at_step=KILL_STEP))

        children.wait_for(
            f"{doomed.name} to hang at step {KILL_STEP}",
            (doomed_dir / "hanging").exists,
            timeout=deadline.clamp(timedelta(seconds=45)),
            watch=[healthy, doomed],
            abort_if=transport_failed,
        )
        children.kill(doomed)
        assert doomed.exitcode == -signal.SIGKILL, doomed.log_tail()

        healed = children.spawn(_tag(1, 1), _replica_main, spec(1, 1))
        children.wait_exit_ok(
            [healthy, healed], timeout=deadline.remaining(), abort_if=transport_failed
        )

    logs = f"logs in {tmp_path / 'logs'}"
    expected_transport = _class_name(_transport_class(transport))

    # The heal went through the transport under test, at the step the healthy replica held.
    recvs = [e for e in _events(healed_dir) if e["op"].startswith("recv")]
    assert [(e["op"], e["step"], e["src_rank"]) for e in recvs] == [
        ("recv_start", KILL_STEP, 0),
        ("recv", KILL_STEP, 0),
    ], f"restarted replica's recv_checkpoint calls: {recvs}; {logs}"
    sends = [e for e in _events(healthy_dir) if e["op"] == "send" and e["step"] == KILL_STEP]
    assert len(sends) == 1, f"healthy replica's sends: {_events(healthy_dir)}; {logs}"
    assert sends[0]["dst_ranks"] == [1], sends
    transports_used = {e["transport"] for d in (healthy_dir, healed_dir) for e in _events(d)}
    assert transports_used == {expected_transport}, transports_used
    assert transport_failed() is None

    healthy_steps = _step_files(healthy_dir)
    healed_steps = _step_files(healed_dir)
    assert sorted(healthy_steps) == list(range(1, TOTAL_STEPS + 1)), logs
    # The restart's first iteration heals but does not commit (only one replica was at the
    # quorum's max step), so its first state file is the healed state at KILL_STEP itself.
    assert sorted(healed_steps) == list(range(KILL_STEP, TOTAL_STEPS + 1)), logs

    # Healing changed something: the restart began from different weights.
    reference = _load(healthy_steps[KILL_STEP])
    assert _bitwise_diff(_load(healed_dir / "init.pt")["model"], reference["model"])

    # What the transport delivered is the healthy replica's state at that step, bit for bit.
    received = _load(healed_dir / f"recv-step-{KILL_STEP:03d}.pt")
    assert received["torchft"]["step"] == KILL_STEP, received["torchft"]
    assert _bitwise_diff(received["user"]["default"], reference) == []

    # And from then on both replicas hold the same bits at every step they share.
    for step in sorted(healed_steps):
        diff = _bitwise_diff(_load(healed_steps[step]), _load(healthy_steps[step]))
        assert diff == [], f"step {step} differs between replicas: {diff[:5]}"
