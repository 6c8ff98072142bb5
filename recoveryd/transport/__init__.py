"""The data plane: a live state_dict from one rank to others over a ProcessGroup.

No gRPC and no coordinator here: :func:`send_state_dict` and
:func:`recv_state_dict` work on any ProcessGroup, and :class:`PGTransport` /
:class:`TorchftTransport` are drop-in replacements for PyTorch's and torchft's
checkpoint transports.

The sides of a transfer are named as everywhere in recoveryd: the *donor*
sends (:func:`send_state_dict`, its plan worked out ahead by
:func:`prepare_send` if it likes), each *joiner* receives
(:func:`recv_state_dict`), in place or into fresh tensors. The public
modules: :mod:`~recoveryd.transport.sender` and
:mod:`~recoveryd.transport.receiver` (the two sides, in the same phases),
:mod:`~recoveryd.transport.striped` (one joiner, several donors, each
sending a disjoint stripe),
:mod:`~recoveryd.transport.tree` (the state's tree as the manifest carries
it, for the agent and the sidecar), :mod:`~recoveryd.transport.format` (the
wire format's constants), :mod:`~recoveryd.transport.config`,
:mod:`~recoveryd.transport.stats`, :mod:`~recoveryd.transport.compat` (the
drop-ins). Modules with a leading underscore are the package's own.
"""

from recoveryd.transport._reuse import prepare_send
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
    "prepare_send",
    "recv_state_dict",
    "send_state_dict",
]
