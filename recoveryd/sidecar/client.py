"""The trainer's side of a sidecar agent: :func:`attach` and the :class:`Attachment` it returns.

An attachment is a :class:`recoveryd.RankAgent`, as the in-process
:class:`recoveryd.Agent` is: the same calls, return types and recovery
record, so a trainer switches mode with one line. Each call is one typed
request (:mod:`recoveryd.sidecar.frames`) over the sidecar's Unix socket,
under a deadline; tensor bytes never cross it (they are shared, see
:mod:`recoveryd.sidecar.share`), and errors come back with their type and
facts.

Attaching proves the trainer may: it presents the sidecar's token (read
from ``token_file``), and a rank it attached before in this process is
taken back with that attachment's secret (a live rank is never taken from
another process). While attached, a thread of the attachment pings the
sidecar when the trainer has not called it for a quarter of the sidecar's
``idle_timeout``, so long gaps between steps never end the session.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TypeVar, cast

import torch

from recoveryd._time import env_str
from recoveryd.agent.interface import RecoveryRecord
from recoveryd.errors import LimitExceededError, RecoverydError, SidecarLostError
from recoveryd.protocol import Report
from recoveryd.sidecar import channel, frames, trust, wire
from recoveryd.sidecar.share import Exporter, raise_nofile_limit, signature
from recoveryd.transport.tree import TreeBuilder, merge_values
from recoveryd.v1 import manifest_pb2 as pb

_R = TypeVar("_R", bound=frames.Reply)
_PLACEHOLDER = torch.empty(0)
_CHECK_EVERY = 100
"""After its first steps, an attachment looks for new tensors every this many steps."""


def attach(
    path: str,
    state_dict: Callable[[], object],
    *,
    replica_id: str,
    group_rank: int = 0,
    group_world_size: int = 1,
    labels: Mapping[str, str] | None = None,
    timeout: timedelta = timedelta(seconds=30),
    transfer_timeout: timedelta = timedelta(minutes=10),
    token_file: str | None = None,
) -> Attachment:
    """Attaches this trainer rank to the sidecar agent listening on ``path``.

    The rank's CPU tensors move to shared memory in place (``/dev/shm`` must
    hold the state; in Kubernetes an ``emptyDir`` with ``medium: Memory`` at
    ``/dev/shm``), CUDA tensors are shared by CUDA IPC (the sidecar must see
    the same GPU). The trainer keeps using its tensors as before.

    Args:
        path: the sidecar's socket (``recoveryd agent --socket PATH``).
        state_dict: returns the rank's live state (as for :class:`recoveryd.Agent`).
        replica_id: this rank's replica.
        group_rank: this rank's rank within its replica.
        group_world_size: how many ranks the replica has.
        labels: locality labels (``node``, ``zone``).
        timeout: how long to wait for the sidecar to accept (it may start
            after the trainer), and for each quick request.
        transfer_timeout: the longest a ``step()`` that sends may take.
        token_file: the file of the sidecar's attach token (default:
            ``RECOVERYD_SIDECAR_TOKEN_FILE``, else ``<path>.token``, which the
            sidecar writes when it starts).

    Raises:
        SidecarLostError: no sidecar accepted within ``timeout``.
        UnsupportedValueError: the state holds what cannot be shared.
        ConfigError: the token file cannot be read, or this process's uid or
            frames version is not one the sidecar serves.
        PermissionDeniedError: the sidecar refused the token, or another live
            trainer process holds this rank.
        LimitExceededError: the sidecar serves as many connections as it
            may, or the state is larger than it takes.
    """
    return Attachment(
        path,
        state_dict,
        identity=_Identity(replica_id, group_rank, group_world_size, dict(labels or {})),
        timeout=timeout,
        transfer_timeout=transfer_timeout,
        token_file=token_file
        or env_str("RECOVERYD_SIDECAR_TOKEN_FILE")
        or trust.default_token_file(path),
    )


class _Identity:
    """Who an attaching rank is."""

    __slots__ = ("group_rank", "group_world_size", "labels", "replica_id")

    def __init__(
        self, replica_id: str, group_rank: int, group_world_size: int, labels: dict[str, str]
    ) -> None:
        self.replica_id = replica_id
        self.group_rank = group_rank
        self.group_world_size = group_world_size
        self.labels = labels


class Attachment:
    """A trainer rank attached to its sidecar agent (see :func:`attach`); a :class:`RankAgent`."""

    def __init__(
        self,
        path: str,
        state_dict: Callable[[], object],
        *,
        identity: _Identity,
        timeout: timedelta,
        transfer_timeout: timedelta,
        token_file: str,
    ) -> None:
        self.path = path
        self.token_file = token_file
        """Where this attachment read the sidecar's token."""
        self._state_fn = state_dict
        self._timeout = timeout
        self._transfer_timeout = transfer_timeout
        self._exporter = Exporter()
        self._steps = 0
        self.last_recovery: RecoveryRecord | None = None
        """How the last :meth:`recover` went (the sidecar's recovery record)."""
        self.sends: deque[Report] = deque(maxlen=32)
        """The last sends the sidecar made from this rank's state (newest last)."""
        raise_nofile_limit()
        state = state_dict()
        exp = self._exporter.export(state)  # fails fast (e.g. no memory for the state)
        self._cuda = exp.cuda
        self._sig = signature(state)
        self._key = (os.path.abspath(path), identity.replica_id, identity.group_rank)
        self._channel = channel.Channel(path, timeout)
        try:
            # Read after connecting: the sidecar writes its token before it listens.
            token = channel.read_token(token_file, path)
            body = wire.pack(frames.encode(frames.State(layout=exp.layout)), len(exp.fds))
            admitted, _ = self._call(
                frames.Attach(
                    version=frames.FRAMES_VERSION,
                    token=token,
                    token_file=token_file,
                    replica_id=identity.replica_id,
                    group_rank=identity.group_rank,
                    group_world_size=identity.group_world_size,
                    labels=identity.labels,
                    pid=os.getpid(),
                    secret=channel.held_secret(self._key),
                    state=_size(body, exp.manifest, exp.fds),
                ),
                frames.Admitted,
            )
            self._channel.max_frame_bytes = admitted.max_frame_bytes
            reply, _ = self._call(body, frames.Attached, exp.manifest, exp.fds)
        except BaseException:
            self._channel.close()  # refused: the sidecar ends this session, not the others
            raise
        self._secret = reply.secret
        channel.hold_secret(self._key, reply.secret)
        if reply.idle_timeout_s > 0:
            self._channel.keep_alive(timedelta(seconds=reply.idle_timeout_s / 4))
        self.agent_id = reply.agent_id
        self.rendezvous = reply.rendezvous
        self.metrics_address = reply.metrics_address
        """``host:port`` of the sidecar's ``/metrics`` (it counts this rank's transfers), or ``None``."""

    @property
    def lost(self) -> bool:
        """Whether the sidecar went away (``step()`` then does nothing)."""
        return self._channel.lost is not None

    def recover(
        self, state_dict: object, *, timeout: timedelta = timedelta(minutes=10)
    ) -> int | None:
        """Receives this rank's state from a live donor, in place (see :meth:`recoveryd.Agent.recover`).

        The sidecar writes the tensors in the trainer's memory; plain values
        come back over the socket and are merged into ``state_dict``.

        Raises:
            SidecarLostError: the sidecar is gone.
            CoordinatorUnavailableError: the coordinator never answered.
            TransferTimeoutError: plans were under way but none finished in time.
        """
        self._check()
        self._refresh(state_dict)
        self._sync()  # the sidecar writes into these tensors on its own streams
        self.last_recovery = RecoveryRecord(outcome="recovering")
        reply, payload = self._call(
            frames.Recover(timeout_s=timeout.total_seconds()),
            frames.Recovered,
            deadline=timeout + self._timeout,
        )
        self.last_recovery = reply.record
        if reply.step is None:
            return None
        m = pb.Manifest()
        m.ParseFromString(cast(bytes, payload))  # upb parses any buffer, without a copy
        merge_values(state_dict, TreeBuilder(m, lambda kind, arg, path: _PLACEHOLDER).build())
        return reply.step

    def step(self, step: int) -> bool:
        """Marks a step boundary; sends this rank's state when a plan's fence is due.

        Does nothing once the sidecar is gone (after raising that once).

        Returns:
            Whether a send was due (and made) at ``step``.

        Raises:
            SidecarLostError: the sidecar went away (raised once).
        """
        if self._channel.lost is not None:
            err, self._channel.unraised = self._channel.unraised, None
            if err is not None:  # found gone by a ping: raised here, once
                raise err
            return False
        self._steps += 1
        if self._steps <= 10 or self._steps % _CHECK_EVERY == 0:
            state = self._state_fn()
            if signature(state) != self._sig:  # e.g. optimizer state made by the first step
                self._refresh(state)
        reply, _ = self._call(frames.Step(step=step), frames.Stepped)
        due = reply.due
        if due:
            self._refresh(self._state_fn())  # the values (counters, ...) as of this step
            self._sync()  # the step's kernels must have finished before the sidecar reads
            reply, _ = self._call(
                frames.Step(step=step, fresh=True), frames.Stepped, deadline=self._transfer_timeout
            )
        self.sends.extend(reply.sends)
        return due

    def park(self, timeout: timedelta) -> None:
        """Serves plans at the current step while the trainer does not step."""
        self._check()
        self._refresh(self._state_fn())
        self._sync()
        reply, _ = self._call(
            frames.Park(timeout_s=timeout.total_seconds()),
            frames.Parked,
            deadline=timeout + self._transfer_timeout,
        )
        self.sends.extend(reply.sends)

    def refresh(self) -> None:
        """Shares the state again (call after replacing tensors, e.g. a reshard)."""
        self._check()
        self._refresh(self._state_fn())

    def close(self, timeout: timedelta = timedelta(seconds=5)) -> None:
        """Detaches: the sidecar stops serving this rank's state, the rank leaves.

        Args:
            timeout: how long the sidecar's agent gets to stop (as for
                :meth:`recoveryd.Agent.close`); the answer is awaited that
                long plus the attach timeout.
        """
        if self._channel.lost is None:
            with contextlib.suppress(SidecarLostError):
                self._call(
                    frames.Close(timeout_s=timeout.total_seconds()),
                    frames.Done,
                    deadline=timeout + self._timeout,
                )
        self._channel.close()
        channel.drop_secret(self._key, self._secret)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------

    def _check(self) -> None:
        if self._channel.lost is not None:
            self._channel.unraised = None
            raise self._channel.lost

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _refresh(self, state: object) -> None:
        exp = self._exporter.export(state)
        self._sig = signature(state)
        self._cuda = exp.cuda
        try:
            body = wire.pack(frames.encode(frames.State(layout=exp.layout)), len(exp.fds))
            size = _size(body, exp.manifest, exp.fds)
            total = size.layout_bytes + size.manifest_bytes
            if total > self._channel.max_frame_bytes:  # sent, it would end the session
                raise LimitExceededError(
                    "RECOVERYD_SIDECAR_MAX_FRAME_BYTES",
                    total,
                    self._channel.max_frame_bytes,
                    what=f"this rank's state as described to the sidecar at {self.path} (bytes)",
                )
            self._call(frames.Refresh(state=size), frames.Done, then=(body, exp.manifest, exp.fds))
        except RecoverydError:
            self._exporter.reset()  # the sidecar may lack some storages: describe all next time
            raise

    def _call(
        self,
        request: frames.Request | bytes,
        expect: type[_R],
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        deadline: timedelta | None = None,
        then: tuple[bytes, bytes, list[int]] | None = None,
    ) -> tuple[_R, bytes | bytearray]:
        """One request and its reply (see :meth:`channel.Channel.call`); a failed
        recovery's record becomes :attr:`last_recovery`."""
        try:
            return self._channel.call(request, expect, payload, fds, deadline=deadline, then=then)
        finally:
            if self._channel.record is not None:
                self.last_recovery, self._channel.record = self._channel.record, None


def _size(body: bytes, manifest: bytes, fds: list[int]) -> frames.StateSize:
    return frames.StateSize(
        layout_bytes=len(body), manifest_bytes=len(manifest), descriptors=len(fds)
    )
