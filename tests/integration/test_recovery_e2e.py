"""End to end: real trainer processes, a real coordinator, real kills.

Each test runs replicas of the demo's training job (recoveryd.demo.trainer)
as spawned processes on 127.0.0.1 and checks, from the ranks' own events,
who recovered from whom, at which step, and that the bytes are the donor's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.demo.cluster import LocalCluster
from recoveryd.demo.trainer import Event

pytestmark = pytest.mark.integration

WAIT = timedelta(seconds=90)
# Small, fast ranks; tests that need longer transfers add extra bytes.
SMALL = {"hidden": 64, "layers": 2, "steps": 100_000, "step_delay_s": 0.01}


def _recovered(
    cluster: LocalCluster, replica: str, ranks: int = 2, incarnation: int = 0
) -> list[Event]:
    return cluster.wait_for(
        lambda e: (
            e.replica_id == replica
            and e.incarnation == incarnation
            and e.kind in ("recovered", "fresh")
        ),
        count=ranks,
        timeout=WAIT,
    )


def _sent_digest(cluster: LocalCluster, plan_id: int, rank: int) -> str:
    [sent] = cluster.wait_for(
        lambda e: e.kind == "sent" and e.data["plan_id"] == plan_id and e.group_rank == rank,
        timeout=timedelta(seconds=30),
    )
    assert sent.data["result"] == "ok", sent.data
    return str(sent.data["digest"])


def _wait_step(cluster: LocalCluster, replica: str, step: int) -> None:
    end = time.monotonic() + WAIT.total_seconds()
    while cluster.step_of(replica) < step:
        assert time.monotonic() < end, f"{replica} did not reach step {step}"
        cluster.drain(0.05)


def _wait_coordinator_sees_step(cluster: LocalCluster, replica: str, at_least: int = 0) -> None:
    client = cluster.client()
    end = time.monotonic() + 30
    while not any(
        r.replica_id == replica and r.step is not None and r.step >= at_least
        for r in client.status().replicas
    ):
        assert time.monotonic() < end, f"the coordinator never saw a step of {replica}"
        time.sleep(0.05)
    client.close()


def _assert_bit_identical_to_donor(cluster: LocalCluster, events: list[Event], donor: str) -> None:
    for e in events:
        assert e.kind == "recovered", e.data
        assert e.data["donor"] == donor
        assert e.data["digest"] == _sent_digest(cluster, e.data["plan_id"], e.group_rank)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(**SMALL) as c:
        yield c


def test_joiner_recovers_from_the_most_advanced_healthy_donor(cluster: LocalCluster) -> None:
    cluster.start_replica("ahead", 2)
    assert all(e.kind == "fresh" for e in _recovered(cluster, "ahead"))
    cluster.start_replica("behind", 2, hold_at=3)  # parks early: healthy, but behind
    _recovered(cluster, "behind")
    _wait_step(cluster, "ahead", cluster.step_of("behind") + 30)

    cluster.start_replica("joiner", 2)
    got = _recovered(cluster, "joiner")

    _assert_bit_identical_to_donor(cluster, got, "ahead")
    steps = {e.data["step"] for e in got}
    assert len(steps) == 1  # one consistent step...
    assert steps.pop() > cluster.step_of("behind")  # ...and the most advanced one
    # Only 'ahead' was ever planned (a plan may be re-fenced if a donor rank
    # overshot its fence on this loaded machine, but never goes elsewhere).
    status = cluster.client().status()
    assert {p.donor for p in status.recent if p.joiner == "joiner"} == {"ahead"}


def test_donor_killed_mid_transfer_joiner_completes_from_another(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 'doomed' is ahead (preferred) and dies 50 ms into its send of 256 MiB;
    # 'spare' is parked behind it and takes over. Gloo may not wake a receive
    # whose peer died between two messages: the stall timeout bounds that.
    monkeypatch.setenv("RECOVERYD_STALL_TIMEOUT", "3")
    big = 256 << 20
    cluster.start_replica("spare", 2, extra_bytes=big, hold_at=3)
    assert all(e.kind == "fresh" for e in _recovered(cluster, "spare"))
    _wait_coordinator_sees_step(cluster, "spare")
    # 'doomed' starts from the parked spare's state, then trains ahead of it.
    cluster.start_replica("doomed", 2, extra_bytes=big, die_during_send_s=0.05)
    assert all(e.kind == "recovered" for e in _recovered(cluster, "doomed"))
    _wait_step(cluster, "doomed", 20)
    _wait_coordinator_sees_step(cluster, "doomed", at_least=20)

    cluster.start_replica("joiner", 2, extra_bytes=big)
    got = _recovered(cluster, "joiner")

    assert not any(cluster.alive("doomed")), "the donor was meant to die mid-send"
    _assert_bit_identical_to_donor(cluster, got, "spare")
    assert all(e.data["attempts"] == 2 for e in got)
    assert all(e.data["step"] == 3 for e in got)  # the parked donor's step
    status = cluster.client().status()
    [failed] = [p for p in status.recent if p.state == "failed"]
    assert failed.donor == "doomed"
    # Whichever came first: the coordinator missing the donor's heartbeats,
    # or a joiner rank's report.
    assert "doomed" in failed.reason or "joiner" in failed.reason, failed.reason


def test_no_healthy_donor_is_a_clear_answer_within_the_deadline() -> None:
    config = CoordinatorConfig(
        heartbeat_interval=timedelta(seconds=0.2), heartbeat_timeout=timedelta(seconds=1)
    )
    with LocalCluster(coordinator_config=config, **SMALL) as cluster:
        cluster.start_replica("only", 2)
        _recovered(cluster, "only")
        _wait_step(cluster, "only", 10)
        _wait_coordinator_sees_step(cluster, "only")
        cluster.kill_replica("only")
        time.sleep(1.5)  # past the heartbeat timeout: 'only' is unhealthy, not gone

        t0 = time.monotonic()
        cluster.start_replica("joiner", 2, recover_timeout_s=30)
        got = _recovered(cluster, "joiner")

        assert all(e.kind == "fresh" for e in got)
        reasons = [e.data["reason"] for e in got]
        assert all("unhealthy" in r and "only" in r for r in reasons), reasons
        assert max(e.data["seconds"] for e in got) < 5  # an answer, not a timeout
        assert time.monotonic() - t0 < 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_coordinator(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recoveryd",
            "coordinator",
            "--bind",
            f"127.0.0.1:{port}",
            "--heartbeat-interval",
            "0.2",
            "--heartbeat-timeout",
            "2",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = CoordinatorClient(f"127.0.0.1:{port}", timeout=timedelta(seconds=1))
    end = time.monotonic() + 30
    while True:
        try:
            client.status()
            break
        except Exception:
            assert proc.poll() is None, "coordinator exited"
            assert time.monotonic() < end, "coordinator did not come up"
            time.sleep(0.1)
    client.close()
    return proc


def test_coordinator_restart_training_goes_on_and_the_next_recovery_works() -> None:
    port = _free_port()
    coord = _start_coordinator(port)
    try:
        with LocalCluster(coordinator=f"127.0.0.1:{port}", **SMALL) as cluster:
            cluster.start_replica("steady", 2)
            _recovered(cluster, "steady")
            _wait_step(cluster, "steady", 10)

            os.kill(coord.pid, signal.SIGKILL)
            coord.wait(10)
            down_at = cluster.step_of("steady")
            time.sleep(2.0)
            cluster.drain(0.1)
            assert cluster.step_of("steady") >= down_at + 20, (
                "training stalled without the coordinator"
            )

            coord = _start_coordinator(port)
            cluster.start_replica("joiner", 2)
            got = _recovered(cluster, "joiner")
            _assert_bit_identical_to_donor(cluster, got, "steady")
    finally:
        coord.kill()
        coord.wait(10)


def test_two_replicas_joining_at_once_both_recover(cluster: LocalCluster) -> None:
    cluster.start_replica("a", 2)
    cluster.start_replica("b", 2)
    _recovered(cluster, "a")
    _recovered(cluster, "b")
    _wait_step(cluster, "a", 20)
    _wait_step(cluster, "b", 20)

    # All four ranks ask at once (a barrier on the launcher's store), so both
    # rounds overlap and neither joiner can be the other's donor.
    cluster.start_replica("c", 2, join_together=("c+d", 4))
    cluster.start_replica("d", 2, join_together=("c+d", 4))
    got_c = _recovered(cluster, "c")
    got_d = _recovered(cluster, "d")

    for got in (got_c, got_d):
        [donor] = {e.data["donor"] for e in got}
        assert donor in ("a", "b")
        _assert_bit_identical_to_donor(cluster, got, donor)
        assert len({e.data["step"] for e in got}) == 1
