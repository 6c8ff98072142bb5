"""A striped plan on real links: one of its two donors blackholed midway (no reset).

The coordinator (``--max-donors 2``) and the replicas each run in a network
namespace of their own (:class:`recoveryd.testing.netlab.NetLab`). Donors
``a`` and ``b`` park at one step, as replicas of a data-parallel job stand
together; the joiner ``c`` pulls half of its state from each over links capped
at 20 Mbit/s, and ``b``'s link goes silent midway. Nothing resets: the watch
on ``b``'s store hears nothing either, so the stall bound ends the wait on
``b``, and ``a`` sends what ``b`` did not, in the same plan. Skipped where
namespaces cannot be made.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import timedelta

import pytest

from recoveryd.demo.cluster import LocalCluster
from recoveryd.testing import netlab
from recoveryd.testing.netlab import NetLab
from tests.integration.test_network_faults import (
    ENV,
    SLOW,
    SPEC,
    WAIT,
    start_coordinator,
    stop_coordinator,
)

pytestmark = pytest.mark.integration


def test_a_striped_donor_blackholed_midway_costs_only_its_part() -> None:
    why = netlab.unavailable()
    if why is not None:
        pytest.skip(why)
    lab = NetLab(["ctl", "a", "b", "c"])
    tmp = tempfile.mkdtemp(prefix="recoveryd-netlab-")
    coord = None
    cluster = None
    try:
        coord, address, token_file = start_coordinator(lab, tmp, "--max-donors", "2")
        cluster = LocalCluster(coordinator=address, token_file=token_file, **SPEC)

        def start(replica: str) -> None:
            assert cluster is not None
            cluster.start_replica(
                replica, 1, netns=lab.namespace(replica), host=lab.address(replica), env=ENV,
                hold_at=5,
            )  # fmt: skip
            cluster.wait_for(
                lambda e: e.replica_id == replica and e.kind in ("fresh", "recovered"),
                timeout=WAIT,
            )

        start("a")
        start("b")  # from 'a', parked at its step: both hold step 5 now
        caps = [lab.cap(d, SLOW) for d in ("a", "b")]
        base = lab.traffic()
        cluster.start_replica("c", 1, netns=lab.namespace("c"), host=lab.address("c"), env=ENV)
        end = time.monotonic() + WAIT.total_seconds()
        while lab.traffic()[("b", "c")] - base[("b", "c")] < 1 << 20:  # 1 MiB of b's part
            assert time.monotonic() < end, "b never sent c anything"
            time.sleep(0.02)
        assert lab.traffic()[("a", "c")] - base[("a", "c")] > 0  # both donors are sending
        t0 = time.time()
        fault = lab.blackhole("b")
        [ev] = cluster.wait_for(
            lambda e: e.replica_id == "c" and e.kind in ("recovered", "fresh"), timeout=WAIT
        )
        lab.clear(fault)
        for f in caps:
            lab.clear(f)

        assert ev.kind == "recovered", ev.data
        assert ev.data["attempts"] == 1, ev.data  # the same plan: resumed, not restarted
        assert ev.data["step"] == 5
        [sent] = cluster.wait_for(
            lambda e: e.kind == "sent" and e.replica_id == "a"
            and e.data["plan_id"] == ev.data["plan_id"],
            timeout=timedelta(seconds=30),
        )  # fmt: skip
        assert sent.data["digest"] == ev.data["digest"], "the joiner's state is not the donors'"
        # The stall bound (3 s) ended the wait on b, then a sent the rest of its part.
        took = ev.time - t0
        assert took < 20, took
        print(f"MATRIX striped donor blackholed midway: recovered {took:.1f} s after, one plan")
    finally:
        if cluster is not None:
            cluster.close()
        if coord is not None:
            stop_coordinator(coord)
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
