"""The coordinator's Prometheus metrics: real registry, real HTTP endpoint, real parser."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.protocol import Beat, MemberInfo, Report

pytestmark = pytest.mark.integration


def _member(rid: str, rank: int) -> MemberInfo:
    return MemberInfo(
        replica_id=rid,
        group_rank=rank,
        group_world_size=2,
        layout_fingerprint="L",
        rendezvous=f"127.0.0.1:{29500 + rank}",
        agent_id=f"{rid}-{rank}",
    )


def _text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _promtool_check(text: str) -> None:
    """``promtool check metrics`` on an exposition (the real linter Prometheus ships)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/tools.sh installs it as root)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def _scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = _text(address)
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _value(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for got, v in metrics.get(name, []) if all(got.get(k) == x for k, x in labels.items())
    )


def test_a_recovery_shows_in_the_coordinators_metrics() -> None:
    config = CoordinatorConfig(warmup=timedelta(0), fence_steps=2)
    coord = Coordinator("127.0.0.1:0", config, metrics_port=0, registry=CollectorRegistry())
    coord.start()
    client = CoordinatorClient(coord.address)
    try:
        assert coord.metrics_address is not None
        for rid, step in (("donor", 10), ("joiner", None)):
            for r in range(2):
                client.register(_member(rid, r), step=step)
        client.heartbeat([Beat(replica_id="donor", group_rank=r, step=10) for r in range(2)])
        plan = client.recover("joiner", 0, wait=timedelta(0))
        assert plan.state == "transfer"
        for r in range(2):
            assert client.acknowledge(plan.plan_id, "donor", r, 10)
        armed = client.recover("joiner", 0, wait=timedelta(seconds=2), joined_plan_id=plan.plan_id)
        assert armed.step == 12
        for r in range(2):
            client.report(
                Report(
                    plan_id=plan.plan_id,
                    replica_id="joiner",
                    group_rank=r,
                    role="joiner",
                    result="ok",
                    step=12,
                    bytes=1000,
                    seconds=0.5,
                    phases={"data": 0.25, "manifest": 0.01},
                )
            )
        assert (
            client.recover("joiner", 0, wait=timedelta(0), received_plan_id=plan.plan_id).state
            == "done"
        )
        time.sleep(1.5)  # the gauges are refreshed once a second

        m = _scrape(coord.metrics_address)
        _promtool_check(_text(coord.metrics_address))

        assert _value(m, "recoveryd_coordinator_heartbeats_total") == 2
        assert _value(m, "recoveryd_coordinator_donor_decisions_total", result="plan") == 1
        assert _value(m, "recoveryd_coordinator_donor_decision_seconds_count") == 1
        assert _value(m, "recoveryd_coordinator_plans_total", result="done") == 1
        assert _value(m, "recoveryd_coordinator_plans_total", result="failed") == 0
        assert _value(m, "recoveryd_recovery_bytes_total") == 2000
        assert _value(m, "recoveryd_recovery_seconds_count", phase="data") == 1
        assert _value(m, "recoveryd_recovery_seconds_sum", phase="data") == pytest.approx(0.25)
        assert _value(m, "recoveryd_recovery_seconds_count", phase="end_to_end") == 1
        assert _value(m, "recoveryd_coordinator_replicas", state="healthy") == 2
        assert _value(m, "recoveryd_coordinator_ranks", state="healthy") == 4
        assert _value(m, "recoveryd_coordinator_transfers_in_flight") == 0
        assert _value(m, "recoveryd_coordinator_replica_step", which="fastest") == 10
        assert m["recoveryd_build_info"][0][0]["version"]
        # Bounded labels only: no replica ids, steps or addresses.
        for samples in m.values():
            for labels, _ in samples:
                assert set(labels) <= {"state", "result", "phase", "which", "le", "version"}
    finally:
        client.close()
        coord.stop()


def test_agents_count_their_transfers_and_recoveries() -> None:
    import threading

    import torch

    from recoveryd.agent import Agent, AgentConfig

    coord = Coordinator(
        "127.0.0.1:0",
        CoordinatorConfig(
            warmup=timedelta(0),
            heartbeat_interval=timedelta(seconds=0.2),
            heartbeat_timeout=timedelta(seconds=2),
        ),
        registry=CollectorRegistry(),
    ).start()

    def config(rid: str, port: int | None) -> AgentConfig:
        return AgentConfig(
            coordinator=coord.address,
            replica_id=rid,
            host="127.0.0.1",
            heartbeat_interval=timedelta(seconds=0.2),
            metrics_port=port,
        )

    donor_state = {"w": torch.zeros(4096), "n": 0}
    donor = Agent(config("donor", None), lambda: donor_state)
    joiner_state = {"w": torch.empty(4096), "n": -1}
    joiner = Agent(config("joiner", 0), lambda: joiner_state)
    stop = threading.Event()

    def train() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            donor_state["w"] += 1
            donor_state["n"] = step
            donor.step(step)
            time.sleep(0.005)

    trainer = threading.Thread(target=train)
    try:
        assert donor.recover(donor_state, timeout=timedelta(seconds=10)) is None
        trainer.start()
        watcher = CoordinatorClient(coord.address)
        end = time.monotonic() + 20
        while not any(r.step for r in watcher.status().replicas if r.replica_id == "donor"):
            assert time.monotonic() < end, "the coordinator never saw the donor's step"
            time.sleep(0.05)
        watcher.close()
        got = joiner.recover(joiner_state, timeout=timedelta(seconds=30))
        assert got is not None
        assert joiner_state["n"] == got
        assert joiner.metrics_address is not None
        stop.set()
        trainer.join(10)

        j = _scrape(joiner.metrics_address)
        _promtool_check(_text(joiner.metrics_address))
        assert _value(j, "recoveryd_agent_recoveries_total", result="recovered") == 1
        assert _value(j, "recoveryd_agent_recovery_seconds_count") == 1
        assert (
            _value(j, "recoveryd_agent_transfers_total", role="joiner", backend="gloo", result="ok")
            == 1
        )
        assert _value(j, "recoveryd_agent_transfer_bytes_total", role="joiner") == 4096 * 4
        assert _value(j, "recoveryd_agent_transfer_seconds_count", role="joiner", phase="data") == 1

        from prometheus_client import generate_latest

        donor_samples = [
            s
            for f in text_string_to_metric_families(generate_latest(donor.registry).decode())
            for s in f.samples
            if s.labels.get("role") == "donor" and s.labels.get("backend") == "gloo"
        ]
        by_result = {
            s.labels["result"]: s.value
            for s in donor_samples
            if s.name == "recoveryd_agent_transfers_total"
        }
        # Every result exists from the start (at zero), so rate() sees the first one.
        assert by_result == {
            "ok": 1,
            "timeout": 0,
            "peer_lost": 0,
            "rejected": 0,
            "step_mismatch": 0,
            "untrusted": 0,
            "error": 0,
        }
        sent = [s for s in donor_samples if s.name == "recoveryd_agent_transfer_bytes_total"]
        assert [s.value for s in sent] == [4096 * 4]
    finally:
        stop.set()
        if trainer.is_alive():
            trainer.join(10)
        joiner.close()
        donor.close()
        coord.stop()
