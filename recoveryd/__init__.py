"""recoveryd: a restarted replica gets its state from a live peer, in seconds.

The public API is what ``__all__`` lists; everything else may change. Every
error is a :class:`RecoverydError`; the specific ones live in
:mod:`recoveryd.errors`.
"""

from recoveryd.agent import Agent, AgentConfig, RecoveryRecord
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.errors import CoordinatorUnavailableError, RecoverydError, TransferError
from recoveryd.transport import (
    ReceivedState,
    TransferConfig,
    TransferStats,
    recv_state_dict,
    send_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentConfig",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorUnavailableError",
    "ReceivedState",
    "RecoveryRecord",
    "RecoverydError",
    "TransferConfig",
    "TransferError",
    "TransferStats",
    "__version__",
    "recv_state_dict",
    "send_state_dict",
]
