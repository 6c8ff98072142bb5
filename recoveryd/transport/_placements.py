"""DTensor placements in the manifest, both ways (the donor encodes, the joiner decodes and compares)."""

from __future__ import annotations

from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as ShardPlacement
from torch.distributed.tensor.placement_types import Partial, Placement

from recoveryd.errors import ManifestError, UnsupportedValueError
from recoveryd.transport.format import Path, path_str
from recoveryd.v1 import manifest_pb2 as pb


def encode_placement(p: object, out: pb.Placement, path: Path) -> None:
    """Writes a DTensor placement into ``out``; unknown placements name their path."""
    name = type(p).__name__
    if name == "Replicate":
        out.kind = pb.Placement.KIND_REPLICATE
    elif name == "Shard":
        out.kind = pb.Placement.KIND_SHARD
        out.dim = p.dim  # type: ignore[attr-defined]
    elif name == "_StridedShard":
        out.kind = pb.Placement.KIND_STRIDED_SHARD
        out.dim = p.dim  # type: ignore[attr-defined]
        out.split_factor = p.split_factor  # type: ignore[attr-defined]
    elif name in ("Partial", "_Partial"):
        out.kind = pb.Placement.KIND_PARTIAL
        out.reduce_op = str(p.reduce_op)  # type: ignore[attr-defined]
    else:
        raise UnsupportedValueError(path_str([*path, f"<placement {name}>"]), p)


def placements_of(t: DTensor, path: Path) -> list[pb.Placement]:
    """A DTensor's placements as the manifest writes them (to compare with a sent one)."""
    out = []
    for p in t.placements:
        enc = pb.Placement()
        encode_placement(p, enc, path)
        out.append(enc)
    return out


def decode_placement(p: pb.Placement) -> Placement:
    """The placement a manifest entry describes.

    Raises:
        ManifestError: an unknown placement kind.
    """
    if p.kind == pb.Placement.KIND_REPLICATE:
        return Replicate()
    if p.kind == pb.Placement.KIND_SHARD:
        return ShardPlacement(p.dim)
    if p.kind == pb.Placement.KIND_PARTIAL:
        return Partial(p.reduce_op or "sum")
    if p.kind == pb.Placement.KIND_STRIDED_SHARD:
        from torch.distributed.tensor.placement_types import _StridedShard

        return _StridedShard(p.dim, split_factor=p.split_factor)
    raise ManifestError(f"unknown DTensor placement kind {p.kind}")
