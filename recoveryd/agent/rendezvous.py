"""Transfer groups: the store each agent hosts, and the two-rank groups plans run on.

Every agent hosts a TCPStore (its *rendezvous*, advertised to the coordinator).
A plan's group is formed on the donor rank's store under the plan's own key
prefix: the donor rank is group rank 0, the joiner rank 1. The group is never
the trainer's default process group, and is dropped after the transfer.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from recoveryd.errors import ConfigError, TransferTimeoutError

T = TypeVar("T")

DONOR_RANK = 0
JOINER_RANK = 1


def go_key(prefix: str) -> str:
    """The key a donor rank sets (to its step, with a proof) right before it sends a plan's state."""
    return f"{prefix}/go"


def dropped_key(prefix: str) -> str:
    """The key a joiner rank sets (to a proof) when it leaves a plan whose group it
    formed, so the donor rank does not wait for it (it checks before and while it sends)."""
    return f"{prefix}/dropped"


def proof(plan_key: bytes, what: str, prefix: str) -> str:
    """The value of one of a plan's control keys, which only a party to the plan can make.

    The store answers anyone who reaches it (and lists its keys): a value
    that is not a MAC under the plan's key is ignored, so a stranger cannot
    start a joiner's receive early or make a donor drop its plan. Without a
    key (an older coordinator) any value counts.
    """
    if not plan_key:
        return "1"
    msg = f"recoveryd/v1 {what}\0{prefix}".encode()
    return hmac.new(plan_key, msg, hashlib.sha256).hexdigest()


def bounded(call: Callable[[], T], timeout: timedelta, what: str) -> T:
    """``call()`` on a remote store (or a group formed through one), waited for at most ``timeout``.

    A TCPStore client reads its socket with no deadline: when the other host
    goes silent (its packets dropped, no reset), ``get``, ``check`` and even
    ``wait(timeout)`` block until the kernel gives up on the connection,
    about 15 minutes (seen on a blackholed link: tests/integration/
    test_network_faults.py). So the call runs in a thread of its own; past
    ``timeout`` it is abandoned (the thread ends when the kernel does) and
    the store must not be used again: a reply may still arrive on it.

    Raises:
        TransferTimeoutError: no answer within ``timeout`` (a ``RuntimeError``,
            as the store's own failures are).
        RuntimeError: what ``call`` raised.
    """
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, call()))
        except BaseException as err:  # handed to the waiting thread
            box.append((False, err))

    t = threading.Thread(target=run, name="recoveryd-store-call", daemon=True)
    t.start()
    t.join(timeout.total_seconds())
    if not box:
        raise TransferTimeoutError(
            f"{what}: no answer within {timeout.total_seconds():g} s (the donor's host is "
            "silent: down, partitioned, or dropping packets); the plan is given up"
        )
    done, value = box[0]
    if not done:
        raise value
    return value  # type: ignore[no-any-return]


def read_go(store: dist.Store, prefix: str, plan_key: bytes, *, timeout: timedelta) -> str:
    """Whether the donor rank set its go: ``set``, ``unset``, or ``forged`` (a value it did not
    write).

    Raises:
        RuntimeError: the store is unreachable (the donor died), or did not
            answer within ``timeout`` (see :func:`bounded`).
    """
    key = go_key(prefix)

    def poll() -> bytes | None:
        return store.get(key) if store.check([key]) else None

    value = bounded(poll, timeout, "reading the donor's go")
    if value is None:
        return "unset"
    step, _, said = value.partition(b":")
    ok = proves(plan_key, said, f"go {step.decode(errors='replace')}", prefix)
    return "set" if ok else "forged"


def proves(plan_key: bytes, value: bytes, what: str, prefix: str) -> bool:
    """Whether ``value`` is :func:`proof` of ``what`` (constant time)."""
    if not plan_key:
        return True
    return hmac.compare_digest(value, proof(plan_key, what, prefix).encode())


def host_store(host: str, port: int, *, timeout: timedelta) -> dist.TCPStore:
    """Hosts this agent's rendezvous store on ``host:port`` (port 0: any free port).

    The store listens on that address only (torch's own would take every
    interface): a socket bound here is handed to it.

    Raises:
        ConfigError: ``host`` is not an address of this machine, or the port is taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(512)
    except OSError as err:
        sock.close()
        raise ConfigError(
            "host", f"{host}:{port}", f"the rendezvous store cannot listen there: {err.strerror}"
        ) from None
    bound = sock.getsockname()[1]
    fd = sock.detach()  # the store owns it from here
    return dist.TCPStore(
        host, bound, None, True, timeout, wait_for_workers=False, master_listen_fd=fd
    )


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
