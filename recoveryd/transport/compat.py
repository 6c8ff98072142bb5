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

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch
from torchft.checkpointing.transport import CheckpointTransport

from recoveryd.transport._wire import Group
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.receiver import recv_state_dict
from recoveryd.transport.sender import send_state_dict

T = TypeVar("T")


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
    Sends are synchronous, so ``disallow_checkpoint`` has nothing to wait for.

    Args:
        pg: the group to transfer on (for torchft, a ``torchft.process_group``
            group the Manager configures).
        timeout: default deadline (torchft passes its own on each call).
        device: the device message buffers live on (``cpu`` for Gloo).
        state_dict: if given, called on receive to get the state_dict to
            receive into in place.
        config: recoveryd's knobs; defaults from the environment.
    """

    def metadata(self) -> str:
        """Nothing: the joiner finds the donor through the group."""
        return "<n/a>"

    def send_checkpoint(
        self, dst_ranks: list[int], step: int, state_dict: T, timeout: timedelta
    ) -> None:
        """Sends ``state_dict`` at ``step`` to ``dst_ranks`` within ``timeout``."""
        send_state_dict(
            self._pg,
            dst_ranks,
            state_dict,
            step=step,
            timeout=timeout,
            config=self._config,
            device=self._device,
        )

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> T:
        """Receives the state at ``step`` from ``src_rank`` within ``timeout``."""
        got = recv_state_dict(
            self._pg,
            src_rank,
            timeout=timeout,
            into=self._into(),
            step=step,
            config=self._config,
            device=self._device,
        )
        return got.state_dict  # type: ignore[return-value]

    def disallow_checkpoint(self) -> None:
        """Nothing to wait for: :meth:`send_checkpoint` returns once joiners confirmed."""

    def shutdown(self, wait: bool = True) -> None:
        """Nothing to release: the transport holds no threads or sockets of its own."""
