"""The benchmark's workloads (A-E): how to build them, how big they are, and how to check them.

Tensors are filled with a cheap deterministic ramp (``arange * scale + offset``, distinct per
tensor) rather than random numbers: ``uniform_`` costs ~5 s per GiB on this machine, a ramp
~0.15 s. Correctness is checked with :func:`state_digest`, an xxh3 hash over every leaf (key
path, dtype, shape and all tensor bytes), so a swapped, truncated or zeroed tensor is caught.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import xxhash
from torch.utils._pytree import keystr, tree_flatten_with_path

StateDict = dict[Any, Any]

_FLOAT_BYTES = 4
_KIB = 1024
_MIB = 1024 * _KIB

WorkloadKind = Literal["dense", "optim", "views"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """One benchmark workload at one scale."""

    name: str
    """Short name (``A`` .. ``E``)."""
    description: str
    """One line for the report."""
    kind: WorkloadKind
    """``dense``: independent tensors; ``optim``: optimizer-state tree; ``views``: one flat buffer."""
    tensor_count: int
    """Number of tensor leaves."""
    tensor_shape: tuple[int, ...]
    """Shape of every tensor leaf (all float32)."""
    non_tensor_leaves: int = 0
    """Number of int/float/str/bool leaves (``optim`` only; a multiple of 10)."""
    in_place: bool = False
    """The receiver passes its own preexisting, touched state_dict to receive into."""

    def __post_init__(self) -> None:
        if self.tensor_count <= 0:
            raise ValueError(f"tensor_count={self.tensor_count} must be positive")
        if self.non_tensor_leaves % 10:
            raise ValueError(f"non_tensor_leaves={self.non_tensor_leaves} must be a multiple of 10")
        if self.kind == "optim" and self.tensor_count % 2:
            raise ValueError(f"optim tensor_count={self.tensor_count} must be even")

    @property
    def tensor_numel(self) -> int:
        """Elements per tensor."""
        n = 1
        for d in self.tensor_shape:
            n *= d
        return n

    @property
    def tensor_bytes(self) -> int:
        """Bytes per tensor."""
        return self.tensor_numel * _FLOAT_BYTES

    @property
    def logical_bytes(self) -> int:
        """Sum of the tensors' nbytes: what the receiver must end up holding."""
        return self.tensor_count * self.tensor_bytes

    @property
    def storage_bytes(self) -> int:
        """Sum over tensors of their whole storage's nbytes (what a per-storage sender ships).

        Equal to :attr:`logical_bytes` except for ``views``, where every view's storage is the
        whole flat buffer.
        """
        if self.kind == "views":
            return self.tensor_count * self.logical_bytes
        return self.logical_bytes


def _full_workloads() -> dict[str, Workload]:
    a = Workload(
        name="A",
        description="1 GiB in 8 float32 tensors, allocating",
        kind="dense",
        tensor_count=8,
        tensor_shape=(8192, 4096),
    )
    return {
        "A": a,
        "B": Workload(
            name="B",
            description="1 GiB in 4,096 tensors of 256 KiB, allocating",
            kind="dense",
            tensor_count=4096,
            tensor_shape=(256, 256),
        ),
        "C": Workload(
            name="C",
            description="20,000 tensors of 1 KiB + 1,000 non-tensor leaves (optimizer state)",
            kind="optim",
            tensor_count=20_000,
            tensor_shape=(256,),
            non_tensor_leaves=1_000,
        ),
        "D": Workload(
            name="D",
            description="64 contiguous 4 MiB views of one 256 MiB buffer, allocating",
            kind="views",
            tensor_count=64,
            tensor_shape=(1024, 1024),
        ),
        "E": Workload(
            name="E",
            description="workload A received in place",
            kind="dense",
            tensor_count=a.tensor_count,
            tensor_shape=a.tensor_shape,
            in_place=True,
        ),
        "F": Workload(
            name="F",
            description="workload C received in place (a heal's optimizer state)",
            kind="optim",
            tensor_count=20_000,
            tensor_shape=(256,),
            non_tensor_leaves=1_000,
            in_place=True,
        ),
    }


def _quick_workloads() -> dict[str, Workload]:
    # 1/8 of the bytes for A, B, D, E (B keeps its 256 KiB tensors, so 1/8 of the count);
    # C keeps 1 KiB tensors at 1/4 of the counts.
    full = _full_workloads()
    return {
        "A": Workload(
            name="A",
            description="128 MiB in 8 float32 tensors, allocating (quick)",
            kind="dense",
            tensor_count=8,
            tensor_shape=(1024, 4096),
        ),
        "B": Workload(
            name="B",
            description="128 MiB in 512 tensors of 256 KiB, allocating (quick)",
            kind="dense",
            tensor_count=512,
            tensor_shape=full["B"].tensor_shape,
        ),
        "C": Workload(
            name="C",
            description="5,000 tensors of 1 KiB + 250 non-tensor leaves (quick)",
            kind="optim",
            tensor_count=5_000,
            tensor_shape=(256,),
            non_tensor_leaves=250,
        ),
        "D": Workload(
            name="D",
            description="64 contiguous 512 KiB views of one 32 MiB buffer, allocating (quick)",
            kind="views",
            tensor_count=64,
            tensor_shape=(128, 1024),
        ),
        "E": Workload(
            name="E",
            description="workload A (quick) received in place",
            kind="dense",
            tensor_count=8,
            tensor_shape=(1024, 4096),
            in_place=True,
        ),
        "F": Workload(
            name="F",
            description="workload C (quick) received in place",
            kind="optim",
            tensor_count=5_000,
            tensor_shape=(256,),
            non_tensor_leaves=250,
            in_place=True,
        ),
    }


WORKLOAD_NAMES: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")


def get_workload(name: str, *, quick: bool) -> Workload:
    """Returns workload ``name`` (``A`` .. ``E``) at full or quick scale."""
    table = _quick_workloads() if quick else _full_workloads()
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {','.join(table)}") from None


def _ramp(out: torch.Tensor, index: int, seed: int) -> torch.Tensor:
    """Fills ``out`` (contiguous float32) with a ramp unique to (index, seed); returns it."""
    flat = out.view(-1)
    torch.arange(flat.numel(), out=flat)
    flat.mul_(1.0 / (1009 + index)).add_(index + 0.25 * seed)
    return out


def _zeros_like_shape(shape: tuple[int, ...]) -> torch.Tensor:
    # zeros() writes every page, so the template is resident before the transfer starts.
    return torch.zeros(shape, dtype=torch.float32)


def _optim_state(w: Workload, make: Any) -> StateDict:
    """Builds an optimizer-shaped tree: state[int] = {exp_avg, exp_avg_sq}, param_groups[...]."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for p in range(w.tensor_count // 2):
        state[p] = {"exp_avg": make(2 * p), "exp_avg_sq": make(2 * p + 1)}
    groups: list[dict[str, Any]] = []
    for g in range(w.non_tensor_leaves // 10):
        groups.append(
            {
                "lr": 1e-3 * (g + 1),
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.01 * g,
                "step": 1000 + g,
                "name": f"group-{g}",
                "amsgrad": False,
                "maximize": g % 2 == 1,
                "group_id": g,
            }
        )
    return {"optim": {"state": state, "param_groups": groups}}


def build_state_dict(w: Workload, *, seed: int = 1) -> StateDict:
    """Builds the donor's state_dict for ``w``."""

    def make(i: int) -> torch.Tensor:
        return _ramp(torch.empty(w.tensor_shape, dtype=torch.float32), i, seed)

    if w.kind == "dense":
        return {f"layers.{i}.weight": make(i) for i in range(w.tensor_count)}
    if w.kind == "optim":
        return _optim_state(w, make)
    flat = _ramp(torch.empty(w.tensor_count * w.tensor_numel, dtype=torch.float32), 0, seed)
    n = w.tensor_numel
    return {
        f"flat.{i}": flat[i * n : (i + 1) * n].view(w.tensor_shape) for i in range(w.tensor_count)
    }


def build_template(w: Workload) -> StateDict:
    """Builds the joiner's preexisting, zero-filled state_dict of the same structure as ``w``."""
    if w.kind == "dense":
        return {
            f"layers.{i}.weight": _zeros_like_shape(w.tensor_shape) for i in range(w.tensor_count)
        }
    if w.kind == "optim":
        return _optim_state(w, lambda _i: _zeros_like_shape(w.tensor_shape))
    flat = torch.zeros(w.tensor_count * w.tensor_numel, dtype=torch.float32)
    n = w.tensor_numel
    return {
        f"flat.{i}": flat[i * n : (i + 1) * n].view(w.tensor_shape) for i in range(w.tensor_count)
    }


def build_raw_buffer(nbytes: int, *, seed: int | None) -> StateDict:
    """The raw-gloo anchor's one uint8 buffer: ramp-filled (donor) or zeroed (joiner, seed=None)."""
    if seed is None:
        return {"buf": torch.zeros(nbytes, dtype=torch.uint8)}
    buf = torch.empty(nbytes, dtype=torch.uint8)
    _ramp(buf[: nbytes // _FLOAT_BYTES * _FLOAT_BYTES].view(torch.float32), 0, seed)
    return {"buf": buf}


def tensor_leaves(sd: StateDict) -> list[tuple[str, torch.Tensor]]:
    """(key path, tensor) for every tensor leaf of ``sd``, in flatten order."""
    leaves, _ = tree_flatten_with_path(sd)
    return [(keystr(p), v) for p, v in leaves if isinstance(v, torch.Tensor)]


def state_digest(sd: StateDict) -> str:
    """xxh3-64 over every leaf sorted by key path: path, then dtype/shape/bytes or repr."""
    leaves, _ = tree_flatten_with_path(sd)
    items = sorted(((keystr(p), v) for p, v in leaves), key=lambda kv: kv[0])
    h = xxhash.xxh3_64()
    for key, v in items:
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            h.update(f"|{v.dtype}|{tuple(v.shape)}|".encode())
            flat = v.detach().reshape(-1)
            if flat.numel():
                h.update(flat.contiguous().view(torch.uint8).numpy().data)
        else:
            h.update(f"|{type(v).__name__}|{v!r}|".encode())
    return h.hexdigest()


def distinct_storages(sd: StateDict) -> int:
    """Number of distinct storages under the tensor leaves (1 when D's views stay views)."""
    return len({t.untyped_storage().data_ptr() for _, t in tensor_leaves(sd)})


def _mib(n: int) -> str:
    return f"{n / _MIB:.1f} MiB"


def describe(w: Workload) -> str:
    """One line: name, description and sizes."""
    return f"{w.name}: {w.description} [{w.tensor_count} tensors, {_mib(w.logical_bytes)} logical]"
