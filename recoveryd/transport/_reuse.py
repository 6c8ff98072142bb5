"""What a transfer reuses when a layout comes again: the donor's plan, the joiner's checks.

Three things are remembered (see :mod:`recoveryd.transport._layout` for how
a layout is recognised, and why nothing remembered holds a tensor):

* the donor's plan for a state (its manifest without values, step and chain,
  its spans and messages), under the state's signature and the tensors'
  facts: the next send of the same state walks it once, cheaply, and
  re-encodes only its values;
* the joiner's validation of a manifest (decoded tensors, spans, messages),
  under the manifest's layout digest: every check ran on exactly this layout;
* the joiner's in-place match (which joiner tensor each manifest tensor is,
  which spans land straight in the joiner's memory and where, which go
  through scratch), under the digest and the joiner state's signature and
  facts: the match is made from the tensors at hand, at their current
  addresses, and the values are still checked against the joiner's types.

Turned off by ``TransferConfig.reuse_layouts=False`` (``RECOVERYD_REUSE_LAYOUTS=0``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from recoveryd.errors import ManifestError, UnsupportedValueError
from recoveryd.transport._flatten import SendPlan, Span, build_plan, encode_value
from recoveryd.transport._inplace import match_in_place, place_in_place
from recoveryd.transport._layout import (
    Remembered,
    Skeleton,
    layout_digest,
    layout_of,
    skeleton,
    tensor_facts,
)
from recoveryd.transport._memory import Arena
from recoveryd.transport._pieces import Message, byte_view, cut
from recoveryd.transport._validate import TensorSpec, check_manifest, check_packing, decode_tensors
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.tree import TreeBuilder, decode_value
from recoveryd.v1 import manifest_pb2 as pb

CAPACITY = 8
"""Layouts remembered on each side (a few states: a model, its optimizer, a sidecar's ranks)."""
BUDGET = 1 << 20
"""The most weight remembered on each side, in all: a weight is one Python object kept
(a tensor's spec counts 12 and 2 per dimension, a span 2, a message's piece 3), so
about 64 MiB at most; an AdamW state of 20,000 1-D tensors weighs ~0.4 Mi."""


def _weight(tensors: int, dims: int, spans: int, pieces: int) -> int:
    return 12 * tensors + 2 * dims + 2 * spans + 3 * pieces


@dataclass(frozen=True, slots=True)
class _Planned:
    sig: list[object]
    facts: list[tuple[object, ...]]
    manifest: pb.Manifest  # without values, step and chain
    spans: list[tuple[int, int, int, int]]  # (owner tensor, base, lo, nbytes)
    messages: list[Message]
    payload_bytes: int


PLANS: Remembered[_Planned] = Remembered(CAPACITY, BUDGET)


def plan_send(
    state: object,
    *,
    step: int | None,
    chain: list[int],
    bucket_bytes: int,
    direct_bytes: int,
    checksums: bool,
    reuse: bool,
) -> tuple[SendPlan, Callable[[], bool] | None]:
    """The donor's plan for ``state``: remembered if its layout was sent before, else built.

    Returns:
        The plan, and what remembers it (``None``: nothing to do; it says
        whether the plan is kept): call it while the joiners check the
        manifest, off the transfer's critical path, and before anything may
        change the state.

    Raises:
        UnsupportedValueError: a leaf the manifest cannot carry, naming its path.
    """
    cut_by = (bucket_bytes, direct_bytes, checksums)
    # With nothing remembered yet (a first send), even the lookup waits until later.
    skel = skeleton(state) if reuse and PLANS else None
    if skel is not None:
        seen = skel

        def fits(known: _Planned) -> bool:
            return known.sig == seen.sig and known.facts == tensor_facts(seen.tensors)

        known = PLANS.get((skel.key(), *cut_by), fits)
        plan = _replay(known, skel, step, chain) if known is not None else None
        if plan is not None:
            return plan, None
    plan = build_plan(
        state,
        step=step,
        chain=chain,
        bucket_bytes=bucket_bytes,
        direct_bytes=direct_bytes,
        checksums=checksums,
    )
    if not reuse or any(s.leaf < 0 for s in plan.spans):  # a span is a copy made for this send
        return plan, None

    def remember() -> bool:
        seen = skel if skel is not None else skeleton(state)
        facts = tensor_facts(seen.tensors) if seen is not None else None
        if seen is None or facts is None:
            return False
        template = layout_of(plan.manifest)
        sizes = [s.nbytes for s in plan.spans]
        messages = cut(sizes, list(plan.manifest.message_nbytes))
        spans = [(s.leaf, s.base, s.lo, s.nbytes) for s in plan.spans]
        pieces = sum(len(m.span_ids) for m in messages)
        return PLANS.put(
            (seen.key(), *cut_by),
            _Planned(seen.sig, facts, template, spans, messages, plan.payload_bytes),
            _weight(len(facts), len(seen.sig), len(spans), pieces),
        )

    return plan, remember


def prepare_send(state_dict: object, *, config: TransferConfig | None = None) -> bool:
    """Works out ``state_dict``'s plan ahead of its send, off the transfer's critical path.

    The next :func:`~recoveryd.transport.send_state_dict` of the same state
    (the same tensors, wherever their values went since) with the same
    ``config`` then reuses it instead of walking the state: for a state of
    many small tensors that is most of the donor's time before the joiner
    hears from it (20,000 tensors: ~0.1 s). Nothing is sent and nothing of
    the state is kept; an agent calls this when a plan's group is formed,
    ahead of the fence.

    Args:
        state_dict: the state the next send will send.
        config: the send's configuration (bucket sizes and checksums shape the
            plan; a send whose joiner demands data MACs checksums nothing, so
            with ``checksums`` on, such a send works its plan out afresh).

    Returns:
        Whether the plan is now remembered (``False``: reuse is off, or the
        state holds what is worked out afresh each send: DTensors,
        ShardedTensors, views sent as copies).

    Raises:
        UnsupportedValueError: a leaf the manifest cannot carry, naming its path
            (in a state of plain containers, tensors and values; others are left
            to the send).
    """
    config = config or TransferConfig()
    if not config.reuse_layouts or skeleton(state_dict) is None:
        return False  # nothing a send could reuse: not worth a walk now
    plan, remember = plan_send(
        state_dict,
        step=None,
        chain=[],
        bucket_bytes=config.bucket_bytes,
        direct_bytes=min(config.direct_bytes, config.bucket_bytes),
        checksums=config.checksums,
        reuse=config.reuse_layouts,
    )
    return plan.reused or (remember is not None and remember())


def _replay(known: _Planned, skel: Skeleton, step: int | None, chain: list[int]) -> SendPlan | None:
    """The remembered plan over this state's tensors and values (``None``: a value the
    manifest cannot carry, left to the full walk to name)."""
    m = pb.Manifest()
    m.CopyFrom(known.manifest)
    if step is not None:
        m.step = step
    m.chain.extend(chain)
    try:
        for v in skel.values:
            encode_value(m.values.add(), v, [])
    except UnsupportedValueError:
        return None
    tensors = skel.tensors
    spans = [Span(tensors[i], base, lo, n, i) for i, base, lo, n in known.spans]
    return SendPlan(m, spans, known.payload_bytes, known.messages, reused=True)


@dataclass(frozen=True, slots=True)
class Validated:
    """A manifest's layout, checked: its tensors, span sizes and messages."""

    digest: bytes | None
    """The layout's key (``None``: not remembered)."""
    tensors: list[TensorSpec]
    sizes: list[int]
    messages: list[Message]
    weight: int = 0
    """What keeping it costs (see :data:`BUDGET`)."""


MANIFESTS: Remembered[Validated] = Remembered(CAPACITY, BUDGET)


def validate(m: pb.Manifest, *, reuse: bool) -> Validated:
    """Checks the manifest's layout (or finds it checked before); values are left to the tree.

    A layout is remembered only once the whole offer was accepted (:func:`keep`).

    Raises:
        ManifestError: naming what is inconsistent, and where.
    """
    digest = layout_digest(m) if reuse else None
    if digest is not None:
        known = MANIFESTS.get(digest)
        if known is not None:
            # Values are not in the digest: the cheap count check the columns had.
            if len(m.values) > len(m.node_kind):
                raise ManifestError("more values, DTensors and ShardedTensors than tree nodes")
            return known
    tensors = decode_tensors(m)
    check_manifest(m, tensors)
    sizes = list(m.storage_nbytes)
    messages = cut(sizes, list(m.message_nbytes))
    check_packing(messages, sizes)
    pieces = sum(len(msg.span_ids) for msg in messages)
    weight = _weight(len(tensors), 2 * len(m.tensor_shape), len(sizes), pieces)
    return Validated(digest, tensors, sizes, messages, weight)


def keep(layout: Validated) -> None:
    """Remembers a validated layout whose offer was accepted (marks it used, if it is)."""
    if layout.digest is not None:
        MANIFESTS.put(layout.digest, layout, layout.weight)


@dataclass(frozen=True, slots=True)
class _Matched:
    sig: list[object]
    facts: list[tuple[object, ...]]
    ids: list[int] | None
    """The joiner's tensor objects, when one stands at several places (tied weights):
    which one is returned where must then be the same objects too."""
    order: list[int]  # per manifest tensor, the joiner tensor (its place in the skeleton)
    own: list[tuple[int, int, int] | None]
    """Per span: (joiner tensor, byte start in its storage, address less its data_ptr)
    when the span lands in the joiner's memory; ``None``: through scratch."""
    value_types: list[type]  # per manifest value, the joiner's value's type
    copies: list[int]  # the manifest tensors copied out of scratch, in order


MATCHES: Remembered[_Matched] = Remembered(CAPACITY, BUDGET)


@dataclass(slots=True)
class Placed:
    """Where an in-place receive's bytes go, and the tree it returns."""

    state: object
    targets: list[torch.Tensor] | _OwnSpans
    copies: list[tuple[torch.Tensor, int]]
    """(joiner tensor, manifest tensor) pairs copied out of scratch after the data."""
    addresses: list[int] | None = None
    """Per span, the CPU address its bytes go to (``None``: ask ``targets``)."""

    def views(self) -> list[torch.Tensor]:
        """Every span's buffer (made now where not made yet)."""
        return [self.targets[s] for s in range(len(self.targets))]


class _OwnSpans:
    """Per span, the joiner's bytes it lands in (views made only when asked for) or scratch."""

    def __init__(self, views: list[tuple[torch.Tensor, int, int] | torch.Tensor]) -> None:
        self._views = views

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, s: int) -> torch.Tensor:
        v = self._views[s]
        if isinstance(v, torch.Tensor):
            return v
        t = byte_view(*v)
        self._views[s] = t
        return t


class _Differs(Exception):
    """A value's type differs from the one matched before: match afresh (and name it)."""


def place(
    m: pb.Manifest,
    layout: Validated,
    into: object,
    arena: Arena,
    reserve: Callable[[int], None],
) -> Placed:
    """Matches ``into`` against the manifest (or reuses the match made for this layout and
    this state) and picks where each span lands; nothing is written.

    Raises:
        StateMismatchError: ``into`` does not match the donor's state.
    """
    skel = skeleton(into) if layout.digest is not None else None
    facts = tensor_facts(skel.tensors) if skel is not None else None
    key = (layout.digest, skel.key()) if skel is not None else None
    if key is not None and skel is not None and facts is not None:
        seen = skel

        def fits(known: _Matched) -> bool:
            return (
                known.sig == seen.sig
                and known.facts == facts
                and (known.ids is None or known.ids == [id(t) for t in seen.tensors])
            )

        known = MATCHES.get(key, fits)
        if known is not None:
            try:
                return _rematch(m, layout, known, skel, facts, arena, reserve)
            except _Differs:
                pass
    dst, state = match_in_place(m, layout.tensors, into)
    targets, copies, own = place_in_place(layout.tensors, layout.sizes, dst, arena, reserve)
    if key is not None and skel is not None and facts is not None:
        matched = _remember(m, layout, skel, facts, dst, targets, own, copies)
        if matched is not None:
            MATCHES.put(key, matched, _weight(0, len(matched.sig), len(matched.own), len(facts)))
    return Placed(state, targets, copies)


def _remember(
    m: pb.Manifest,
    layout: Validated,
    skel: Skeleton,
    facts: list[tuple[object, ...]],
    dst: dict[int, torch.Tensor],
    targets: list[torch.Tensor],
    own: list[bool],
    copies: list[tuple[torch.Tensor, int]],
) -> _Matched | None:
    """The match just made, in terms of the joiner's skeleton (``None``: not reusable)."""
    if any(f[5].type != "cpu" for f in facts):  # type: ignore[attr-defined]
        return None  # addresses are host addresses
    where = {id(t): k for k, t in enumerate(skel.tensors)}
    order = [where.get(id(dst.get(i)), -1) for i in range(len(layout.tensors))]
    if -1 in order:
        return None
    first: dict[int, int] = {}
    for i, spec in enumerate(layout.tensors):
        first.setdefault(spec.storage, i)
    spans: list[tuple[int, int, int] | None] = []
    for s, t in enumerate(targets):
        if not own[s] or s not in first:
            spans.append(None)
            continue
        k = order[first[s]]
        spans.append((k, int(t.storage_offset()), t.data_ptr() - skel.tensors[k].data_ptr()))
    value_types = [type(decode_value(v)) for v in m.values]
    tied = len(where) < len(skel.tensors)
    ids = [id(t) for t in skel.tensors] if tied else None
    copied = [i for _, i in copies]  # in the order the full path copies them
    return _Matched(skel.sig, facts, ids, order, spans, value_types, copied)


class _Retyped(TreeBuilder):
    """The donor's tree over the joiner's tensors, each value of the type matched before."""

    def __init__(
        self, m: pb.Manifest, mine: list[torch.Tensor], order: list[int], types: list[type]
    ) -> None:
        super().__init__(m, lambda _kind, arg, _path: mine[order[arg]], paths=False)
        self._types = types

    def _value(self, arg: int) -> object:
        v = super()._value(arg)
        if arg >= len(self._types) or type(v) is not self._types[arg]:
            raise _Differs
        return v


def _rematch(
    m: pb.Manifest,
    layout: Validated,
    known: _Matched,
    skel: Skeleton,
    facts: list[tuple[object, ...]],
    arena: Arena,
    reserve: Callable[[int], None],
) -> Placed:
    """The remembered match over the tensors at hand."""
    mine, order = skel.tensors, known.order
    state = _Retyped(m, mine, order, known.value_types).build()
    sizes = layout.sizes
    reserve(sum(n for n, o in zip(sizes, known.own, strict=True) if o is None))
    views: list[tuple[torch.Tensor, int, int] | torch.Tensor] = []
    addresses: list[int] = []
    for s, o in enumerate(known.own):
        if o is None:
            scratch = arena.empty(sizes[s])
            views.append(scratch)
            addresses.append(scratch.data_ptr())
        else:
            k, start, delta = o
            views.append((mine[k], start, sizes[s]))
            addresses.append(facts[k][0] + delta)  # type: ignore[operator]
    copies = [(mine[order[i]], i) for i in known.copies]
    return Placed(state, _OwnSpans(views), copies, addresses)
