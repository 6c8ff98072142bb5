"""The one error hierarchy of recoveryd.

Every error recoveryd raises is a :class:`RecoverydError`; each subclass also
subclasses the built-in it refines, so ``except TimeoutError`` keeps working in
code that does not know recoveryd. Errors carry the facts a caller needs as
attributes (``src_rank``, ``step``, ``paths``) besides a message that says what
went wrong and what to do.

Errors cross process boundaries (a sidecar's answer to its trainer) as plain
data through one converter, :func:`error_to_fields` and
:func:`error_from_fields`: the type, the message and the facts (each class's
``facts``) come back as they left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar


class RecoverydError(Exception):
    """Base class of every error recoveryd raises."""

    facts: ClassVar[tuple[str, ...]] = ()
    """The attributes that carry this error's facts (they cross process boundaries)."""


class ConfigError(RecoverydError, ValueError):
    """A configuration value is invalid.

    Attributes:
        field: the name of the offending field.
        value: the rejected value.
    """

    facts: ClassVar[tuple[str, ...]] = ("field", "value")

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"invalid {field}={value!r}: {why}")
        self.field = field
        self.value = value


class TransferError(RecoverydError, RuntimeError):
    """A state transfer failed; the joiner's state must not be used as complete.

    Attributes:
        peer_rank: the rank of the peer the failing wait was on, if known.
        donor_index: in a striped receive, the position (in the ``donors``
            given) of the donor that failed, if one did.
    """

    facts: ClassVar[tuple[str, ...]] = ("peer_rank",)

    def __init__(self, message: str, *, peer_rank: int | None = None) -> None:
        super().__init__(message)
        self.peer_rank = peer_rank
        self.donor_index: int | None = None


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer did not finish within the caller's timeout (a silent or slow peer)."""


class PeerLostError(TransferError, ConnectionError):
    """The peer of a transfer went away (process died, connection closed)."""


class DonorsDisagreeError(TransferError, ValueError):
    """The donors of a striped receive do not offer the same state (another step, layout
    or cutting); every donor was refused and nothing was written."""


class UnsupportedValueError(TransferError, TypeError):
    """A state_dict leaf cannot be carried by the manifest format.

    Attributes:
        path: the key path of the leaf, e.g. ``"optim.state.0.step_fn"``.
    """

    facts: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, path: str, value: object) -> None:
        super().__init__(
            f"cannot send state_dict leaf at {path!r} of type {type(value).__qualname__}: "
            "only tensors, DTensor, ShardedTensor, containers (dict, list, tuple, OrderedDict) "
            "and plain values (None, bool, int, float, complex, str, bytes, torch.dtype, "
            "torch.Size, torch.device) can be sent; convert it or drop it from the state_dict"
        )
        self.path = path


class ManifestError(TransferError, ValueError):
    """The incoming manifest is malformed, of an unknown version, or hostile."""


class StateMismatchError(TransferError, ValueError):
    """The incoming state does not fit the joiner's in-place state.

    Raised before any byte is written into the joiner's tensors.

    Attributes:
        paths: every mismatching key path, each with what differs.
    """

    facts: ClassVar[tuple[str, ...]] = ("paths",)

    def __init__(self, mismatches: Sequence[str]) -> None:
        shown = "\n  ".join(mismatches[:50])
        more = f"\n  ... and {len(mismatches) - 50} more" if len(mismatches) > 50 else ""
        super().__init__(
            f"incoming state does not match the in-place state_dict at {len(mismatches)} "
            f"path(s); nothing was written:\n  {shown}{more}"
        )
        self.paths = list(mismatches)


class StepMismatchError(TransferError, ValueError):
    """The donor's step is not the step the joiner demanded.

    Attributes:
        expected: the step the joiner asked for.
        actual: the step the donor sent (``None`` if it sent none).
    """

    facts: ClassVar[tuple[str, ...]] = ("expected", "actual")

    def __init__(self, expected: int, actual: int | None, *, peer_rank: int | None) -> None:
        super().__init__(
            f"expected state at step {expected} but rank {peer_rank} sent step {actual}; "
            "ask the coordinator for a fresh plan",
            peer_rank=peer_rank,
        )
        self.expected = expected
        self.actual = actual


class IntegrityError(TransferError, ValueError):
    """A received bucket failed its checksum: bytes were corrupted on the way."""


class UntrustedPeerError(TransferError, PermissionError):
    """The peer on the transfer group could not prove it holds the plan's key.

    It is not the planned donor or joiner (someone joined the plan's
    rendezvous without being a party to the plan), or the two sides were
    given different plans. Nothing was sent or written.
    """


class CoordinatorUnavailableError(RecoverydError, ConnectionError):
    """The coordinator did not answer in time (down, restarting, or unreachable).

    Attributes:
        address: the coordinator's ``host:port``.
    """

    facts: ClassVar[tuple[str, ...]] = ("address", "detail")

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(
            f"coordinator {address} unavailable: {detail}; check that `recoveryd coordinator` "
            "runs there and is reachable (agents keep retrying with backoff)"
        )
        self.address = address
        self.detail = detail


class UnknownMemberError(RecoverydError, KeyError):
    """A call came from a rank the coordinator does not know (it must register again).

    Attributes:
        replica_id: the replica named by the call.
        group_rank: the rank named by the call.
    """

    facts: ClassVar[tuple[str, ...]] = ("replica_id", "group_rank")

    def __init__(self, replica_id: str, group_rank: int) -> None:
        super().__init__(
            f"rank {group_rank} of replica {replica_id!r} is not registered; register again "
            "(the coordinator may have restarted)"
        )
        self.replica_id = replica_id
        self.group_rank = group_rank

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SidecarLostError(RecoverydError, ConnectionError):
    """The sidecar agent a trainer is attached to went away (or never answered).

    The trainer can keep training without recovery support: after this error
    the attachment's ``step()`` does nothing.

    Attributes:
        path: the sidecar's socket.
    """

    facts: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"the recoveryd sidecar at {path} is gone ({detail}); training can go on without "
            "recovery support: restart the sidecar container and the trainer re-attaches "
            "when it restarts"
        )
        self.path = path


class AuthenticationError(RecoverydError, PermissionError):
    """The coordinator refused this process's credentials (missing, wrong or expired).

    Attributes:
        address: the coordinator's ``host:port``.
    """

    facts: ClassVar[tuple[str, ...]] = ("address", "detail")

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(
            f"coordinator {address} refused this process's credentials: {detail}; give it the "
            "job's token (--token-file / RECOVERYD_TOKEN_FILE) or a certificate of the job's CA "
            "(--tls-cert/--tls-key/--tls-ca / RECOVERYD_TLS_*), as the coordinator was started with"
        )
        self.address = address
        self.detail = detail


class PermissionDeniedError(RecoverydError, PermissionError):
    """A call acted for a rank (or replica) its caller does not hold.

    Attributes:
        replica_id: the replica named by the call.
        group_rank: the rank named by the call (-1: the replica as a whole).
    """

    facts: ClassVar[tuple[str, ...]] = ("replica_id", "group_rank", "detail")

    def __init__(self, replica_id: str, group_rank: int, detail: str) -> None:
        who = (
            f"rank {group_rank} of replica {replica_id!r}"
            if group_rank >= 0
            else (f"replica {replica_id!r}")
        )
        super().__init__(f"not allowed to act for {who}: {detail}")
        self.replica_id = replica_id
        self.group_rank = group_rank
        self.detail = detail


class LimitExceededError(RecoverydError, ValueError):
    """A request went past one of the coordinator's or the sidecar's limits.

    Attributes:
        limit: the name of the limit (also the knob that raises it, where there is one).
        value: what the request asked for.
        maximum: the limit's value.
    """

    facts: ClassVar[tuple[str, ...]] = ("limit", "value", "maximum")

    def __init__(self, limit: str, value: int, maximum: int, what: str = "") -> None:
        super().__init__(
            f"{what or limit}: {value} is over the limit of {maximum} ({limit}); "
            "split the request, or raise the limit where it is configurable"
        )
        self.limit = limit
        self.value = value
        self.maximum = maximum


_PLAIN = (str, int, float, bool, type(None))
MAX_FACT_ITEMS = 1000
"""A list fact crosses with at most this many items (a mismatch can name every
tensor of a state; the message lists the first 50 anyway)."""
MAX_TEXT_CHARS = 16384
"""A message or text fact crosses cut to this many characters."""
_KNOWN: dict[str, type[RecoverydError]] = {
    c.__name__: c
    for c in (
        RecoverydError,
        ConfigError,
        TransferError,
        TransferTimeoutError,
        PeerLostError,
        UnsupportedValueError,
        ManifestError,
        StateMismatchError,
        StepMismatchError,
        IntegrityError,
        UntrustedPeerError,
        CoordinatorUnavailableError,
        UnknownMemberError,
        SidecarLostError,
        AuthenticationError,
        PermissionDeniedError,
        LimitExceededError,
    )
}


def _facts_of(cls: type[RecoverydError]) -> tuple[str, ...]:
    names: list[str] = []
    for c in reversed(cls.__mro__):
        for name in c.__dict__.get("facts", ()):
            if name not in names:
                names.append(name)
    return tuple(names)


def _plain(value: object) -> object:
    if isinstance(value, str):
        return value[:MAX_TEXT_CHARS]
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value):
        return [_plain(v) for v in value[:MAX_FACT_ITEMS]]
    return repr(value)[:MAX_TEXT_CHARS]


def error_to_fields(err: BaseException) -> dict[str, object]:
    """An error as plain data: its type (the nearest one of this module), message and facts.

    An error that is not a :class:`RecoverydError` becomes one whose message
    names its type. Facts that are not plain data cross as their ``repr``;
    texts are cut to :data:`MAX_TEXT_CHARS`, lists to :data:`MAX_FACT_ITEMS`,
    so a description stays small enough for any frame.
    """
    cls = next((c for c in type(err).__mro__ if _KNOWN.get(c.__name__) is c), None)
    if cls is None:
        return {"type": "RecoverydError", "message": f"{type(err).__name__}: {err}", "facts": {}}
    facts = {name: _plain(getattr(err, name, None)) for name in _facts_of(cls)}
    return {"type": cls.__name__, "message": str(err)[:MAX_TEXT_CHARS], "facts": facts}


def error_from_fields(fields: Mapping[str, object]) -> RecoverydError:
    """The error :func:`error_to_fields` described: the same type, message and facts.

    Only this module's types are built, only with the facts each declares; a
    fact left out is ``None``. Values are checked to be plain data, not to be
    of the type the fact has where it is raised.

    Raises:
        ValueError: ``fields`` is not such a description (an unknown type, a
            fact this type does not carry, a value that is not plain data).
    """
    name, message, facts = fields.get("type"), fields.get("message"), fields.get("facts", {})
    cls = _KNOWN.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(message, str) or not isinstance(facts, Mapping):
        raise ValueError(f"not an error description: {dict(fields)!r:.200}")
    allowed = _facts_of(cls)
    for key, value in facts.items():
        if key not in allowed:
            raise ValueError(f"{name} carries no fact {key!r}")
        if not isinstance(value, _PLAIN) and not (
            isinstance(value, list) and all(isinstance(v, _PLAIN) for v in value)
        ):
            raise ValueError(f"{name}.{key} is not plain data")
    # Built around the constructors, which compose their messages from the
    # facts: the message that crossed is the one to keep. OSError's subclasses
    # (ConnectionError, TimeoutError) need its __new__, every other one BaseException's.
    base = OSError if issubclass(cls, OSError) else BaseException
    err = base.__new__(cls)
    Exception.__init__(err, message)
    for key in allowed:
        setattr(err, key, facts.get(key))
    return err
