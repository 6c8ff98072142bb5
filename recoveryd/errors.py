"""The one error hierarchy of recoveryd.

Every error recoveryd raises is a :class:`RecoverydError`; each subclass also
subclasses the built-in it refines, so ``except TimeoutError`` keeps working in
code that does not know recoveryd. Errors carry the facts a caller needs as
attributes (``src_rank``, ``step``, ``paths``) besides a message that says what
went wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence


class RecoverydError(Exception):
    """Base class of every error recoveryd raises."""


class ConfigError(RecoverydError, ValueError):
    """A configuration value is invalid.

    Attributes:
        field: the name of the offending field.
        value: the rejected value.
    """

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"invalid {field}={value!r}: {why}")
        self.field = field
        self.value = value


class TransferError(RecoverydError, RuntimeError):
    """A state transfer failed; the receiver's state must not be used as complete.

    Attributes:
        peer_rank: the rank of the peer the failing wait was on, if known.
    """

    def __init__(self, message: str, *, peer_rank: int | None = None) -> None:
        super().__init__(message)
        self.peer_rank = peer_rank


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer did not finish within the caller's timeout (a silent or slow peer)."""


class PeerLostError(TransferError, ConnectionError):
    """The peer of a transfer went away (process died, connection closed)."""


class UnsupportedValueError(TransferError, TypeError):
    """A state_dict leaf cannot be carried by the manifest format.

    Attributes:
        path: the key path of the leaf, e.g. ``"optim.state.0.step_fn"``.
    """

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
    """The incoming state does not fit the receiver's in-place state.

    Raised before any byte is written into the receiver's tensors.

    Attributes:
        paths: every mismatching key path, each with what differs.
    """

    def __init__(self, mismatches: Sequence[str]) -> None:
        shown = "\n  ".join(mismatches[:50])
        more = f"\n  ... and {len(mismatches) - 50} more" if len(mismatches) > 50 else ""
        super().__init__(
            f"incoming state does not match the in-place state_dict at {len(mismatches)} "
            f"path(s); nothing was written:\n  {shown}{more}"
        )
        self.paths = list(mismatches)


class StepMismatchError(TransferError, ValueError):
    """The sender's step is not the step the receiver demanded.

    Attributes:
        expected: the step the receiver asked for.
        actual: the step the sender sent (``None`` if it sent none).
    """

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


class CoordinatorUnavailableError(RecoverydError, ConnectionError):
    """The coordinator did not answer in time (down, restarting, or unreachable).

    Attributes:
        address: the coordinator's ``host:port``.
    """

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

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"the recoveryd sidecar at {path} is gone ({detail}); training can go on without "
            "recovery support: restart the sidecar container and the trainer re-attaches "
            "when it restarts"
        )
        self.path = path
