"""recoveryd: a restarted replica gets its state from a live peer, in seconds.

The public API is what ``__all__`` lists; everything else may change.
"""

from recoveryd.errors import (
    ConfigError,
    IntegrityError,
    ManifestError,
    PeerLostError,
    RecoverydError,
    StateMismatchError,
    StepMismatchError,
    TransferError,
    TransferTimeoutError,
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
    "ConfigError",
    "IntegrityError",
    "ManifestError",
    "PeerLostError",
    "ReceivedState",
    "RecoverydError",
    "StateMismatchError",
    "StepMismatchError",
    "TransferConfig",
    "TransferError",
    "TransferStats",
    "TransferTimeoutError",
    "UnsupportedValueError",
    "__version__",
    "recv_state_dict",
    "send_state_dict",
]
