"""Sharing a trainer's live tensors with its sidecar, without copies.

Trainer side (:class:`Exporter`): the storage of every CPU tensor (a plain
tensor, a DTensor's local shard, a ShardedTensor's local shards) is moved
into shared memory in place (``share_memory_()``: the storage keeps its
identity, so every view of it, the optimizer's and FSDP's references
included, follows), and each storage is described once by a handle: a file
descriptor for CPU memory, a CUDA IPC handle for GPU memory. The state's
tree, dtypes, shapes, sharding facts (meshes, placements, shards) and plain
values travel as the transport's manifest (protobuf, never pickle).

Sidecar side (:class:`SharedState`): maps the handles and rebuilds the same
tree over them, a DTensor as a :class:`~recoveryd.transport.tree.LocalDTensor`
and a ShardedTensor as a :class:`~recoveryd.transport.tree.LocalShardedTensor`
(their local shards and facts: the sidecar has neither the trainer's mesh
nor its groups, and needs neither to send or receive them in place). A byte
the trainer writes is a byte the sidecar reads, and the other way round: the
sidecar receives a recovery straight into the trainer's tensors.

CPU memory goes in sealed memfds where the trainer can make them, and the
sidecar checks every descriptor before it maps it (see :mod:`recoveryd.sidecar.seal`):
a trainer can neither make the sidecar grow its files nor crash it by
shrinking them.
"""

from __future__ import annotations

import base64
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from google.protobuf.message import DecodeError

from recoveryd.errors import ConfigError, ManifestError, UnsupportedValueError
from recoveryd.sidecar import seal
from recoveryd.sidecar.frames import SharedLayout, SpanRef, StorageHandle
from recoveryd.transport.format import NODE_DTENSOR, NODE_TENSOR
from recoveryd.transport.tree import (
    LocalDTensor,
    LocalShardedTensor,
    TensorSpec,
    TreeBuilder,
    check_manifest,
    decode_tensors,
    describe,
    flatten_leaves,
    local_tensors,
    typed_view,
)
from recoveryd.v1 import manifest_pb2 as pb


@dataclass(frozen=True, slots=True)
class Exported:
    """A state described for the sidecar: what is new since the last export."""

    manifest: bytes
    layout: SharedLayout
    """The new storages' handles, every span, the released storages."""
    fds: list[int] = field(default_factory=list)
    """One descriptor per new CPU handle, in handle order (owned by the storages: do not close)."""
    cuda: bool = False
    """Whether any tensor is on a GPU (the two processes then synchronise)."""


def _local_tensors(state: object) -> list[torch.Tensor]:
    """Every tensor that holds ``state``'s bytes (DTensors' and ShardedTensors' local shards too)."""
    return [t for leaf in flatten_leaves(state).values() for t in local_tensors(leaf)]


def signature(state: object) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Where every tensor of ``state`` lives: changes when tensors are added or replaced."""
    return tuple((t.data_ptr(), tuple(t.shape)) for t in _local_tensors(state))


class Exporter:
    """The trainer's side: shares a state's storages and describes them.

    It holds every exported storage until an export no longer finds it in the
    state: a storage the trainer dropped cannot be freed and its address
    reused by a new one while the sidecar still maps the old memory under
    that address (the new one would look already shared).
    """

    def __init__(self, *, sealed: bool | None = None) -> None:
        self._known: dict[tuple[str, int], tuple[int, torch.UntypedStorage]] = {}
        self._next_id = 0
        self.sealed = seal.can_seal() if sealed is None else sealed
        """Whether CPU storages go in sealed memfds (else torch's ``/dev/shm`` segments)."""

    def reset(self) -> None:
        """Forgets what was exported (the next export describes every storage anew)."""
        self._known.clear()

    def export(self, state: object) -> Exported:
        """Moves ``state``'s CPU tensors to shared memory (in place) and describes it.

        Raises:
            UnsupportedValueError: a leaf that cannot be shared (a tensor
                on another device kind, a strided view the manifest would
                copy, a placement the manifest cannot carry).
        """
        tensors = _local_tensors(state)
        for t in tensors:
            if t.device.type == "cpu":
                if not t.is_shared():  # type: ignore[no-untyped-call]
                    _to_shared_memory(t, tensors, sealed=self.sealed)
            elif t.device.type != "cuda":
                raise UnsupportedValueError(f"a tensor on {t.device}", t)
        live = {(str(t.device), t.untyped_storage().data_ptr()) for t in tensors}
        plan = describe(state)
        handles: list[StorageHandle] = []
        spans: list[SpanRef] = []
        fds: list[int] = []
        for sp in plan.spans:
            if sp.nbytes == 0:
                spans.append(SpanRef(handle=-1, start=0, nbytes=0))
                continue
            storage = sp.owner.untyped_storage()
            key = (str(sp.owner.device), storage.data_ptr())
            if key not in live:
                raise UnsupportedValueError(
                    "a strided view whose extent is mostly gaps, or a lazily conjugated "
                    "tensor (the sidecar can only share tensors as they are stored)",
                    sp.owner,
                )
            known = self._known.get(key)
            if known is None:
                h = self._next_id
                self._next_id += 1
                self._known[key] = (h, storage)
                handles.append(_handle(h, storage, fds))
            else:
                h = known[0]
            spans.append(SpanRef(handle=h, start=sp.lo, nbytes=sp.nbytes))
        used = {s.handle for s in spans}
        release = []
        for key, (h, _) in list(self._known.items()):
            if h not in used:
                del self._known[key]
                release.append(h)
        return Exported(
            manifest=plan.manifest.SerializeToString(),
            layout=SharedLayout(handles=tuple(handles), spans=tuple(spans), release=tuple(release)),
            fds=fds,
            cuda=any(t.is_cuda for t in tensors),
        )


def raise_nofile_limit() -> None:
    """Raises the soft open-files limit to the hard one: each shared storage holds a
    descriptor (in the trainer, and in the sidecar while it maps it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _to_shared_memory(t: torch.Tensor, tensors: list[torch.Tensor], *, sealed: bool) -> None:
    if sealed:
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            return  # an empty storage is never handed over (its spans have no handle)
        try:
            seal.move_to_sealed_memory(storage)
        except OSError as err:
            total = sum(x.untyped_storage().nbytes() for x in tensors if x.device.type == "cpu")
            raise seal.memory_error(err, total) from err
        return
    try:
        t.share_memory_()  # type: ignore[no-untyped-call]
    except RuntimeError as err:
        if "Too many open files" in str(err):
            raise ConfigError(
                "ulimit -n",
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                f"the trainer keeps one descriptor per shared storage and ran out ({err}); "
                f"this state has {len({x.untyped_storage().data_ptr() for x in tensors})} "
                "storages: raise the open-files limit (recoveryd.attach raises the soft limit "
                "to the hard one; raise the hard one, e.g. the container runtime's nofile)",
            ) from err
        total = sum(x.untyped_storage().nbytes() for x in tensors if x.device.type == "cpu")
        raise ConfigError(
            "/dev/shm",
            f"{total} bytes of CPU state",
            f"could not move the state into shared memory ({err}). /dev/shm must hold the "
            "whole CPU state: in Kubernetes, mount an emptyDir with medium: Memory at "
            "/dev/shm, sized for it (deploy/k8s does); with Docker, --shm-size",
        ) from err


def _handle(h: int, storage: torch.UntypedStorage, fds: list[int]) -> StorageHandle:
    if storage.device.type == "cpu":
        fd, size = storage._share_fd_cpu_()
        fds.append(fd)
        return StorageHandle(id=h, kind="cpu", size=int(size))
    dev, handle, size, offset, rc_handle, rc_offset, event, sync = storage._share_cuda_()  # type: ignore[no-untyped-call]
    return StorageHandle(
        id=h,
        kind="cuda",
        device=int(dev),
        handle=base64.b64encode(handle).decode(),
        size=int(size),
        offset=int(offset),
        ref_counter=base64.b64encode(rc_handle).decode(),
        ref_counter_offset=int(rc_offset),
        event=base64.b64encode(event).decode() if event else "",
        event_sync=bool(sync),
    )


class SharedState:
    """The sidecar's side: the trainer's storages, mapped, and its state over them.

    Args:
        require_sealed: map only CPU segments sealed against shrinking (see
            :func:`recoveryd.sidecar.seal.check_segment`).
    """

    def __init__(self, *, require_sealed: bool = True) -> None:
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._unsealed: dict[int, int] = {}  # id -> bytes mapped, for storages to check again
        self.require_sealed = require_sealed
        self.cuda = False

    def update(self, layout: SharedLayout, fds: list[int]) -> None:
        """Maps the layout's new storages and unmaps its released ones (see :meth:`add`)."""
        self.add(layout.handles, fds)
        self.release(layout.release)

    def release(self, ids: Sequence[int]) -> None:
        """Unmaps storages the trainer's state no longer uses."""
        for h in ids:
            self._storages.pop(h, None)
            self._unsealed.pop(h, None)

    def add(self, handles: Sequence[StorageHandle], fds: list[int]) -> None:
        """Maps new handles (closes the descriptors: the mappings keep the memory).

        Raises:
            ConfigError: a handle that cannot be mapped here (e.g. a CUDA
                handle without the trainer's GPU visible to this process).
            ManifestError: a descriptor that is not a trainer's segment as its
                handle describes it (see :func:`recoveryd.sidecar.seal.check_segment`).
        """
        fd_iter = iter(fds)
        try:
            if len(fds) != sum(1 for h in handles if h.kind == "cpu"):
                raise ManifestError(
                    f"{len(fds)} descriptors for {sum(h.kind == 'cpu' for h in handles)} CPU storages"
                )
            for h in handles:
                if h.id in self._storages:
                    raise ManifestError(f"storage {h.id} is shared twice")
                if h.kind == "cpu":
                    fd = next(fd_iter)
                    sealed = seal.check_segment(
                        fd, h.size, h.id, require_sealed=self.require_sealed
                    )
                    self._storages[h.id] = torch.UntypedStorage._new_shared_fd_cpu(  # type: ignore[attr-defined]
                        fd, h.size
                    )
                    if not sealed:
                        self._unsealed[h.id] = h.size
                else:
                    self._storages[h.id] = _map_cuda(h)
                    self.cuda = True
        except StopIteration:
            raise ManifestError("fewer descriptors than CPU storages") from None
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def state(self, manifest: bytes | bytearray, spans: Sequence[SpanRef]) -> object:
        """The trainer's state tree over the mapped storages.

        Raises:
            ManifestError: the description does not fit the mapped storages.
        """
        m = pb.Manifest()
        try:
            m.ParseFromString(cast(bytes, manifest))  # upb parses any buffer, without a copy
        except DecodeError as err:
            raise ManifestError(f"the trainer's description does not parse: {err}") from err
        tensors = decode_tensors(m)
        check_manifest(m, tensors)
        if len(spans) != len(m.storage_nbytes):
            raise ManifestError(f"{len(spans)} spans for {len(m.storage_nbytes)} storages")
        bufs = [
            self._span(s, i, int(n))
            for i, (s, n) in enumerate(zip(spans, m.storage_nbytes, strict=True))
        ]
        params = list(m.tensor_is_parameter)

        def tensor(i: int) -> torch.Tensor:
            spec: TensorSpec = tensors[i]
            t = typed_view(bufs[spec.storage], spec)
            return torch.nn.Parameter(t, requires_grad=False) if params[i] else t

        def leaf(kind: int, arg: int, path: tuple[object, ...]) -> object:
            if kind == NODE_TENSOR:
                return tensor(arg)
            if kind == NODE_DTENSOR:
                dmeta = m.dtensors[arg]
                return LocalDTensor(local=tensor(dmeta.local_tensor), meta=dmeta)
            smeta = m.sharded_tensors[arg]
            return LocalShardedTensor(locals=[tensor(i) for i in smeta.local_tensor], meta=smeta)

        return TreeBuilder(m, leaf, tensors=tensors).build()

    def _span(self, span: SpanRef, i: int, nbytes: int) -> torch.Tensor:
        h, lo, n = span.handle, span.start, span.nbytes
        if n != nbytes:
            raise ManifestError(f"span {i}: {n} bytes described, {nbytes} in the manifest")
        if h < 0:
            return torch.empty(0, dtype=torch.uint8)
        storage = self._storages.get(h)
        if storage is None:
            raise ManifestError(f"span {i}: storage {h} was never shared (or was released)")
        if lo < 0 or lo + n > storage.nbytes():
            raise ManifestError(
                f"span {i}: bytes [{lo}, {lo + n}) of a {storage.nbytes()}-byte storage"
            )
        return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
            storage, lo, (n,), (1,)
        )

    def check_whole(self) -> None:
        """Checks that no unsealed segment shrank since it was mapped (call before every
        access; a shrink between this check and the access still crashes the process).

        Raises:
            ManifestError: one did: its memory must not be touched any more.
        """
        for h, size in self._unsealed.items():
            now = seal.shrunk(self._storages[h]._get_shared_fd(), size)  # type: ignore[attr-defined]
            if now is not None:
                raise ManifestError(
                    f"storage {h} shrank from {size} to {now} bytes after it was shared: the "
                    "trainer cut its own memory; this sidecar will not touch it (the rank's "
                    "session ends, reported unhealthy)"
                )

    def close(self) -> None:
        """Drops the mappings (the trainer's memory is freed once it lets go too)."""
        self._storages.clear()
        self._unsealed.clear()


def _map_cuda(h: StorageHandle) -> torch.UntypedStorage:
    if not torch.cuda.is_available():
        raise ConfigError(
            "cuda",
            h.device,
            "the trainer shares CUDA tensors but this sidecar sees no "
            "GPU: run it with the trainer's GPU visible (same pod, same NVIDIA_VISIBLE_DEVICES)",
        )
    torch.cuda._lazy_init()  # type: ignore[no-untyped-call]
    return torch.UntypedStorage._new_shared_cuda(
        h.device,
        base64.b64decode(h.handle),
        h.size,
        h.offset,
        base64.b64decode(h.ref_counter),
        h.ref_counter_offset,
        base64.b64decode(h.event) if h.event else b"",
        h.event_sync,
    )
