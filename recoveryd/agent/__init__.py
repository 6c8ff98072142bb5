"""The per-rank agent: talks to the coordinator, forms transfer groups, runs transfers.

What a trainer calls is :class:`Agent` (``agent.py``: ``recover`` / ``step`` /
``park`` / ``refresh`` / ``close``), one implementation of :class:`RankAgent`
(``interface.py``, with the :class:`RecoveryRecord` both faces return; the
sidecar's :class:`recoveryd.Attachment` is the other). Below it, one module
per part, each usable by the sidecar too:

- ``link.py``: registration, heartbeats, the order stream and reports, kept
  alive by background threads (``client.py``: the gRPC client, proto types
  stop there, converted by :mod:`recoveryd.codec`);
- ``donor.py``: the donor side (orders in, groups formed ahead, sends at the fence);
- ``joiner.py``: the joiner side (one :class:`~recoveryd.agent.joiner.JoinerRound`
  per ``recover``, in named phases);
- ``rendezvous.py`` (the store each agent hosts, the two-rank groups),
  ``layout.py`` (the layout fingerprint), ``config.py`` (:class:`AgentConfig`,
  the advertised address and its interface).

The agent imports the transport, the protocol and the metrics, never the
coordinator. Names here are imported on first use (the client needs no torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recoveryd.agent.agent import Agent
    from recoveryd.agent.config import AgentConfig
    from recoveryd.agent.interface import RankAgent, RecoveryRecord

_LAZY = {
    "Agent": "recoveryd.agent.agent",
    "AgentConfig": "recoveryd.agent.config",
    "RankAgent": "recoveryd.agent.interface",
    "RecoveryRecord": "recoveryd.agent.interface",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'recoveryd.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["Agent", "AgentConfig", "RankAgent", "RecoveryRecord"]
