"""Repeated transfers of one state (a layout seen before), on real Gloo groups over loopback.

The second and later sends reuse the donor's plan and the joiner's checks and
match; every one must land exactly what was sent, where the joiner's tensors
are now, and refuse what it refused the first time.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from recoveryd.errors import StateMismatchError, TransferError
from recoveryd.testing import run_threads
from recoveryd.transport import TransferConfig, _reuse, recv_state_dict, send_state_dict
from tests.statedicts import assert_same, every_kind

pytestmark = pytest.mark.integration
T = timedelta(seconds=30)
_ROUNDS = 3


def _forget() -> None:
    for kept in (_reuse.PLANS, _reuse.MANIFESTS, _reuse.MATCHES):
        kept.clear()


def _refill(state: object, fresh: object) -> None:
    """Writes ``fresh``'s values into ``state``'s own tensors and containers (a training step)."""
    if isinstance(state, dict):
        for k in state:
            if isinstance(state[k], torch.Tensor):
                with torch.no_grad():
                    state[k].copy_(fresh[k])  # type: ignore[index]
            elif isinstance(state[k], dict | list):
                _refill(state[k], fresh[k])  # type: ignore[index]
            elif not isinstance(state[k], tuple):
                state[k] = fresh[k]  # type: ignore[index]
    elif isinstance(state, list):
        for i, v in enumerate(state):
            if isinstance(v, torch.Tensor):
                v.copy_(fresh[i])  # type: ignore[index]
            elif isinstance(v, dict | list):
                _refill(v, fresh[i])  # type: ignore[index]


def _again_and_again(rank: int, ws: int, pg: object, store: object) -> list[int]:
    cfg = TransferConfig(bucket_bytes=4096, direct_bytes=1024)
    state = every_kind(seed=1)
    if rank == 0:
        for r in range(_ROUNDS):
            _refill(state, every_kind(seed=10 + r))
            send_state_dict(pg, [1], state, step=r, timeout=T, config=cfg)  # type: ignore[arg-type]
        return [_reuse.PLANS.hits]
    mine = every_kind(seed=2)
    own = {k: v for k, v in mine.items() if isinstance(v, torch.Tensor)}
    for r in range(_ROUNDS):
        got = recv_state_dict(pg, 0, into=mine, step=r, timeout=T, config=cfg)  # type: ignore[arg-type]
        assert_same(every_kind(seed=10 + r), got.state_dict)
        out = got.state_dict
        assert isinstance(out, dict)
        for k, v in own.items():
            assert out[k] is v, f"{k} is not the joiner's own tensor"
        # Tied weights stay one object: the joiner's tied tensor at both paths.
        assert out["tied_a"] is out["flat"]
    return [_reuse.MANIFESTS.hits, _reuse.MATCHES.hits]


def test_the_same_state_again_lands_bit_exact_through_the_remembered_plan() -> None:
    _forget()
    donor, joiner = run_threads(_again_and_again, 2)
    # From the second round on: the donor's plan, the joiner's checks and its match.
    assert joiner == [_ROUNDS - 1, _ROUNDS - 1]
    assert donor == [_ROUNDS - 1]


def _optimizer_state(n: int) -> dict[str, object]:
    state = {p: {"exp_avg": torch.zeros(64), "exp_avg_sq": torch.zeros(64)} for p in range(n)}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "step": 10, "params": list(range(n))}]
    return {"state": state, "param_groups": groups}


def _expected(p: int, r: int) -> torch.Tensor:
    return torch.arange(64.0) + 1000 * p + r


def _moved(rank: int, ws: int, pg: object, store: object) -> list[int]:
    """Between sends the joiner's tensors move, change layout or type; the donor's too."""
    if rank == 0:
        state = _optimizer_state(50)
        slots = state["state"]
        assert isinstance(slots, dict)
        for r in range(5):
            if r == 3:  # the donor's own tensor reallocated (same shape)
                slots[7]["exp_avg"] = slots[7]["exp_avg"].clone()
            for p, s in slots.items():
                s["exp_avg"].copy_(_expected(p, r))
            state["param_groups"][0]["step"] = 10 + r  # type: ignore[index]
            if r < 4:
                send_state_dict(pg, [1], state, step=r, timeout=T)  # type: ignore[arg-type]
            else:  # refused by the joiner, as the first time would be
                with pytest.raises(TransferError, match="refused"):
                    send_state_dict(pg, [1], state, step=r, timeout=T)  # type: ignore[arg-type]
        return [_reuse.PLANS.hits]
    mine = _optimizer_state(50)
    slots = mine["state"]
    assert isinstance(slots, dict)
    old = slots[3]["exp_avg"]
    for r in range(5):
        if r == 2:  # the joiner's tensor replaced by a strided view (through scratch)
            slots[3]["exp_avg"] = torch.zeros(128)[::2]
            assert slots[3]["exp_avg"].data_ptr() != old.data_ptr()
            frozen = old.clone()
        if r == 4:  # a joiner value of another type than sent
            mine["param_groups"][0]["step"] = 1.5  # type: ignore[index]
            with pytest.raises(StateMismatchError, match="float here, int sent"):
                recv_state_dict(pg, 0, into=mine, step=r, timeout=T)  # type: ignore[arg-type]
            break
        got = recv_state_dict(pg, 0, into=mine, step=r, timeout=T)  # type: ignore[arg-type]
        out = got.state_dict
        assert isinstance(out, dict)
        assert out["param_groups"][0]["step"] == 10 + r
        for p, s in slots.items():
            assert out["state"][p]["exp_avg"] is s["exp_avg"]
            assert torch.equal(s["exp_avg"], _expected(p, r)), (p, r)
        if r >= 2:
            assert torch.equal(old, frozen), "a replaced joiner tensor was written"
    return [_reuse.MATCHES.hits]


def test_tensors_that_moved_or_changed_type_are_matched_afresh() -> None:
    _forget()
    donor, joiner = run_threads(_moved, 2)
    assert donor == [3]  # rounds 1, 2 and 4 (3 reallocated a tensor)
    assert joiner == [2]  # rounds 1 and 3 (2 replaced a tensor, 4 changed a value's type)


def _off(rank: int, ws: int, pg: object, store: object) -> int:
    cfg = TransferConfig(reuse_layouts=False)
    state = _optimizer_state(10)
    for r in range(2):
        if rank == 0:
            send_state_dict(pg, [1], state, step=r, timeout=T, config=cfg)  # type: ignore[arg-type]
        else:
            recv_state_dict(pg, 0, into=_optimizer_state(10), step=r, timeout=T, config=cfg)  # type: ignore[arg-type]
    return _reuse.PLANS.hits + _reuse.PLANS.misses + _reuse.MANIFESTS.hits + _reuse.MATCHES.hits


def test_reuse_can_be_turned_off() -> None:
    _forget()
    assert run_threads(_off, 2) == [0, 0]
