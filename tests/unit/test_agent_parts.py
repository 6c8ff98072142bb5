"""The agent's pure parts: layout fingerprints, value merging, its config, and the status table."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import OrderedDict

import pytest
import torch

from recoveryd.agent.config import AgentConfig, _interface_addresses, interface_of, route_to
from recoveryd.agent.layout import fingerprint
from recoveryd.errors import ConfigError
from recoveryd.protocol import ClusterStatus, PlanSnapshot, RankStatus, ReplicaStatus
from recoveryd.status import render
from recoveryd.transport.tree import merge_values

# ---- layout fingerprint ---------------------------------------------------------


def _state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
        "optim": {
            "state": {0: {"step": seed, "exp_avg": torch.randn(4, 3, generator=g)}},
            "param_groups": [{"lr": 0.1 * (seed + 1), "params": [0], "name": f"g{seed}"}],
        },
        "extra": (seed, "tag"),
    }


def _print(state: object) -> str:
    return fingerprint(state)[0]


def test_fingerprint_is_equal_for_states_built_alike() -> None:
    a, b = _state(0), _state(1)  # other tensor values, other plain values of the same types
    digest, device = fingerprint(a)
    assert fingerprint(b) == (digest, device)
    assert device == "cpu"
    assert len(digest) == 24
    assert int(digest, 16) >= 0


def test_fingerprint_compares_values_by_type_only() -> None:
    assert _print({"step": 1}) == _print({"step": 99})
    assert _print({"name": "a"}) == _print({"name": "bb"})
    assert _print({"step": 1}) != _print({"step": 1.0})
    assert _print({"step": None}) != _print({"step": 0})


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"w": torch.zeros(4, 3)}, {"w": torch.zeros(3, 4)}),  # shape
        ({"w": torch.zeros(4, 3)}, {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}),  # dtype
        ({"w": torch.zeros(2)}, {"v": torch.zeros(2)}),  # key
        ({1: torch.zeros(2)}, {"1": torch.zeros(2)}),  # key type
        ({"w": torch.zeros(2)}, OrderedDict(w=torch.zeros(2))),  # mapping kind
        ({"x": [1, 2]}, {"x": (1, 2)}),  # sequence kind
        ({"x": [1, 2]}, {"x": [1, 2, 3]}),  # length
        ({"x": [[1], 2]}, {"x": [[1, 2]]}),  # nesting
        ({"w": torch.zeros(2)}, {"w": 0.0}),  # tensor vs plain value
    ],
)
def test_fingerprint_differs_with_the_layout(a: object, b: object) -> None:
    assert _print(a) != _print(b)


def test_fingerprint_of_a_state_without_tensors_is_cpu() -> None:
    assert fingerprint({"step": 3})[1] == "cpu"


# ---- merging received plain values ------------------------------------------------


def test_merge_writes_plain_values_in_place_and_keeps_tensor_objects() -> None:
    w, t, u, v = torch.zeros(2), torch.zeros(3), torch.zeros(4), torch.zeros(5)
    same = "unchanged"
    lst: list[object] = [t, 3, "x"]
    tup = (u, "a")
    kept = (v, same)
    nested: list[object] = [(t, 1)]
    dst: dict[str, object] = {
        "w": w,
        "step": 1,
        "lst": lst,
        "tup": tup,
        "kept": kept,
        "nested": nested,
    }
    # The received tree: other tensor objects where dst has tensors, new plain values.
    src: dict[str, object] = {
        "w": torch.ones(2),
        "step": 5,
        "lst": [torch.ones(3), 4, "y"],
        "tup": (torch.ones(4), "b"),
        "kept": (torch.ones(5), same),
        "nested": [(torch.ones(3), 2)],
        "new": 9,
    }

    assert merge_values(dst, src) is dst
    assert dst["w"] is w
    assert dst["step"] == 5
    assert dst["new"] == 9
    assert dst["lst"] is lst
    assert lst[0] is t
    assert lst[1:] == [4, "y"]
    merged_tup = dst["tup"]
    assert isinstance(merged_tup, tuple)
    assert merged_tup is not tup  # a tuple holding a new value is rebuilt in its parent
    assert merged_tup[0] is u
    assert merged_tup[1] == "b"
    assert dst["kept"] is kept  # nothing new in it: the same object
    assert dst["nested"] is nested
    inner = nested[0]
    assert isinstance(inner, tuple)
    assert inner[0] is t
    assert inner[1] == 2
    assert torch.equal(w, torch.zeros(2))  # tensor bytes are not merge's business


def test_merge_rebuilds_a_top_level_tuple_and_replaces_a_resized_list() -> None:
    t = torch.zeros(1)
    merged = merge_values((t, 1), (torch.ones(1), 2))
    assert isinstance(merged, tuple)
    assert merged[0] is t
    assert merged[1] == 2
    dst: dict[str, object] = {"x": [1, 2]}
    merge_values(dst, {"x": [1, 2, 3]})
    assert dst["x"] == [1, 2, 3]


def test_merge_preserves_the_tuple_subtype() -> None:
    merged = merge_values(torch.Size([2, 3]), torch.Size([2, 4]))
    assert type(merged) is torch.Size
    assert merged == torch.Size([2, 4])


# ---- agent config ----------------------------------------------------------------


@pytest.mark.parametrize("address", ["nohost", "host:", ":50051", "host:port", "host:65536"])
def test_bad_coordinator_address_names_the_field(address: str) -> None:
    with pytest.raises(ConfigError) as e:
        AgentConfig(coordinator=address, replica_id="r")
    assert e.value.field == "coordinator"
    assert e.value.value == address
    assert "HOST:PORT" in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"group_rank": 2, "group_world_size": 2}, "group_rank"),
        ({"group_rank": -1}, "group_rank"),
        ({"group_world_size": 0}, "group_world_size"),
        ({"replica_id": ""}, "replica_id"),
        ({"rendezvous_port": 70000}, "rendezvous_port"),
    ],
)
def test_bad_agent_config_names_the_field(kwargs: dict[str, object], name: str) -> None:
    base: dict[str, object] = {"coordinator": "127.0.0.1:50051", "replica_id": "r"}
    with pytest.raises(ConfigError) as e:
        AgentConfig(**{**base, **kwargs})  # type: ignore[arg-type]
    assert e.value.field == name


def test_good_agent_config() -> None:
    c = AgentConfig(coordinator="[::1]:50051", replica_id="r", group_rank=1, group_world_size=2)
    assert (c.group_rank, c.group_world_size) == (1, 2)
    pinned = AgentConfig(coordinator="127.0.0.1:1", replica_id="r", host="10.1.2.3")
    assert pinned.advertised_host() == "10.1.2.3"


def test_host_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECOVERYD_HOST", "10.9.9.9")
    assert AgentConfig(coordinator="127.0.0.1:1", replica_id="r").host == "10.9.9.9"


def test_route_to_loopback_is_loopback() -> None:
    assert route_to("127.0.0.1:1") == "127.0.0.1"


# ---- status table ----------------------------------------------------------------


def _rank(r: int, step: int | None, *, healthy: bool = True) -> RankStatus:
    return RankStatus(
        group_rank=r,
        step=step,
        healthy=healthy,
        last_seen_s=0.25,
        rendezvous=f"10.0.0.{r + 1}:29500",
        device_kind="cpu",
        labels={"zone": "z1"},
    )


def _snapshot(**kw: object) -> PlanSnapshot:
    base: dict[str, object] = {
        "plan_id": 1,
        "joiner": "r1",
        "donor": "r0",
        "step": None,
        "state": "preparing",
        "attempt": 1,
        "age_s": 1.5,
        "ranks_done": 0,
        "reason": "",
        "bytes": 0,
        "transfer_s": 0.0,
        "recovery_s": 0.0,
        "phases": {},
        "addresses": (),
    }
    return PlanSnapshot(**{**base, **kw})  # type: ignore[arg-type]


def test_render_shows_replicas_and_plans() -> None:
    status = ClusterStatus(
        coordinator_id="c-123",
        uptime_s=42.0,
        replicas=[
            ReplicaStatus(
                replica_id="r0",
                world_size=2,
                step=120,
                healthy=True,
                state="training",
                ranks=[_rank(0, 120), _rank(1, 121)],
            ),
            ReplicaStatus(
                replica_id="r1",
                world_size=2,
                step=None,
                healthy=False,
                state="recovering",
                ranks=[_rank(0, None, healthy=False)],
            ),
        ],
        active=[_snapshot(plan_id=8, step=124, state="armed", attempt=2)],
        recent=[
            _snapshot(
                plan_id=7,
                step=122,
                state="done",
                bytes=2_000_000_000,
                transfer_s=1.0,
                recovery_s=3.25,
                addresses=("10.0.0.1:4000", "10.0.0.2:4000"),
            ),
            _snapshot(plan_id=6, state="failed", reason="donor 'r2' became unhealthy"),
        ],
    )
    text = render(status)
    lines = text.splitlines()
    assert lines[0] == "coordinator c-123, up 42 s, 2 replicas, 3 ranks"
    r0 = [ln.split() for ln in lines if ln.startswith("r0 ")]
    assert [row[:5] for row in r0] == [
        ["r0", "training", "0/2", "120", "yes"],
        ["r0", "training", "1/2", "121", "yes"],
    ]
    [r1] = [ln.split() for ln in lines if ln.startswith("r1 ")]
    assert r1[:5] == ["r1", "recovering", "0/2", "-", "NO"]
    assert "zone=z1" in r1

    assert "transfers in flight: 1" in lines
    assert "recent transfers: 2" in lines
    [armed] = [ln.split() for ln in lines if ln.startswith("8 ")]
    assert armed[:6] == ["8", "r1", "r0", "124", "armed", "2"]
    assert armed[-2:] == ["(age)", "-"]
    [done] = [ln for ln in lines if ln.startswith("7 ")]
    assert done.split()[:5] == ["7", "r1", "r0", "122", "done"]
    assert "1.9 GiB" in done
    assert " 2.00 " in done  # GB/s: 2e9 bytes in 1 s
    assert "3.250" in done
    assert done.endswith("10.0.0.1:4000,10.0.0.2:4000")
    [failed] = [ln for ln in lines if ln.startswith("6 ")]
    assert "failed (donor 'r2' became unhealthy)" in failed
    assert "GB/S" in text


def test_render_of_an_empty_cluster() -> None:
    text = render(ClusterStatus(coordinator_id="c", uptime_s=0.0, replicas=[], active=[]))
    assert "0 replicas, 0 ranks" in text
    assert "transfers in flight: 0" in text
    assert "recent transfers: 0" in text
    assert "PLAN" not in text  # no plan table without plans


def test_interface_of_names_the_interface_of_every_local_address() -> None:
    addresses = _interface_addresses()
    assert addresses, "getifaddrs found no address"
    for ip, name in addresses.items():
        assert interface_of(ip) == ("lo" if ip.startswith("127.") or ip == "::1" else name)
    assert interface_of("127.0.0.5") == "lo"
    # Names are not looked up (DNS could hang the agent's start), nor is junk.
    t0 = time.monotonic()
    assert interface_of("trainer-0.trainer.recoveryd.svc") == ""
    assert interface_of("a\x00b") == ""
    assert interface_of("192.0.2.250") in ("", addresses.get("192.0.2.250"))
    assert time.monotonic() - t0 < 0.5


def test_interface_of_sees_secondary_and_ipv6_addresses_in_a_network_namespace() -> None:
    script = (
        "ip link add v0 type veth peer name v1 && ip addr add 10.1.1.1/24 dev v0 && "
        "ip addr add 10.1.1.2/24 dev v0 && ip -6 addr add fd01::5/64 dev v0 nodad && "
        f"ip link set v0 up && exec {sys.executable} -c "
        "'from recoveryd.agent.config import interface_of; "
        'print(",".join(interface_of(a) for a in ("10.1.1.1", "10.1.1.2", "fd01::5", "10.1.1.3")))\''
    )
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 and "Operation not permitted" in done.stderr + done.stdout:
        pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "v0,v0,v0,"


# ---- the donor's plan, worked out ahead of the fence ------------------------------------


def test_a_formed_plan_is_worked_out_ahead_once_at_a_step_boundary() -> None:
    from collections import deque
    from datetime import timedelta

    import torch.distributed as dist

    from recoveryd._time import Deadline
    from recoveryd.agent.donor import Donor, _SendOrder
    from recoveryd.agent.link import Position
    from recoveryd.transport import _reuse

    _reuse.PLANS.clear()
    donor = Donor(
        AgentConfig(coordinator="127.0.0.1:1", replica_id="r"),
        store=dist.HashStore(),
        host="127.0.0.1",
        graveyard=deque(),
        position=lambda: Position(step=1, parked=False, step_time_s=0.1),
    )
    state = _state(0)
    asked: list[int] = []

    def state_fn() -> object:
        asked.append(1)
        return state

    order = _SendOrder(
        plan_id=1,
        joiner="j",
        prefix="p",
        backend="gloo",
        deadline=Deadline(timedelta(seconds=30)),
        key=b"",
    )
    donor._orders[1] = order
    donor.warm(state_fn)
    assert asked == []  # no group yet: nothing to send on
    order.group = object()  # type: ignore[assignment]
    donor.warm(state_fn)
    donor.warm(state_fn)
    assert asked == [1]  # once per plan
    assert order.warmed
    assert len(_reuse.PLANS) == 1
    # The send at the fence finds it (same config as the agent's sends).
    assert _reuse.prepare_send(state, config=donor._config.transfer)
