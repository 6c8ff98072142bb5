"""A digest of a state_dict's layout, so only replicas sharded alike donate to each other.

Two states have the same fingerprint when they have the same tree (container
kinds and keys), and at every tensor the same kind, dtype and shape (for a
DTensor also its global shape, placements, mesh shape and mesh dim names;
for a ShardedTensor its global size and its local shards' offsets and
sizes); values are compared by type only. Devices are left out, as for plain
tensors: a CPU replica and a GPU one of the same model exchange state (the
transport stages what crosses devices). A sidecar's stand-ins
for DTensors and ShardedTensors print as what they stand for, so a replica
served by a sidecar and one with its agent in process match. Two replicas
with equal fingerprints can stream rank r's state into rank r in place. The
mesh's global ranks are left out: every replica's differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from recoveryd.transport.tree import local_tensors, sharding_of
from recoveryd.v1 import manifest_pb2 as pb


def _placement(p: object) -> str:
    kind, dim, split, op = (getattr(p, a) for a in ("kind", "dim", "split_factor", "reduce_op"))
    return f"{kind}:{dim}:{split}:{op}"


def _describe(obj: object, out: list[str], devices: set[str]) -> None:
    meta = sharding_of(obj)
    if meta is not None:  # a DTensor or a ShardedTensor, or a sidecar's stand-in for one
        locals_ = local_tensors(obj)
        for t in locals_:
            devices.add(t.device.type)
        if isinstance(meta, pb.DTensorMeta):
            local = locals_[0]
            out.append(
                f"D{local.dtype}{tuple(meta.global_shape)}"
                f"{tuple(_placement(p) for p in meta.placements)}"
                f"{tuple(meta.mesh_shape)}{tuple(meta.mesh_dim_names)}"
                f"{tuple(local.shape)}"
            )
        else:
            shards = sorted(
                (tuple(meta.shards[i].offsets), tuple(meta.shards[i].sizes))
                for i in meta.local_shard
            )
            out.append(f"S{meta.dtype}{tuple(meta.global_size)}{shards}")
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
