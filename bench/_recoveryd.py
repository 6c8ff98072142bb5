"""The recoveryd adapter: ``send_state_dict`` / ``recv_state_dict`` from ``recoveryd.transport``.

recoveryd gets the same counting ProcessGroup proxy as the PG anchors, so its bytes are counted
the same way; its own ``TransferStats`` (wire_bytes, payload_bytes, messages, seconds) are
reported next to the count.

Variants (each its own transport name, so they run side by side in one table):

* ``recoveryd``: no ``config=`` (recoveryd's defaults, i.e. ``TransferConfig()``).
* ``recoveryd-checksums``: ``config=TransferConfig(checksums=True)`` on both ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

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
    config_kwargs: ClassVar[dict[str, Any] | None] = None
    """``TransferConfig(**config_kwargs)`` is passed as ``config=`` to both ends; None: no config."""

    def open(self, env: Env) -> None:
        super().open(env)
        from recoveryd import transport

        self._mod: Any = transport
        self._config: Any = (
            None if self.config_kwargs is None else transport.TransferConfig(**self.config_kwargs)
        )

    def _config_arg(self) -> dict[str, Any]:
        return {} if self._config is None else {"config": self._config}

    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        stats = self._mod.send_state_dict(
            self.env.pg,
            dst_ranks=[_JOINER],
            state_dict=state_dict,
            step=step,
            timeout=self.env.timeout,
            **self._config_arg(),
        )
        return _stats_dict(stats)

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        got = self._mod.recv_state_dict(
            self.env.pg,
            src_rank=_DONOR,
            into=into,
            step=step,
            timeout=self.env.timeout,
            **self._config_arg(),
        )
        extras = _stats_dict(got.stats)
        extras["returned_step"] = got.step
        return got.state_dict, extras


class RecoverydChecksums(Recoveryd):
    """recoveryd with ``TransferConfig(checksums=True)``: every message xxh3-checked."""

    name = "recoveryd-checksums"
    config_kwargs = {"checksums": True}  # noqa: RUF012 -- read-only class constant
