"""Striped receives: one joiner pulls disjoint stripes of one state from several donors at once.

Rank 0 is the joiner; every other rank is a donor holding the same state (or,
in the bad-input cases, not quite). Each donor pairs with the joiner in a
two-rank group of its own, as the agent's plans do.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from recoveryd.errors import DonorsDisagreeError, TransferError, UntrustedPeerError
from recoveryd.testing import FaultyGroup, run_ranks
from recoveryd.testing.ranks import gloo_group
from recoveryd.transport import TransferConfig, send_state_dict
from recoveryd.transport.format import TAG_DATA
from recoveryd.transport.striped import recv_state_dict_striped

pytestmark = pytest.mark.integration
T = timedelta(seconds=60)
KEY = bytes(range(32))
# Small messages, so that a few MiB make dozens of them to stripe.
CONFIG = TransferConfig(bucket_bytes=256 * 1024, direct_bytes=64 * 1024)
MACS = TransferConfig(bucket_bytes=256 * 1024, direct_bytes=64 * 1024, data_macs=True)


def _state(fill: float, step: int = 7) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {f"w{i}": torch.randn(256, 64 + i, generator=g) + fill for i in range(12)},
        "small": [torch.full((3,), float(i) + fill) for i in range(40)],
        "lr": 0.1 + fill,
        "step": step,
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _pair(store: dist.Store, donor: int, rank: int) -> dist.ProcessGroup:
    """The two-rank group of ``donor`` and the joiner (rank 0): donor is 0, joiner 1."""
    return gloo_group(store, 0 if rank == donor else 1, 2, T, prefix=f"pair{donor}")


def _run(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, case: str) -> object:
    donors = list(range(1, ws))
    if rank != 0:
        group = _pair(store, rank, rank)
        state = _state(0.0)
        step = 7
        if case in ("steps", "steps-any") and rank == 2:
            step = 8
        if case == "layout" and rank == 2:
            state["extra"] = torch.zeros(4)
        key = bytes(32) if case == "stranger" and rank == 2 else KEY
        try:
            stats = send_state_dict(
                group, [1], state, timeout=T, step=step, config=CONFIG, auth_key=key
            )
        except TransferError as err:
            return ("refused", type(err).__name__)
        return ("sent", stats.bytes_sent)
    groups = [_pair(store, d, rank) for d in donors]
    mine = _state(1000.0)
    before = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in mine["model"].items()
    }
    shares = [3.0, 1.0] if case == "shares" else None
    try:
        got = recv_state_dict_striped(
            [(g, 0) for g in groups],
            timeout=T,
            into=mine,
            step=None if case == "steps-any" else 7,
            shares=shares,
            config=MACS if case == "macs" else CONFIG,
            auth_keys=[KEY] * len(donors),
        )
    except TransferError as err:
        untouched = all(torch.equal(before[k], mine["model"][k]) for k in before)
        return ("error", type(err).__name__, str(err), untouched, err.donor_index)
    assert got.step == 7
    return (
        "ok",
        _same(mine["model"], _state(0.0)["model"]),
        _same(got.state_dict, _state(0.0)),
        got.stats.payload_bytes,
    )


@pytest.mark.parametrize("case", ["plain", "macs"])
def test_three_donors_each_send_a_third_and_the_joiner_gets_the_donors_state(case: str) -> None:
    """With ``macs`` every data message carries a MAC under its own index, checked per donor."""
    out = run_ranks(_run, 4, args=(case,))
    assert out[0][:3] == ("ok", True, True)
    total = out[0][3]
    sent = [o[1] for o in out[1:]]
    assert all(o[0] == "sent" for o in out[1:])
    assert sum(sent) >= total  # every byte once (plus the handshake's few)
    assert all(0.2 * total < s < 0.5 * total for s in sent), (sent, total)


def test_shares_size_the_stripes() -> None:
    out = run_ranks(_run, 3, args=("shares",))
    assert out[0][:3] == ("ok", True, True)
    big, small = out[1][1], out[2][1]
    assert 2.0 < big / small < 4.5, (big, small)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        # Past the demanded step: an overshot fence (the plan is re-fenced wider).
        ("steps", "StepMismatchError"),
        # No step demanded, the donors at two: they cannot be mixed.
        ("steps-any", "DonorsDisagreeError"),
        ("layout", "DonorsDisagreeError"),
        ("stranger", "UntrustedPeerError"),
    ],
)
def test_donors_that_disagree_or_cannot_prove_the_key_are_refused_before_any_write(
    case: str, error: str
) -> None:
    out = run_ranks(_run, 3, args=(case,))
    kind, name, message, untouched, blamed = out[0]
    assert (kind, name) == ("error", error), message
    assert untouched, "the joiner's tensors were written"
    assert blamed == 1, message  # the second donor (rank 2) is the odd one, and is named
    assert all(o[0] == "refused" for o in out[1:]), out[1:]


@pytest.mark.parametrize("state", [{"x": 1.5}, {"lr": 0.25}])
def test_donors_with_no_stripe_are_told_and_send_nothing(state: dict[str, float]) -> None:
    """More donors than messages (one tensor, three donors), or no tensors at all."""
    assert issubclass(DonorsDisagreeError, TransferError)
    assert issubclass(UntrustedPeerError, TransferError)
    out = run_ranks(_tiny, 4, args=(state,))
    assert out[0] == ("ok", next(iter(state.values())))
    assert [o[0] for o in out[1:]] == ["sent"] * 3, out[1:]


def _tiny(
    rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, spec: dict[str, float]
) -> object:
    sent = {k: torch.tensor([v]) if k == "x" else v for k, v in spec.items()}
    if rank != 0:
        try:
            stats = send_state_dict(_pair(store, rank, rank), [1], sent, timeout=T)
        except TransferError as err:
            return ("refused", str(err))
        return ("sent", stats.payload_bytes)
    into = {k: torch.zeros(1) if k == "x" else 0.0 for k in spec}
    groups = [(_pair(store, d, rank), 0) for d in range(1, ws)]
    got = recv_state_dict_striped(groups, timeout=T, into=into)
    value = got.state_dict["x"] if "x" in spec else got.state_dict["lr"]  # type: ignore[index]
    return ("ok", float(value[0]) if "x" in spec else float(value))


class _Slow:
    """A donor's group that waits before every data message (a slower link)."""

    def __init__(self, pg: dist.ProcessGroup, delay_s: float) -> None:
        self._pg, self._delay = pg, delay_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._pg, name)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> object:
        if tag == TAG_DATA:
            time.sleep(self._delay)
        return self._pg.send(tensors, dst, tag)


def _uneven(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store) -> object:
    config = TransferConfig(
        bucket_bytes=256 * 1024, direct_bytes=64 * 1024, stall_timeout=timedelta(seconds=1)
    )
    state = {f"w{i}": torch.full((64 * 1024,), float(i)) for i in range(16)}
    if rank != 0:
        group: object = _pair(store, rank, rank)
        if rank == 2:
            group = _Slow(group, 0.3)  # type: ignore[arg-type]
        send_state_dict(group, [1], state, timeout=T, config=config)  # type: ignore[arg-type]
        return ("sent",)
    into = {k: torch.zeros_like(v) for k, v in state.items()}
    groups = [(_pair(store, d, rank), 0) for d in range(1, ws)]
    recv_state_dict_striped(groups, timeout=T, into=into, config=config)
    return ("ok", all(torch.equal(into[k], state[k]) for k in state))


def test_a_donor_done_long_before_the_others_waits_for_the_joiners_word() -> None:
    """Its stripe ends seconds before the slow donor's, far past the stall bound (1 s)."""
    out = run_ranks(_uneven, 3)
    assert out == [("ok", True), ("sent",), ("sent",)]


def _dies(rank: int, ws: int, pg: dist.ProcessGroup, store: dist.Store, mode: str) -> object:
    resume = mode != "fail"
    config = TransferConfig(
        bucket_bytes=256 * 1024,
        direct_bytes=64 * 1024,
        # Probed: a stall bound far past what the test allows (the probe must end the wait).
        stall_timeout=timedelta(seconds=60 if mode == "probed" else 3),
        checksums=mode == "resume-checked",
        handshake_timeout=timedelta(seconds=5),
    )
    if rank != 0:
        store.set(f"pid{rank}", str(os.getpid()))
        group: object = _pair(store, rank, rank)
        if rank == 2 and mode == "vanish":  # its group formed; it dies before its offer
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 2:
            fault = "stop" if mode == "probed" else "kill"
            group = FaultyGroup(group, after=3, mode=fault)  # type: ignore[arg-type]
        try:
            stats = send_state_dict(group, [1], _state(0.0), timeout=T, step=7, config=config)  # type: ignore[arg-type]
        except TransferError as err:
            return ("told", str(err))
        return ("sent", stats.bytes_sent)
    groups = [(_pair(store, d, rank), 0) for d in range(1, ws)]
    probes = [_lives(int(store.get(f"pid{d}"))) for d in range(1, ws)]
    mine = _state(1000.0)
    t0 = time.monotonic()
    try:
        got = recv_state_dict_striped(
            groups, timeout=T, into=mine, step=7, config=config, resume=resume,
            alive=probes if mode == "probed" else None,
        )  # fmt: skip
    except TransferError as err:
        return ("error", type(err).__name__, time.monotonic() - t0)
    finally:
        if mode == "probed":  # the stopped donor: its part came from the other
            os.kill(int(store.get("pid2")), signal.SIGKILL)
    same = _same(mine["model"], _state(0.0)["model"]) and _same(got.state_dict, _state(0.0))
    return ("ok", same, got.stats.payload_bytes, time.monotonic() - t0)


def _lives(pid: int) -> Callable[[], bool]:
    """A probe of whether process ``pid`` runs (a killed, unreaped child is a zombie;
    a stopped one, "T", answers nothing)."""

    def probe() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X", "T")
        except OSError:
            return False

    return probe


def test_a_probe_that_sees_a_donor_die_resumes_at_once_not_after_the_stall_bound() -> None:
    """A donor frozen mid-stripe (SIGSTOP: its connections stay open, Gloo never wakes)
    is seen by the probe; the stall bound is 60 s, its part comes from the other in seconds."""
    out = run_ranks(_dies, 3, args=("probed",), allow_death=[2])
    assert out[0][:2] == ("ok", True), out[0]
    assert out[2] is None  # it died
    assert out[0][3] < 15, out[0]


def test_a_donor_dying_mid_stripe_fails_the_receive_within_the_stall_bound() -> None:
    out = run_ranks(_dies, 3, args=("fail",), allow_death=[2])
    assert out[0][0] == "error", out[0]
    assert out[0][2] < 20, out[0]
    assert out[2] is None  # it died
    assert out[1][0] == "told", out[1]  # the other donor hears the state is not complete


@pytest.mark.parametrize("mode", ["resume", "resume-checked"])
def test_a_donor_dying_mid_stripe_is_resumed_from_the_others_at_the_same_step(mode: str) -> None:
    """``resume-checked``: with checksums, the dead donor's whole stripe comes again."""
    out = run_ranks(_dies, 4, args=(mode,), allow_death=[2])
    assert out[0][:2] == ("ok", True), out[0]
    assert out[2] is None  # it died
    total = out[0][2]
    sent = [out[1][1], out[3][1]]
    assert [out[1][0], out[3][0]] == ["sent", "sent"], (out[1], out[3])
    # The survivors sent their own thirds and split the dead donor's missing part: without
    # checksums what it delivered before dying stays, with them its whole third comes again.
    assert all(s > total / 3 for s in sent), (sent, total)
    if mode == "resume-checked":
        assert sum(sent) >= total, (sent, total)


def test_a_donor_gone_before_its_offer_leaves_its_part_to_the_others() -> None:
    """It died after its go, before a byte of its offer: the receive goes on without it."""
    out = run_ranks(_dies, 3, args=("vanish",), allow_death=[2])
    assert out[0][:2] == ("ok", True), out[0]
    assert out[2] is None  # it died
    total = out[0][2]
    assert out[1][0] == "sent"
    assert out[1][1] >= total, (out[1], total)  # all of it from rank 1
    assert out[0][3] < 20, out[0]  # within the handshake bound (5 s), not the transfer's
