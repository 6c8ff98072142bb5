"""Drop-in replacements for PyTorch's and torchft's checkpoint transports.

Switching is one import line::

    # from torch.distributed.checkpoint._pg_transport import PGTransport
    from recoveryd.transport import PGTransport

    # torchft.Manager(checkpoint_transport=PGTransport(...))
    torchft.Manager(checkpoint_transport=recoveryd.transport.TorchftTransport(...))

One semantic difference is deliberate: an in-place receive whose state_dict does
not match the donor's (a missing or extra tensor, another shape or dtype) is
refused with :class:`recoveryd.errors.StateMismatchError` before anything is
written, where the originals silently allocate or write past the mismatch.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch
from torchft.checkpointing.transport import CheckpointTransport

from recoveryd.transport._wire import Group
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.receiver import recv_state_dict
from recoveryd.transport.sender import send_state_dict

T = TypeVar("T")
logger = logging.getLogger(__name__)


class _OnGroup:
    """What both drop-ins hold: the group, a deadline, the wire device, the in-place state."""

    def __init__(
        self,
        pg: Group,
        timeout: timedelta,
        device: torch.device,
        state_dict: Callable[[], Any] | None = None,
        *,
        config: TransferConfig | None = None,
    ) -> None:
        self._pg = pg
        self._timeout = timeout
        self._device = device
        self._state_dict = state_dict
        self._config = config or TransferConfig()

    def _into(self) -> object | None:
        """The state to receive into in place, or ``None`` to allocate."""
        return self._state_dict() if self._state_dict is not None else None


class PGTransport(_OnGroup):
    """``torch.distributed.checkpoint._pg_transport.PGTransport``, through recoveryd.

    Args:
        pg: the group to transfer on.
        timeout: deadline of each send or receive (the original ignores it).
        device: the device message buffers live on (``cpu`` for Gloo).
        state_dict: if given, called on receive to get the state_dict to
            receive into in place.
        config: recoveryd's knobs; defaults from the environment.
    """

    def send_checkpoint(self, dst_ranks: list[int], state_dict: object) -> None:
        """Sends ``state_dict`` to ``dst_ranks``; see :func:`recoveryd.transport.send_state_dict`."""
        send_state_dict(
            self._pg,
            dst_ranks,
            state_dict,
            timeout=self._timeout,
            config=self._config,
            device=self._device,
        )

    def recv_checkpoint(self, src_rank: int) -> object:
        """Receives the state_dict ``src_rank`` sends; in place if ``state_dict`` was given."""
        return recv_state_dict(
            self._pg,
            src_rank,
            timeout=self._timeout,
            into=self._into(),
            config=self._config,
            device=self._device,
        ).state_dict


class TorchftTransport(_OnGroup, CheckpointTransport[T], Generic[T]):  # type: ignore[misc]
    """A torchft ``CheckpointTransport`` that heals through recoveryd.

    Pass it as ``torchft.Manager(checkpoint_transport=TorchftTransport(pg, ...))``.
    As torchft's contract allows, a send runs in the background:
    :meth:`send_checkpoint` returns once it started, and
    :meth:`disallow_checkpoint` (which torchft calls before the state may
    change) waits for it to end. The send runs on the caller's CUDA device and
    stream (torchft's recovery stream), and its GPU work has finished when
    :meth:`disallow_checkpoint` returns. A send that fails is logged and kept
    in :attr:`last_send_error`; the joiners see the failure themselves, and
    torchft heals again.

    Args:
        pg: the group to transfer on (for torchft, a ``torchft.process_group``
            group the Manager configures).
        timeout: the deadline of a call torchft gives none (``timeout=None``).
        device: the device message buffers live on (``cpu`` for Gloo).
        state_dict: if given, called on receive to get the state_dict to
            receive into in place.
        config: recoveryd's knobs; defaults from the environment.
    """

    def __init__(
        self,
        pg: Group,
        timeout: timedelta,
        device: torch.device,
        state_dict: Callable[[], Any] | None = None,
        *,
        config: TransferConfig | None = None,
    ) -> None:
        super().__init__(pg, timeout, device, state_dict, config=config)
        self._sending: threading.Thread | None = None
        self.last_send_error: Exception | None = None
        """The error of the latest background send, or ``None`` if it succeeded."""

    def metadata(self) -> str:
        """Nothing: the joiner finds the donor through the group."""
        return "<n/a>"

    def send_checkpoint(
        self, dst_ranks: list[int], step: int, state_dict: T, timeout: timedelta | None = None
    ) -> None:
        """Starts sending ``state_dict`` at ``step`` to ``dst_ranks`` within ``timeout``.

        One send at a time: a send still running is waited for first.
        """
        self.disallow_checkpoint()
        deadline = timeout if timeout is not None else self._timeout
        self._sending = threading.Thread(
            target=self._send,
            args=(list(dst_ranks), step, state_dict, deadline, _caller_stream()),
            name="recoveryd-torchft-send",
            daemon=True,
        )
        self._sending.start()

    def _send(
        self,
        dst_ranks: list[int],
        step: int,
        state_dict: T,
        timeout: timedelta,
        stream: torch.cuda.Stream | None,
    ) -> None:
        self.last_send_error = None
        try:
            with _on_stream(stream):
                send_state_dict(
                    self._pg,
                    dst_ranks,
                    state_dict,
                    step=step,
                    timeout=timeout,
                    config=self._config,
                    device=self._device,
                )
        except Exception as err:  # the joiners fail their receive and torchft heals again
            self.last_send_error = err
            logger.warning("sending step %d to ranks %s failed: %s", step, dst_ranks, err)

    def recv_checkpoint(
        self, src_rank: int, metadata: str, step: int, timeout: timedelta | None = None
    ) -> T:
        """Receives the state at ``step`` from ``src_rank`` within ``timeout``.

        A send of this replica still running is waited for first (the two
        would share the group's tags).
        """
        self.disallow_checkpoint()
        got = recv_state_dict(
            self._pg,
            src_rank,
            timeout=timeout if timeout is not None else self._timeout,
            into=self._into(),
            step=step,
            config=self._config,
            device=self._device,
        )
        return got.state_dict  # type: ignore[return-value]

    def disallow_checkpoint(self) -> None:
        """Waits for a send under way to end (its own deadline bounds it)."""
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.join()

    def shutdown(self, wait: bool = True) -> None:
        """Waits for a send under way when ``wait`` (else leaves it to its deadline)."""
        if wait:
            self.disallow_checkpoint()


def _caller_stream() -> torch.cuda.Stream | None:
    """The calling thread's current CUDA stream, if this process uses CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):  # type: ignore[no-untyped-call]
        return None
    return torch.cuda.current_stream()


@contextlib.contextmanager
def _on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Runs the block on ``stream`` and its device, then waits for the GPU work it queued.

    A new thread starts on device 0's default stream; the background send
    must order itself after the caller's work and finish before the state
    may change.
    """
    if stream is None:
        yield
        return
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        try:
            yield
        finally:
            stream.synchronize()
