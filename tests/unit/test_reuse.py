"""Plans and checks reused for a layout seen before: the same result as working them out afresh."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from recoveryd.errors import ManifestError, StateMismatchError, UnsupportedValueError
from recoveryd.transport import TransferConfig, _reuse
from recoveryd.transport._flatten import SendPlan, build_plan
from recoveryd.transport._layout import layout_digest, skeleton, tensor_facts
from recoveryd.transport._memory import Arena
from recoveryd.v1 import manifest_pb2 as pb
from tests.statedicts import every_kind

_CUT = {"bucket_bytes": 4096, "direct_bytes": 1024, "checksums": False}


def _plan(state: object, step: int = 3) -> tuple[SendPlan, bool]:
    """plan_send's plan (remembering it at once, as a send does), and whether it was reused."""
    hits = _reuse.PLANS.hits
    plan, remember = _reuse.plan_send(state, step=step, chain=[0, 1], reuse=True, **_CUT)  # type: ignore[arg-type]
    if remember is not None:
        remember()
    return plan, _reuse.PLANS.hits > hits


def _fresh(state: object, step: int = 3) -> SendPlan:
    return build_plan(state, step=step, chain=[0, 1], **_CUT)  # type: ignore[arg-type]


def _same_plan(a: SendPlan, b: SendPlan) -> None:
    assert a.manifest.SerializeToString(deterministic=True) == b.manifest.SerializeToString(
        deterministic=True
    )
    assert [(s.base, s.lo, s.nbytes) for s in a.spans] == [
        (s.base, s.lo, s.nbytes) for s in b.spans
    ]
    assert all(x.owner is y.owner for x, y in zip(a.spans, b.spans, strict=True))
    assert a.payload_bytes == b.payload_bytes


def _plain_kinds() -> dict[str, object]:
    """every_kind: views, tied weights, Parameters, every dtype and value kind (no copies)."""
    return every_kind(seed=5)


def test_a_state_sent_again_reuses_the_plan_and_it_is_the_plan_built_afresh() -> None:
    _reuse.PLANS.clear()
    state = _plain_kinds()
    _, reused = _plan(state)
    assert not reused
    again, reused = _plan(state, step=4)
    assert reused
    _same_plan(again, _fresh(state, step=4))
    # New values (the numbers a training step changes) go out; the layout is kept.
    state["values"]["neg"] = -6  # type: ignore[index]
    state["optim"]["param_groups"][0]["lr"] = 0.05  # type: ignore[index]
    flat = state["flat"]
    assert isinstance(flat, torch.Tensor)
    flat.add_(1.0)
    third, reused = _plan(state, step=5)
    assert reused
    _same_plan(third, _fresh(state, step=5))


@pytest.mark.parametrize(
    "change",
    [
        "resize",
        "set_storage",
        "replace",
        "requires_grad",
        "dtype_via_data",
        "key_type",
        "value_type",
        "new_key",
        "container_kind",
    ],
)
def test_any_change_of_layout_is_worked_out_afresh(change: str) -> None:
    _reuse.PLANS.clear()
    state: dict[object, object] = {
        "w": torch.randn(4, 3),
        "b": torch.randn(3),
        1: {"step": 7, "t": torch.arange(5.0)},
    }
    _plan(state)
    _, reused = _plan(state)
    assert reused
    w = state["w"]
    assert isinstance(w, torch.Tensor)
    if change == "resize":
        w.resize_(6, 3)  # same object, a new allocation
    elif change == "set_storage":
        w.set_(torch.randn(4, 3).untyped_storage(), 0, (4, 3), (3, 1))
    elif change == "replace":
        state["w"] = torch.randn(4, 3)
    elif change == "requires_grad":
        w.requires_grad_(True)
    elif change == "dtype_via_data":
        w.data = torch.randn(4, 3, dtype=torch.float64)
    elif change == "key_type":
        del state[1]
        state[1.0] = {"step": 7, "t": torch.arange(5.0)}  # 1.0 == 1, a different state
    elif change == "value_type":
        state[1]["step"] = 7.0  # type: ignore[index]
    elif change == "new_key":
        state["extra"] = torch.zeros(2)
    elif change == "container_kind":
        state[1] = OrderedDict(state[1])  # type: ignore[call-overload]
    if change == "key_type":
        with pytest.raises(UnsupportedValueError):
            _plan(state)
        return
    plan, reused = _plan(state)
    assert not reused
    _same_plan(plan, _fresh(state))


def test_new_tensor_objects_over_the_same_memory_reuse_the_donors_plan() -> None:
    # What a sidecar does: after each refresh its state's tensors are new views of the
    # same shared memory. The donor only reads memory, so its plan still holds.
    _reuse.PLANS.clear()
    flat = torch.arange(64.0)
    _plan({"a": flat[:16].view(4, 4), "b": flat[16:], "n": 1})
    again = {"a": flat[:16].view(4, 4), "b": flat[16:], "n": 2}
    plan, reused = _plan(again)
    assert reused
    _same_plan(plan, _fresh(again))


def test_a_tensor_swapped_for_its_lazy_conjugate_is_sent_resolved() -> None:
    _reuse.PLANS.clear()
    z = torch.randn(4, dtype=torch.complex64)
    _plan({"z": z})
    assert _plan({"z": z})[1]
    swapped = {"z": z.conj()}  # same address, shape and strides: only the bit differs
    plan, reused = _plan(swapped)
    assert not reused
    fresh = _fresh(swapped)
    assert plan.manifest == fresh.manifest
    [span], [want] = plan.spans, fresh.spans
    assert span.leaf == -1  # a resolved copy, not z's raw bytes
    assert torch.equal(span.view(0, span.nbytes), want.view(0, want.nbytes))
    assert not torch.equal(span.view(0, span.nbytes), z.view(torch.uint8))


def test_copies_made_for_a_send_are_never_remembered() -> None:
    _reuse.PLANS.clear()
    z = torch.randn(3, dtype=torch.complex64)
    state = {"conj": z.conj(), "gappy": torch.randn(64, 1024)[:, ::512]}
    _plan(state)
    _, reused = _plan(state)
    assert not reused  # a copy is a snapshot of the values: it must be taken again
    assert len(_reuse.PLANS) == 0


def test_a_value_the_manifest_cannot_carry_is_named_even_when_the_layout_is_known() -> None:
    _reuse.PLANS.clear()
    state = {"t": torch.ones(2), "v": [1, 2]}
    _plan(state)
    state["v"] = [1, object()]
    with pytest.raises(UnsupportedValueError, match=r"v\.1|v\]\[1|\['v'\]\[1\]"):
        _plan(state)


def test_skeleton_leaves_sharded_and_unknown_leaves_to_the_full_walk() -> None:
    class Thing:
        pass

    assert skeleton({"a": torch.ones(1), "b": [1, "x", None]}) is not None
    assert skeleton({"a": Thing()}) is None
    assert skeleton({"a": {"b": {}}}) is not None
    deep: dict[str, object] = {}
    node = deep
    for _ in range(300):
        child: dict[str, object] = {}
        node["x"] = child
        node = child
    assert skeleton(deep) is None


def test_facts_follow_the_tensor_not_its_values() -> None:
    t = torch.zeros(4)
    before = tensor_facts([t])
    t.add_(1)
    assert tensor_facts([t]) == before
    t.resize_(8)
    assert tensor_facts([t]) != before


def _manifest(state: object) -> pb.Manifest:
    return pb.Manifest.FromString(_fresh(state).manifest.SerializeToString())


def test_the_layout_digest_ignores_values_step_and_chain_only() -> None:
    a = _manifest({"t": torch.ones(2), "lr": 0.1})
    b = _manifest({"t": torch.ones(2), "lr": 0.2})
    b.step = 99
    assert layout_digest(a) == layout_digest(b)
    c = _manifest({"t": torch.ones(3), "lr": 0.1})
    assert layout_digest(a) != layout_digest(c)


def _place(m: pb.Manifest, into: object) -> _reuse.Placed:
    layout = _reuse.validate(m, reuse=True)
    return _reuse.place(m, layout, into, Arena(hugepages=False), lambda n: None)


def test_a_known_layout_with_values_missing_or_of_another_type_is_still_refused() -> None:
    _reuse.MANIFESTS.clear()
    _reuse.MATCHES.clear()
    into = {"t": torch.zeros(2), "lr": 0.0, "n": 1}
    good = _manifest({"t": torch.ones(2), "lr": 0.1, "n": 2})
    _place(good, into)
    placed = _place(good, into)  # the remembered match
    assert _reuse.MATCHES.hits == 1
    assert placed.state == {"t": into["t"], "lr": 0.1, "n": 2}
    assert isinstance(placed.state, dict)
    assert placed.state["t"] is into["t"]
    # Same layout digest (values are not in it), one value short: the tree is refused.
    short = pb.Manifest()
    short.CopyFrom(good)
    del short.values[-1]
    assert layout_digest(short) == layout_digest(good)
    with pytest.raises(ManifestError):
        _place(short, into)
    # Same layout, a value of another type than the joiner holds: named, as afresh.
    retyped = _manifest({"t": torch.ones(2), "lr": 0.1, "n": 2.5})
    with pytest.raises(StateMismatchError, match="n: int here, float sent"):
        _place(retyped, into)


def test_a_remembered_match_follows_the_joiners_tensors() -> None:
    _reuse.MANIFESTS.clear()
    _reuse.MATCHES.clear()
    m = _manifest({"a": torch.ones(4), "b": torch.ones(2, 2)})
    into: dict[str, object] = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    _place(m, into)
    hit = _place(m, into)
    assert hit.addresses is not None
    a = into["a"]
    assert isinstance(a, torch.Tensor)
    assert hit.addresses[0] == a.data_ptr()
    # New objects over the same memory (what Module.state_dict() returns each time).
    fresh = {k: v.detach() for k, v in into.items()}  # type: ignore[union-attr]
    hit = _place(m, fresh)
    assert hit.addresses is not None
    assert isinstance(hit.state, dict)
    assert hit.state["a"] is fresh["a"]
    # The joiner's tensor replaced by a transposed one: matched afresh, through scratch.
    into["b"] = torch.zeros(2, 2).t()
    again = _place(m, into)
    assert again.addresses is None
    assert [t is into["b"] for t, _ in again.copies] == [True]


def test_a_joiner_tensor_swapped_for_its_conjugate_goes_through_scratch_again() -> None:
    _reuse.MANIFESTS.clear()
    _reuse.MATCHES.clear()
    m = _manifest({"z": torch.ones(3, dtype=torch.complex64)})
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64), requires_grad=False)
    into = {"z": p}
    assert _place(m, into).addresses is None
    assert _place(m, into).addresses is not None  # remembered: straight into p's memory
    p.data = p.data.conj()  # same object, same address: now a lazy conjugate
    placed = _place(m, into)
    assert placed.addresses is None  # through scratch and copy_into, as afresh
    assert [t is p for t, _ in placed.copies] == [True]


def test_scratch_copies_go_in_the_order_the_full_path_makes_them() -> None:
    _reuse.MANIFESTS.clear()
    _reuse.MATCHES.clear()
    flat, u = torch.arange(8.0), torch.arange(4.0) + 100
    m = _manifest({"a": flat[4:8], "b": u, "c": flat[0:4]})  # span 0 = {a, c}, span 1 = {b}
    shared = torch.zeros(8)[::2]  # one non-contiguous tensor at "b" and "c": scratch
    into = {"a": torch.zeros(4), "b": shared, "c": shared}
    first = _place(m, into)
    again = _place(m, into)
    assert again.addresses is not None
    assert [i for _, i in again.copies] == [i for _, i in first.copies]


def test_a_joiner_state_without_storage_is_refused_by_name_as_afresh() -> None:
    _reuse.MANIFESTS.clear()
    _reuse.MATCHES.clear()
    m = _manifest({"w": torch.ones(2, 2)})
    with pytest.raises(StateMismatchError, match="w"):
        _place(m, {"w": torch.ones(2, 2).to_sparse()})


def test_prepare_send_remembers_what_the_next_send_reuses() -> None:
    _reuse.PLANS.clear()
    state = {"w": torch.randn(8, 8), "step": 3}
    assert _reuse.prepare_send(state)
    _, reused = _plan(state)
    assert not reused  # _plan cuts with other bucket sizes: another plan
    cfg = TransferConfig(bucket_bytes=4096, direct_bytes=1024, checksums=False)
    assert _reuse.prepare_send(state, config=cfg)  # the plan _plan remembered: reused
    assert not _reuse.prepare_send(state, config=TransferConfig(reuse_layouts=False))
    # A leaf only the full walk judges (DTensors and their stand-ins alike): not walked now.
    assert not _reuse.prepare_send({"w": _Opaque()})


class _Opaque:
    pass
