"""Trust on the control plane, against a real coordinator on 127.0.0.1 and real channels.

Each test plays an attack that worked before the coordinator checked
credentials and rank secrets (issue 12): a caller without the job's token or
certificate, a certificate naming another replica, and, inside the job, a
caller acting for a rank it does not hold (re-registering it, acknowledging,
reporting, heartbeating or watching for it). Certificates are made per test
with trustme; nothing secret is committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recoveryd.agent.client import CoordinatorClient
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.coordinator.service import MAX_BEATS
from recoveryd.credentials import Credentials
from recoveryd.errors import (
    AuthenticationError,
    ConfigError,
    CoordinatorUnavailableError,
    LimitExceededError,
    PermissionDeniedError,
    RecoverydError,
    UnknownMemberError,
)
from recoveryd.protocol import Beat, MemberInfo, Report
from recoveryd.v1 import coordinator_pb2 as pb
from recoveryd.v1 import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

_T = timedelta(seconds=5)
_TOKEN = "job-token-" + "a" * 32
_CONFIG = CoordinatorConfig(
    heartbeat_timeout=timedelta(seconds=30), warmup=timedelta(0), fence_steps=2
)
_REPO = Path(__file__).resolve().parents[2]


def _info(replica_id: str, group_rank: int, *, world: int = 2, **kw: object) -> MemberInfo:
    fields: dict[str, object] = {
        "rendezvous": f"127.0.0.1:{29500 + group_rank}",
        "agent_id": f"{replica_id}-{group_rank}",
        **kw,
    }
    return MemberInfo(
        replica_id=replica_id,
        group_rank=group_rank,
        group_world_size=world,
        layout_fingerprint="L",
        **fields,  # type: ignore[arg-type]
    )


def _register(client: CoordinatorClient, replica_id: str, *, step: int | None) -> None:
    for r in range(2):
        client.register(_info(replica_id, r), step=step)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(_TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def coordinator(token_file: Path) -> Iterator[Coordinator]:
    coord = Coordinator(
        "127.0.0.1:0", _CONFIG, credentials=Credentials(token_file=str(token_file))
    ).start(timeout=timedelta(seconds=10))
    try:
        yield coord
    finally:
        coord.stop(grace=timedelta(seconds=0.2))


def _client(coord: Coordinator, token_file: Path | None) -> CoordinatorClient:
    creds = Credentials(token_file=str(token_file)) if token_file else Credentials()
    return CoordinatorClient(coord.address, timeout=_T, credentials=creds)


@pytest.fixture
def job(coordinator: Coordinator, token_file: Path) -> Iterator[CoordinatorClient]:
    """The job's honest agents (one client per test: it holds the ranks' secrets)."""
    c = _client(coordinator, token_file)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def insider(coordinator: Coordinator, token_file: Path) -> Iterator[CoordinatorClient]:
    """Code inside the job: it has the job's token, but holds no rank's secret."""
    c = _client(coordinator, token_file)
    try:
        yield c
    finally:
        c.close()


# ---- the job's token ---------------------------------------------------------------


def test_a_caller_without_the_token_is_refused_unauthenticated(coordinator: Coordinator) -> None:
    with grpc.insecure_channel(coordinator.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        fake_donor = pb.RegisterRequest(member=pb.Member(replica_id="evil", group_world_size=1))
        for metadata in [(), (("authorization", "Bearer wrong-token-of-good-length"),)]:
            with pytest.raises(grpc.RpcError) as exc:
                stub.Register(fake_donor, timeout=5, metadata=metadata)
            assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "no valid token" in (exc.value.details() or "")
        with pytest.raises(grpc.RpcError) as exc:
            stub.GetStatus(pb.StatusRequest(), timeout=5)
        assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
        watch = stub.Watch(pb.WatchRequest(replica_id="a"), timeout=5)
        with pytest.raises(grpc.RpcError) as exc:
            next(iter(watch))
        assert exc.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # Health stays open: probes carry no credentials, and it says nothing about the job.
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert coordinator.call(lambda s: s.members.counts()) == (0, 0)


def test_the_client_maps_a_refused_token_to_authentication_error(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("b" * 40)
    for client in (_client(coordinator, None), _client(coordinator, wrong)):
        try:
            with pytest.raises(AuthenticationError, match="refused this process's credentials"):
                client.register(_info("a", 0), step=None)
        finally:
            client.close()


def test_a_token_rotates_by_adding_the_new_one_then_removing_the_old(
    coordinator: Coordinator, token_file: Path, tmp_path: Path
) -> None:
    new = "job-token-" + "n" * 32
    old_file = tmp_path / "old"  # an agent not rolled yet: it keeps sending the old token
    old_file.write_text(_TOKEN)
    old_client = _client(coordinator, old_file)
    new_file = tmp_path / "new"
    new_file.write_text(new)
    new_client = _client(coordinator, new_file)
    try:
        old_client.register(_info("a", 0), step=None)
        with pytest.raises(AuthenticationError):
            new_client.register(_info("b", 0), step=None)
        time.sleep(1.1)  # files are looked at again once a second at most
        token_file.write_text(f"{_TOKEN}\n{new}\n")  # step 1: both accepted
        _eventually(lambda: new_client.register(_info("b", 0), step=None))
        old_client.status()
        time.sleep(1.1)
        token_file.write_text(f"{new}\n")  # step 3: the old one is gone
        _eventually(lambda: _refused(old_client))
        new_client.status()
    finally:
        old_client.close()
        new_client.close()


def _refused(client: CoordinatorClient) -> None:
    with pytest.raises(AuthenticationError):
        client.status()


def _eventually(fn: object, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            fn()  # type: ignore[operator]
            return
        except (AuthenticationError, AssertionError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_token_file_that_is_too_weak_is_a_config_error(tmp_path: Path) -> None:
    weak = tmp_path / "weak"
    weak.write_text("secret\n")
    with pytest.raises(ConfigError, match=r"printable characters without spaces"):
        Credentials(token_file=str(weak))
    with pytest.raises(ConfigError, match="cannot be read"):
        Credentials(token_file=str(tmp_path / "missing"))


# ---- exposure ---------------------------------------------------------------------


def test_a_coordinator_beyond_loopback_without_credentials_refuses_to_start(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="--insecure"):
        Coordinator("0.0.0.0:0", _CONFIG)
    # A server certificate alone encrypts but says nothing of who calls.
    pki = _Pki(tmp_path)
    cert, key = pki.issue("127.0.0.1")
    with pytest.raises(ConfigError, match="a server certificate alone encrypts"):
        Coordinator("0.0.0.0:0", _CONFIG, credentials=Credentials(tls_cert=cert, tls_key=key))
    coord = Coordinator("0.0.0.0:0", _CONFIG, insecure=True).start(timeout=timedelta(seconds=10))
    coord.stop(grace=timedelta(seconds=0.1))


def test_the_cli_says_why_it_will_not_serve_without_credentials() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "recoveryd", "coordinator", "--bind", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=_REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("RECOVERYD_")},
    )
    assert r.returncode == 1
    assert "lets anyone who reaches the port steer every replica's recovery" in r.stderr
    assert "--token-file" in r.stderr
    assert "--insecure" in r.stderr


# ---- rank secrets -----------------------------------------------------------------


def test_a_live_rank_cannot_be_registered_over_and_keeps_its_own_leave(
    job: CoordinatorClient, insider: CoordinatorClient
) -> None:
    _register(job, "victim", step=5)
    with pytest.raises(PermissionDeniedError, match="held by a live registration"):
        insider.register(_info("victim", 0, labels={"evil": "1"}), step=10**9)
    assert job.leave("victim", 0, "victim-0")  # the real agent's Leave still works


def test_a_caller_cannot_act_for_a_rank_it_does_not_hold(
    coordinator: Coordinator, job: CoordinatorClient, insider: CoordinatorClient
) -> None:
    _register(job, "donor", step=10)
    _register(job, "joiner", step=None)
    answer = job.recover("joiner", 0, wait=timedelta(0))
    assert answer.state == "transfer"
    plan_id = answer.plan_id
    # A forged acknowledgement at step 10**12 would arm a plan that never fires.
    with pytest.raises(PermissionDeniedError):
        insider.acknowledge(plan_id, "donor", 0, 10**12)
    # A forged joiner "ok" would mark the plan done with nothing sent; a forged
    # failure would exclude the only donor.
    for result in ("ok", "peer_lost"):
        with pytest.raises(PermissionDeniedError):
            insider.report(
                Report(
                    plan_id=plan_id, replica_id="joiner", group_rank=0, role="joiner", result=result
                )
            )
    # Spoofed unhealthy beats would make a joiner start from scratch.
    with pytest.raises(PermissionDeniedError):
        insider.heartbeat([Beat(replica_id="donor", group_rank=0, step=10, healthy=False)])
    # Recovering as the healthy replica would hand its state to the caller.
    with pytest.raises(PermissionDeniedError):
        insider.recover("donor", 0, wait=timedelta(0))
    # Watching for the donor would take its orders.
    orders, cancel = insider.watch("donor", 0)
    with pytest.raises(PermissionDeniedError):
        next(orders)
    cancel()
    status = job.status()
    assert all(r.healthy for rep in status.replicas if rep.replica_id == "donor" for r in rep.ranks)
    plan = status.active[0]
    assert (plan.plan_id, plan.state, plan.ranks_done) == (plan_id, "preparing", 0)
    # Unknown ranks are not a way around it either: they are told to register.
    with pytest.raises(UnknownMemberError):
        insider.recover("nobody", 0, wait=timedelta(0))


def test_a_rank_is_taken_over_with_its_secret_or_once_its_holder_is_silent(
    coordinator: Coordinator, token_file: Path
) -> None:
    quick = CoordinatorConfig(
        heartbeat_interval=timedelta(seconds=0.2),
        heartbeat_timeout=timedelta(seconds=0.6),
        warmup=timedelta(0),
    )
    coord = Coordinator("127.0.0.1:0", quick, credentials=Credentials(token_file=str(token_file)))
    coord.start(timeout=timedelta(seconds=10))
    old, new = _client(coord, token_file), _client(coord, token_file)
    try:
        old.register(_info("r", 0), step=1)
        old.register(_info("r", 1), step=1)
        with pytest.raises(PermissionDeniedError):
            new.register(_info("r", 0), step=None)
        # A holder that says it is unhealthy (its trainer died under a sidecar) does
        # not open the rank to anyone: a squatter would race the trainer's restart.
        old.heartbeat([Beat(replica_id="r", group_rank=0, step=1, healthy=False)])
        with pytest.raises(PermissionDeniedError):
            new.register(_info("r", 0), step=None)
        time.sleep(0.8)
        new.register(_info("r", 0), step=None)  # its holder fell silent
        new.register(_info("r", 1), step=None)
        with pytest.raises(PermissionDeniedError):  # the old holder now holds nothing
            old.heartbeat([Beat(replica_id="r", group_rank=1, step=1)])
        # Whoever holds the secret replaces a live registration at once (a restarted agent).
        kept = new.secret("r", 1)
        third = _client(coord, token_file)
        third.hold("r", 1, kept)
        third.register(_info("r", 1), step=None)
        with pytest.raises(PermissionDeniedError):
            new.heartbeat([Beat(replica_id="r", group_rank=1, step=None)])
        third.close()
    finally:
        old.close()
        new.close()
        coord.stop(grace=timedelta(seconds=0.1))


def test_status_does_not_show_an_agents_error_text(
    job: CoordinatorClient, insider: CoordinatorClient
) -> None:
    _register(job, "donor", step=10)
    _register(job, "joiner", step=None)
    plan_id = job.recover("joiner", 0, wait=timedelta(0)).plan_id
    secret = "state mismatch at model.layers.0.weight: shape [4096, 4096]"
    job.report(
        Report(
            plan_id=plan_id,
            replica_id="joiner",
            group_rank=0,
            role="joiner",
            result="rejected",
            message=secret,
        )
    )
    plan = next(p for p in insider.status().recent if p.plan_id == plan_id)
    assert plan.reason == "joiner rank 0 ('joiner'): rejected"
    assert "model.layers" not in repr(insider.status())


# ---- bounds -------------------------------------------------------------------------


def test_what_a_registration_may_carry_is_bounded(job: CoordinatorClient) -> None:
    cases = [
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "at most 32 labels"),
        ({"labels": {"k": "v" * 300}}, "at most 253 characters"),
        ({"rendezvous": "127.0.0.1:1\nINFO forged log line"}, "printable, without spaces"),
    ]
    for extra, why in cases:
        with pytest.raises(ConfigError, match=why):
            _info("a", 0, **extra)
    # The same, sent past the client's own checks, is refused by the coordinator.
    with grpc.insecure_channel(job.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        member = pb.Member(
            replica_id="a",
            group_world_size=1,
            layout_fingerprint="L",
            device_kind="cpu",
            rendezvous="127.0.0.1:1\nforged",
        )
        with pytest.raises(grpc.RpcError) as exc:
            stub.Register(
                pb.RegisterRequest(member=member),
                timeout=5,
                metadata=(("authorization", f"Bearer {_TOKEN}"),),
            )
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        huge = pb.Member(replica_id="a", group_world_size=1, labels={"k": "v" * (2 << 20)})
        with pytest.raises(grpc.RpcError) as exc:
            stub.Register(
                pb.RegisterRequest(member=huge),
                timeout=5,
                metadata=(("authorization", f"Bearer {_TOKEN}"),),
            )
        assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_beats_per_call_replicas_and_ranks_are_capped(token_file: Path) -> None:
    small = CoordinatorConfig(max_replicas=3, max_ranks=5, warmup=timedelta(0))
    coord = Coordinator("127.0.0.1:0", small, credentials=Credentials(token_file=str(token_file)))
    coord.start(timeout=timedelta(seconds=10))
    client = _client(coord, token_file)
    try:
        _register(client, "a", step=None)
        for r in range(2):
            client.register(_info("b", r, world=3), step=None)
        client.register(_info("c", 0), step=None)  # 3 replicas, 5 ranks
        with pytest.raises(RecoverydError, match=r"RESOURCE_EXHAUSTED.*max_replicas"):
            client.register(_info("d", 0), step=None)
        with pytest.raises(RecoverydError, match=r"RESOURCE_EXHAUSTED.*max_ranks"):
            client.register(_info("b", 2, world=3), step=None)
        client.register(_info("c", 0), step=None)  # a registered rank registers again freely
        beats = [Beat(replica_id="a", group_rank=0, step=1)] * (MAX_BEATS + 1)
        with pytest.raises(RecoverydError, match=r"RESOURCE_EXHAUSTED.*beats in one call"):
            client.heartbeat(beats)
        assert coord.call(lambda s: s.members.counts()) == (3, 5)
    finally:
        client.close()
        coord.stop(grace=timedelta(seconds=0.1))


def test_status_comes_in_pages_and_the_client_reads_them_all(
    job: CoordinatorClient, coordinator: Coordinator
) -> None:
    n = 620  # over one page of 500
    for i in range(n):
        job.register(_info(f"r{i:04d}", 0, world=1), step=i)
    first = pb_grpc.CoordinatorStub(job._channel).GetStatus(pb.StatusRequest(), timeout=10)
    assert len(first.replicas) == 500
    assert first.next_page_token == "r0499"
    status = job.status()
    assert [r.replica_id for r in status.replicas] == [f"r{i:04d}" for i in range(n)]
    assert status.next_page_token == ""


def test_limit_errors_name_the_limit() -> None:
    err = LimitExceededError("max_ranks", 6, 5)
    assert str(err).startswith("max_ranks: 6 is over the limit of 5 (max_ranks)")


# ---- mutual TLS ---------------------------------------------------------------------


class _Pki:
    """A job's CA, and certificates of it written to files."""

    def __init__(self, tmp_path: Path, ca: trustme.CA | None = None) -> None:
        self.dir = tmp_path
        self.ca = ca or trustme.CA()
        self.ca_file = tmp_path / f"ca-{id(self.ca)}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, *names: str) -> tuple[str, str]:
        leaf = self.ca.issue_cert(*names)
        cert, key = self.dir / f"{names[0]}-{id(leaf)}.pem", self.dir / f"{names[0]}-{id(leaf)}.key"
        for i, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(str(cert), append=i > 0)
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    def client(self, address: str, *names: str, ca: str | None = None) -> CoordinatorClient:
        cert, key = self.issue(*names) if names else ("", "")
        creds = Credentials(tls_cert=cert, tls_key=key, tls_ca=ca or str(self.ca_file))
        return CoordinatorClient(address, timeout=_T, credentials=creds)


@pytest.fixture
def pki(tmp_path: Path) -> _Pki:
    return _Pki(tmp_path)


@pytest.fixture
def tls_coordinator(pki: _Pki) -> Iterator[Coordinator]:
    cert, key = pki.issue("127.0.0.1", "localhost")
    creds = Credentials(tls_cert=cert, tls_key=key, tls_ca=str(pki.ca_file))
    coord = Coordinator("127.0.0.1:0", _CONFIG, credentials=creds, health_port=0)
    coord.start(timeout=timedelta(seconds=10))
    try:
        yield coord
    finally:
        coord.stop(grace=timedelta(seconds=0.2))


def test_a_client_certificate_acts_for_the_replica_it_names(
    pki: _Pki, tls_coordinator: Coordinator
) -> None:
    a = pki.client(tls_coordinator.address, "replica-a")
    try:
        a.register(_info("replica-a", 0), step=3)
        # Credentials that can never act for the replica: a refusal the agent does
        # not wait out (its joiner raises at once).
        with pytest.raises(
            AuthenticationError, match=r"names \['replica-a'\], not replica 'replica-b'"
        ):
            a.register(_info("replica-b", 0), step=3)
        assert [r.replica_id for r in a.status().replicas] == ["replica-a"]
    finally:
        a.close()
    operator = pki.client(tls_coordinator.address, "operator")  # status needs no replica
    try:
        assert len(operator.status().replicas) == 1
    finally:
        operator.close()


def test_a_client_without_a_certificate_of_the_job_ca_cannot_call(
    pki: _Pki, tls_coordinator: Coordinator, tmp_path: Path
) -> None:
    (tmp_path / "other").mkdir()
    stranger = _Pki(tmp_path / "other")
    clients = [
        pki.client(tls_coordinator.address),  # TLS, but no client certificate
        stranger.client(tls_coordinator.address, "replica-a", ca=str(pki.ca_file)),
    ]
    try:
        for c in clients:
            # The server ends the handshake, which a client cannot tell from a
            # network failure; the message says what to check.
            with pytest.raises(CoordinatorUnavailableError, match="refusing this client's cert"):
                c.register(_info("replica-a", 0), step=3)
    finally:
        for c in clients:
            c.close()
    # A client that does not trust the coordinator's certificate says so, and
    # keeps trying (a CA rolled out to one side first heals by itself).
    doubter = stranger.client(tls_coordinator.address, "replica-a")
    try:
        with pytest.raises(CoordinatorUnavailableError, match="does not trust the coordinator"):
            doubter.register(_info("replica-a", 0), step=3)
    finally:
        doubter.close()
    with grpc.insecure_channel(tls_coordinator.address) as ch:  # plaintext at a TLS port
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.CoordinatorStub(ch).GetStatus(pb.StatusRequest(), timeout=3)
        assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
    # Probes reach health on its own plaintext port, and only health is there.
    assert tls_coordinator.health_port
    with grpc.insecure_channel(f"127.0.0.1:{tls_coordinator.health_port}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.CoordinatorStub(ch).GetStatus(pb.StatusRequest(), timeout=3)
        assert exc.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert tls_coordinator.call(lambda s: s.members.counts()) == (0, 0)


def test_a_ca_without_a_server_certificate_is_a_config_error(pki: _Pki) -> None:
    with pytest.raises(ConfigError, match="also give it its own certificate"):
        Coordinator("127.0.0.1:0", _CONFIG, credentials=Credentials(tls_ca=str(pki.ca_file)))


def test_a_certificate_names_its_replica_by_its_cn_even_beside_other_sans(
    pki: _Pki, tls_coordinator: Coordinator
) -> None:
    leaf = pki.ca.issue_cert("trainer-1.trainer.job.svc", common_name="trainer-1")
    cert, key = pki.dir / "cn.pem", pki.dir / "cn.key"
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(cert), append=i > 0)
    leaf.private_key_pem.write_to_path(str(key))
    creds = Credentials(tls_cert=str(cert), tls_key=str(key), tls_ca=str(pki.ca_file))
    client = CoordinatorClient(tls_coordinator.address, timeout=_T, credentials=creds)
    try:
        client.register(_info("trainer-1", 0), step=1)  # by its CN
        client.register(_info("trainer-1.trainer.job.svc", 0), step=1)  # by a SAN
        with pytest.raises(AuthenticationError, match="not replica 'trainer-2'"):
            client.register(_info("trainer-2", 0), step=1)
    finally:
        client.close()
