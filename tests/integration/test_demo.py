"""`recoveryd demo`, the README's main command, end to end (smaller, to keep CI fast)."""

from __future__ import annotations

import io
import json

import psutil
import pytest

from recoveryd.demo.run import DemoConfig, run_demo

pytestmark = pytest.mark.integration


def test_demo_recovers_bit_for_bit_and_leaves_nothing_behind() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = io.StringIO()

    rc = run_demo(DemoConfig(steps=150, kill_at=30, hidden=128), out=out, as_json=True)

    summary = json.loads(out.getvalue())
    assert rc == 0, summary
    assert summary["passed"] is True
    assert [c["ok"] for c in summary["checks"]] == [True] * len(summary["checks"])
    assert len(summary["checks"]) == 4  # recovered, two ranks bit for bit, all replicas equal
    assert summary["recovered_step"] > summary["killed_at_step"]
    assert 0 < summary["recover_seconds"] < 30
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert [p.cmdline() for p in left if "resource_tracker" not in " ".join(p.cmdline())] == []


def test_demo_in_sidecar_mode_recovers_through_the_surviving_sidecars() -> None:
    out = io.StringIO()

    rc = run_demo(
        DemoConfig(steps=150, kill_at=30, hidden=128, sidecars=True), out=out, as_json=True
    )

    summary = json.loads(out.getvalue())
    assert rc == 0, summary
    assert [c["ok"] for c in summary["checks"]] == [True] * 4
    assert summary["recovered_step"] > summary["killed_at_step"]


@pytest.mark.parametrize("sidecars", [False, True], ids=["in_process", "sidecar"])
def test_demo_with_fsdp2_recovers_every_dtensor_shard_bit_for_bit(sidecars: bool) -> None:
    out = io.StringIO()

    rc = run_demo(
        DemoConfig(replicas=2, steps=150, kill_at=30, hidden=128, model="fsdp2", sidecars=sidecars),
        out=out,
        as_json=True,
    )

    summary = json.loads(out.getvalue())
    assert rc == 0, summary
    # Recovered on every rank, each rank's shards and optimizer state equal to what
    # its donor rank sent, and both replicas identical after training on.
    assert [c["ok"] for c in summary["checks"]] == [True] * 4
    assert summary["recovered_step"] > summary["killed_at_step"]
