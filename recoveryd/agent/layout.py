"""A digest of a state_dict's layout, so only replicas sharded alike donate to each other.

Two states have the same fingerprint when they have the same tree (container
kinds and keys), and at every tensor the same kind, dtype and shape (for a
DTensor also its global shape and placements, for a ShardedTensor its local
shards' offsets and sizes); values are compared by type only. Two replicas
with equal fingerprints can stream rank r's state into rank r in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


def _describe(obj: object, out: list[str], devices: set[str]) -> None:
    if isinstance(obj, DTensor):
        local = obj.to_local()
        devices.add(local.device.type)
        out.append(
            f"D{obj.dtype}{tuple(obj.shape)}{tuple(str(p) for p in obj.placements)}"
            f"{tuple(local.shape)}"
        )
    elif isinstance(obj, ShardedTensor):
        shards = sorted(
            (tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes))
            for s in obj.local_shards()
        )
        for s in obj.local_shards():
            devices.add(s.tensor.device.type)
        out.append(f"S{obj.dtype}{tuple(obj.size())}{shards}")
    elif isinstance(obj, torch.Tensor):
        devices.add(obj.device.type)
        out.append(f"T{obj.dtype}{tuple(obj.shape)}")
    elif isinstance(obj, Mapping):
        out.append(f"{{{type(obj).__name__}:{len(obj)}")
        for k, v in obj.items():
            out.append(f"{type(k).__name__}={k!r}")
            _describe(v, out, devices)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append(f"[{type(obj).__name__}:{len(obj)}")
        for v in obj:
            _describe(v, out, devices)
        out.append("]")
    else:
        out.append(f"V{type(obj).__name__}")


def fingerprint(state_dict: object) -> tuple[str, str]:
    """The layout digest of ``state_dict`` and its device kind.

    Returns:
        ``(digest, device_kind)``: a hex digest, and ``"cuda"`` when any tensor
        is on a GPU, else ``"cpu"``.
    """
    parts: list[str] = []
    devices: set[str] = set()
    _describe(state_dict, parts, devices)
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()
    return digest, "cuda" if "cuda" in devices else "cpu"
