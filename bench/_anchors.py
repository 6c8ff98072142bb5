"""The anchors recoveryd is compared with, each driven the way its own code expects.

* ``raw-gloo``: one preallocated, touched uint8 buffer of the workload's tensor bytes, sent with
  a single ``pg.send``/``pg.recv`` -- the limit of this ProcessGroup on this machine.
* ``raw-gloo-fresh``: the same single ``pg.send``/``pg.recv``, but the joiner receives into a
  buffer it allocates inside the timed region (``torch.empty``), on every workload, as an
  allocating receiver must -- the limit for allocating workloads on a fresh process, since the
  first touch of fresh memory is part of the cost.
* ``torch-pg``: ``torch.distributed.checkpoint._pg_transport.PGTransport``.
* ``torchft-pg``: ``torchft.checkpointing.pg_transport.PGTransport``.
* ``torchft-http``: ``torchft.checkpointing.http_transport.HTTPTransport`` (``num_chunks=0``,
  the one-request ``/full`` path); the donor's address goes to the joiner through the store.

Imports of the transports happen in :meth:`Adapter.open`, so a rank pays only for its own.
"""

from __future__ import annotations

from typing import Any

import torch

from bench._adapter import Adapter, Env, WireCount, copy_into
from bench._workloads import StateDict

_CPU = torch.device("cpu")
_DONOR = 0
_JOINER = 1


class RawGloo(Adapter):
    """One ``pg.send``/``pg.recv`` of a single uint8 buffer (always received in place)."""

    name = "raw-gloo"

    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        self.env.pg.send([state_dict["buf"]], _JOINER, 0).wait(self.env.timeout)
        return {}

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        if into is None:
            raise ValueError("raw-gloo receives into a preallocated buffer only")
        self.env.pg.recv([into["buf"]], _DONOR, 0).wait(self.env.timeout)
        return into, {}


class RawGlooFresh(RawGloo):
    """``raw-gloo`` received into a ``torch.empty`` buffer allocated inside the timed region."""

    name = "raw-gloo-fresh"

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        if into is not None:
            raise ValueError("raw-gloo-fresh allocates its receive buffer itself")
        buf = torch.empty(self.env.logical_bytes, dtype=torch.uint8)
        self.env.pg.recv([buf], _DONOR, 0).wait(self.env.timeout)
        return {"buf": buf}, {}


class TorchPG(Adapter):
    """``torch.distributed.checkpoint._pg_transport.PGTransport``; in place via ``state_dict=``."""

    name = "torch-pg"

    def open(self, env: Env) -> None:
        super().open(env)
        from torch.distributed.checkpoint import _pg_transport

        self._cls: Any = _pg_transport.PGTransport

    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        self._cls(self.env.pg, self.env.timeout, _CPU).send_checkpoint([_JOINER], state_dict)
        return {}

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        factory = (lambda: into) if into is not None else None
        t = self._cls(self.env.pg, self.env.timeout, _CPU, state_dict=factory)
        return t.recv_checkpoint(_DONOR), {}


class TorchftPG(Adapter):
    """``torchft.checkpointing.pg_transport.PGTransport``; in place via ``state_dict=``."""

    name = "torchft-pg"

    def open(self, env: Env) -> None:
        super().open(env)
        from torchft.checkpointing import pg_transport

        self._cls: Any = pg_transport.PGTransport

    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        t = self._cls(self.env.pg, self.env.timeout, _CPU)
        t.send_checkpoint([_JOINER], step, state_dict, self.env.timeout)
        return {}

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        factory = (lambda: into) if into is not None else None
        t = self._cls(self.env.pg, self.env.timeout, _CPU, state_dict=factory)
        return t.recv_checkpoint(_DONOR, t.metadata(), step, self.env.timeout), {}


class TorchftHTTP(Adapter):
    """``torchft.checkpointing.http_transport.HTTPTransport`` with ``num_chunks=0``.

    The donor stages the state_dict (``send_checkpoint`` returns at once) and publishes
    ``metadata()`` under ``http-addr/<step>``; the joiner waits for that key and GETs
    ``<addr><step>/full``. The donor's serving happens in its server thread while the joiner
    reads, which the donor's RSS sampler covers (it runs until the end-of-transfer barrier).
    No in-place API: an in-place receive is emulated by copying into the joiner's tensors.
    """

    name = "torchft-http"
    native_in_place = False

    def open(self, env: Env) -> None:
        super().open(env)
        from torchft.checkpointing.http_transport import HTTPTransport

        env.sockets.install()
        self._transport: Any = HTTPTransport(timeout=env.timeout, num_chunks=0)

    def _key(self, step: int) -> str:
        return f"http-addr/{step}"

    def send(self, state_dict: StateDict, step: int) -> dict[str, Any]:
        self._transport.send_checkpoint([_JOINER], step, state_dict, self.env.timeout)
        self.env.store.set(self._key(step), self._transport.metadata())
        return {}

    def recv(self, into: StateDict | None, step: int) -> tuple[StateDict, dict[str, Any]]:
        self.env.store.wait([self._key(step)], self.env.timeout)
        address = self.env.store.get(self._key(step)).decode()
        got = self._transport.recv_checkpoint(_DONOR, address, step, self.env.timeout)
        if into is not None:
            return copy_into(into, got), {"emulated_in_place": True}
        return got, {}

    def wire(self) -> WireCount:
        s = self.env.sockets
        return WireCount(
            sent_bytes=s.written_bytes,
            recv_bytes=s.read_bytes,
            messages=0,
            source="http",
            uncounted_calls={},
        )

    def close(self) -> None:
        self._transport.shutdown(wait=False)
        self.env.sockets.uninstall()
