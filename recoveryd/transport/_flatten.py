"""Donor side of the manifest: walk a state_dict into a manifest and a byte plan.

The walk finds every tensor (plain, DTensor local, ShardedTensor local shard),
groups them by the storage they view, and sends each storage's covered bytes
once: tied weights and views of one flat buffer stay one span on the wire and
come back as views of one buffer. A strided view whose extent is mostly gaps
(``t[:, ::1000]``) is sent as a dense copy instead, so no gap bytes are sent,
and so is a view whose elements share memory (``expand``'s zero strides,
``unfold``'s overlapping windows): a joiner refuses such strides, since a
manifest could otherwise make it a tensor of 2**59 elements over 4 bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from recoveryd.errors import UnsupportedValueError
from recoveryd.transport import _dtypes
from recoveryd.transport._pieces import Message, byte_view
from recoveryd.transport._sharding import (
    LocalDTensor,
    LocalShardedTensor,
    dtensor_meta,
    sharded_meta,
)
from recoveryd.transport._validate import one_to_one
from recoveryd.transport.format import (
    FORMAT_VERSION,
    KEY_INT,
    KEY_STR,
    NODE_DICT,
    NODE_DTENSOR,
    NODE_LIST,
    NODE_ORDERED_DICT,
    NODE_SHARDED_TENSOR,
    NODE_TENSOR,
    NODE_TUPLE,
    NODE_VALUE,
    SPAN_ALIGN,
    path_str,
)
from recoveryd.v1 import manifest_pb2 as pb

# A strided tensor whose extent is this many times its own bytes is sent dense.
_GAPPY_RATIO = 2


@dataclass(slots=True)
class Span:
    """Bytes ``[lo, lo + nbytes)`` of ``owner``'s storage, which starts at address ``base``."""

    owner: torch.Tensor
    base: int
    lo: int
    nbytes: int
    leaf: int = -1
    """The manifest index of ``owner``; -1 when ``owner`` is a copy made for the send."""

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def view(self, offset: int, n: int) -> torch.Tensor:
        """A 1-D uint8 tensor over ``n`` bytes of the span from ``offset``."""
        return byte_view(self.owner, self.lo + offset, n)


@dataclass(slots=True)
class SendPlan:
    """What the donor streams: the manifest and the spans, in stream order."""

    manifest: pb.Manifest
    spans: list[Span]
    payload_bytes: int
    messages: list[Message] | None = None
    """The messages cut over the spans, when already known (a layout seen before)."""
    reused: bool = False
    """Whether the plan is one remembered for this layout (not walked afresh)."""


@dataclass(slots=True)
class _Leaf:
    tensor: torch.Tensor
    index: int  # position in the tensor_* columns
    base: int  # address of the storage's first byte
    lo: int  # byte extent within its storage
    hi: int
    own: bool = True  # the state's own tensor, not a copy made for the send


def _extent(t: torch.Tensor) -> tuple[int, int]:
    size = t.element_size()
    if t.numel() == 0:
        return 0, 0
    last = sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    start = int(t.storage_offset())
    return start * size, (start + last + 1) * size


class _Walker:
    def __init__(self, m: pb.Manifest) -> None:
        self.m = m
        self.kinds: list[int] = []
        self.args: list[int] = []
        self.key_kind: list[int] = []
        self.key_str: list[str] = []
        self.key_int: list[int] = []
        self.dtype: list[int] = []
        self.ndim: list[int] = []
        self.shape: list[int] = []
        self.stride: list[int] = []
        self.requires_grad: list[bool] = []
        self.is_parameter: list[bool] = []
        self.tensors: list[torch.Tensor] = []
        self.by_storage: dict[tuple[int, int], list[_Leaf]] = {}
        self.dense: list[_Leaf] = []

    def walk(self, obj: object, path: list[object]) -> None:
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:  # most leaves: test first
            self.kinds.append(NODE_TENSOR)
            self.args.append(self._tensor(obj, path))  # type: ignore[arg-type]
        elif kind is dict or kind is OrderedDict:
            d: dict[object, object] = obj  # type: ignore[assignment]
            self.kinds.append(NODE_DICT if kind is dict else NODE_ORDERED_DICT)
            self.args.append(len(d))
            for k, v in d.items():
                tk = type(k)
                if tk is str:
                    self.key_kind.append(KEY_STR)
                    self.key_str.append(k)  # type: ignore[arg-type]
                elif tk is int and -(1 << 63) <= k < (1 << 63):  # type: ignore[operator]
                    self.key_kind.append(KEY_INT)
                    self.key_int.append(k)  # type: ignore[arg-type]
                else:
                    raise UnsupportedValueError(path_str([*path, f"<key {k!r}>"]), k)
                path.append(k)
                self.walk(v, path)
                path.pop()
        elif kind is list or kind is tuple:
            seq: list[object] = obj  # type: ignore[assignment]
            self.kinds.append(NODE_LIST if kind is list else NODE_TUPLE)
            self.args.append(len(seq))
            for i, v in enumerate(seq):
                path.append(i)
                self.walk(v, path)
                path.pop()
        elif isinstance(obj, DTensor | LocalDTensor):
            self.kinds.append(NODE_DTENSOR)
            self.args.append(len(self.m.dtensors))
            self._dtensor(obj, path)
        elif isinstance(obj, ShardedTensor | LocalShardedTensor):
            self.kinds.append(NODE_SHARDED_TENSOR)
            self.args.append(len(self.m.sharded_tensors))
            self._sharded(obj, path)
        elif isinstance(obj, torch.Tensor):
            self.kinds.append(NODE_TENSOR)
            self.args.append(self._tensor(obj, path))
        else:
            self.kinds.append(NODE_VALUE)
            self.args.append(len(self.m.values))
            encode_value(self.m.values.add(), obj, path)

    def _tensor(self, t: torch.Tensor, path: list[object]) -> int:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            raise UnsupportedValueError(path_str(path), t)
        code = _dtypes.TO_PB.get(t.dtype)
        if code is None or t.layout is not torch.strided or t.is_meta:
            raise UnsupportedValueError(path_str(path), t)
        index = len(self.tensors)
        requires_grad = t.requires_grad
        is_parameter = type(t) is torch.nn.Parameter
        own = True  # whether t is the state's own tensor (not a copy made here)
        if t.is_conj() or t.is_neg():
            # Lazy conjugate/negative views: their storage holds the other values.
            t = t.detach().resolve_conj().resolve_neg().contiguous()
            own = False
        itemsize = t.element_size()
        nbytes = t.numel() * itemsize
        contiguous = t.is_contiguous()
        if contiguous:
            lo = int(t.storage_offset()) * itemsize
            hi = lo + nbytes
        else:
            lo, hi = _extent(t)
        if nbytes == 0:
            self.dense.append(_Leaf(t, index, t.data_ptr(), 0, 0, own))
        elif (hi - lo > _GAPPY_RATIO * nbytes and hi - lo > 64 * 1024) or (
            not contiguous and not one_to_one(tuple(t.shape), t.stride())
        ):
            t = t.detach().contiguous()
            self.dense.append(_Leaf(t, index, t.data_ptr(), 0, nbytes, own=False))
        else:
            # The storage's own address, without building a storage object per tensor.
            base = t.data_ptr() - lo
            leaf = _Leaf(t, index, base, lo, hi, own)
            key = (t.get_device(), base)
            group = self.by_storage.get(key)
            if group is None:
                self.by_storage[key] = [leaf]
            else:
                group.append(leaf)
        self.tensors.append(t)
        self.dtype.append(code)
        self.ndim.append(t.dim())
        self.shape.extend(t.shape)
        self.stride.extend(t.stride())
        self.requires_grad.append(requires_grad)
        self.is_parameter.append(is_parameter)
        return index

    def _dtensor(self, t: DTensor | LocalDTensor, path: list[object]) -> None:
        meta = self.m.dtensors.add()
        meta.CopyFrom(dtensor_meta(t, tuple(path)))
        local = t.local if isinstance(t, LocalDTensor) else t._local_tensor
        meta.local_tensor = self._tensor(local, [*path, "<local>"])

    def _sharded(self, t: ShardedTensor | LocalShardedTensor, path: list[object]) -> None:
        meta = self.m.sharded_tensors.add()
        meta.CopyFrom(sharded_meta(t, tuple(path)))
        if isinstance(t, LocalShardedTensor):
            locals_ = t.locals
        else:
            locals_ = [s.tensor for s in t.local_shards()]
        if len(locals_) != len(meta.local_shard):
            raise UnsupportedValueError(path_str([*path, "<local shards>"]), t)
        for j, local in enumerate(locals_):
            meta.local_tensor.append(self._tensor(local, [*path, f"<shard {j}>"]))


def encode_value(out: pb.Value, v: object, path: list[object]) -> None:
    """Writes a plain value into ``out``.

    Raises:
        UnsupportedValueError: a value the manifest cannot carry, naming ``path``.
    """
    kind = type(v)
    if v is None:
        out.none = True
    elif kind is bool:
        out.bool_value = v  # type: ignore[assignment]
    elif kind is int:
        if -(1 << 63) <= v < (1 << 63):  # type: ignore[operator]
            out.int_value = v  # type: ignore[assignment]
        else:
            out.big_int_value = str(v)
    elif kind is float:
        out.float_value = v  # type: ignore[assignment]
    elif kind is str:
        out.str_value = v  # type: ignore[assignment]
    elif kind is bytes:
        out.bytes_value = v  # type: ignore[assignment]
    elif kind is complex:
        out.complex_value.real = v.real  # type: ignore[attr-defined]
        out.complex_value.imag = v.imag  # type: ignore[attr-defined]
    elif kind is torch.dtype and v in _dtypes.TO_PB:
        out.dtype_value = _dtypes.TO_PB[v]  # type: ignore[assignment]
    elif kind is torch.Size:
        out.size_value.items.extend(v)  # type: ignore[arg-type]
    elif kind is torch.device:
        out.device_value = str(v)
    else:
        raise UnsupportedValueError(path_str(path), v)


def _merge(leaves: list[_Leaf]) -> list[list[_Leaf]]:
    """Groups leaves of one storage into runs whose aligned extents overlap or touch."""
    if len(leaves) == 1:
        return [leaves]
    leaves.sort(key=lambda leaf: leaf.lo)
    groups: list[list[_Leaf]] = []
    hi = -1
    for leaf in leaves:
        lo = leaf.lo - leaf.lo % SPAN_ALIGN
        if groups and lo <= hi:
            groups[-1].append(leaf)
            hi = max(hi, leaf.hi)
        else:
            groups.append([leaf])
            hi = leaf.hi
    return groups


def build_plan(
    state_dict: object,
    *,
    step: int | None,
    chain: list[int],
    bucket_bytes: int,
    direct_bytes: int,
    checksums: bool,
) -> SendPlan:
    """Walks ``state_dict`` into a :class:`SendPlan`.

    Raises:
        UnsupportedValueError: a leaf the manifest cannot carry, naming its path.
    """
    m = pb.Manifest(format_version=FORMAT_VERSION, checksums=checksums)
    if step is not None:
        m.step = step
    w = _Walker(m)
    w.walk(state_dict, [])
    storage_of = [0] * len(w.tensors)
    offset_of = [0] * len(w.tensors)
    spans: list[Span] = []
    span_sizes: list[int] = []
    groups = [g for leaves in w.by_storage.values() for g in _merge(leaves)]
    groups.extend([leaf] for leaf in w.dense)
    for group in groups:
        if len(group) == 1:
            first = group[0]
            lo, hi = first.lo - first.lo % SPAN_ALIGN, first.hi
        else:
            first = group[0]
            lo = min(leaf.lo for leaf in group)
            lo -= lo % SPAN_ALIGN
            hi = max(leaf.hi for leaf in group)
        for leaf in group:
            # A leaf's extent starts at its storage offset (strides are never negative).
            storage_of[leaf.index] = len(spans)
            offset_of[leaf.index] = leaf.lo - lo
        spans.append(Span(first.tensor, first.base, lo, hi - lo, first.index if first.own else -1))
        span_sizes.append(hi - lo)
    m.node_kind.extend(w.kinds)  # type: ignore[arg-type]
    m.node_arg.extend(w.args)
    m.key_kind.extend(w.key_kind)  # type: ignore[arg-type]
    m.key_str.extend(w.key_str)
    m.key_int.extend(w.key_int)
    m.tensor_dtype.extend(w.dtype)  # type: ignore[arg-type]
    m.tensor_ndim.extend(w.ndim)
    m.tensor_shape.extend(w.shape)
    m.tensor_stride.extend(w.stride)
    m.tensor_storage.extend(storage_of)
    m.tensor_byte_offset.extend(offset_of)
    m.tensor_requires_grad.extend(w.requires_grad)
    m.tensor_is_parameter.extend(w.is_parameter)
    m.storage_nbytes.extend(span_sizes)
    m.message_nbytes.extend(cut_messages(span_sizes, bucket_bytes, direct_bytes))
    m.chain.extend(chain)
    return SendPlan(manifest=m, spans=spans, payload_bytes=sum(span_sizes))


def cut_messages(span_sizes: list[int], bucket_bytes: int, direct_bytes: int) -> list[int]:
    """Cuts the concatenated spans into messages.

    A span of at least ``direct_bytes`` goes in messages of its own of at most
    ``bucket_bytes`` (straight from and into tensor memory, no staging copy);
    smaller spans are packed whole into buckets of at most ``bucket_bytes``.
    """
    out: list[int] = []
    bucket = 0
    for n in span_sizes:
        if n >= direct_bytes:
            if bucket:
                out.append(bucket)
                bucket = 0
            pieces = -(-n // bucket_bytes)
            size = -(-n // pieces)
            while n > 0:
                out.append(min(size, n))
                n -= size
        elif n:
            if bucket + n > bucket_bytes:
                out.append(bucket)
                bucket = 0
            bucket += n
    if bucket:
        out.append(bucket)
    return out
