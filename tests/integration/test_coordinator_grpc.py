"""The coordinator over real gRPC: a server on 127.0.0.1 port 0, real channels, the real CLI.

Wire-level contracts are asserted on ``err.code()`` through raw stubs; the
rest goes through :class:`CoordinatorClient`, as an agent would. No tensors
move here: donors and joiners are played by the test, one RPC at a time.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import SERVICE_NAME, Coordinator
from recoveryd.coordinator.service import CoordinatorService
from recoveryd.errors import (
    CoordinatorUnavailableError,
    RecoverydError,
    UnknownMemberError,
)
from recoveryd.protocol import Answer, Beat, MemberInfo, Order, Report
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

_RPC_S = 5.0  # deadline of every raw-stub call
_ORDER_WAIT = timedelta(seconds=5)
_CLIENT_TIMEOUT = timedelta(seconds=5)
_REPO = Path(__file__).resolve().parents[2]
_CONFIG = CoordinatorConfig(
    fence_steps=2, heartbeat_timeout=timedelta(seconds=30), warmup=timedelta(0)
)


# ---- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    coord = Coordinator("127.0.0.1:0", _CONFIG).start(timeout=timedelta(seconds=10))
    try:
        yield coord
    finally:
        coord.stop(grace=timedelta(seconds=0.2))


@pytest.fixture
def client(coordinator: Coordinator) -> Iterator[CoordinatorClient]:
    c = CoordinatorClient(coordinator.address, timeout=_CLIENT_TIMEOUT)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def channel(coordinator: Coordinator) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(coordinator.address)
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.CoordinatorStub:
    return pb_grpc.CoordinatorStub(channel)


def _info(replica_id: str, group_rank: int, *, world: int = 2, fp: str = "L") -> MemberInfo:
    return MemberInfo(
        replica_id=replica_id,
        group_rank=group_rank,
        group_world_size=world,
        layout_fingerprint=fp,
        rendezvous=f"127.0.0.1:{29500 + group_rank}",
        agent_id=f"{replica_id}-{group_rank}",
    )


def _register_replica(
    client: CoordinatorClient, replica_id: str, *, step: int | None, world: int = 2
) -> None:
    for r in range(world):
        client.register(_info(replica_id, r, world=world), step=step)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _OrderStream:
    """One rank's Watch stream, drained on a thread so that every read has a deadline."""

    def __init__(self, client: CoordinatorClient, replica_id: str, group_rank: int) -> None:
        self._orders, self._cancel = client.watch(replica_id, group_rank)
        self._queue: queue.Queue[Order | BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            for order in self._orders:
                self._queue.put(order)
        except BaseException as err:
            self._queue.put(err)

    def next(self, timeout: timedelta = _ORDER_WAIT) -> Order:
        try:
            item = self._queue.get(timeout=timeout.total_seconds())
        except queue.Empty:
            raise AssertionError(f"no order within {timeout}") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._cancel()
        self._thread.join(5)


def _in_thread(fn: Callable[[], object], delay_s: float = 0.0) -> threading.Thread:
    def go() -> None:
        time.sleep(delay_s)
        fn()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _hold_long_poll(
    client: CoordinatorClient, plan_id: int, errors: list[BaseException]
) -> threading.Thread:
    """Joiner rank 0 long-polls ``plan_id`` (10 s) on a thread; what it raises goes to ``errors``."""

    def hold() -> None:
        try:
            client.recover("joiner", 0, wait=timedelta(seconds=10), joined_plan_id=plan_id)
        except BaseException as err:
            errors.append(err)

    t = _in_thread(hold)
    time.sleep(0.3)  # let the call reach the server; if it does not, stop() still ends it
    return t


def _timed_recover(
    client: CoordinatorClient,
    replica_id: str,
    group_rank: int,
    *,
    wait: timedelta,
    joined_plan_id: int = 0,
) -> tuple[Answer, float]:
    t0 = time.monotonic()
    answer = client.recover(replica_id, group_rank, wait=wait, joined_plan_id=joined_plan_id)
    return answer, time.monotonic() - t0


# ---- health and reflection ------------------------------------------------------


@pytest.mark.parametrize("service", ["", "recoveryd.v1.Coordinator"])
def test_health_serving(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=_RPC_S)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_not_found(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=_RPC_S)
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_coordinator(channel: grpc.Channel) -> None:
    assert SERVICE_NAME == "recoveryd.v1.Coordinator"
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(
        refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=_RPC_S
        )
    )
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert "recoveryd.v1.Coordinator" in names
    assert "grpc.health.v1.Health" in names


# ---- membership and errors on the wire ---------------------------------------------


def test_register_then_batched_heartbeat(client: CoordinatorClient) -> None:
    reg = client.register(_info("a", 0, world=1), step=3)
    assert reg.coordinator_id
    assert reg.heartbeat_interval == _CONFIG.heartbeat_interval

    coordinator_id, unknown = client.heartbeat(
        [
            Beat(replica_id="a", group_rank=0, step=7),
            Beat(replica_id="ghost", group_rank=0, step=1),
        ]
    )
    assert coordinator_id == reg.coordinator_id
    assert unknown == [1]

    coordinator_id, unknown = client.heartbeat(
        [
            Beat(replica_id="ghost", group_rank=3, step=None),
            Beat(replica_id="a", group_rank=0, step=8),
            Beat(replica_id="a", group_rank=1, step=8),  # rank beyond a's world size
        ]
    )
    assert unknown == [0, 2]

    (rep,) = client.status().replicas
    assert (rep.replica_id, rep.step, rep.healthy, rep.state) == ("a", 8, True, "healthy")
    assert [k.step for k in rep.ranks] == [8]


def test_a_rank_leaves_only_by_the_agent_that_registered_it(client: CoordinatorClient) -> None:
    client.register(_info("a", 0, world=1), step=3)
    client.register(_info("b", 0, world=1), step=3)
    assert client.leave("a", 0, "someone-else") is False  # a stale agent cannot take it away
    assert client.leave("ghost", 0, "x") is False
    assert {r.replica_id for r in client.status().replicas} == {"a", "b"}
    assert client.leave("a", 0, "a-0") is True
    assert [r.replica_id for r in client.status().replicas] == ["b"]
    assert client.leave("a", 0, "a-0") is False  # already gone


def test_recover_unregistered_is_not_found(
    stub: pb_grpc.CoordinatorStub, client: CoordinatorClient
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.Recover(pb.RecoverRequest(replica_id="nobody", group_rank=0), timeout=_RPC_S)
    assert exc.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'nobody'" in exc.value.details()

    with pytest.raises(UnknownMemberError, match=r"rank 0 of replica 'nobody' is not registered"):
        client.recover("nobody", 0, wait=timedelta(0))


def test_unknown_member_error_carries_the_rank(client: CoordinatorClient) -> None:
    with pytest.raises(UnknownMemberError) as exc:
        client.recover("nobody", 1, wait=timedelta(0))
    assert (exc.value.replica_id, exc.value.group_rank) == ("nobody", 1)


@pytest.mark.parametrize(
    ("member", "field"),
    [
        (pb.Member(replica_id="", group_world_size=2, layout_fingerprint="L"), "replica_id"),
        (
            pb.Member(replica_id="a", group_rank=2, group_world_size=2, layout_fingerprint="L"),
            "group_rank",
        ),
        (pb.Member(replica_id="a", group_world_size=0, layout_fingerprint="L"), "group_world_size"),
        (pb.Member(replica_id="a", group_world_size=1), "layout_fingerprint"),
    ],
    ids=["empty-replica-id", "rank-beyond-world", "empty-world", "no-fingerprint"],
)
def test_register_invalid_member(
    stub: pb_grpc.CoordinatorStub, member: pb.Member, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.Register(pb.RegisterRequest(member=member), timeout=_RPC_S)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"invalid {field}=" in exc.value.details()


def test_register_conflicting_world_size(
    stub: pb_grpc.CoordinatorStub, client: CoordinatorClient
) -> None:
    client.register(_info("a", 0, world=2), step=None)
    member = pb.Member(replica_id="a", group_rank=1, group_world_size=3, layout_fingerprint="L")
    with pytest.raises(grpc.RpcError) as exc:
        stub.Register(pb.RegisterRequest(member=member), timeout=_RPC_S)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "registered with 2 ranks" in exc.value.details()


def test_report_unknown_result_is_invalid_argument(
    stub: pb_grpc.CoordinatorStub, client: CoordinatorClient
) -> None:
    report = pb.TransferReport(
        plan_id=1, replica_id="a", group_rank=0, role=pb.TransferReport.JOINER, result="great"
    )
    with pytest.raises(grpc.RpcError) as exc:
        stub.ReportTransfer(report, timeout=_RPC_S)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'great'" in exc.value.details()

    no_role = pb.TransferReport(plan_id=1, replica_id="a", group_rank=0, result="ok")
    with pytest.raises(grpc.RpcError) as exc:
        stub.ReportTransfer(no_role, timeout=_RPC_S)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    # The client turns INVALID_ARGUMENT into a RecoverydError that names the code.
    with pytest.raises(RecoverydError, match="INVALID_ARGUMENT") as exc_info:
        client.report(
            Report(plan_id=1, replica_id="a", group_rank=0, role="joiner", result="great")
        )
    assert not isinstance(exc_info.value, CoordinatorUnavailableError)


# ---- the recovery protocol --------------------------------------------------------


def test_first_replica_gets_no_donor(client: CoordinatorClient) -> None:
    _register_replica(client, "only", step=None)
    answer, took = _timed_recover(client, "only", 0, wait=timedelta(seconds=5))
    assert answer.state == "no_donor"
    assert "first replica" in answer.reason
    assert took < 2.0  # a final answer is not held for the wait
    # Every rank of the replica gets the same final answer.
    assert client.recover("only", 1, wait=timedelta(0)).state == "no_donor"


def test_recovery_end_to_end(client: CoordinatorClient) -> None:
    _register_replica(client, "donor", step=10)
    _register_replica(client, "joiner", step=None)
    streams = [_OrderStream(client, "donor", r) for r in range(2)]
    try:
        first = [client.recover("joiner", r, wait=timedelta(0)) for r in range(2)]
        for r, a in enumerate(first):
            assert a.state == "transfer"
            assert a.step is None
            assert a.donor == "donor"
            assert a.rendezvous == f"127.0.0.1:{29500 + r}"
            assert a.backend == "gloo"
        plan_id = first[0].plan_id
        assert plan_id > 0
        assert first[1].plan_id == plan_id

        for s in streams:
            order = s.next()
            assert order.kind == "prepare"
            assert order.plan_id == plan_id
            assert order.joiner == "joiner"
            assert order.step is None
            assert order.rendezvous_prefix == first[0].rendezvous_prefix

        assert client.acknowledge(plan_id, "donor", 0, 10)
        assert client.acknowledge(plan_id, "donor", 1, 10)
        for s in streams:
            order = s.next()
            assert (order.kind, order.plan_id, order.step) == ("arm", plan_id, 12)

        for r in range(2):
            a = client.recover("joiner", r, wait=timedelta(seconds=5), joined_plan_id=plan_id)
            assert (a.state, a.plan_id, a.step) == ("transfer", plan_id, 12)

        st = client.status()
        assert [p.plan_id for p in st.active] == [plan_id]
        assert st.active[0].state == "armed"
        assert {r.replica_id: r.state for r in st.replicas}["joiner"] == "recovering"

        for r in range(2):
            client.report(
                Report(
                    plan_id=plan_id,
                    replica_id="joiner",
                    group_rank=r,
                    role="joiner",
                    result="ok",
                    step=12,
                    bytes=1000,
                    seconds=0.5,
                )
            )
        for r in range(2):
            a = client.recover("joiner", r, wait=timedelta(seconds=5), joined_plan_id=plan_id)
            assert (a.state, a.plan_id, a.step) == ("done", plan_id, 12)

        st = client.status()
        assert {r.replica_id for r in st.replicas} == {"donor", "joiner"}
        assert all(len(r.ranks) == 2 for r in st.replicas)
        assert st.active == []
        (plan,) = [p for p in st.recent if p.plan_id == plan_id]
        assert (plan.state, plan.step, plan.joiner, plan.donor) == ("done", 12, "joiner", "donor")
        assert plan.ranks_done == 2
        assert plan.bytes == 2000
        assert plan.attempt == 1
        assert {r.replica_id: r.state for r in st.replicas}["joiner"] != "recovering"
        # A late ack for a finished plan is told the plan is gone.
        assert not client.acknowledge(plan_id, "donor", 0, 12)
    finally:
        for s in streams:
            s.close()


def _armable_plan(client: CoordinatorClient) -> int:
    """A donor at step 10 and a joiner whose rank 0 holds a plan not armed yet."""
    _register_replica(client, "donor", step=10)
    _register_replica(client, "joiner", step=None)
    a = client.recover("joiner", 0, wait=timedelta(0))
    assert (a.state, a.step) == ("transfer", None)
    return a.plan_id


def test_recover_long_poll_holds_for_the_wait(client: CoordinatorClient) -> None:
    plan_id = _armable_plan(client)
    answer, took = _timed_recover(
        client, "joiner", 0, wait=timedelta(seconds=1), joined_plan_id=plan_id
    )
    assert 0.8 <= took < 5.0
    assert (answer.state, answer.plan_id, answer.step) == ("transfer", plan_id, None)


def test_recover_long_poll_returns_on_acknowledge(client: CoordinatorClient) -> None:
    plan_id = _armable_plan(client)
    acker = CoordinatorClient(client.address, timeout=_CLIENT_TIMEOUT)  # the donor's own channel
    for r in range(2):
        acker.hold("donor", r, client.secret("donor", r))
    acks: list[bool] = []

    def ack_all() -> None:
        acks.extend(acker.acknowledge(plan_id, "donor", r, 10) for r in range(2))

    t = _in_thread(ack_all, delay_s=0.2)
    try:
        answer, took = _timed_recover(
            client, "joiner", 0, wait=timedelta(seconds=5), joined_plan_id=plan_id
        )
    finally:
        t.join(10)
        acker.close()
    assert acks == [True, True]
    assert (answer.state, answer.step) == ("transfer", 12)
    assert took < 2.0


def test_recover_long_poll_does_not_spin(
    coordinator: Coordinator, client: CoordinatorClient
) -> None:
    plan_id = _armable_plan(client)
    calls = [0]

    def count_recover_calls(service: CoordinatorService) -> None:
        real = service.planner.recover

        def counting(*args: object, **kwargs: object) -> Answer:
            calls[0] += 1
            return real(*args, **kwargs)  # type: ignore[arg-type]

        service.planner.recover = counting  # type: ignore[method-assign]

    coordinator.call(count_recover_calls)
    _, took = _timed_recover(client, "joiner", 0, wait=timedelta(seconds=1), joined_plan_id=plan_id)
    assert took >= 0.8
    # Woken by the 0.25 s tick at most ~4 times in 1 s, plus the first evaluation.
    assert calls[0] <= 20, f"Recover re-evaluated {calls[0]} times in one 1 s long poll"


# ---- a stopped coordinator ---------------------------------------------------------


def test_stopped_coordinator_is_unavailable() -> None:
    coord = Coordinator("127.0.0.1:0", _CONFIG).start(timeout=timedelta(seconds=10))
    timeout = timedelta(seconds=2)
    client = CoordinatorClient(coord.address, timeout=timeout)
    streams: list[_OrderStream] = []
    held: list[BaseException] = []
    poll: threading.Thread | None = None
    try:
        plan_id = _armable_plan(client)
        streams = [_OrderStream(client, "donor", 0)]
        assert streams[0].next().kind == "prepare"

        poll = _hold_long_poll(client, plan_id, held)

        t0 = time.monotonic()
        coord.stop(grace=timedelta(seconds=0.2))
        assert time.monotonic() - t0 < 5.0

        # Open calls break with the coordinator: the held long poll and the order stream.
        poll.join(5)
        assert not poll.is_alive()
        assert len(held) == 1
        assert isinstance(held[0], CoordinatorUnavailableError)
        with pytest.raises(CoordinatorUnavailableError):
            streams[0].next()

        calls: list[Callable[[], object]] = [
            client.status,
            lambda: client.register(_info("late", 0, world=1), step=None),
            lambda: client.heartbeat([Beat(replica_id="donor", group_rank=0, step=11)]),
            lambda: client.recover("joiner", 1, wait=timedelta(0)),
            lambda: client.acknowledge(plan_id, "donor", 1, 10),
        ]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(CoordinatorUnavailableError) as exc:
                call()
            assert time.monotonic() - t0 < timeout.total_seconds() + 1.0
            assert exc.value.address == coord.address
            assert isinstance(exc.value, ConnectionError)
    finally:
        for s in streams:
            s.close()
        client.close()
        coord.stop(grace=timedelta(seconds=0.2))
        if poll is not None:
            poll.join(5)
        gc.collect()  # what the stop left behind is logged here, not at interpreter exit


def test_stop_with_held_long_poll_leaves_no_pending_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    coord = Coordinator("127.0.0.1:0", _CONFIG).start(timeout=timedelta(seconds=10))
    client = CoordinatorClient(coord.address, timeout=timedelta(seconds=2))
    held: list[BaseException] = []
    poll: threading.Thread | None = None
    try:
        plan_id = _armable_plan(client)
        poll = _hold_long_poll(client, plan_id, held)
        coord.stop(grace=timedelta(seconds=0.2))
        poll.join(5)
        assert [type(e) for e in held] == [CoordinatorUnavailableError]
    finally:
        client.close()
        coord.stop(grace=timedelta(seconds=0.2))
        if poll is not None:
            poll.join(5)
    gc.collect()
    destroyed = [r.getMessage() for r in caplog.records if "destroyed" in r.getMessage()]
    assert destroyed == []


# ---- the CLI -----------------------------------------------------------------------


def _cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recoveryd", *args],
            cwd=_REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"coordinator exited with {proc.returncode}:\n{log.read_text()}")
            try:
                r = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"coordinator not SERVING within {timeout_s} s:\n{log.read_text()}")
            time.sleep(0.1)


def test_cli_coordinator_and_status(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    dead = f"127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coord = _cli(
            "coordinator",
            "--bind",
            address,
            "--grace",
            "1",
            "--metrics-port",
            "0",
            log=tmp_path / "coordinator.log",
        )
        procs.append(coord)
        # Started alongside (each interpreter takes seconds to import torch).
        dead_status = _cli(
            "status", "--coordinator", dead, "--timeout", "2", log=tmp_path / "dead.log"
        )
        procs.append(dead_status)

        _wait_serving(address, coord, tmp_path / "coordinator.log", timeout_s=30)
        client = CoordinatorClient(address, timeout=_CLIENT_TIMEOUT)
        try:
            _register_replica(client, "cli-replica", step=5)
        finally:
            client.close()

        status = subprocess.run(
            [sys.executable, "-m", "recoveryd", "status", "--coordinator", address],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        out = status.stdout
        assert "1 replicas, 2 ranks" in out
        assert "REPLICA" in out
        assert "HEALTHY" in out
        rows = [line.split() for line in out.splitlines() if line.startswith("cli-replica")]
        assert [row[:4] for row in rows] == [
            ["cli-replica", "healthy", "0/2", "5"],
            ["cli-replica", "healthy", "1/2", "5"],
        ]
        assert "recent transfers: 0" in out

        t0 = time.monotonic()
        coord.send_signal(signal.SIGTERM)
        assert coord.wait(timeout=15) == 0, (tmp_path / "coordinator.log").read_text()
        assert time.monotonic() - t0 < 5.0

        assert dead_status.wait(timeout=60) != 0
        dead_log = (tmp_path / "dead.log").read_text()
        assert dead in dead_log
        assert "unavailable" in dead_log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
