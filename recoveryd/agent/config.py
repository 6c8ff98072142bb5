"""The agent's knobs: who this rank is, where the coordinator is, and how long to wait."""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from recoveryd._time import env_int, env_str
from recoveryd.agent.keeper import default_dir
from recoveryd.credentials import Credentials
from recoveryd.errors import ConfigError
from recoveryd.protocol import check_identity
from recoveryd.transport.config import TransferConfig


def _address(value: str, name: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(name, value, "must be HOST:PORT")
    return host.strip("[]"), int(port)


def route_to(address: str) -> str:
    """The local IP address whose interface routes to ``address`` (no packet is sent)."""
    host, port = _address(address, "coordinator")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def interface_of(host: str) -> str:
    """The local interface that holds the address ``host`` (``eth0``), or ``""``.

    ``host`` must be an IP address (IPv4 or IPv6); a name gives ``""`` rather
    than a DNS lookup that could hang. Every address of every interface counts
    (secondary ones too). Gloo binds its transfers to this address, so this is
    the interface their bytes use; NCCL picks its own (``NCCL_SOCKET_IFNAME``).
    """
    try:
        info = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return ""
    ip = str(info[0][4][0]).split("%")[0]
    if ip.startswith("127.") or ip == "::1":
        return "lo"
    return _interface_addresses().get(ip, "")


class _Sockaddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 14)]


class _SockaddrIn(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_ubyte * 4),
    ]


class _SockaddrIn6(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_ushort),
        ("port", ctypes.c_uint16),
        ("flowinfo", ctypes.c_uint32),
        ("addr", ctypes.c_ubyte * 16),
        ("scope_id", ctypes.c_uint32),
    ]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("next", ctypes.POINTER(_Ifaddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_Sockaddr)),
    ("netmask", ctypes.POINTER(_Sockaddr)),
    ("ifu", ctypes.POINTER(_Sockaddr)),
    ("data", ctypes.c_void_p),
]


def _interface_addresses() -> dict[str, str]:
    """Every local IP address and the interface holding it (``getifaddrs``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return {}
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return {}
    out: dict[str, str] = {}
    try:
        node = head
        while node:
            ifa = node.contents
            if ifa.addr and ifa.name:
                family = ifa.addr.contents.family
                if family == socket.AF_INET:
                    raw = bytes(ctypes.cast(ifa.addr, ctypes.POINTER(_SockaddrIn)).contents.addr)
                    out.setdefault(socket.inet_ntop(socket.AF_INET, raw), ifa.name.decode())
                elif family == socket.AF_INET6:
                    raw = bytes(ctypes.cast(ifa.addr, ctypes.POINTER(_SockaddrIn6)).contents.addr)
                    out.setdefault(socket.inet_ntop(socket.AF_INET6, raw), ifa.name.decode())
            node = ifa.next
    finally:
        libc.freeifaddrs(head)
    return out


def _port(name: str) -> int | None:
    return env_int(name, None, what="an integer (a port number)")


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    """Who this rank is and how its agent behaves.

    Every field but the identity has a default; ``RECOVERYD_HOST``,
    ``RECOVERYD_RENDEZVOUS_PORT`` and ``RECOVERYD_METRICS_PORT`` override
    the advertised host and the ports.
    """

    coordinator: str
    """``host:port`` of the coordinator."""
    replica_id: str
    """This rank's replica: a whole copy of the model (all its ranks)."""
    group_rank: int = 0
    """This rank's rank within its replica."""
    group_world_size: int = 1
    """How many ranks the replica has."""
    host: str = field(default_factory=lambda: env_str("RECOVERYD_HOST"))
    """Address peers reach this rank's transfers at; empty: the interface that
    routes to the coordinator. Logged, and shown by ``recoveryd status``."""
    rendezvous_port: int = field(default_factory=lambda: _port("RECOVERYD_RENDEZVOUS_PORT") or 0)
    """Port of the rendezvous store this agent hosts (0, the default: any free
    port; ``RECOVERYD_RENDEZVOUS_PORT``, e.g. a named container port)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Locality labels (``node``, ``zone``) the coordinator prefers donors by."""
    heartbeat_interval: timedelta = timedelta(seconds=2)
    """Heartbeat period until the coordinator says otherwise (it does, when the agent registers)."""
    rpc_timeout: timedelta = timedelta(seconds=5)
    """Deadline of each coordinator call."""
    rendezvous_timeout: timedelta = timedelta(seconds=60)
    """How long a transfer group may take to form (both sides)."""
    metrics_port: int | None = field(default_factory=lambda: _port("RECOVERYD_METRICS_PORT"))
    """Serve this agent's Prometheus ``/metrics`` on this port (0: any free
    port; ``None``, the default: not served, e.g. with several ranks per
    host; ``RECOVERYD_METRICS_PORT``). ``Agent.registry`` holds them either way."""
    transfer: TransferConfig = field(default_factory=TransferConfig)
    """Bucket sizes and checksums of the transfers."""
    credentials: Credentials = field(default_factory=Credentials.from_env)
    """What the agent presents to the coordinator: the job's token and/or a
    TLS client certificate (``RECOVERYD_TOKEN_FILE``, ``RECOVERYD_TLS_CERT``,
    ``RECOVERYD_TLS_KEY``, ``RECOVERYD_TLS_CA``; none by default)."""
    state_dir: str = field(default_factory=lambda: env_str("RECOVERYD_STATE_DIR", default_dir()))
    """A private directory (0700) where the rank's coordinator secret is kept,
    so a trainer restarted in place takes its rank back at once
    (``RECOVERYD_STATE_DIR``; default ``$TMPDIR/recoveryd-<uid>``; "" keeps
    nothing, and a restarted rank waits for its old registration to fall silent)."""

    def __post_init__(self) -> None:
        _address(self.coordinator, "coordinator")
        check_identity(self.replica_id, self.group_rank, self.group_world_size)
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", self.metrics_port, "must be a port number or None")
        if not 0 <= self.rendezvous_port < 65536:
            raise ConfigError("rendezvous_port", self.rendezvous_port, "must be a port number")
        for name in ("heartbeat_interval", "rpc_timeout", "rendezvous_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(name, getattr(self, name), "must be positive")

    def advertised_host(self) -> str:
        """:attr:`host`, or the interface that routes to the coordinator."""
        return self.host or route_to(self.coordinator)
