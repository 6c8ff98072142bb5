"""The recoveryd adapter: ``send_state_dict`` / ``recv_state_dict`` from ``recoveryd.transport``.

recoveryd gets the same counting ProcessGroup proxy as the PG anchors, so its bytes are counted
the same way; its own ``TransferStats`` (wire_bytes, payload_bytes, messages, seconds) are
reported next to the count.

Variants (each its own transport name, so they run side by side in one table):

* ``recoveryd``: no ``config=`` (recoveryd's defaults, i.e. ``TransferConfig()``).
* ``recoveryd-checksums``: ``config=TransferConfig(checksums=True)`` on both ends.
* ``recoveryd-keyed``: a plan key on both ends (the agents' default): the mutual
  challenge and the manifest's MAC.
* ``recoveryd-macs``: a plan key and ``TransferConfig(data_macs=True)``: every data
  message MAC'd too (keyed BLAKE3).
* ``recoveryd-warmed``: recoveryd's defaults, the donor's plan worked out before the
  first transfer (``prepare_send``, untimed), as an agent does when a plan's group forms
  ahead of the fence.
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
    auth_key: ClassVar[bytes | None] = None
    """Passed as ``auth_key=`` to both ends (a fixed key: the bench measures cost, not secrecy)."""

    def open(self, env: Env) -> None:
        super().open(env)
        from recoveryd import transport

        self._mod: Any = transport
        self._config: Any = (
            None if self.config_kwargs is None else transport.TransferConfig(**self.config_kwargs)
        )

    def _config_arg(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self._config is None else {"config": self._config}
        if self.auth_key is not None:
            out["auth_key"] = self.auth_key
        return out

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


class RecoverydKeyed(Recoveryd):
    """recoveryd with a plan key: the challenge and the manifest's MAC (the agents' default)."""

    name = "recoveryd-keyed"
    auth_key = bytes(range(32))


class RecoverydMacs(Recoveryd):
    """recoveryd with a plan key and ``data_macs``: every data message MAC'd too."""

    name = "recoveryd-macs"
    auth_key = bytes(range(32))
    config_kwargs = {"data_macs": True}  # noqa: RUF012 -- read-only class constant


class RecoverydWarmed(Recoveryd):
    """recoveryd with the donor's plan worked out when the group forms (``prepare_send``)."""

    name = "recoveryd-warmed"

    def ready(self, state_dict: StateDict | None, into: StateDict | None) -> None:
        if state_dict is not None:
            self._mod.prepare_send(state_dict, config=self._config)
