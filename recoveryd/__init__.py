"""recoveryd: a restarted replica gets its state from a live peer, in seconds.

The public API is what ``__all__`` lists; everything else may change:

- a trainer rank talks to a :class:`RankAgent`: an :class:`Agent` in its own
  process (configured by :class:`AgentConfig`), or an :class:`Attachment` to
  a sidecar (``recoveryd agent``) from :func:`attach`; either tells how its
  recovery went in a :class:`RecoveryRecord`;
- :class:`Coordinator` (with :class:`CoordinatorConfig`) runs the coordinator
  in a process of one's own; :class:`Credentials` (the job's token, TLS
  certificates) is what both ends present and demand;
- :func:`send_state_dict` / :func:`recv_state_dict` (with
  :class:`TransferConfig`, :class:`TransferStats`, :class:`ReceivedState`)
  are the data plane on any ProcessGroup; :mod:`recoveryd.transport` also has
  the drop-ins for PyTorch's and torchft's checkpoint transports.

Every error is a :class:`RecoverydError`; the specific ones live in
:mod:`recoveryd.errors`. Names are imported on first use, so the coordinator
and the command line start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from recoveryd._version import __version__
from recoveryd.errors import (
    CoordinatorUnavailableError,
    RecoverydError,
    SidecarLostError,
    TransferError,
)

if TYPE_CHECKING:
    from recoveryd.agent import Agent, AgentConfig, RankAgent, RecoveryRecord
    from recoveryd.coordinator.config import CoordinatorConfig
    from recoveryd.coordinator.server import Coordinator
    from recoveryd.credentials import Credentials
    from recoveryd.sidecar.client import Attachment, attach
    from recoveryd.transport import (
        ReceivedState,
        TransferConfig,
        TransferStats,
        recv_state_dict,
        send_state_dict,
    )


_LAZY = {
    "Agent": "recoveryd.agent",
    "AgentConfig": "recoveryd.agent",
    "Attachment": "recoveryd.sidecar.client",
    "attach": "recoveryd.sidecar.client",
    "RankAgent": "recoveryd.agent",
    "RecoveryRecord": "recoveryd.agent",
    "Coordinator": "recoveryd.coordinator.server",
    "CoordinatorConfig": "recoveryd.coordinator.config",
    "Credentials": "recoveryd.credentials",
    "ReceivedState": "recoveryd.transport",
    "TransferConfig": "recoveryd.transport",
    "TransferStats": "recoveryd.transport",
    "recv_state_dict": "recoveryd.transport",
    "send_state_dict": "recoveryd.transport",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'recoveryd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "Agent",
    "AgentConfig",
    "Attachment",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorUnavailableError",
    "Credentials",
    "RankAgent",
    "ReceivedState",
    "RecoveryRecord",
    "RecoverydError",
    "SidecarLostError",
    "TransferConfig",
    "TransferError",
    "TransferStats",
    "__version__",
    "attach",
    "recv_state_dict",
    "send_state_dict",
]
