"""The data plane: a live state_dict from one rank to others over a ProcessGroup.

No gRPC and no coordinator here: :func:`send_state_dict` and
:func:`recv_state_dict` work on any ProcessGroup, and :class:`PGTransport` /
:class:`TorchftTransport` are drop-in replacements for PyTorch's and torchft's
checkpoint transports.
"""

from recoveryd.transport.compat import PGTransport, TorchftTransport
from recoveryd.transport.config import TransferConfig
from recoveryd.transport.receiver import recv_state_dict
from recoveryd.transport.sender import send_state_dict
from recoveryd.transport.stats import ReceivedState, TransferStats

__all__ = [
    "PGTransport",
    "ReceivedState",
    "TorchftTransport",
    "TransferConfig",
    "TransferStats",
    "recv_state_dict",
    "send_state_dict",
]
