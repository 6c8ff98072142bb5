"""The fault matrix on real links: each party in its own network namespace, faults on the router.

One coordinator (namespace ``ctl``) and two donor replicas (``a``, ``b``)
run for the whole module; each case starts the joiner replica ``c`` again (a
new incarnation, as a restarted pod would be), injects one fault with
:class:`recoveryd.testing.netlab.NetLab`, and checks the outcome from the
ranks' own events: who recovered from whom, in how many plans, and that the
bytes are the donor's. The donors train the same batches from the same
seed, so their losses at each step must stay equal whatever happened to their
links: no fault touches a donor's state (checked at the end).

Deadlines are short here (heartbeat timeout 3 s, stall 3 s, handshake 5 s)
so that each case detects in seconds; the README's matrix says what they are
at the defaults. Skipped where namespaces cannot be made (not root, no
``ip``/``nft``/``tc``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest

from recoveryd.demo.cluster import LocalCluster
from recoveryd.demo.trainer import Event
from recoveryd.testing import netlab
from recoveryd.testing.clock import faketime_env
from recoveryd.testing.netlab import NetLab

pytestmark = pytest.mark.integration

HEARTBEAT_TIMEOUT_S = 3.0
STALL_S = 3.0
EXTRA = 8 * 1024 * 1024
"""Extra state per replica: ~3.5 s over a 20 Mbit/s link."""
SLOW = 20_000_000
WAIT = timedelta(seconds=60)
ENV = {
    "RECOVERYD_STALL_TIMEOUT": str(STALL_S),
    "RECOVERYD_HANDSHAKE_TIMEOUT": "5",
    "RECOVERYD_BUCKET_BYTES": str(1024 * 1024),  # 1 MiB messages: 0.4 s each at 20 Mbit/s
}
SPEC = {
    "hidden": 64,
    "layers": 2,
    "steps": 1_000_000,
    "step_delay_s": 0.02,
    "extra_bytes": EXTRA,
    "heartbeat_interval_s": 0.5,
    "rendezvous_timeout_s": 5.0,
    "recover_timeout_s": 90.0,
}


@dataclass
class Net:
    lab: NetLab
    cluster: LocalCluster
    coordinator: str
    token_file: str
    joiners: int = 0

    def start_joiner(self, env: dict[str, str] | None = None) -> int:
        """Starts replica ``c`` again; returns its incarnation."""
        self.cluster.kill_replica("c")
        inc = self.cluster.start_replica(
            "c",
            1,
            netns=self.lab.namespace("c"),
            host=self.lab.address("c"),
            env={**ENV, **(env or {})},
        )
        self.joiners += 1
        return inc

    def outcome(self, inc: int, timeout: timedelta = WAIT) -> Event:
        [ev] = self.cluster.wait_for(
            lambda e: (
                e.replica_id == "c" and e.incarnation == inc and e.kind in ("recovered", "fresh")
            ),
            timeout=timeout,
        )
        return ev

    def donor_of_transfer(self, at_least: int = 2 * 1024 * 1024) -> str:
        """The donor whose link carries ``c``'s transfer (once ``at_least`` bytes went)."""
        end = time.monotonic() + WAIT.total_seconds()
        base = self.lab.traffic()
        while time.monotonic() < end:
            now = self.lab.traffic()
            for d in ("a", "b"):
                if now[(d, "c")] - base[(d, "c")] >= at_least:
                    return d
            time.sleep(0.02)
        raise AssertionError("no donor sent c anything")

    @contextlib.contextmanager
    def donor_links(self, bits_per_s: int) -> Iterator[None]:
        """Both donors' links capped at ``bits_per_s`` (so a transfer can be caught midway)."""
        caps = [self.lab.cap(d, bits_per_s) for d in ("a", "b")]
        try:
            yield
        finally:
            for f in caps:
                self.lab.clear(f)

    def status(self) -> str:
        """``recoveryd status``, run inside the coordinator's namespace."""
        argv = [sys.executable, "-m", "recoveryd", "status", "--coordinator", self.coordinator]
        proc = self.lab.popen(
            "ctl",
            [*argv, "--token-file", self.token_file],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=30)
        return out.decode()

    def replica_state(self, replica: str) -> str:
        for line in self.status().splitlines():
            cols = line.split()
            if cols and cols[0] == replica and len(cols) > 1:
                return cols[1]
        return "absent"

    def wait_state(self, replica: str, state: str, timeout_s: float = 30.0) -> float:
        end = time.monotonic() + timeout_s
        while (now := self.replica_state(replica)) != state:
            assert time.monotonic() < end, f"{replica} is {now}, not {state}"
            time.sleep(0.3)
        return time.monotonic()


def _sent(cluster: LocalCluster, plan_id: int) -> Event:
    [sent] = cluster.wait_for(
        lambda e: e.kind == "sent" and e.data["plan_id"] == plan_id, timeout=timedelta(seconds=30)
    )
    return sent


def _assert_donors_bytes(net: Net, ev: Event, donor: str | None = None) -> None:
    assert ev.kind == "recovered", ev.data
    if donor is not None:
        assert ev.data["donor"] == donor, ev.data
    sent = _sent(net.cluster, ev.data["plan_id"])
    assert sent.replica_id == ev.data["donor"]
    assert sent.data["result"] == "ok"
    assert ev.data["digest"] == sent.data["digest"], "the joiner's state is not the donor's"


def _steps(
    cluster: LocalCluster, replica: str, since: float, until: float = float("inf")
) -> list[int]:
    cluster.drain(0.1)
    return [
        int(e.data["step"])
        for e in cluster.events
        if e.replica_id == replica and e.kind == "progress" and since <= e.time < until
    ]


def start_coordinator(
    lab: NetLab, tmp: str, *flags: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    """The coordinator in namespace ``ctl``, with a token of its own in ``tmp`` and the
    matrix's short deadlines (``flags``: more of its options), once it serves; returns
    it, its address and the token file."""
    token_file = os.path.join(tmp, "token")
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    address = f"{lab.address('ctl')}:29400"
    log_path = os.path.join(tmp, "coordinator.log")
    argv = [sys.executable, "-m", "recoveryd", "--log-level", "INFO", "coordinator"]
    argv += ["--bind", address, "--token-file", token_file, "--heartbeat-interval", "0.5"]
    argv += ["--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--transfer-timeout", "60"]
    argv += ["--warmup", "1", "--metrics-port", "-1", *flags]
    with open(log_path, "wb") as log:
        coord = lab.popen("ctl", argv, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 60
    while True:
        with open(log_path, "rb") as f:
            logged = f.read().decode(errors="replace")
        if "serving on" in logged:
            return coord, address, token_file
        if coord.poll() is not None or time.monotonic() > end:
            stop_coordinator(coord)
            raise AssertionError(f"the coordinator did not start:\n{logged[-2000:]}")
        time.sleep(0.1)


def stop_coordinator(coord: subprocess.Popen[bytes]) -> None:
    coord.terminate()
    try:
        coord.wait(15)
    except subprocess.TimeoutExpired:
        coord.kill()
        coord.wait(5)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    why = netlab.unavailable()
    if why is not None:
        pytest.skip(why)
    lab = NetLab(["ctl", "a", "b", "c"])
    tmp = tempfile.mkdtemp(prefix="recoveryd-netlab-")
    coord = None
    cluster = None
    try:
        coord, address, token_file = start_coordinator(lab, tmp)
        cluster = LocalCluster(coordinator=address, token_file=token_file, **SPEC)
        for d in ("a", "b"):
            cluster.start_replica(d, 1, netns=lab.namespace(d), host=lab.address(d), env=ENV)
        for d in ("a", "b"):
            cluster.wait_for(
                lambda e, d=d: e.replica_id == d and e.kind in ("fresh", "recovered"), timeout=WAIT
            )
        yield Net(lab, cluster, address, token_file)
        _assert_donors_untouched(cluster)
    finally:
        if cluster is not None:
            cluster.close()
        if coord is not None:
            stop_coordinator(coord)
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _assert_donors_untouched(cluster: LocalCluster) -> None:
    """The donors trained the same batches from the same seed: equal losses at every step."""
    cluster.drain(0.1)
    losses: dict[str, dict[int, float]] = {"a": {}, "b": {}}
    for e in cluster.events:
        if e.kind == "progress" and e.replica_id in losses:
            losses[e.replica_id][int(e.data["step"])] = float(e.data["loss"])
    common = sorted(set(losses["a"]) & set(losses["b"]))
    assert len(common) > 10, f"too few common steps to compare: {common}"
    assert all(losses["a"][s] == losses["b"][s] for s in common)


def test_donor_blackholed_mid_transfer_is_replanned_onto_the_other_donor(net: Net) -> None:
    with net.donor_links(SLOW):
        inc = net.start_joiner()
        donor = net.donor_of_transfer()
        t0 = time.time()
        fault = net.lab.blackhole(donor)
        ev = net.outcome(inc)
        net.lab.clear(fault)
        other = "b" if donor == "a" else "a"
        _assert_donors_bytes(net, ev, other)
        assert ev.data["attempts"] >= 2
        print(f"MATRIX donor blackholed mid-transfer: recovered {ev.time - t0:.1f} s after")
        net.wait_state(donor, "healthy")  # back after the link heals


def test_donor_reset_mid_transfer_is_replanned(net: Net) -> None:
    with net.donor_links(SLOW):
        inc = net.start_joiner()
        donor = net.donor_of_transfer()
        t0 = time.time()
        fault = net.lab.reset(donor, "c")
        ev = net.outcome(inc)
        net.lab.clear(fault)
        _assert_donors_bytes(net, ev, "b" if donor == "a" else "a")
        assert ev.data["attempts"] >= 2
        assert ev.time - t0 < STALL_S + 10, "detection is bounded by the stall timeout"
        print(f"MATRIX donor link reset mid-transfer: recovered {ev.time - t0:.1f} s after")


def test_donor_blackholed_before_the_fence(net: Net) -> None:
    with net.donor_links(SLOW):
        inc = net.start_joiner()
        # The joiner reaches the donor's store first (a few KiB), the data after the fence.
        base = net.lab.traffic()
        end = time.monotonic() + WAIT.total_seconds()
        donor = ""
        while not donor:
            now = net.lab.traffic()
            donor = next((d for d in ("a", "b") if now[("c", d)] > base[("c", d)]), "")
            assert time.monotonic() < end, "the joiner never reached a donor"
            time.sleep(0.005)
        t0 = time.time()
        fault = net.lab.blackhole(donor)
        sent_before = net.lab.traffic()[(donor, "c")] - base[(donor, "c")]
        ev = net.outcome(inc)
        net.lab.clear(fault)
        _assert_donors_bytes(net, ev, "b" if donor == "a" else "a")
        print(
            f"MATRIX donor blackholed before the fence ({sent_before} bytes had gone): "
            f"recovered {ev.time - t0:.1f} s after"
        )
        net.wait_state(donor, "healthy")


def test_donor_blackholed_after_the_data(net: Net) -> None:
    inc = net.start_joiner()
    donor = net.donor_of_transfer(at_least=EXTRA)
    t0 = time.time()
    fault = net.lab.blackhole(donor)
    try:
        ev = net.outcome(inc)
    finally:
        net.lab.clear(fault)
    _assert_donors_bytes(net, ev, donor)  # every byte had come: no re-plan
    assert ev.data["attempts"] == 1
    print(f"MATRIX donor blackholed after the data: recovered {ev.time - t0:.1f} s after")
    net.wait_state(donor, "healthy")


def test_joiner_blackholed_mid_transfer_frees_the_donor(net: Net) -> None:
    with net.donor_links(SLOW):
        inc = net.start_joiner()
        donor = net.donor_of_transfer()
        t0 = time.time()
        fault = net.lab.blackhole("c", max_s=STALL_S + 5)
        time.sleep(STALL_S + 4)
        healed = time.time()
        net.lab.clear(fault)
        net.cluster.drain(0.1)
        # The donor's step() sent; it is held by the cut-off joiner for the stall bound at most.
        steps = _steps(net.cluster, donor, since=t0 + STALL_S + 1.5, until=healed)
        seen = [
            (round(e.time - t0, 1), e.kind, e.data.get("step"))
            for e in net.cluster.events
            if e.replica_id == donor and e.time >= t0 - 1
        ]
        assert steps, f"{donor} did not train on while its joiner was cut off: {seen}"
        ev = net.outcome(inc)
        _assert_donors_bytes(net, ev)
        assert ev.data["attempts"] >= 2
        print(
            f"MATRIX joiner blackholed mid-transfer for {STALL_S + 4:g} s: donor training at "
            f"step {max(steps)}; recovered {ev.time - t0:.1f} s after the fault"
        )


def test_agents_partitioned_from_the_coordinator_train_on_and_recover_when_it_heals(
    net: Net,
) -> None:
    cut = [net.lab.blackhole("c", "ctl"), net.lab.blackhole("a", "ctl")]
    try:
        _partitioned(net, cut)
    finally:
        for f in cut:
            net.lab.clear(f)


def _partitioned(net: Net, cut: list[netlab.Fault]) -> None:
    t0 = time.time()
    inc = net.start_joiner()
    time.sleep(6)
    net.cluster.drain(0.1)
    assert not [
        e
        for e in net.cluster.events
        if e.replica_id == "c" and e.incarnation == inc and e.kind in ("recovered", "fresh")
    ], "the joiner decided without its coordinator"
    assert _steps(net.cluster, "a", since=t0 + 2), "a stopped training while cut off"
    healed = time.time()
    for f in cut:
        net.lab.clear(f)
    ev = net.outcome(inc)
    _assert_donors_bytes(net, ev)
    print(
        f"MATRIX agents partitioned from the coordinator: recovered {ev.time - healed:.1f} s after it healed"
    )
    net.wait_state("a", "healthy")


def test_coordinator_partitioned_from_one_donor_plans_the_other(net: Net) -> None:
    cut = net.lab.blackhole("a", "ctl")
    try:
        t0 = time.monotonic()
        net.wait_state("a", "unhealthy", timeout_s=HEARTBEAT_TIMEOUT_S + 10)
        detected = time.monotonic() - t0
        inc = net.start_joiner()
        ev = net.outcome(inc)
        _assert_donors_bytes(net, ev, "b")
        assert ev.data["attempts"] == 1
    finally:
        net.lab.clear(cut)
    print(f"MATRIX coordinator cut from a donor: unhealthy after {detected:.1f} s")
    net.wait_state("a", "healthy")


def test_lossy_slow_link_completes_within_its_deadline(net: Net) -> None:
    faults = [net.lab.loss("c", 5), net.lab.delay("c", 50, jitter_ms=10)]
    try:
        inc = net.start_joiner()
        ev = net.outcome(inc)
    finally:
        for f in faults:
            net.lab.clear(f)
    _assert_donors_bytes(net, ev)
    assert ev.data["attempts"] == 1, "a lossy link is slow, not dead: no re-plan"
    assert ev.data["phases"]["handshake"] >= 0.09, "a handshake round trip took < 2 x 50 ms"
    print(
        f"MATRIX 5% loss + 50 ms delay: recovered in {ev.data['seconds']:.1f} s "
        f"(phases {ev.data['phases']})"
    )


def test_transfer_time_scales_with_a_capped_link(net: Net) -> None:
    rate = 50_000_000
    with net.donor_links(rate):
        inc = net.start_joiner()
        ev = net.outcome(inc)
    _assert_donors_bytes(net, ev)
    assert ev.data["attempts"] == 1
    floor = ev.data["bytes"] * 8 / rate
    data_s = ev.data["phases"]["data"]
    assert data_s >= 0.8 * floor, (data_s, floor)
    print(f"MATRIX 50 Mbit/s donor links: data {data_s:.2f} s, link floor {floor:.2f} s")


def test_clock_skewed_by_minutes_on_one_agent(net: Net) -> None:
    env = faketime_env(+300, monotonic=True)
    if env is None:
        pytest.skip("libfaketime is not installed (scripts/tools.sh installs it)")
    inc = net.start_joiner(env=env)
    ev = net.outcome(inc)
    _assert_donors_bytes(net, ev)
    assert ev.data["attempts"] == 1
    step = ev.data["step"]
    net.wait_state("c", "healthy")
    # The skewed process's own clock says so (the preload took).
    assert any(
        e.replica_id == "c" and e.incarnation == inc and e.time > time.time() + 200
        for e in net.cluster.events
    ), "the joiner's clock was not skewed"
    print(f"MATRIX clock +5 min on the joiner: recovered step {step}, healthy")


def test_one_way_partition_coordinator_to_donor(net: Net) -> None:
    """The donor's heartbeats still arrive; the coordinator's answers and orders do not."""
    cut = net.lab.blackhole("ctl", "a", both_ways=False)
    try:
        time.sleep(HEARTBEAT_TIMEOUT_S + 1)
        t0 = time.time()
        inc = net.start_joiner()
        ev = net.outcome(inc)
        _assert_donors_bytes(net, ev, "b")  # a's heartbeats did not keep it a donor
        assert ev.data["attempts"] == 1
    finally:
        net.lab.clear(cut)
    print(
        f"MATRIX one-way ctl->a: recovered from {ev.data['donor']} in {ev.time - t0:.1f} s "
        f"({ev.data['attempts']} plan(s))"
    )
    net.wait_state("a", "healthy")


_STORE_HOST = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
s = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
print(s.port, flush=True)
time.sleep(120)
"""


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rpartition(")")[2].split()[0]


def test_reads_of_a_silent_donor_store_end_at_their_bound() -> None:
    """A TCPStore read on a peer that stops answering (here: SIGSTOPped) has no deadline of
    its own; the joiner's bounded reads give up after theirs (no namespaces needed)."""
    import signal

    from recoveryd.agent.rendezvous import bounded, connect_store, read_go
    from recoveryd.errors import TransferTimeoutError

    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST], stdout=subprocess.PIPE)
    try:
        assert host.stdout is not None
        port = int(host.stdout.readline())
        store = connect_store(f"127.0.0.1:{port}", timeout=timedelta(seconds=5))
        assert read_go(store, "p", b"", timeout=timedelta(seconds=5)) == "unset"
        os.kill(host.pid, signal.SIGSTOP)
        end = time.monotonic() + 10
        while _proc_state(host.pid) != "T":  # the signal lands when it is next scheduled
            assert time.monotonic() < end, "the store host did not stop"
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError, match="no answer within 1 s"):
            read_go(store, "p", b"", timeout=timedelta(seconds=1))
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        with pytest.raises(TransferTimeoutError):
            bounded(
                lambda: connect_store(f"127.0.0.1:{port}", timeout=timedelta(seconds=30)),
                timedelta(seconds=1),
                "connecting",
            )
        assert time.monotonic() - t0 < 3
    finally:
        host.kill()
        host.wait(10)
