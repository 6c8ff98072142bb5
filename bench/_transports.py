"""The registry of benchmarked transports: names, import checks, adapters and cost estimates."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from bench._adapter import Adapter
from bench._workloads import Workload


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportInfo:
    """What the harness knows about a transport before running it."""

    name: str
    """Name on the command line and in the table."""
    module: str
    """Module whose import must succeed (checked in the parent before any rank starts)."""
    attrs: tuple[str, ...]
    """Names that module must define."""
    factory: Callable[[], Adapter]
    """Builds the rank-side adapter."""
    ships_whole_storages: bool
    """Sends each tensor's whole storage (so D's 64 views cost 64 buffers on the wire)."""


def _raw() -> Adapter:
    from bench._anchors import RawGloo

    return RawGloo()


def _raw_fresh() -> Adapter:
    from bench._anchors import RawGlooFresh

    return RawGlooFresh()


def _torch_pg() -> Adapter:
    from bench._anchors import TorchPG

    return TorchPG()


def _torchft_pg() -> Adapter:
    from bench._anchors import TorchftPG

    return TorchftPG()


def _torchft_http() -> Adapter:
    from bench._anchors import TorchftHTTP

    return TorchftHTTP()


def _recoveryd() -> Adapter:
    from bench._recoveryd import Recoveryd

    return Recoveryd()


def _recoveryd_checksums() -> Adapter:
    from bench._recoveryd import RecoverydChecksums

    return RecoverydChecksums()


def _recoveryd_keyed() -> Adapter:
    from bench._recoveryd import RecoverydKeyed

    return RecoverydKeyed()


def _recoveryd_warmed() -> Adapter:
    from bench._recoveryd import RecoverydWarmed

    return RecoverydWarmed()


def _recoveryd_macs() -> Adapter:
    from bench._recoveryd import RecoverydMacs

    return RecoverydMacs()


TRANSPORTS: dict[str, TransportInfo] = {
    t.name: t
    for t in (
        TransportInfo(
            name="raw-gloo",
            module="torch.distributed",
            attrs=("ProcessGroupGloo",),
            factory=_raw,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="raw-gloo-fresh",
            module="torch.distributed",
            attrs=("ProcessGroupGloo",),
            factory=_raw_fresh,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="recoveryd",
            module="recoveryd.transport",
            attrs=("send_state_dict", "recv_state_dict"),
            factory=_recoveryd,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="recoveryd-warmed",
            module="recoveryd.transport",
            attrs=("send_state_dict", "recv_state_dict", "prepare_send"),
            factory=_recoveryd_warmed,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="recoveryd-checksums",
            module="recoveryd.transport",
            attrs=("send_state_dict", "recv_state_dict", "TransferConfig"),
            factory=_recoveryd_checksums,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="recoveryd-keyed",
            module="recoveryd.transport",
            attrs=("send_state_dict", "recv_state_dict"),
            factory=_recoveryd_keyed,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="recoveryd-macs",
            module="recoveryd.transport",
            attrs=("send_state_dict", "recv_state_dict", "TransferConfig"),
            factory=_recoveryd_macs,
            ships_whole_storages=False,
        ),
        TransportInfo(
            name="torch-pg",
            module="torch.distributed.checkpoint._pg_transport",
            attrs=("PGTransport",),
            factory=_torch_pg,
            ships_whole_storages=True,
        ),
        TransportInfo(
            name="torchft-pg",
            module="torchft.checkpointing.pg_transport",
            attrs=("PGTransport",),
            factory=_torchft_pg,
            ships_whole_storages=True,
        ),
        TransportInfo(
            name="torchft-http",
            module="torchft.checkpointing.http_transport",
            attrs=("HTTPTransport",),
            factory=_torchft_http,
            # torch.save dedupes storages, so D's flat buffer goes once.
            ships_whole_storages=False,
        ),
    )
}

ANCHOR = "raw-gloo"
"""The ProcessGroup limit: preallocated, touched receive buffer (``x raw``)."""
FRESH_ANCHOR = "raw-gloo-fresh"
"""The limit for an allocating receive in a fresh process (``x fresh``)."""
RAW_ANCHORS: tuple[str, ...] = (ANCHOR, FRESH_ANCHOR)
"""Transports that move the workload's bytes as one uint8 buffer (not its state_dict)."""


def joiner_template(name: str, w: Workload) -> bool:
    """Whether the joiner of ``name`` on ``w`` builds (and receives into) a preexisting buffer.

    raw-gloo always does (one zeroed uint8 buffer), raw-gloo-fresh never does (it allocates
    inside the timed region), every other transport does on in-place workloads only.
    """
    if name == ANCHOR:
        return True
    if name == FRESH_ANCHOR:
        return False
    return w.in_place


def make_adapter(name: str) -> Adapter:
    """The rank-side adapter for transport ``name``."""
    return TRANSPORTS[name].factory()


def import_problem(name: str) -> str | None:
    """Why transport ``name`` cannot run here (its import fails), or None if it imports."""
    info = TRANSPORTS[name]
    try:
        mod = importlib.import_module(info.module)
    except Exception as e:
        return f"import {info.module} failed: {type(e).__name__}: {e}"
    missing = [a for a in info.attrs if not hasattr(mod, a)]
    if missing:
        return f"{info.module} lacks {', '.join(missing)}"
    return None


def expected_wire_bytes(name: str, w: Workload) -> int:
    """Bytes the transport is expected to move for ``w`` (for time budgets and skips)."""
    info = TRANSPORTS[name]
    return w.storage_bytes if info.ships_whole_storages else w.logical_bytes


def expected_receiver_bytes(name: str, w: Workload) -> int:
    """Bytes the joiner is expected to hold at its peak (template + received + staging)."""
    held = expected_wire_bytes(name, w)
    template = w.logical_bytes if joiner_template(name, w) else 0
    return template + held
