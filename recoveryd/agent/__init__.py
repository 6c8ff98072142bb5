"""The per-rank agent: talks to the coordinator, forms transfer groups, runs transfers.

:class:`Agent` is the trainer-facing part (``recover`` / ``step`` / ``park``).
The link to the coordinator (``link``), the donor side (``donor``), the
joiner side (``joiner``), the client, the rendezvous and the layout
fingerprint are separate modules, so a sidecar process can reuse them.
Names here are imported on first use (the client needs no torch).
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
