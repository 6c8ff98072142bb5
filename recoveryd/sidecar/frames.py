"""The requests and replies between a trainer and its sidecar, typed, with one codec.

Every frame's header is one of the frozen dataclasses below, named by its
``op``; :func:`encode` turns one into the header's JSON object and
:func:`decode_request` / :func:`decode_reply` turn a header back, checking
every field against its type (an unknown op or field, a missing one, a
value of the wrong type is a :class:`~recoveryd.sidecar.wire.MalformedFrameError`).
Manifests travel as the frame's payload and descriptors alongside (see
:mod:`recoveryd.sidecar.wire`); errors as :func:`recoveryd.errors.error_to_fields`
describes them.

A conversation: ``Attach`` (small: who, the token, the size of the state to
come) -> ``Admitted`` -> ``State`` (the layout, the manifest, the
descriptors) -> ``Attached`` (with the attachment's secret); then requests
and their replies, a ``Refresh`` followed at once by its ``State``, and
``Ping`` -> ``Done`` while the trainer is away.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeAlias, Union

from recoveryd.agent.interface import RecoveryRecord
from recoveryd.protocol import Report
from recoveryd.sidecar.wire import MalformedFrameError

FRAMES_VERSION = 2
"""The version of these frames; a trainer and its sidecar must speak the same
(the attach says which, and a sidecar of another version refuses it).
2: the attach is checked (token, the rank's holder) before the state is sent."""

# ---- what a trainer shares ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StorageHandle:
    """One storage the trainer shares: a CPU segment (its descriptor travels
    alongside, in handle order) or a CUDA IPC handle (base64 fields)."""

    id: int
    kind: Literal["cpu", "cuda"]
    size: int
    device: int = 0
    handle: str = ""
    offset: int = 0
    ref_counter: str = ""
    ref_counter_offset: int = 0
    event: str = ""
    event_sync: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SpanRef:
    """Where one span of the manifest lives: bytes ``[start, start + nbytes)`` of
    storage ``handle`` (-1: an empty span, in no storage)."""

    handle: int
    start: int
    nbytes: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SharedLayout:
    """A state's storages as shared: the new ones, every span, and the released ones."""

    handles: tuple[StorageHandle, ...] = ()
    """Storages not shared before (the sidecar maps them)."""
    spans: tuple[SpanRef, ...] = ()
    """One per span of the manifest, in its order."""
    release: tuple[int, ...] = ()
    """Ids of storages the state no longer uses (the sidecar unmaps them)."""


# ---- requests (trainer -> sidecar) -----------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StateSize:
    """The sizes of the :class:`State` frame a request announces: the receiver
    takes exactly that much (within its ceiling), nothing more."""

    layout_bytes: int
    """Bytes of the :class:`State` frame's header (as :func:`recoveryd.sidecar.wire.pack` encodes it)."""
    manifest_bytes: int
    """Bytes of its payload, the manifest."""
    descriptors: int
    """Descriptors that come with it (one per new CPU storage)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Attach:
    """Serve this rank: who it is, the proof that it may attach, the size of its state.

    The first frame of a connection and a small one: the sidecar checks it
    (version, token, the rank's current holder) before it accepts anything
    larger, then answers :class:`Admitted` and the trainer sends its
    :class:`State`."""

    OP: ClassVar[str] = "attach"
    version: int
    """:data:`FRAMES_VERSION` of the trainer's recoveryd."""
    token: str = ""
    """The sidecar's attach token, as read from ``token_file``."""
    token_file: str = ""
    """Where the trainer read the token (for the messages of a refusal)."""
    replica_id: str
    group_rank: int
    group_world_size: int
    labels: Mapping[str, str]
    pid: int
    secret: str = ""
    """The secret of this process's live attachment of the same rank, if it has
    one (:attr:`Attached.secret`): presenting it replaces that attachment."""
    state: StateSize


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class State:
    """The rank's state as shared (manifest as payload, descriptors alongside);
    sent only right after :class:`Admitted` or a :class:`Refresh`."""

    OP: ClassVar[str] = "state"
    layout: SharedLayout


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Refresh:
    """The state as it is now: a :class:`State` of these sizes follows at once."""

    OP: ClassVar[str] = "refresh"
    state: StateSize


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Ping:
    """Nothing to do: the trainer lives (sent when it has not called for a while)."""

    OP: ClassVar[str] = "ping"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Recover:
    """Recover this rank's state in place within ``timeout_s``."""

    OP: ClassVar[str] = "recover"
    timeout_s: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    """A step boundary; ``fresh``: the state was just refreshed, send if due."""

    OP: ClassVar[str] = "step"
    step: int
    fresh: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Park:
    """Serve plans at the current step for ``timeout_s``."""

    OP: ClassVar[str] = "park"
    timeout_s: float


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Close:
    """The trainer detaches on purpose: the rank leaves, its agent stops within ``timeout_s``."""

    OP: ClassVar[str] = "close"
    timeout_s: float


Request: TypeAlias = Attach | State | Refresh | Recover | Step | Park | Close | Ping

# ---- replies (sidecar -> trainer) --------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Admitted:
    """The attach is accepted: send the :class:`State` it announced."""

    OP: ClassVar[str] = "admitted"
    max_frame_bytes: int
    """The largest :class:`State` frame (header and payload) this sidecar takes."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Attached:
    """The rank is served by this agent."""

    OP: ClassVar[str] = "attached"
    agent_id: str
    rendezvous: str
    metrics_address: str | None = None
    secret: str = ""
    """This attachment's secret: an attach of the same rank that presents it
    replaces this one while it lives (the trainer process keeps it)."""
    idle_timeout_s: float = 0.0
    """The sidecar ends a session silent this long: the trainer pings well within it (0: never)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Done:
    """The request is done (``refresh``, ``close``, ``ping``)."""

    OP: ClassVar[str] = "done"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Recovered:
    """How the recovery went; the received plain values come as the payload's manifest."""

    OP: ClassVar[str] = "recovered"
    step: int | None
    record: RecoveryRecord


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Stepped:
    """``due``: a send is due, refresh and ask again with ``fresh``; ``sends``: sends made."""

    OP: ClassVar[str] = "stepped"
    due: bool
    sends: tuple[Report, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Parked:
    """The park ended; ``sends``: sends made while parked."""

    OP: ClassVar[str] = "parked"
    sends: tuple[Report, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Failed:
    """The request failed with this error (see :func:`recoveryd.errors.error_to_fields`);
    a failed recovery also says how far it went (``state_written`` above all)."""

    OP: ClassVar[str] = "failed"
    error: Mapping[str, object]
    record: RecoveryRecord | None = None


Reply: TypeAlias = Admitted | Attached | Done | Recovered | Stepped | Parked | Failed

_REQUESTS: dict[str, type[Any]] = {
    c.OP: c for c in (Attach, State, Refresh, Recover, Step, Park, Close, Ping)
}
_REPLIES: dict[str, type[Any]] = {
    c.OP: c for c in (Admitted, Attached, Done, Recovered, Stepped, Parked, Failed)
}


# ---- the codec -----------------------------------------------------------------------------


def encode(msg: Request | Reply) -> dict[str, Any]:
    """The frame header of ``msg``: its ``op`` and its fields as JSON values."""
    return {"op": msg.OP, **_to_json(msg)}


def decode_request(header: Mapping[str, Any]) -> Request:
    """The request a frame header describes.

    Raises:
        MalformedFrameError: not a well-formed request.
    """
    msg: Request = _decode(header, _REQUESTS)
    return msg


def decode_reply(header: Mapping[str, Any]) -> Reply:
    """The reply a frame header describes.

    Raises:
        MalformedFrameError: not a well-formed reply.
    """
    msg: Reply = _decode(header, _REPLIES)
    return msg


def _decode(header: Mapping[str, Any], kinds: Mapping[str, type[Any]]) -> Any:
    fields = dict(header)
    op = fields.pop("op", None)
    cls = kinds.get(op) if isinstance(op, str) else None
    if cls is None:
        raise MalformedFrameError(f"malformed frame: unknown op {op!r}")
    return _from_json(cls, fields, op)


def _to_json(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_json(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and built, for dataclasses)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MalformedFrameError(f"malformed frame: {where} is not an object")
        hints = _hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        extra = set(value) - known
        if extra:
            raise MalformedFrameError(
                f"malformed frame: {where} has unknown fields {sorted(extra)}"
            )
        args = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                args[f.name] = _from_json(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedFrameError(f"malformed frame: {where} lacks {f.name!r}")
        return tp(**args)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _from_json(arm, value, where)
            except MalformedFrameError:
                continue
        raise MalformedFrameError(f"malformed frame: {where} is none of {tp}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise MalformedFrameError(
            f"malformed frame: {where} is {value!r}, not one of {typing.get_args(tp)}"
        )
    if origin is tuple:
        if not isinstance(value, list):
            raise MalformedFrameError(f"malformed frame: {where} is not a list")
        (arm, _) = typing.get_args(tp)
        return tuple(_from_json(arm, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise MalformedFrameError(f"malformed frame: {where} is not an object")
        _, arm = typing.get_args(tp)
        return {k: _from_json(arm, v, f"{where}.{k}") for k, v in value.items()}
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is object or tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise MalformedFrameError(
            f"malformed frame: {where} has a type the codec does not know ({tp})"
        )
    raise MalformedFrameError(
        f"malformed frame: {where} is {type(value).__name__}, not {tp.__name__}"
    )
