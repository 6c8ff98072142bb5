"""The trainer's side of a sidecar agent: :func:`attach` and the :class:`Attachment` it returns.

An attachment has the in-process :class:`recoveryd.Agent`'s calls
(``recover``, ``step``, ``park``, ``close``), so a trainer switches mode with
one line. Each call is one request over the sidecar's Unix socket, under a
deadline; tensor bytes never cross it (they are shared, see
:mod:`recoveryd.sidecar.share`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch

from recoveryd.errors import (
    CoordinatorUnavailableError,
    IntegrityError,
    ManifestError,
    PeerLostError,
    RecoverydError,
    SidecarLostError,
    TransferError,
    TransferTimeoutError,
)
from recoveryd.protocol import Report
from recoveryd.sidecar import wire
from recoveryd.sidecar.share import Exported, Exporter, signature
from recoveryd.transport.tree import TreeBuilder, merge_values
from recoveryd.v1 import manifest_pb2 as pb

logger = logging.getLogger(__name__)

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
        identity={
            "replica_id": replica_id,
            "group_rank": group_rank,
            "group_world_size": group_world_size,
            "labels": dict(labels or {}),
        },
        timeout=timeout,
        transfer_timeout=transfer_timeout,
    )


class Attachment:
    """A trainer rank attached to its sidecar agent (see :func:`attach`)."""

    def __init__(
        self,
        path: str,
        state_dict: Callable[[], object],
        *,
        identity: dict[str, Any],
        timeout: timedelta,
        transfer_timeout: timedelta,
    ) -> None:
        self.path = path
        self._state_fn = state_dict
        self._timeout = timeout.total_seconds()
        self._transfer_timeout = transfer_timeout.total_seconds()
        self._exporter = Exporter()
        self._lost: SidecarLostError | None = None
        self._steps = 0
        self.last_recovery: dict[str, Any] | None = None
        """How the last :meth:`recover` went (the sidecar's recovery record)."""
        self.sends: deque[Report] = deque(maxlen=32)
        """The last sends the sidecar made from this rank's state (newest last)."""
        _raise_nofile_limit()
        state = state_dict()
        exp = self._exporter.export(state)  # fails fast (e.g. /dev/shm too small)
        self._cuda = exp.cuda
        self._sig = signature(state)
        self._sock = self._connect()
        reply = self._call(
            {"op": "attach", **identity, "pid": os.getpid(), **_describe(exp)},
            exp.manifest,
            exp.fds,
        )[0]
        self.agent_id = str(reply["agent_id"])
        self.rendezvous = str(reply["rendezvous"])
        self.metrics_port: int | None = reply.get("metrics_port")
        """The sidecar's ``/metrics`` port (on the sidecar's host), or ``None``."""

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
        reply, payload = self._call(
            {"op": "recover", "timeout_s": timeout.total_seconds()},
            deadline_s=timeout.total_seconds() + self._timeout,
        )
        self.last_recovery = reply.get("record")
        if reply["step"] is None:
            return None
        m = pb.Manifest()
        m.ParseFromString(payload)
        merge_values(state_dict, TreeBuilder(m, lambda kind, arg, path: _PLACEHOLDER).build())
        return int(reply["step"])

    def step(self, step: int) -> None:
        """Marks a step boundary; sends this rank's state when a plan's fence is due.

        Does nothing once the sidecar is gone (after raising that once).

        Raises:
            SidecarLostError: the sidecar went away (raised once).
        """
        if self._lost is not None:
            return
        self._steps += 1
        if self._steps <= 10 or self._steps % _CHECK_EVERY == 0:
            state = self._state_fn()
            if signature(state) != self._sig:  # e.g. optimizer state made by the first step
                self._refresh(state)
        reply = self._call({"op": "step", "step": step})[0]
        if reply["due"]:
            self._refresh(self._state_fn())  # the values (counters, ...) as of this step
            self._sync()  # the step's kernels must have finished before the sidecar reads
            reply = self._call(
                {"op": "step", "step": step, "fresh": True}, deadline_s=self._transfer_timeout
            )[0]
        self._note(reply)

    def park(self, timeout: timedelta) -> None:
        """Serves plans at the current step while the trainer does not step."""
        self._check()
        self._refresh(self._state_fn())
        self._sync()
        reply = self._call(
            {"op": "park", "timeout_s": timeout.total_seconds()},
            deadline_s=timeout.total_seconds() + self._transfer_timeout,
        )[0]
        self._note(reply)

    def refresh(self) -> None:
        """Shares the state again (call after replacing tensors, e.g. a reshard)."""
        self._check()
        self._refresh(self._state_fn())

    def close(self) -> None:
        """Detaches (the sidecar stops serving this rank's state)."""
        if self._lost is None:
            with contextlib.suppress(SidecarLostError):
                self._call({"op": "close"})
        self._lost = self._lost or SidecarLostError(self.path, "closed")
        self._sock.close()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ------------------------------------------------------------

    def _connect(self) -> socket.socket:
        end = time.monotonic() + self._timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except OSError as err:
                sock.close()
                if time.monotonic() >= end:
                    raise SidecarLostError(self.path, f"cannot connect: {err}") from err
                time.sleep(0.1)

    def _note(self, reply: dict[str, Any]) -> None:
        for r in reply.get("sends") or []:
            self.sends.append(Report(**{**r, "phases": dict(r.get("phases") or {})}))

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
            self._call({"op": "refresh", **_describe(exp)}, exp.manifest, exp.fds)
        except RecoverydError:
            self._exporter.reset()  # the sidecar may lack some storages: describe all next time
            raise

    def _call(
        self,
        header: dict[str, Any],
        payload: bytes = b"",
        fds: list[int] | None = None,
        *,
        deadline_s: float | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        try:
            wire.send(self._sock, header, payload, fds or [])
            frame = wire.recv(self._sock, deadline=time.monotonic() + (deadline_s or self._timeout))
        except wire.WireError as err:
            self._lost = SidecarLostError(self.path, str(err))
            logger.error("%s", self._lost)
            # Closing tells the sidecar at once: it reports the rank unhealthy
            # and drops the state, instead of serving it on after a timeout.
            with contextlib.suppress(OSError):
                self._sock.close()
            raise self._lost from err
        reply = frame.header
        if reply.get("ok"):
            return reply, frame.payload
        name, message = reply.get("error", "RecoverydError"), reply.get("message", "")
        if name == "CoordinatorUnavailableError":
            raise CoordinatorUnavailableError(
                str(reply.get("address", "?")), str(reply.get("detail", message))
            )
        make = _ERRORS.get(name)
        raise make(message) if make is not None else RecoverydError(f"sidecar: {name}: {message}")


def _describe(exp: Exported) -> dict[str, Any]:
    return {"handles": exp.handles, "spans": exp.spans, "release": exp.release}


def _raise_nofile_limit() -> None:
    """Raises the soft open-files limit to the hard one: the trainer keeps one
    descriptor per shared storage (torch's file_descriptor sharing)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_ERRORS: dict[str, Callable[[str], RecoverydError]] = {
    "TransferTimeoutError": TransferTimeoutError,
    "PeerLostError": PeerLostError,
    "StepMismatchError": lambda m: TransferError(m),
    "ManifestError": ManifestError,
    "IntegrityError": IntegrityError,
}
