"""The trainer's side of a sidecar agent: :func:`attach` and the :class:`Attachment` it returns.

An attachment is a :class:`recoveryd.RankAgent`, as the in-process
:class:`recoveryd.Agent` is: the same calls, return types and recovery
record, so a trainer switches mode with one line. Each call is one typed
request (:mod:`recoveryd.sidecar.frames`) over the sidecar's Unix socket,
under a deadline; tensor bytes never cross it (they are shared, see
:mod:`recoveryd.sidecar.share`), and errors come back with their type and
facts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TypeVar

import torch

from recoveryd._time import Deadline
from recoveryd.agent.interface import RecoveryRecord
from recoveryd.errors import RecoverydError, SidecarLostError, error_from_fields
from recoveryd.protocol import Report
from recoveryd.sidecar import frames, wire
from recoveryd.sidecar.share import Exporter, signature
from recoveryd.transport.tree import TreeBuilder, merge_values
from recoveryd.v1 import manifest_pb2 as pb

logger = logging.getLogger(__name__)

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

    Raises:
        SidecarLostError: no sidecar accepted within ``timeout``.
        UnsupportedValueError: the state holds what cannot be shared.
    """
    return Attachment(
        path,
        state_dict,
        identity=_Identity(replica_id, group_rank, group_world_size, dict(labels or {})),
        timeout=timeout,
        transfer_timeout=transfer_timeout,
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
    ) -> None:
        self.path = path
        self._state_fn = state_dict
        self._timeout = timeout
        self._transfer_timeout = transfer_timeout
        self._exporter = Exporter()
        self._lost: SidecarLostError | None = None
        self._steps = 0
        self.last_recovery: RecoveryRecord | None = None
        """How the last :meth:`recover` went (the sidecar's recovery record)."""
        self.sends: deque[Report] = deque(maxlen=32)
        """The last sends the sidecar made from this rank's state (newest last)."""
        _raise_nofile_limit()
        state = state_dict()
        exp = self._exporter.export(state)  # fails fast (e.g. /dev/shm too small)
        self._cuda = exp.cuda
        self._sig = signature(state)
        self._sock = self._connect()
        try:
            reply, _ = self._call(
                frames.Attach(
                    version=frames.FRAMES_VERSION,
                    replica_id=identity.replica_id,
                    group_rank=identity.group_rank,
                    group_world_size=identity.group_world_size,
                    labels=identity.labels,
                    pid=os.getpid(),
                    layout=exp.layout,
                ),
                frames.Attached,
                exp.manifest,
                exp.fds,
            )
        except BaseException:
            self._sock.close()  # refused: the sidecar ends this session, not the others
            raise
        self.agent_id = reply.agent_id
        self.rendezvous = reply.rendezvous
        self.metrics_address = reply.metrics_address
        """``host:port`` of the sidecar's ``/metrics`` (it counts this rank's transfers), or ``None``."""

    @property
    def lost(self) -> bool:
        """Whether the sidecar went away (``step()`` then does nothing)."""
        return self._lost is not None

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
        m.ParseFromString(payload)
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
        if self._lost is not None:
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
        if self._lost is None:
            with contextlib.suppress(SidecarLostError):
                self._call(
                    frames.Close(timeout_s=timeout.total_seconds()),
                    frames.Done,
                    deadline=timeout + self._timeout,
                )
        self._lost = self._lost or SidecarLostError(self.path, "closed")
        self._sock.close()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------

    def _connect(self) -> socket.socket:
        deadline = Deadline(self._timeout)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError as err:
                sock.close()
                if deadline.expired:
                    raise SidecarLostError(self.path, f"cannot connect: {err}") from err
                deadline.sleep(timedelta(seconds=0.1))

    def _check(self) -> None:
        if self._lost is not None:
            raise self._lost

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _refresh(self, state: object) -> None:
        exp = self._exporter.export(state)
        self._sig = signature(state)
        self._cuda = exp.cuda
        try:
            self._call(frames.Refresh(layout=exp.layout), frames.Done, exp.manifest, exp.fds)
        except RecoverydError:
            self._exporter.reset()  # the sidecar may lack some storages: describe all next time
            raise

    def _call(
        self,
        request: frames.Request,
        expect: type[_R],
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        deadline: timedelta | None = None,
    ) -> tuple[_R, bytes]:
        """One request and its reply (of type ``expect``); a failure is raised as it was raised there."""
        try:
            wire.send(self._sock, frames.encode(request), payload, fds or [])
            frame = wire.recv(self._sock, deadline=Deadline(deadline or self._timeout))
            try:
                reply = frames.decode_reply(frame.header)
            except wire.WireError as err:
                raise wire.WireError(
                    f"its answer to {request.OP} is not one this trainer reads ({err}): run the "
                    "same recoveryd version in the trainer and in its sidecar"
                ) from err
        except wire.WireError as err:
            self._lost = SidecarLostError(self.path, str(err))
            logger.error("%s", self._lost)
            # Closing tells the sidecar at once: it reports the rank unhealthy
            # and drops the state, instead of serving it on after a timeout.
            with contextlib.suppress(OSError):
                self._sock.close()
            raise self._lost from err
        if isinstance(reply, frames.Failed):
            if reply.record is not None:
                self.last_recovery = reply.record
            try:
                error = error_from_fields(reply.error)
            except ValueError as err:
                raise RecoverydError(f"the sidecar failed {request.OP}: {err}") from None
            raise error
        if not isinstance(reply, expect):
            raise RecoverydError(
                f"the sidecar answered {request.OP} with {reply.OP}, not {expect.OP}: "
                "run the same recoveryd version in the trainer and the sidecar"
            )
        return reply, frame.payload


def _raise_nofile_limit() -> None:
    """Raises the soft open-files limit to the hard one: the trainer keeps one
    descriptor per shared storage (torch's file_descriptor sharing)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
