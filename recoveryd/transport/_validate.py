"""Checking a received manifest before anything is built: counts, tensor columns, references.

Nothing here trusts the manifest: every index, size, stride and extent is
checked against the others and against fixed bounds, so a hostile or broken
donor cannot make the joiner allocate, index or write out of range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recoveryd.errors import ManifestError
from recoveryd.transport import _dtypes
from recoveryd.transport._pieces import Message
from recoveryd.transport.config import MIN_BUCKET_BYTES
from recoveryd.transport.format import (
    FORMAT_VERSION,
    MAX_MESSAGE_BYTES,
    MAX_NUMEL,
    NODE_TENSOR,
    SPAN_ALIGN,
)
from recoveryd.v1 import manifest_pb2 as pb


@dataclass(slots=True)
class TensorSpec:
    """One tensor of the manifest, decoded."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage: int
    byte_offset: int
    requires_grad: bool
    numel: int
    contiguous: bool
    extent: int  # bytes from its first to one past its last element; 0 if empty


MAX_SHARDS = 1 << 16
"""The most shards a ShardedTensor may have."""
MAX_SHARD_PAIRS = 1 << 22
"""The most shard pairs the overlap checks of one manifest compare (shards that
overlap on the dim swept)."""
MAX_MESH_RANKS = 1 << 24
"""The most ranks a DTensor's mesh may have."""
MAX_RANK = (1 << 31) - 1
"""The largest global rank (torch's ranks are 32-bit ints)."""


class PairBudget:
    """The shard pairs the overlap checks of one manifest may still compare.

    One budget spans the manifest, so many ShardedTensors each just under a
    per-tensor bound cannot add up to a quadratic amount of work.
    """

    __slots__ = ("left",)

    def __init__(self, pairs: int = MAX_SHARD_PAIRS) -> None:
        self.left = pairs

    def spend(self, where: str) -> None:
        """Counts one comparison.

        Raises:
            ManifestError: the budget is spent.
        """
        self.left -= 1
        if self.left < 0:
            raise ManifestError(
                f"{where}: the manifest's shards overlap in too many pairs on every dim "
                f"(more than {MAX_SHARD_PAIRS} compared)"
            )


def _check_columns(m: pb.Manifest) -> None:
    """The cheap facts, before any object is built: version, column lengths, counts, messages."""
    if m.format_version != FORMAT_VERSION:
        raise ManifestError(
            f"manifest format {m.format_version}, this recoveryd reads {FORMAT_VERSION}: "
            "upgrade the older side"
        )
    nodes = len(m.node_kind)
    if len(m.node_arg) != nodes:
        raise ManifestError("node columns have different lengths")
    if len(m.key_str) + len(m.key_int) != len(m.key_kind):
        raise ManifestError(
            f"{len(m.key_kind)} dict keys, {len(m.key_str)} str and {len(m.key_int)} int ones"
        )
    if len(m.values) + len(m.dtensors) + len(m.sharded_tensors) > nodes:
        raise ManifestError("more values, DTensors and ShardedTensors than tree nodes")
    n = len(m.tensor_dtype)
    cols = (
        m.tensor_ndim,
        m.tensor_storage,
        m.tensor_byte_offset,
        m.tensor_requires_grad,
        m.tensor_is_parameter,
    )
    if any(len(c) != n for c in cols):
        raise ManifestError("tensor columns have different lengths")
    if len(m.storage_nbytes) > n:
        raise ManifestError(
            f"{len(m.storage_nbytes)} spans for {n} tensors: every span is some tensor's"
        )
    _check_messages(m)


def _check_messages(m: pb.Manifest) -> None:
    """No more messages than a donor cuts, each in bounds, covering the spans exactly.

    A donor packs small spans whole and cuts a span of ``n`` bytes into at most
    ``ceil(n / bucket_bytes)`` messages, ``bucket_bytes >= MIN_BUCKET_BYTES``
    (an exact bound: 4 KiB buckets and ``direct_bytes=1`` reach it).
    """
    sizes = list(m.storage_nbytes)
    count = len(m.message_nbytes)
    total = sum(sizes)
    if count > len(sizes) - sizes.count(0):  # more than one per span: the exact bound
        most = sum(-(-n // MIN_BUCKET_BYTES) for n in sizes)
        if count > most:
            raise ManifestError(
                f"{count} messages for {total} bytes in {len(sizes)} spans; a donor cuts "
                f"them into at most {most} (a span of n bytes into ceil(n / "
                f"{MIN_BUCKET_BYTES}) at most, small ones packed whole)"
            )
    if any(n == 0 or n > MAX_MESSAGE_BYTES for n in m.message_nbytes):
        raise ManifestError("a message is empty or larger than 1 GiB")
    if sum(m.message_nbytes) != total:
        raise ManifestError("messages do not cover the storages exactly")


def decode_tensors(m: pb.Manifest) -> list[TensorSpec]:
    """Checks the columns' lengths and counts first, then decodes and bounds-checks the tensors.

    No tensor's elements may share memory (a donor sends such a view dense),
    and every span is exactly the bytes its tensors cover, as a donor cuts it.

    Raises:
        ManifestError: naming what is inconsistent, and where.
    """
    _check_columns(m)
    ndims = list(m.tensor_ndim)
    if not len(m.tensor_shape) == len(m.tensor_stride) == sum(ndims):
        raise ManifestError("tensor shapes/strides do not match the tensors' dimensions")
    shapes, strides = list(m.tensor_shape), list(m.tensor_stride)
    storages, offsets = list(m.tensor_storage), list(m.tensor_byte_offset)
    grads, span = list(m.tensor_requires_grad), list(m.storage_nbytes)
    # Per span: whether any tensor is in it, its tensors' first byte and end.
    seen, end = bytearray(len(span)), [0] * len(span)
    first = [0 if n == 0 else MAX_NUMEL for n in span]
    out: list[TensorSpec] = []
    pos = 0
    for i, code in enumerate(m.tensor_dtype):
        dtype = _dtypes.FROM_PB.get(code)
        if dtype is None:
            raise ManifestError(f"tensor {i}: unknown dtype code {code}")
        nd = ndims[i]
        if nd > 64:
            raise ManifestError(f"tensor {i}: {nd} dimensions")
        shape = tuple(shapes[pos : pos + nd])
        stride = tuple(strides[pos : pos + nd])
        pos += nd
        s = storages[i]
        if s >= len(span):
            raise ManifestError(f"tensor {i}: storage {s} out of range")
        itemsize = dtype.itemsize
        off = offsets[i]
        if off % itemsize:
            raise ManifestError(f"tensor {i}: byte offset {off} not a multiple of {itemsize}")
        if nd == 1:  # the common case, without the generic loops
            numel, st = shape[0], stride[0]
            if numel < 0 or st < 0:
                raise ManifestError(f"tensor {i}: negative size or stride")
            last, contiguous = (numel - 1) * st, st == 1 or numel < 2
        else:
            if any(d < 0 for d in shape) or any(st < 0 for st in stride):
                raise ManifestError(f"tensor {i}: negative size or stride")
            numel = math.prod(shape)
            last = sum((d - 1) * st for d, st in zip(shape, stride, strict=True))
            contiguous = _is_contiguous(shape, stride)
        extent = 0
        seen[s] = 1
        if numel:
            if numel > MAX_NUMEL:
                raise ManifestError(f"tensor {i}: {numel} elements")
            if not contiguous and numel > 1 and not one_to_one(shape, stride):
                raise ManifestError(
                    f"tensor {i}: shape {list(shape)} with strides {list(stride)} puts "
                    "several elements in one place (a zero or overlapping stride); a donor "
                    "sends such a view dense"
                )
            extent = (last + 1) * itemsize
            reach = off + extent
            if reach > span[s]:
                raise ManifestError(f"tensor {i}: reaches byte {reach} of a {span[s]}-byte span")
            if off < first[s]:
                first[s] = off
            if reach > end[s]:
                end[s] = reach
        out.append(TensorSpec(dtype, shape, stride, s, off, grads[i], numel, contiguous, extent))
    if end != span or 0 in seen or max(first, default=0) >= SPAN_ALIGN:
        _refuse_span(span, seen, first, end)
    return out


def one_to_one(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether every element has bytes of its own: taken by growing stride, each dim
    of size > 1 steps past everything the smaller ones reach."""
    reach = 0
    for st, d in sorted((st, d) for d, st in zip(shape, stride, strict=True) if d > 1):
        if st <= reach:
            return False
        reach += (d - 1) * st
    return True


def _refuse_span(span: list[int], seen: bytearray, first: list[int], end: list[int]) -> None:
    """Names the first span that is no tensor's, or not exactly the bytes its tensors cover."""
    for s, (n, e) in enumerate(zip(span, end, strict=True)):
        if e != n or not seen[s] or first[s] >= SPAN_ALIGN:
            covered = f"bytes {first[s]} to {e}" if e else "no bytes" if seen[s] else "none"
            raise ManifestError(
                f"span {s} is {n} bytes, its tensors cover {covered}: a donor sends the bytes "
                f"its tensors cover, from the {SPAN_ALIGN}-byte boundary below the first"
            )


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for d, st in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and st != expected:
            return False
        expected *= d
    return True


def check_manifest(m: pb.Manifest, tensors: list[TensorSpec]) -> None:
    """Checks the columns' references to each other (the tree is checked as it is built)."""
    for d in m.dtensors:
        if d.local_tensor >= len(tensors):
            raise ManifestError("a DTensor names a tensor out of range")
    # Every tensor is one leaf's, exactly once: nothing unreferenced, nothing shared.
    refs = [a for k, a in zip(m.node_kind, m.node_arg, strict=True) if k == NODE_TENSOR]
    refs.extend(d.local_tensor for d in m.dtensors)
    for st in m.sharded_tensors:
        refs.extend(st.local_tensor)
    if len(refs) != len(tensors) or sorted(refs) != list(range(len(tensors))):
        raise ManifestError("tensors are not each referenced exactly once by the tree")
    for st in m.sharded_tensors:
        if len(st.local_shard) != len(st.local_tensor):
            raise ManifestError("a ShardedTensor's local shard columns differ in length")
        if any(j >= len(st.shards) for j in st.local_shard) or any(
            t >= len(tensors) for t in st.local_tensor
        ):
            raise ManifestError("a ShardedTensor names a shard or tensor out of range")


def check_dtensor(d: pb.DTensorMeta, tensors: list[TensorSpec], where: str) -> None:
    """A DTensor's facts agree with each other and with its local shard (``where``: its path).

    Raises:
        ManifestError: naming the path and what disagrees.
    """
    local = tensors[d.local_tensor]
    nd = len(d.global_shape)
    if len(d.global_stride) != nd or len(local.shape) != nd:
        raise ManifestError(
            f"{where}: {nd}-d global shape, {len(d.global_stride)}-d stride, "
            f"{len(local.shape)}-d local shard"
        )
    if any(n < 0 for n in d.global_shape):
        raise ManifestError(f"{where}: a negative size")
    if math.prod(d.global_shape) > MAX_NUMEL or any(
        not 0 <= s <= MAX_NUMEL for s in d.global_stride
    ):
        raise ManifestError(
            f"{where}: global shape {list(d.global_shape)}, stride {list(d.global_stride)} "
            f"(at most {MAX_NUMEL} elements, strides in [0, {MAX_NUMEL}])"
        )
    _check_device_type(d.device_type, where)
    if (
        len(d.mesh_shape) > 16
        or any(n < 1 for n in d.mesh_shape)
        or math.prod(d.mesh_shape) > MAX_MESH_RANKS
    ):
        raise ManifestError(f"{where}: a mesh of shape {list(d.mesh_shape)}")
    if d.mesh_ranks:
        if len(d.mesh_ranks) != math.prod(d.mesh_shape):
            raise ManifestError(
                f"{where}: {len(d.mesh_ranks)} mesh ranks for a mesh of shape {list(d.mesh_shape)}"
            )
        if any(not 0 <= r <= MAX_RANK for r in d.mesh_ranks):
            raise ManifestError(f"{where}: a mesh rank outside [0, {MAX_RANK}]")
        if len(set(d.mesh_ranks)) != len(d.mesh_ranks):
            raise ManifestError(f"{where}: a rank appears twice in the mesh")
    if d.mesh_dim_names and len(d.mesh_dim_names) != len(d.mesh_shape):
        raise ManifestError(
            f"{where}: {len(d.mesh_dim_names)} names for a {len(d.mesh_shape)}-d mesh"
        )
    if len(d.placements) != len(d.mesh_shape):
        raise ManifestError(
            f"{where}: {len(d.placements)} placements on a {len(d.mesh_shape)}-d mesh"
        )
    # Per tensor dim, how many ways plain Shard placements cut it (0: not
    # sharded; None: a strided shard, whose pieces torch sizes itself).
    ways: list[int | None] = [0] * nd
    for p, n in zip(d.placements, d.mesh_shape, strict=True):
        if p.kind not in (pb.Placement.KIND_SHARD, pb.Placement.KIND_STRIDED_SHARD):
            continue
        if not 0 <= p.dim < nd:
            raise ManifestError(f"{where}: shards dim {p.dim} of a {nd}-d tensor")
        if p.kind == pb.Placement.KIND_STRIDED_SHARD:
            if p.split_factor < 1:
                raise ManifestError(f"{where}: a strided shard of split factor {p.split_factor}")
            ways[p.dim] = None
        elif (w := ways[p.dim]) is not None:
            ways[p.dim] = max(w, 1) * n
    for dim, (n, g, w) in enumerate(zip(local.shape, d.global_shape, ways, strict=True)):
        if n > g:
            raise ManifestError(f"{where}: local shard of {n} > global {g} on dim {dim}")
        if w == 0 and n != g:
            raise ManifestError(
                f"{where}: dim {dim} is not sharded, yet its local shard has {n} of {g}"
            )
        if w and n > -(-g // w):
            raise ManifestError(
                f"{where}: dim {dim} is cut {w} ways, yet its local shard has {n} of {g} "
                f"(at most {-(-g // w)})"
            )


def _check_device_type(device_type: str, where: str) -> None:
    """The mesh's device type names a torch device type (empty: an older donor, ``cpu``)."""
    if not device_type:
        return
    try:
        ok = len(device_type) <= 32 and torch.device(device_type).index is None
    except (RuntimeError, ValueError):
        ok = False
    if not ok:
        raise ManifestError(f"{where}: the mesh's device type {device_type[:32]!r} is not one")


def check_sharded(
    st: pb.ShardedTensorMeta,
    tensors: list[TensorSpec],
    where: str,
    budget: PairBudget | None = None,
) -> None:
    """A ShardedTensor's shards lie in its global size, do not overlap, and fit its local tensors.

    An empty shard may sit past the end (torch's chunk sharding puts the
    empty chunks of a short dim there); its offsets need only be in range.

    Args:
        st: the facts.
        tensors: the manifest's tensors.
        where: the path, for errors.
        budget: the shard pairs the manifest's overlap checks may still
            compare (a fresh one when not given).

    Raises:
        ManifestError: naming the path (``where``) and what is wrong.
    """
    nd = len(st.global_size)
    size = list(st.global_size)
    if nd > 64 or any(n < 0 for n in size) or math.prod(size) > MAX_NUMEL:
        raise ManifestError(f"{where}: a global size {size}")
    if len(st.shards) > MAX_SHARDS:
        raise ManifestError(f"{where}: {len(st.shards)} shards (at most {MAX_SHARDS})")
    boxes = []
    for j, sh in enumerate(st.shards):
        lo, n = list(sh.offsets), list(sh.sizes)
        if len(lo) != nd or len(n) != nd:
            raise ManifestError(f"{where}: shard {j} is not {nd}-d")
        empty = 0 in n
        if any(
            o < 0 or k < 0 or o > MAX_NUMEL or (not empty and o + k > g)
            for o, k, g in zip(lo, n, size, strict=True)
        ):
            raise ManifestError(
                f"{where}: shard {j} (offsets {lo}, sizes {n}) leaves the global size {size}"
            )
        if st.group_ranks and sh.group_rank >= len(st.group_ranks):
            raise ManifestError(f"{where}: shard {j} on group rank {sh.group_rank}")
        if not empty:
            boxes.append((lo, [o + k for o, k in zip(lo, n, strict=True)], j))
    _check_disjoint(where, boxes, budget if budget is not None else PairBudget())
    if len(set(st.local_shard)) != len(st.local_shard):
        raise ManifestError(f"{where}: a shard is local twice")
    dtype = _dtypes.FROM_PB.get(st.dtype)
    for ti, si in zip(st.local_tensor, st.local_shard, strict=True):
        spec = tensors[ti]
        if list(spec.shape) != list(st.shards[si].sizes) or spec.dtype != dtype:
            raise ManifestError(
                f"{where}: local shard {si} is a {spec.dtype} {list(spec.shape)}, "
                f"its metadata says {dtype} {list(st.shards[si].sizes)}"
            )


def _check_disjoint(
    where: str, boxes: list[tuple[list[int], list[int], int]], budget: PairBudget
) -> None:
    """No two (non-empty) shards share an element.

    A sweep along the dim whose shards start at the most distinct offsets
    (the dim they are cut along): only shards overlapping on it are compared.
    """
    if len(boxes) < 2 or not boxes[0][0]:
        return
    nd = len(boxes[0][0])
    dim = max(range(nd), key=lambda k: len({b[0][k] for b in boxes}))
    boxes.sort(key=lambda b: b[0][dim])
    active: list[tuple[list[int], list[int], int]] = []
    for box in boxes:
        active = [a for a in active if a[1][dim] > box[0][dim]]
        for other in active:
            budget.spend(where)
            if all(
                lo1 < h2 and lo2 < h1
                for lo1, h1, lo2, h2 in zip(box[0], box[1], other[0], other[1], strict=True)
            ):
                raise ManifestError(f"{where}: shards {other[2]} and {box[2]} overlap")
        active.append(box)


def check_chain(chain: list[int], src: int, me: int, world: int) -> None:
    """Checks that the relay chain leads from ``src`` through this rank, within the group."""
    if not chain or chain[0] != src or chain.count(me) != 1:
        raise ManifestError(f"relay chain {chain} does not lead from rank {src} to {me}")
    if any(not 0 <= r < world for r in chain) or len(set(chain)) != len(chain):
        raise ManifestError(f"relay chain {chain} names ranks outside the group or twice")


def check_packing(messages: list[Message], sizes: list[int]) -> None:
    """Checks that every packed message carries whole spans (only direct ones cut a span)."""
    for msg in messages:
        if not msg.direct and any(
            o or n != sizes[sp]
            for sp, o, n in zip(msg.span_ids, msg.offsets, msg.sizes, strict=True)
        ):
            raise ManifestError("a packed message carries part of a span")
