"""Receiver side of the manifest: validate it, place its bytes, rebuild the tree.

Nothing here trusts the manifest: every index, size and extent is checked
before anything is allocated, and an in-place receive is matched against the
receiver's own state_dict (every path, kind, shape and dtype) before a single
byte is written into it.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from recoveryd.errors import ManifestError, StateMismatchError
from recoveryd.transport import _dtypes
from recoveryd.transport._alloc import Arena, SpanBuffers
from recoveryd.transport._flatten import FORMAT_VERSION, encode_placement, path_str
from recoveryd.transport._pieces import Buffers, Message, byte_view
from recoveryd.v1 import manifest_pb2 as pb

_MAX_DEPTH = 256
# torch counts elements in int64; beyond this a shape cannot be a real tensor.
_MAX_NUMEL = 1 << 60
_BIG_INT = re.compile(r"-?[0-9]{1,4300}")
# One message is never larger than this; bounds what a hostile manifest can
# make the receiver stage.
MAX_MESSAGE_BYTES = 1 << 30

Path = tuple[object, ...]

# Enum values as plain ints, looked up once.
_DICT, _ODICT = pb.NODE_KIND_DICT, pb.NODE_KIND_ORDERED_DICT
_LIST, _TUPLE, _VALUE = pb.NODE_KIND_LIST, pb.NODE_KIND_TUPLE, pb.NODE_KIND_VALUE
_TENSOR = pb.NODE_KIND_TENSOR
_LEAVES = frozenset((pb.NODE_KIND_TENSOR, pb.NODE_KIND_DTENSOR, pb.NODE_KIND_SHARDED_TENSOR))
_KEY_STR, _KEY_INT = pb.KEY_KIND_STR, pb.KEY_KIND_INT


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


def decode_tensors(m: pb.Manifest) -> list[TensorSpec]:
    """Decodes and bounds-checks the tensor columns.

    Raises:
        ManifestError: any column is inconsistent or a tensor reaches outside its span.
    """
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
    ndims = list(m.tensor_ndim)
    total_dims = sum(ndims)
    if len(m.tensor_shape) != total_dims or len(m.tensor_stride) != total_dims:
        raise ManifestError("tensor shapes/strides do not match the tensors' dimensions")
    shapes = list(m.tensor_shape)
    strides = list(m.tensor_stride)
    storages = list(m.tensor_storage)
    offsets = list(m.tensor_byte_offset)
    grads = list(m.tensor_requires_grad)
    span = list(m.storage_nbytes)
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
            numel, last = shape[0], shape[0] - 1
            contiguous = stride[0] == 1 or numel < 2
            if numel < 0 or stride[0] < 0:
                raise ManifestError(f"tensor {i}: negative size or stride")
            last *= stride[0]
        else:
            if any(d < 0 for d in shape) or any(st < 0 for st in stride):
                raise ManifestError(f"tensor {i}: negative size or stride")
            numel = math.prod(shape)
            last = sum((d - 1) * st for d, st in zip(shape, stride, strict=True))
            contiguous = _is_contiguous(shape, stride)
        extent = 0
        if numel:
            if numel > _MAX_NUMEL:
                raise ManifestError(f"tensor {i}: {numel} elements")
            extent = (last + 1) * itemsize
            if off + extent > span[s]:
                raise ManifestError(
                    f"tensor {i}: reaches byte {off + extent} of a {span[s]}-byte span"
                )
        out.append(TensorSpec(dtype, shape, stride, s, off, grads[i], numel, contiguous, extent))
    return out


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for d, st in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and st != expected:
            return False
        expected *= d
    return True


def check_manifest(m: pb.Manifest, tensors: list[TensorSpec]) -> None:
    """Checks everything but the tree (walked when it is rebuilt)."""
    if m.format_version != FORMAT_VERSION:
        raise ManifestError(
            f"manifest format {m.format_version}, this recoveryd reads {FORMAT_VERSION}: "
            "upgrade the older side"
        )
    if len(m.node_kind) != len(m.node_arg):
        raise ManifestError("node columns have different lengths")
    if any(n == 0 or n > MAX_MESSAGE_BYTES for n in m.message_nbytes):
        raise ManifestError("a message is empty or larger than 1 GiB")
    if sum(m.message_nbytes) != sum(m.storage_nbytes):
        raise ManifestError("messages do not cover the storages exactly")
    for d in m.dtensors:
        if d.local_tensor >= len(tensors):
            raise ManifestError("a DTensor names a tensor out of range")
    # Every tensor is one leaf's, exactly once: nothing unreferenced, nothing shared.
    refs = [a for k, a in zip(m.node_kind, m.node_arg, strict=True) if k == _TENSOR]
    refs.extend(d.local_tensor for d in m.dtensors)
    for st in m.sharded_tensors:
        refs.extend(st.local_tensor)
    if len(refs) != len(tensors) or sorted(refs) != list(range(len(tensors))):
        raise ManifestError("tensors are not each referenced exactly once by the tree")
    nd, ns = len(m.dtensors), len(m.sharded_tensors)
    for k, a in zip(m.node_kind, m.node_arg, strict=True):
        if (k == pb.NODE_KIND_DTENSOR and a >= nd) or (
            k == pb.NODE_KIND_SHARDED_TENSOR and a >= ns
        ):
            raise ManifestError("a DTensor or ShardedTensor node is out of range")
    for st in m.sharded_tensors:
        if len(st.local_shard) != len(st.local_tensor):
            raise ManifestError("a ShardedTensor's local shard columns differ in length")
        if any(j >= len(st.shards) for j in st.local_shard) or any(
            t >= len(tensors) for t in st.local_tensor
        ):
            raise ManifestError("a ShardedTensor names a shard or tensor out of range")


class TreeBuilder:
    """Walks the manifest's pre-order tree, calling ``leaf`` for tensor-like nodes."""

    def __init__(
        self, m: pb.Manifest, leaf: Callable[[int, int, Path], object], *, paths: bool = True
    ) -> None:
        self._kinds = list(m.node_kind)
        self._args = list(m.node_arg)
        self._key_kind = list(m.key_kind)
        self._key_str = list(m.key_str)
        self._key_int = list(m.key_int)
        self._values = m.values
        self._leaf = leaf
        self._paths = paths
        self._pos = 0
        self._key = 0
        self._str = 0
        self._int = 0

    def build(self) -> object:
        if not self._kinds:
            raise ManifestError("empty tree")
        root = self._node((), 0)
        if self._pos != len(self._kinds) or self._key != len(self._key_kind):
            raise ManifestError("tree has trailing nodes or keys")
        return root

    def _next_key(self) -> object:
        if self._key >= len(self._key_kind):
            raise ManifestError("tree runs out of dict keys")
        kind = self._key_kind[self._key]
        self._key += 1
        if kind == _KEY_STR and self._str < len(self._key_str):
            self._str += 1
            return self._key_str[self._str - 1]
        if kind == _KEY_INT and self._int < len(self._key_int):
            self._int += 1
            return self._key_int[self._int - 1]
        raise ManifestError(f"bad dict key kind {kind}")

    def _node(self, path: Path, depth: int) -> object:
        if depth > _MAX_DEPTH:
            raise ManifestError(f"tree deeper than {_MAX_DEPTH}")
        pos = self._pos
        if pos >= len(self._kinds):
            raise ManifestError("tree runs out of nodes")
        kind, arg = self._kinds[pos], self._args[pos]
        self._pos = pos + 1
        if kind in _LEAVES:
            return self._leaf(kind, arg, path)
        if kind in (_DICT, _ODICT):
            if arg > len(self._kinds):
                raise ManifestError("dict larger than the tree")
            d: dict[object, object] = {} if kind == _DICT else OrderedDict()
            for _ in range(arg):
                k = self._next_key()
                d[k] = self._node((*path, k) if self._paths else path, depth + 1)
            return d
        if kind in (_LIST, _TUPLE):
            if arg > len(self._kinds):
                raise ManifestError("list larger than the tree")
            if self._paths:
                items = [self._node((*path, i), depth + 1) for i in range(arg)]
            else:
                items = [self._node(path, depth + 1) for _ in range(arg)]
            return items if kind == _LIST else tuple(items)
        if kind == _VALUE:
            if arg >= len(self._values):
                raise ManifestError("value index out of range")
            return decode_value(self._values[arg])
        raise ManifestError(f"unknown node kind {kind}")


def decode_value(v: pb.Value) -> object:
    """Turns a manifest value back into the Python value it stands for."""
    which = v.WhichOneof("kind")
    if which is None or which == "none":
        return None
    if which == "bool_value":
        return v.bool_value
    if which == "int_value":
        return v.int_value
    if which == "float_value":
        return v.float_value
    if which == "str_value":
        return v.str_value
    if which == "bytes_value":
        return v.bytes_value
    if which == "complex_value":
        return complex(v.complex_value.real, v.complex_value.imag)
    if which == "dtype_value":
        dtype = _dtypes.FROM_PB.get(v.dtype_value)
        if dtype is None:
            raise ManifestError(f"unknown dtype code {v.dtype_value}")
        return dtype
    if which == "size_value":
        return torch.Size(v.size_value.items)
    if which == "device_value":
        try:
            return torch.device(v.device_value)
        except RuntimeError as e:
            raise ManifestError(f"bad device {v.device_value!r}") from e
    if which == "big_int_value":
        text = v.big_int_value
        if not _BIG_INT.fullmatch(text):
            raise ManifestError("bad big int value")
        return int(text)
    raise ManifestError(f"unknown value kind {which}")


def flatten_leaves(obj: object) -> dict[Path, object]:
    """Every leaf of a state_dict by path (tensors, DTensor, ShardedTensor and values)."""
    out: dict[Path, object] = {}

    def walk(o: object, path: Path) -> None:
        kind = type(o)
        if kind is dict or kind is OrderedDict:
            for k, v in o.items():  # type: ignore[attr-defined]
                walk(v, (*path, k))
        elif kind is list or kind is tuple:
            for i, v in enumerate(o):  # type: ignore[arg-type]
                walk(v, (*path, i))
        else:
            out[path] = o

    walk(obj, ())
    return out


def local_of(leaf: object) -> list[torch.Tensor]:
    """The plain tensors that hold a leaf's local data."""
    if isinstance(leaf, DTensor):
        return [leaf._local_tensor]
    if isinstance(leaf, ShardedTensor):
        return [s.tensor for s in leaf.local_shards()]
    if isinstance(leaf, torch.Tensor):
        return [leaf]
    return []


def typed_view(buf: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor ``spec`` describes, viewing the span buffer ``buf``."""
    if spec.numel == 0:
        return torch.empty(spec.shape, dtype=spec.dtype, device=buf.device)
    nbytes = spec.numel * spec.dtype.itemsize
    if spec.contiguous and spec.byte_offset == 0 and buf.numel() == nbytes:
        # The usual case: one tensor fills its span (2 calls instead of a set_).
        return buf.view(spec.dtype).view(spec.shape)
    t = torch.empty(0, dtype=spec.dtype, device=buf.device)
    start = buf.storage_offset() + spec.byte_offset
    t.set_(buf.untyped_storage(), start // spec.dtype.itemsize, spec.shape, spec.stride)
    return t


def allocate_targets(
    sizes: list[int], messages: list[Message], device: torch.device, arena: Arena
) -> tuple[SpanBuffers, list[torch.Tensor | None]]:
    """Fresh span buffers for an allocating receive, and where each message lands."""
    if device.type == "cpu":
        return arena.for_stream(sizes, messages)
    buffers = SpanBuffers(sizes, arena, device=device)
    return buffers, landing_in_place(messages, buffers)


def landing_in_place(messages: list[Message], targets: Buffers) -> list[torch.Tensor | None]:
    """Per message, the target bytes it can be received into directly, if any."""
    return [
        targets[m.span_ids[0]].narrow(0, m.offsets[0], m.sizes[0]) if m.direct else None
        for m in messages
    ]


def match_in_place(
    m: pb.Manifest, tensors: list[TensorSpec], into: object
) -> tuple[dict[int, torch.Tensor], object]:
    """Matches every incoming tensor to the receiver's tensor at the same path.

    Returns:
        The receiver tensor for each manifest tensor index, and the sender's
        tree with the receiver's own tensor objects as its tensor leaves.

    Raises:
        StateMismatchError: naming every path that is missing, extra, or of
            another kind, shape or dtype. Nothing has been written.
    """
    have = flatten_leaves(into)
    sent: set[Path] = set()
    dst: dict[int, torch.Tensor] = {}
    problems: list[str] = []

    def check(index: int, t: torch.Tensor, path: Path, suffix: str = "") -> None:
        spec = tensors[index]
        if t.dtype != spec.dtype:
            where = path_str(path) + suffix
            problems.append(f"{where}: dtype {t.dtype} here, {spec.dtype} sent")
        elif t.shape != spec.shape:
            where = path_str(path) + suffix
            problems.append(f"{where}: shape {list(t.shape)} here, {list(spec.shape)} sent")
        else:
            dst[index] = t

    def leaf(kind: int, arg: int, path: Path) -> object:
        sent.add(path)
        mine = have.get(path)
        if kind == _TENSOR and (type(mine) is torch.Tensor or type(mine) is torch.nn.Parameter):
            check(arg, mine, path)  # the common case first
            return mine
        where = path_str(path)
        if mine is None and path not in have:
            problems.append(f"{where}: missing in the receiver's state_dict")
            return None
        if kind == _TENSOR:
            problems.append(f"{where}: {type(mine).__name__} here, a tensor sent")
        elif kind == pb.NODE_KIND_DTENSOR:
            if arg >= len(m.dtensors):
                raise ManifestError("DTensor index out of range")
            if not isinstance(mine, DTensor):
                problems.append(f"{where}: {type(mine).__name__} here, a DTensor sent")
            else:
                dmeta = m.dtensors[arg]
                here = _placements(mine, path)
                if list(mine.shape) != list(dmeta.global_shape):
                    problems.append(
                        f"{where}: global shape {list(mine.shape)} here, "
                        f"{list(dmeta.global_shape)} sent"
                    )
                elif here != list(dmeta.placements):
                    problems.append(
                        f"{where}: placements {list(mine.placements)} here, differ from the sent"
                    )
                elif list(mine.device_mesh.mesh.shape) != list(dmeta.mesh_shape):
                    problems.append(
                        f"{where}: mesh shape {list(mine.device_mesh.mesh.shape)} here, "
                        f"{list(dmeta.mesh_shape)} sent"
                    )
                else:
                    check(dmeta.local_tensor, mine._local_tensor, path)
        else:
            if arg >= len(m.sharded_tensors):
                raise ManifestError("ShardedTensor index out of range")
            if not isinstance(mine, ShardedTensor):
                problems.append(f"{where}: {type(mine).__name__} here, a ShardedTensor sent")
            else:
                meta = m.sharded_tensors[arg]
                shards = mine.local_shards()
                if len(shards) != len(meta.local_tensor):
                    problems.append(
                        f"{where}: {len(shards)} local shards here, {len(meta.local_tensor)} sent"
                    )
                else:
                    for j, (shard, ti, si) in enumerate(
                        zip(shards, meta.local_tensor, meta.local_shard, strict=True)
                    ):
                        if list(shard.metadata.shard_offsets) != list(meta.shards[si].offsets):
                            problems.append(f"{where}.<shard {j}>: offsets differ")
                        else:
                            check(ti, shard.tensor, path, f".<shard {j}>")
        return mine

    state = TreeBuilder(m, leaf).build()
    for path, obj in have.items():
        if path not in sent and local_of(obj):
            problems.append(f"{path_str(path)}: not in the sender's state_dict")
    if problems:
        raise StateMismatchError(problems)
    return dst, state


def _placements(t: DTensor, path: Path) -> list[pb.Placement]:
    out = []
    for p in t.placements:
        enc = pb.Placement()
        encode_placement(p, enc, list(path))
        out.append(enc)
    return out


def place_in_place(
    tensors: list[TensorSpec], sizes: list[int], dst: dict[int, torch.Tensor], arena: Arena
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, int]]]:
    """Chooses, per span, the receiver's own memory (same layout) or scratch plus copies.

    Returns:
        One buffer per span, and the (receiver tensor, manifest tensor) pairs
        to copy out of scratch once the data is in.
    """
    by_span: list[list[int]] = [[] for _ in sizes]
    for i, spec in enumerate(tensors):
        by_span[spec.storage].append(i)
    targets: list[torch.Tensor] = []
    copies: list[tuple[torch.Tensor, int]] = []
    for s, members in enumerate(by_span):
        target = _same_layout(members, tensors, dst, sizes[s])
        if target is not None:
            targets.append(target)
        else:
            targets.append(arena.empty(sizes[s]))
            copies.extend((dst[i], i) for i in members)
    return targets, copies


def _same_layout(
    members: list[int], tensors: list[TensorSpec], dst: dict[int, torch.Tensor], nbytes: int
) -> torch.Tensor | None:
    """The receiver's bytes that mirror a sender span, if its tensors sit the same way in one storage."""
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
    # Writing the span straight into the receiver's memory is only right if the
    # sender's tensors cover every byte of it: alignment padding or the gaps
    # between views would otherwise land on receiver bytes no tensor names.
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
