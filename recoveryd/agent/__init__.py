"""The per-rank agent: talks to the coordinator, forms transfer groups, runs transfers.

:class:`Agent` is the trainer-facing part (``recover`` / ``step`` / ``park``).
The link to the coordinator (``link``), the donor side (``donor``), the
joiner side (``joiner``), the client, the rendezvous and the layout
fingerprint are separate modules, so a sidecar process can reuse them.
"""

from recoveryd.agent.agent import Agent
from recoveryd.agent.config import AgentConfig
from recoveryd.agent.joiner import RecoveryRecord

__all__ = ["Agent", "AgentConfig", "RecoveryRecord"]
