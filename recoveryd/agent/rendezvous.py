"""Transfer groups: the store each agent hosts, and the two-rank groups plans run on.

Every agent hosts a TCPStore (its *rendezvous*, advertised to the coordinator).
A plan's group is formed on the donor rank's store under the plan's own key
prefix: the donor rank is group rank 0, the joiner rank 1. The group is never
the trainer's default process group, and is dropped after the transfer.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from recoveryd.errors import ConfigError

DONOR_RANK = 0
JOINER_RANK = 1


def go_key(prefix: str) -> str:
    """The key a donor rank sets (to its step) right before it sends a plan's state."""
    return f"{prefix}/go"


def host_store(host: str, port: int, *, timeout: timedelta) -> dist.TCPStore:
    """Hosts this agent's rendezvous store on ``host:port`` (port 0: any free port)."""
    return dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)


def connect_store(address: str, *, timeout: timedelta) -> dist.TCPStore:
    """A client of the store at ``host:port`` (a donor rank's rendezvous)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("rendezvous", address, "must be HOST:PORT")
    return dist.TCPStore(host.strip("[]"), int(port), None, False, timeout)


def open_group(
    store: dist.Store,
    prefix: str,
    rank: int,
    *,
    backend: str,
    host: str,
    timeout: timedelta,
) -> dist.ProcessGroup:
    """Forms a plan's two-rank group; blocks until the other side joins or ``timeout``.

    Args:
        store: the donor rank's rendezvous store (hosted or connected).
        prefix: the plan's key prefix.
        rank: :data:`DONOR_RANK` or :data:`JOINER_RANK`.
        backend: ``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors).
        host: the local address Gloo listens on (this agent's advertised host).
        timeout: bounds forming the group and every operation on it.
    """
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        nccl: Any = dist.ProcessGroupNCCL
        opts = nccl.Options()
        opts._timeout = timeout
        # NCCL connects lazily: the transfer's first message forms the
        # communicator, under the transfer's deadline.
        return nccl(prefixed, rank, 2, opts)  # type: ignore[no-any-return]
    if backend != "gloo":
        raise ConfigError("backend", backend, "must be 'gloo' or 'nccl'")
    gloo: Any = dist.ProcessGroupGloo
    opts = gloo._Options()
    opts._timeout = timeout
    opts._devices = [gloo.create_device(hostname=host)]
    return gloo(prefixed, rank, 2, opts)  # type: ignore[no-any-return]


def device_for(backend: str) -> torch.device:
    """The device a group of ``backend`` moves bytes from."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
