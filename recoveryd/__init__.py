"""recoveryd: a restarted replica gets its state from a live peer, in seconds.

The public API is what ``__all__`` lists; everything else may change.
"""

from recoveryd.agent import Agent, AgentConfig, RecoveryRecord
from recoveryd.coordinator.config import CoordinatorConfig
from recoveryd.coordinator.server import Coordinator
from recoveryd.errors import (
    ConfigError,
    CoordinatorUnavailableError,
    IntegrityError,
    ManifestError,
    PeerLostError,
    RecoverydError,
    StateMismatchError,
    StepMismatchError,
    TransferError,
    TransferTimeoutError,
    UnknownMemberError,
    UnsupportedValueError,
)
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
    "ConfigError",
    "Coordinator",
    "CoordinatorConfig",
    "CoordinatorUnavailableError",
    "IntegrityError",
    "ManifestError",
    "PeerLostError",
    "ReceivedState",
    "RecoveryRecord",
    "RecoverydError",
    "StateMismatchError",
    "StepMismatchError",
    "TransferConfig",
    "TransferError",
    "TransferStats",
    "TransferTimeoutError",
    "UnknownMemberError",
    "UnsupportedValueError",
    "__version__",
    "recv_state_dict",
    "send_state_dict",
]
