"""The state_dict tree as the manifest carries it: the public API of the agent and the sidecar.

Building (:func:`describe`: a state's manifest and spans, as a send would
cut them), decoding (:func:`decode_tensors`, :class:`TreeBuilder`,
:func:`decode_value`), typed views over span bytes (:func:`typed_view`),
flattening a state into its leaves (:func:`flatten_leaves`,
:func:`local_tensors`, :func:`sharding_of`), DTensors and ShardedTensors held
as their local shards and sharding facts without a mesh or group
(:class:`LocalDTensor`, :class:`LocalShardedTensor`: what a sidecar holds;
they are sent and received in place like what they stand for), and merging
received plain values into a live state (:func:`merge_values`). The transfer itself lives in
:mod:`recoveryd.transport.sender` and :mod:`recoveryd.transport.receiver`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from recoveryd.errors import ManifestError
from recoveryd.transport import _dtypes
from recoveryd.transport._flatten import SendPlan, Span, build_plan
from recoveryd.transport._sharding import (
    LocalDTensor,
    LocalShardedTensor,
    dtensor_meta,
    sharded_meta,
)
from recoveryd.transport._validate import (
    PairBudget,
    TensorSpec,
    check_dtensor,
    check_manifest,
    check_sharded,
    decode_tensors,
)
from recoveryd.transport.format import (
    KEY_INT,
    KEY_STR,
    LEAF_KINDS,
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    NODE_DICT,
    NODE_DTENSOR,
    NODE_LIST,
    NODE_ORDERED_DICT,
    NODE_SHARDED_TENSOR,
    NODE_TENSOR,
    NODE_TUPLE,
    NODE_VALUE,
    Path,
    path_str,
)
from recoveryd.v1 import manifest_pb2 as pb

__all__ = [
    "LocalDTensor",
    "LocalShardedTensor",
    "Path",
    "SendPlan",
    "Span",
    "TensorSpec",
    "TreeBuilder",
    "check_manifest",
    "decode_tensors",
    "decode_value",
    "describe",
    "flatten_leaves",
    "local_tensors",
    "merge_values",
    "path_str",
    "sharding_of",
    "typed_view",
]

_BIG_INT = re.compile(r"-?[0-9]{1,4300}")
_CONTAINERS = frozenset((NODE_DICT, NODE_ORDERED_DICT, NODE_LIST, NODE_TUPLE))
LeafFn = Callable[[int, int, Path], object]


def describe(state: object) -> SendPlan:
    """The manifest and the spans of ``state``, one span per storage range, none cut.

    Raises:
        UnsupportedValueError: a leaf the manifest cannot carry, naming its path.
    """
    return build_plan(
        state,
        step=None,
        chain=[],
        bucket_bytes=MAX_MESSAGE_BYTES,  # the largest message a joiner accepts
        direct_bytes=1,
        checksums=False,
    )


class TreeBuilder:
    """Walks the manifest's pre-order tree, calling ``leaf`` for tensor-like nodes.

    Every node count, key and index is checked as it is read, and every value,
    DTensor and ShardedTensor must be used once, in pre-order (as a donor
    writes them: one node cannot make the joiner decode or check one entry
    many times); a malformed tree raises :class:`ManifestError` and builds
    nothing.

    Args:
        m: the manifest (validated by :func:`decode_tensors` first).
        leaf: called as ``leaf(kind, arg, path)`` for every tensor, DTensor and
            ShardedTensor node (``kind`` one of ``NODE_*``, ``arg`` its index);
            its return value stands at that place in the tree.
        paths: pass each plain tensor's key path to ``leaf`` (``False`` passes
            ``()``: cheaper, for callers that never name one; DTensors and
            ShardedTensors always get theirs).
        tensors: the manifest's decoded tensors; when given, every DTensor's
            and ShardedTensor's sharding facts are checked (naming its path)
            before ``leaf`` sees it.
    """

    def __init__(
        self,
        m: pb.Manifest,
        leaf: LeafFn,
        *,
        paths: bool = True,
        tensors: list[TensorSpec] | None = None,
    ) -> None:
        self._kinds = list(m.node_kind)
        self._args = list(m.node_arg)
        self._keys = _keys(m)
        self._values = m.values
        self._leaf = leaf
        self._paths = paths
        # Key paths are kept up to date only where some leaf is given its own.
        self._track = paths or bool(m.dtensors) or bool(m.sharded_tensors)
        self._tensors = tensors
        self._dtensors = m.dtensors
        self._sharded = m.sharded_tensors
        self._pairs = PairBudget()
        self._path: list[object] = []  # the keys from the root to the node being built
        self._pos = 0
        self._key = 0
        self._used: dict[int, int] = {NODE_VALUE: 0, NODE_DTENSOR: 0, NODE_SHARDED_TENSOR: 0}

    def build(self) -> object:
        """The tree, with ``leaf``'s results at the tensor-like nodes."""
        if not self._kinds:
            raise ManifestError("empty tree")
        root = self._node(0)
        if self._pos != len(self._kinds) or self._key != len(self._keys):
            raise ManifestError("tree has trailing nodes or keys")
        if self._used != {
            NODE_VALUE: len(self._values),
            NODE_DTENSOR: len(self._dtensors),
            NODE_SHARDED_TENSOR: len(self._sharded),
        }:
            raise ManifestError("the tree leaves values, DTensors or ShardedTensors unused")
        return root

    def _read(self, depth: int) -> tuple[int, int]:
        """The next node's kind and argument."""
        if depth > MAX_DEPTH:
            raise ManifestError(f"tree deeper than {MAX_DEPTH}")
        pos = self._pos
        if pos >= len(self._kinds):
            raise ManifestError("tree runs out of nodes")
        self._pos = pos + 1
        kind, arg = self._kinds[pos], self._args[pos]
        if kind in _CONTAINERS and arg > len(self._kinds):
            raise ManifestError("a dict or list larger than the tree")
        return kind, arg

    def _use(self, kind: int, arg: int) -> None:
        """Counts a value, DTensor or ShardedTensor node, which must name the next entry."""
        if arg != self._used[kind]:
            raise ManifestError(
                "values, DTensors and ShardedTensors are not each used once, in pre-order"
            )
        self._used[kind] = arg + 1

    def _next_key(self) -> object:
        i = self._key
        if i >= len(self._keys):
            raise ManifestError("tree runs out of dict keys")
        self._key = i + 1
        return self._keys[i]

    def _leaf_node(self, kind: int, arg: int) -> object:
        if kind == NODE_TENSOR:
            return self._leaf(kind, arg, tuple(self._path) if self._paths else ())
        self._use(kind, arg)
        path = tuple(self._path)
        if kind == NODE_DTENSOR:
            if arg >= len(self._dtensors):
                raise ManifestError("DTensor index out of range")
            if self._tensors is not None:
                check_dtensor(self._dtensors[arg], self._tensors, path_str(path))
        else:
            if arg >= len(self._sharded):
                raise ManifestError("ShardedTensor index out of range")
            if self._tensors is not None:
                check_sharded(self._sharded[arg], self._tensors, path_str(path), self._pairs)
        return self._leaf(kind, arg, path)

    def _value(self, arg: int) -> object:
        self._use(NODE_VALUE, arg)
        if arg >= len(self._values):
            raise ManifestError("value index out of range")
        return decode_value(self._values[arg])

    def _node(self, depth: int) -> object:
        # The hot loop of a receive (a node per key, value and tensor): _read and
        # _next_key inlined, paths kept only when tracked.
        pos = self._pos
        if pos >= len(self._kinds) or depth > MAX_DEPTH:
            self._read(depth)  # raises, saying which
        self._pos = pos + 1
        kind, arg = self._kinds[pos], self._args[pos]
        if kind == NODE_TENSOR:
            return self._leaf(kind, arg, tuple(self._path) if self._paths else ())
        if kind in LEAF_KINDS:
            return self._leaf_node(kind, arg)
        if kind in _CONTAINERS and arg > len(self._kinds):
            raise ManifestError("a dict or list larger than the tree")
        path, track = self._path, self._track
        if kind in (NODE_DICT, NODE_ORDERED_DICT):
            d: dict[object, object] = {} if kind == NODE_DICT else OrderedDict()
            keys = self._keys
            for _ in range(arg):
                i = self._key
                if i >= len(keys):
                    raise ManifestError("tree runs out of dict keys")
                self._key = i + 1
                k = keys[i]
                if track:
                    path.append(k)
                    d[k] = self._node(depth + 1)
                    path.pop()
                else:
                    d[k] = self._node(depth + 1)
            return d
        if kind in (NODE_LIST, NODE_TUPLE):
            if track:
                items = []
                for i in range(arg):
                    path.append(i)
                    items.append(self._node(depth + 1))
                    path.pop()
            else:
                items = [self._node(depth + 1) for _ in range(arg)]
            return items if kind == NODE_LIST else tuple(items)
        if kind == NODE_VALUE:
            return self._value(arg)
        raise ManifestError(f"unknown node kind {kind}")

    def _skip(self, depth: int) -> None:
        """Reads past the next node's subtree, checking it as :meth:`build` would, building nothing."""
        kind, arg = self._read(depth)
        if kind in _CONTAINERS:
            for _ in range(arg):
                if kind in (NODE_DICT, NODE_ORDERED_DICT):
                    self._next_key()
                self._skip(depth + 1)
        elif kind in (NODE_VALUE, NODE_DTENSOR, NODE_SHARDED_TENSOR):
            self._use(kind, arg)
        elif kind != NODE_TENSOR:
            raise ManifestError(f"unknown node kind {kind}")


def _keys(m: pb.Manifest) -> list[object]:
    """The dict keys in the order the tree reads them (``key_kind`` picks each one's column)."""
    kinds = list(m.key_kind)
    strs = kinds.count(KEY_STR)
    if strs != len(m.key_str) or kinds.count(KEY_INT) != len(kinds) - strs:
        raise ManifestError("dict key kinds do not match the key columns")
    if not m.key_int:
        return list(m.key_str)
    if not m.key_str:
        return list(m.key_int)
    by_str, by_int = iter(m.key_str), iter(m.key_int)
    return [next(by_str) if k == KEY_STR else next(by_int) for k in kinds]


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


def local_tensors(leaf: object) -> list[torch.Tensor]:
    """The plain tensors that hold a leaf's local data."""
    if isinstance(leaf, DTensor):
        return [leaf._local_tensor]
    if isinstance(leaf, LocalDTensor):
        return [leaf.local]
    if isinstance(leaf, ShardedTensor):
        return [s.tensor for s in leaf.local_shards()]
    if isinstance(leaf, LocalShardedTensor):
        return list(leaf.locals)
    if isinstance(leaf, torch.Tensor):
        return [leaf]
    return []


def sharding_of(leaf: object, path: Path = ()) -> pb.DTensorMeta | pb.ShardedTensorMeta | None:
    """A DTensor's or ShardedTensor's sharding facts (its stand-in's too), or ``None`` for others.

    Raises:
        UnsupportedValueError: a placement or dtype the manifest cannot carry.
    """
    if isinstance(leaf, DTensor | LocalDTensor):
        return dtensor_meta(leaf, path)
    if isinstance(leaf, ShardedTensor | LocalShardedTensor):
        return sharded_meta(leaf, path)
    return None


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


def merge_values(dst: object, src: object) -> object:
    """Writes ``src``'s non-tensor values into ``dst``'s containers; returns the merged node.

    In place, tensors already hold the received bytes (``src`` has ``dst``'s
    tensor objects, or placeholders); plain values (ints, floats, strings,
    ...) are replaced in mutable containers, and tuples holding any are
    rebuilt in their parent.
    """
    if isinstance(src, torch.Tensor):
        return dst
    if isinstance(src, Mapping) and isinstance(dst, MutableMapping):
        for k, v in src.items():
            merged = merge_values(dst.get(k), v)
            if merged is not dst.get(k):
                dst[k] = merged
        return dst
    if isinstance(src, list) and isinstance(dst, list) and len(src) == len(dst):
        for i, v in enumerate(src):
            merged = merge_values(dst[i], v)
            if merged is not dst[i]:
                dst[i] = merged
        return dst
    if isinstance(src, tuple) and isinstance(dst, tuple) and len(src) == len(dst):
        items = [merge_values(d, v) for d, v in zip(dst, src, strict=True)]
        return dst if all(a is b for a, b in zip(items, dst, strict=True)) else type(dst)(items)
    return src
