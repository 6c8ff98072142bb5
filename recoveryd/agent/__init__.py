"""The per-rank agent: talks to the coordinator, forms transfer groups, runs transfers.

:class:`Agent` is the trainer-facing part (``recover`` / ``step``); the
coordinator client, the rendezvous and the layout fingerprint are separate
modules so the sidecar process can reuse them.
"""

from recoveryd.agent.agent import Agent, RecoveryRecord
from recoveryd.agent.config import AgentConfig

__all__ = ["Agent", "AgentConfig", "RecoveryRecord"]
