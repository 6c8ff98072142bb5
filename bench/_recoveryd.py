"""The recoveryd adapter: ``send_state_dict`` / ``recv_state_dict`` from ``recoveryd.transport``.

recoveryd gets the same counting ProcessGroup proxy as the PG anchors, so its bytes are counted
the same way; its own ``TransferStats`` (wire_bytes, payload_bytes, messages, seconds) are
reported next to the count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench._adapter import Adapter, Env
from bench._workloads import StateDict

_DONOR = 0
_JOINER = 1
_STATS_FIELDS = ("wire_bytes", "payload_bytes", "messages", "seconds")


def _stats_dict(stats: Any) -> dict[str, Any]:
    """Every dataclass field of TransferStats plus the documented names (some are properties)."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        out.update(dataclasses.asdict(stats))
    for k in _STATS_FIELDS:
        if hasattr(stats, k):
            out[k] = getattr(stats, k)
    return {f"stats.{k}": v for k, v in out.items()}


class Recoveryd(Adapter):
    """recoveryd's data plane: allocating (``into=None``) or in place (``into=<state_dict>``)."""

    name = "recoveryd"

    def open(self, env: Env) -> None:
        super().open(env)
        from recoveryd import transport

        self._mod: Any = transport

    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        stats = self._mod.send_state_dict(
            self.env.pg,
            dst_ranks=[_JOINER],
            state_dict=state_dict,
            step=step,
            timeout=self.env.timeout,
        )
        return _stats_dict(stats)

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        got = self._mod.recv_state_dict(
            self.env.pg, src_rank=_DONOR, into=into, step=step, timeout=self.env.timeout
        )
        extras = _stats_dict(got.stats)
        extras["returned_step"] = got.step
        return got.state_dict, extras
