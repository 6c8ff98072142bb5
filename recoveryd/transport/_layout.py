"""Recognising a layout seen before: a state's shape without its values, and a few remembered ones.

A repeated heal (and every transfer of a sidecar) sends the same model's
state again: the same containers and keys, the same tensor objects over
the same memory, only the numbers inside changed. Working the transfer out
again costs Python per tensor on both sides (a 20,000-tensor optimizer
state: ~0.1 s on the donor, ~0.2-0.3 s on the joiner, against ~10 ms of
data). So what was worked out is kept, under a key that names the layout:

* :func:`skeleton` walks a state into its signature (container kinds,
  lengths, key types and keys, leaf kinds and value types: everything but
  the values and tensor contents), its plain tensors and its values;
* :func:`tensor_facts` is what a tensor's bytes on the wire depend on (its
  address, offset, shape, strides, dtype, device, flags and its storage's
  size): two states with equal signatures and equal facts have the same
  plan;
* :func:`layout_digest` is a received manifest's key: a BLAKE3 hash of
  everything in it but the values, the step and the chain;
* :class:`Remembered` is a small, locked LRU of what was worked out.

Nothing remembered holds a tensor: a reuse is only ever made from the
tensors of the state at hand, after their facts matched, so a resized,
replaced or freed tensor is a miss (worked out again), never a write into
memory that is no longer the state's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import blake3
import torch

from recoveryd.transport.format import MAX_DEPTH
from recoveryd.v1 import manifest_pb2 as pb

_T = TypeVar("_T")
_VALUE_TYPES = (torch.dtype, torch.Size, torch.device)


@dataclass(slots=True)
class Skeleton:
    """A state's shape without its values (:attr:`sig`), its plain tensors and its values,
    each in pre-order."""

    sig: list[object]
    tensors: list[torch.Tensor]
    values: list[object]

    def key(self) -> int:
        """A hash of the signature (equal signatures, equal keys)."""
        return hash(tuple(self.sig))


class _NotPlain(Exception):
    """The state holds something a skeleton does not describe."""


def skeleton(state: object) -> Skeleton | None:
    """The skeleton of ``state``, or ``None`` if it holds anything but dicts,
    OrderedDicts, lists, tuples, plain tensors (or Parameters) and other leaves
    (DTensors, ShardedTensors, their stand-ins and tensor subclasses are
    worked out afresh each time), or is deeper than the manifest allows."""
    sig: list[object] = []
    tensors: list[torch.Tensor] = []
    values: list[object] = []

    def walk(obj: object, depth: int) -> None:
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            sig.append(kind)
            tensors.append(obj)  # type: ignore[arg-type]
        elif kind is dict or kind is OrderedDict:
            if depth >= MAX_DEPTH:
                raise _NotPlain
            d: dict[object, object] = obj  # type: ignore[assignment]
            sig.append(kind)
            sig.append(len(d))
            for k, v in d.items():
                # The key's type too: 1, 1.0 and True are equal keys, not equal states.
                sig.append(type(k))
                sig.append(k)
                walk(v, depth + 1)
        elif kind is list or kind is tuple:
            if depth >= MAX_DEPTH:
                raise _NotPlain
            seq: list[object] = obj  # type: ignore[assignment]
            sig.append(kind)
            sig.append(len(seq))
            for v in seq:
                walk(v, depth + 1)
        elif isinstance(obj, torch.Tensor) or (
            kind.__module__ != "builtins" and kind not in _VALUE_TYPES
        ):
            raise _NotPlain  # DTensors, tensor subclasses, stand-ins, unknown objects
        else:
            sig.append(kind)
            values.append(obj)

    try:
        walk(state, 0)
    except (_NotPlain, RecursionError, TypeError):  # TypeError: an unhashable key
        return None
    return Skeleton(sig, tensors, values)


def tensor_facts(tensors: list[torch.Tensor]) -> list[tuple[object, ...]] | None:
    """Per tensor, everything its bytes on the wire depend on (equal facts: same bytes, same place).

    Its address, storage offset, shape, strides, dtype, device,
    ``requires_grad``, lazy conjugate and negative bits and its storage's size
    (its class is in the skeleton's signature). Not the object: a state's
    tensors may be new objects over the same memory each time
    (``Module.state_dict()`` detaches, a sidecar re-views its shared memory).
    ``None`` when a tensor has no storage (sparse, meta): such states are
    worked out afresh, and refused there by name.
    """
    try:
        return [
            (
                t.data_ptr(),
                t.storage_offset(),
                t.shape,
                t.stride(),
                t.dtype,
                t.device,
                t.requires_grad,
                t.is_conj(),
                t.is_neg(),
                t.untyped_storage().nbytes(),
            )
            for t in tensors
        ]
    except (RuntimeError, NotImplementedError):
        return None


def layout_of(m: pb.Manifest) -> pb.Manifest:
    """A copy of the manifest without what changes from one send of a state to the next:
    its values, step and chain."""
    c = pb.Manifest()
    c.CopyFrom(m)
    for name in ("values", "step", "chain"):
        c.ClearField(name)
    return c


def layout_digest(m: pb.Manifest) -> bytes:
    """A received manifest's layout key: BLAKE3 of its :func:`layout_of`.

    Collision resistant, so a donor cannot make two different layouts share a
    key (a remembered validation is reused only for the very layout validated).
    """
    return blake3.blake3(layout_of(m).SerializeToString(deterministic=True)).digest()


class Remembered(Generic[_T]):
    """A few layouts' worked-out plans, least recently used first out; thread-safe.

    Bounded twice: by count and by weight (the tensors, spans and messages a
    plan holds), so what is kept after the transfers stays small whatever
    the layouts (the joiner's are a donor's to choose).

    Args:
        capacity: how many are kept.
        budget: the most weight kept in all; a heavier plan is not kept.
    """

    def __init__(self, capacity: int, budget: int) -> None:
        self._capacity = capacity
        self._budget = budget
        self._items: OrderedDict[object, tuple[_T, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: object, fits: Callable[[_T], bool] = lambda _item: True) -> _T | None:
        """The plan kept under ``key`` if it ``fits`` the state at hand (counted as a hit),
        else ``None`` (a miss)."""
        with self._lock:
            kept = self._items.get(key)
            if kept is not None:
                self._items.move_to_end(key)
        hit = kept is not None and fits(kept[0])
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        return kept[0] if hit and kept is not None else None

    def put(self, key: object, item: _T, weight: int) -> bool:
        """Keeps ``item`` under ``key``, dropping the least recently used beyond the bounds;
        says whether it is kept (not when heavier than the whole budget)."""
        if weight > self._budget:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._weight -= old[1]
            self._items[key] = (item, weight)
            self._weight += weight
            while len(self._items) > self._capacity or self._weight > self._budget:
                _, (_, w) = self._items.popitem(last=False)
                self._weight -= w
        return True

    def clear(self) -> None:
        """Forgets everything (and the counts)."""
        with self._lock:
            self._items.clear()
            self._weight = 0
            self.hits = self.misses = 0
