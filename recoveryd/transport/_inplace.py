"""The in-place rebuild: the donor's tree over the joiner's own tensors.

An in-place receive is matched against the joiner's state_dict (every
path, container, plain value's type, tensor kind, shape, dtype, DTensor
placement and ShardedTensor offset) before a single byte is written; then each span lands straight in the joiner's
memory where its tensors sit the way the donor's do, and through scratch
plus per-tensor copies where they do not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from recoveryd.errors import ManifestError, StateMismatchError
from recoveryd.transport._memory import Arena
from recoveryd.transport._pieces import byte_view
from recoveryd.transport._sharding import (
    LocalDTensor,
    LocalShardedTensor,
    decode_placement,
    dtensor_meta,
    sharded_meta,
)
from recoveryd.transport._validate import TensorSpec, one_to_one
from recoveryd.transport.format import (
    LEAF_KINDS,
    NODE_DICT,
    NODE_DTENSOR,
    NODE_LIST,
    NODE_ORDERED_DICT,
    NODE_TENSOR,
    NODE_TUPLE,
    NODE_VALUE,
    Path,
    path_str,
)
from recoveryd.transport.tree import TreeBuilder, flatten_leaves, local_tensors
from recoveryd.v1 import manifest_pb2 as pb


def match_in_place(
    m: pb.Manifest, tensors: list[TensorSpec], into: object
) -> tuple[dict[int, torch.Tensor], object]:
    """Matches the donor's tree against the joiner's, node by node.

    Every container must be the joiner's kind (a dict or an OrderedDict for a
    dict, a list or a tuple of the same length), every path the joiner's,
    every tensor of the joiner's kind, shape and dtype, and every plain value
    of the joiner's value's exact type there (``bool`` is not ``int``, ``int``
    is not ``float``, ``None`` only where the joiner has ``None``); the
    values themselves may differ. A subtree the joiner lacks is named once
    and read past, building nothing.

    Returns:
        The joiner tensor for each manifest tensor index, and the donor's
        tree with the joiner's own tensor objects as its tensor leaves.

    Raises:
        StateMismatchError: naming every path that is missing, extra, or of
            another kind, type, shape or dtype. Nothing has been written.
    """
    have = flatten_leaves(into)
    sent: set[Path] = set()
    dst: dict[int, torch.Tensor] = {}
    problems: list[str] = []

    def check(index: int, t: torch.Tensor, path: Path, suffix: str = "") -> None:
        spec = tensors[index]
        if t.layout is not torch.strided or t.is_meta:
            where = path_str(path) + suffix
            problems.append(
                f"{where}: a {'meta' if t.is_meta else t.layout} tensor here, which holds no "
                "memory to receive into; make it a dense tensor"
            )
        elif t.dtype != spec.dtype:
            where = path_str(path) + suffix
            problems.append(f"{where}: dtype {t.dtype} here, {spec.dtype} sent")
        elif t.shape != spec.shape:
            where = path_str(path) + suffix
            problems.append(f"{where}: shape {list(t.shape)} here, {list(spec.shape)} sent")
        elif not t.is_contiguous() and writable(t) is None:
            problems.append(
                f"{path_str(path) + suffix}: strides {list(t.stride())} here put several "
                "elements in one place, which cannot be written; make it contiguous"
            )
        else:
            dst[index] = t

    def leaf(kind: int, arg: int, path: Path) -> object:
        sent.add(path)
        mine = matcher.mine
        if kind == NODE_TENSOR and (type(mine) is torch.Tensor or type(mine) is torch.nn.Parameter):
            check(arg, mine, path)  # the common case first
            return mine
        where = path_str(path)
        if kind == NODE_TENSOR:
            problems.append(f"{where}: {_what(mine)} here, a tensor sent")
        elif kind == NODE_DTENSOR:
            if not isinstance(mine, DTensor | LocalDTensor):
                problems.append(f"{where}: {_what(mine)} here, a DTensor sent")
            else:
                sent_meta = m.dtensors[arg]
                why = _dtensor_differs(dtensor_meta(mine, path), sent_meta)
                if why:
                    problems.append(f"{where}: {why}")
                else:
                    local = mine.local if isinstance(mine, LocalDTensor) else mine._local_tensor
                    check(sent_meta.local_tensor, local, path)
        elif not isinstance(mine, ShardedTensor | LocalShardedTensor):
            problems.append(f"{where}: {_what(mine)} here, a ShardedTensor sent")
        else:
            _match_sharded(m.sharded_tensors[arg], mine, path, problems, check)
        return mine

    matcher = _Matcher(m, tensors, into, leaf, problems)
    state = matcher.build()
    for path, obj in have.items():
        if path not in sent and local_tensors(obj):
            problems.append(f"{path_str(path)}: not in the donor's state_dict")
    if problems:
        raise StateMismatchError(problems)
    return dst, state


class _Matcher(TreeBuilder):
    """Builds the donor's tree along the joiner's: ``mine`` is the joiner's node at the
    node being built; what the joiner lacks or holds otherwise goes to ``problems``."""

    def __init__(
        self,
        m: pb.Manifest,
        tensors: list[TensorSpec],
        into: object,
        leaf: Callable[[int, int, Path], object],
        problems: list[str],
    ) -> None:
        super().__init__(m, leaf, tensors=tensors)
        self.mine = into
        self._problems = problems

    def _refuse(self, why: str) -> None:
        self._problems.append(f"{path_str(self._path)}: {why}")

    def _child(self, mine: object, key: object, depth: int) -> object:
        self._path.append(key)
        self.mine = mine
        node = self._node(depth)
        self._path.pop()
        return node

    def _node(self, depth: int) -> object:
        mine, pos = self.mine, self._pos
        kind, arg = self._read(depth)
        if kind in LEAF_KINDS:
            return self._leaf_node(kind, arg)
        if kind == NODE_VALUE:
            v = self._value(arg)
            if type(v) is not type(mine):
                self._refuse(f"{_what(mine)} here, {_what(v)} sent")
            return v
        if kind in (NODE_DICT, NODE_ORDERED_DICT):
            if not isinstance(mine, dict) or type(mine) not in (dict, OrderedDict):
                self._mismatch(pos, depth, f"{_what(mine)} here, a dict sent")
                return None
            d: dict[object, object] = {} if kind == NODE_DICT else OrderedDict()
            for _ in range(arg):
                k = self._next_key()
                if k in mine:
                    d[k] = self._child(mine[k], k, depth + 1)
                else:
                    self._path.append(k)
                    self._refuse("missing in the joiner's state_dict")
                    self._skip(depth + 1)
                    self._path.pop()
            return d
        if kind in (NODE_LIST, NODE_TUPLE):
            want = list if kind == NODE_LIST else tuple
            if not isinstance(mine, list | tuple) or type(mine) is not want or len(mine) != arg:
                here = f"{_what(mine)} of {len(mine)}" if isinstance(mine, list | tuple) else ""
                why = f"{here or _what(mine)} here, a {want.__name__} of {arg} sent"
                self._mismatch(pos, depth, why)
                return None
            items = [self._child(mine[i], i, depth + 1) for i in range(arg)]
            return items if kind == NODE_LIST else tuple(items)
        raise ManifestError(f"unknown node kind {kind}")

    def _mismatch(self, pos: int, depth: int, why: str) -> None:
        """Names the node at ``pos`` and reads past its subtree."""
        self._refuse(why)
        self._pos = pos
        self._skip(depth)


def _what(obj: object) -> str:
    return "None" if obj is None else type(obj).__name__


def _match_sharded(
    sent_st: pb.ShardedTensorMeta,
    mine: ShardedTensor | LocalShardedTensor,
    path: Path,
    problems: list[str],
    check: Callable[[int, torch.Tensor, Path, str], None],
) -> None:
    """A ShardedTensor's global size and local shards match the joiner's."""
    where = path_str(path)
    here = sharded_meta(mine, path)
    if isinstance(mine, LocalShardedTensor):
        locals_ = mine.locals
    else:
        locals_ = [s.tensor for s in mine.local_shards()]
    if list(here.global_size) != list(sent_st.global_size):
        problems.append(
            f"{where}: global size {list(here.global_size)} here, {list(sent_st.global_size)} sent"
        )
        return
    if len(locals_) != len(sent_st.local_tensor):
        problems.append(
            f"{where}: {len(locals_)} local shards here, {len(sent_st.local_tensor)} sent"
        )
        return
    for j, (local, mine_si, ti, si) in enumerate(
        zip(locals_, here.local_shard, sent_st.local_tensor, sent_st.local_shard, strict=True)
    ):
        ours, theirs = here.shards[mine_si], sent_st.shards[si]
        if list(ours.offsets) != list(theirs.offsets) or list(ours.sizes) != list(theirs.sizes):
            problems.append(
                f"{where}.<shard {j}>: offsets {list(ours.offsets)} size "
                f"{list(ours.sizes)} here, offsets {list(theirs.offsets)} size "
                f"{list(theirs.sizes)} sent"
            )
        else:
            check(ti, local, path, f".<shard {j}>")


def _dtensor_differs(here: pb.DTensorMeta, sent: pb.DTensorMeta) -> str:
    """How a joiner's DTensor is sharded unlike the donor's, in words ("" if alike)."""
    if list(here.global_shape) != list(sent.global_shape):
        return f"global shape {list(here.global_shape)} here, {list(sent.global_shape)} sent"
    if list(here.mesh_shape) != list(sent.mesh_shape):
        return f"mesh shape {list(here.mesh_shape)} here, {list(sent.mesh_shape)} sent"
    if list(here.placements) != list(sent.placements):
        return f"placements {_placements_text(here)} here, {_placements_text(sent)} sent"
    return ""


def _placements_text(meta: pb.DTensorMeta) -> str:
    return "[" + ", ".join(repr(decode_placement(p)) for p in meta.placements) + "]"


def place_in_place(
    tensors: list[TensorSpec],
    sizes: list[int],
    dst: dict[int, torch.Tensor],
    arena: Arena,
    reserve: Callable[[int], None],
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]], list[bool]]:
    """Chooses, per span, the joiner's own memory (same layout) or scratch plus copies.

    ``reserve`` is called with the scratch's total before any of it is
    allocated (it raises when that is over the joiner's limit).

    Returns:
        One buffer per span, the (joiner tensor, manifest tensor) pairs to
        copy out of scratch once the data is in (see :func:`copy_into`), and
        per span whether its buffer is the joiner's own memory.
    """
    by_span: list[list[int]] = [[] for _ in sizes]
    for i, spec in enumerate(tensors):
        by_span[spec.storage].append(i)
    mine = [
        _same_layout(members, tensors, dst, n) for members, n in zip(by_span, sizes, strict=True)
    ]
    reserve(sum(n for n, t in zip(sizes, mine, strict=True) if t is None))
    targets: list[torch.Tensor] = []
    copies: list[tuple[torch.Tensor, int]] = []
    for s, target in enumerate(mine):
        if target is None:
            target = arena.empty(sizes[s])
            copies.extend((dst[i], i) for i in by_span[s])
        targets.append(target)
    return targets, copies, [t is not None for t in mine]


def writable(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` with every zero-stride dim narrowed to one element (an expanded tensor's own
    memory), or ``None`` if its elements still share memory (nothing can be written)."""
    for d, (n, st) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if n > 1 and st == 0:
            t = t.narrow(d, 0, 1)
    return t if one_to_one(tuple(t.shape), tuple(t.stride())) else None


def copy_into(t: torch.Tensor, src: torch.Tensor) -> None:
    """Copies a received tensor into the joiner's ``t`` of the same shape.

    An expanded ``t`` (zero strides: one element stands for a whole dim)
    takes ``src``'s first element along each dim it repeats; the donor's
    tensor repeats it too (it was sent dense, see the donor's walk).
    """
    if 0 not in t.stride():
        t.copy_(src)
        return
    for d, (n, st) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if n > 1 and st == 0:
            t, src = t.narrow(d, 0, 1), src.narrow(d, 0, 1)
    t.copy_(src)


def _same_layout(
    members: list[int], tensors: list[TensorSpec], dst: dict[int, torch.Tensor], nbytes: int
) -> torch.Tensor | None:
    """The joiner's bytes that mirror a donor span, if its tensors sit the same way in one storage."""
    if not members:
        return None
    if len(members) == 1:
        # The usual case: one contiguous tensor filling its span on both sides.
        t, spec = dst[members[0]], tensors[members[0]]
        if (
            spec.contiguous
            and spec.byte_offset == 0
            and spec.numel * spec.dtype.itemsize == nbytes
            and t.is_contiguous()
            and not t.is_conj()
            and not t.is_neg()
        ):
            return t.detach().reshape(-1).view(torch.uint8)
    # Writing the span straight into the joiner's memory is only right if the
    # donor's tensors cover every byte of it: alignment padding or the gaps
    # between views would otherwise land on joiner bytes no tensor names.
    covered = 0
    for lo, hi in sorted(
        (tensors[i].byte_offset, tensors[i].byte_offset + tensors[i].extent) for i in members
    ):
        if lo > covered:
            return None
        covered = max(covered, hi)
    if covered < nbytes:
        return None
    for i in members:
        spec, t = tensors[i], dst[i]
        if spec.extent != spec.numel * spec.dtype.itemsize or t.is_conj() or t.is_neg():
            return None  # gaps inside a tensor, or a view that transforms on write
    first = dst[members[0]]
    ptr = first.untyped_storage().data_ptr()
    base: int | None = None
    for i in members:
        t, spec = dst[i], tensors[i]
        if t.untyped_storage().data_ptr() != ptr or t.device != first.device:
            return None
        if spec.numel and tuple(t.stride()) != spec.stride:
            return None
        b = int(t.storage_offset()) * t.element_size() - spec.byte_offset
        if base is None:
            base = b
        elif b != base:
            return None
    assert base is not None
    if base < 0 or base + nbytes > first.untyped_storage().nbytes():
        return None
    return byte_view(first, base, nbytes)
