"""`recoveryd example-trainer` (what deploy/k8s runs in every trainer pod), as real processes.

Two "pods" on loopback, configured only by the environment the manifests set:
the second starts while the first trains, recovers its state from it, and
both then report the same loss at the same step (same state). SIGTERM stops
both cleanly, as a pod deletion does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.demo.standalone import ExampleTrainerConfig
from recoveryd.errors import ConfigError

pytestmark = pytest.mark.integration


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    c = Coordinator(
        "127.0.0.1:0",
        CoordinatorConfig(
            heartbeat_interval=timedelta(seconds=0.2),
            heartbeat_timeout=timedelta(seconds=2),
            warmup=timedelta(seconds=0.2),
        ),
    ).start()
    yield c
    c.stop()


def _pod(
    name: str, coordinator: str, log: Path, sidecar: str | None = None, model: str = "mlp"
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RECOVERYD_COORDINATOR": coordinator,
        "RECOVERYD_REPLICA_ID": name,
        "RECOVERYD_HOST": "127.0.0.1",
        "RECOVERYD_HIDDEN": "128",
        "RECOVERYD_STEP_DELAY": "0.01",
        "RECOVERYD_LABELS": "node=n1,zone=z1",
        "RECOVERYD_METRICS_PORT": "0",
        "RECOVERYD_MODEL": model,
    }
    if sidecar is not None:
        env["RECOVERYD_SIDECAR_SOCKET"] = sidecar
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "recoveryd", "example-trainer"],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = log.read_text(errors="replace")
        m = re.search(pattern, text)
        if m:
            return m.group(1)
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{text}"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {timeout_s} s:\n{log.read_text(errors='replace')}")


def _sidecar(coordinator: str, path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "recoveryd", "agent", "--coordinator", coordinator,
             "--socket", str(path), "--host", "127.0.0.1"],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.mark.parametrize("mode", ["in-process", "sidecar", "sidecar-fsdp2"])
def test_a_second_pod_recovers_from_the_first_and_both_stop_on_sigterm(
    coordinator: Coordinator, tmp_path: Path, mode: str
) -> None:
    model = "fsdp2" if mode.endswith("fsdp2") else "mlp"
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    sidecars: list[subprocess.Popen[bytes]] = []
    socks: list[str | None] = [None, None]
    if mode.startswith("sidecar"):  # what deploy/k8s/overlays/sidecar runs in each pod
        for i in range(2):
            socks[i] = str(tmp_path / f"agent-{i}.sock")
            sidecars.append(
                _sidecar(coordinator.address, Path(socks[i]), tmp_path / f"sidecar-{i}.log")
            )
    # The transfer line comes from whoever runs the agent.
    b_agent_log = tmp_path / "sidecar-1.log" if mode.startswith("sidecar") else b_log
    a = _pod("trainer-0", coordinator.address, a_log, socks[0], model)
    b: subprocess.Popen[bytes] | None = None
    try:
        assert "fresh" in _wait_for(a_log, r"trainer-0: (fresh[^\n]*) at step 0", a, 60)
        _wait_for(a_log, r"step (100) loss", a, 60)
        b = _pod("trainer-1", coordinator.address, b_log, socks[1], model)
        step = int(_wait_for(b_log, r"trainer-1: recovered at step (\d+)", b, 90))
        assert step >= 100
        # The log names the peer, the interface and the rate of the transfer.
        line = _wait_for(b_agent_log, r"(received step \d+ from 'trainer-0'[^\n]*)", b, 5)
        assert " over lo (127.0.0.1) <- 127.0.0.1:" in line
        assert line.endswith("/s")
        # Same state from there on: the same loss at the next hundred.
        at = (step // 100 + 1) * 100
        loss_b = _wait_for(b_log, rf"step {at} loss (\S+)", b, 60)
        loss_a = _wait_for(a_log, rf"step {at} loss (\S+)", a, 60)
        assert loss_a == loss_b
        client = CoordinatorClient(coordinator.address)
        status = client.status()
        client.close()
        labels = {r.replica_id: dict(r.ranks[0].labels) for r in status.replicas}
        assert labels == {"trainer-0": {"node": "n1", "zone": "z1"}} | {
            "trainer-1": {"node": "n1", "zone": "z1"}
        }
        assert {r.ranks[0].interface for r in status.replicas} == {"lo"}
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=30) for p in (a, b) if p is not None]
        for s in sidecars:
            s.send_signal(signal.SIGTERM)
        sidecar_codes = [s.wait(timeout=30) for s in sidecars]
    assert codes == [0, 0], a_log.read_text() + b_log.read_text()
    assert sidecar_codes == [0] * len(sidecars)
    # Stopped on purpose, both ranks left: nothing stays behind as unhealthy.
    client = CoordinatorClient(coordinator.address)
    try:
        assert client.status().replicas == []
    finally:
        client.close()


def test_the_environment_is_checked_with_clear_errors() -> None:
    with pytest.raises(ConfigError, match="RECOVERYD_COORDINATOR"):
        ExampleTrainerConfig.from_env({})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        ExampleTrainerConfig.from_env({"RECOVERYD_COORDINATOR": "c:1", "RECOVERYD_LABELS": "x"})
    with pytest.raises(ConfigError, match="RECOVERYD_HIDDEN"):
        ExampleTrainerConfig.from_env({"RECOVERYD_COORDINATOR": "c:1", "RECOVERYD_HIDDEN": "big"})
    with pytest.raises(ConfigError, match="device"):
        ExampleTrainerConfig.from_env({"RECOVERYD_COORDINATOR": "c:1", "RECOVERYD_DEVICE": "tpu"})
    cfg = ExampleTrainerConfig.from_env(
        {"RECOVERYD_COORDINATOR": "c:1", "HOSTNAME": "trainer-2", "RECOVERYD_LABELS": "node=a"}
    )
    assert (cfg.replica_id, cfg.labels, cfg.steps) == ("trainer-2", {"node": "a"}, 0)


def test_sigterm_while_waiting_for_an_unreachable_coordinator_exits_at_once(
    tmp_path: Path,
) -> None:
    log = tmp_path / "pod.log"
    pod = _pod("trainer-0", "127.0.0.1:1", log)  # nothing listens there
    try:
        _wait_for(log, r"(rank 0/1 of 'trainer-0')", pod, 60)  # in recover() now
        time.sleep(0.5)
        pod.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = pod.wait(timeout=20)
        assert time.monotonic() - sent < 10, "recover() held the trainer past SIGTERM"
        assert code == 128 + signal.SIGTERM
    finally:
        if pod.poll() is None:
            pod.kill()
