"""The sidecar's knobs, as one frozen dataclass; each one also set by a ``RECOVERYD_*`` variable."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from recoveryd._time import env_bool, env_int, env_seconds, env_str
from recoveryd.credentials import Credentials
from recoveryd.errors import ConfigError
from recoveryd.sidecar.trust import default_token_file

_MiB = 1 << 20
MIN_FRAME_BYTES = 64 << 10
"""The smallest ``max_frame_bytes``: any state frame of one tensor fits."""


def parse_uids(raw: str, *, name: str = "RECOVERYD_SIDECAR_ALLOWED_UIDS") -> tuple[int, ...]:
    """``"1000,1001"`` as uids (empty: none).

    Raises:
        ConfigError: (naming ``name``) an entry is not a uid.
    """
    uids = []
    for part in raw.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            uid = int(part)
        except ValueError:
            raise ConfigError(name, raw, "must be uids (numbers) separated by commas") from None
        if uid < 0:
            raise ConfigError(name, raw, f"uid {uid} is negative")
        uids.append(uid)
    return tuple(uids)


@dataclass(frozen=True, kw_only=True, slots=True)
class SidecarConfig:
    """The sidecar's knobs (the ranks' identities come from the trainers that attach).

    Every field past the first two can also be set through the environment
    variable named in its description; an explicit argument wins.
    """

    coordinator: str
    """``host:port`` of the coordinator."""
    socket_path: str
    """The Unix socket trainers attach to (its directory must exist)."""
    metrics_port: int | None = None
    """Serve ``/metrics`` (every attached rank's transfers) on this port; ``None``: off."""
    host: str = field(default_factory=lambda: env_str("RECOVERYD_HOST"))
    """Address peers reach transfers at (empty: the interface that routes to the coordinator)."""
    heartbeat_interval: timedelta = timedelta(seconds=2)
    rendezvous_timeout: timedelta = timedelta(seconds=60)
    credentials: Credentials = field(default_factory=Credentials.from_env)
    """What every attached rank's agent presents to the coordinator: the job's
    token and/or a TLS client certificate (``RECOVERYD_TOKEN_FILE``,
    ``RECOVERYD_TLS_*``; not to be confused with :attr:`token_file`, the
    attach token between a trainer and this sidecar)."""

    token_file: str = field(default_factory=lambda: env_str("RECOVERYD_SIDECAR_TOKEN_FILE"))
    """The file of the token a trainer must present to attach (``RECOVERYD_SIDECAR_TOKEN_FILE``;
    its first line, read again at every attach so a rotated Secret takes effect).

    Empty (the default): the sidecar makes a new token at every start and writes
    it to ``<socket_path>.token`` (mode 0600) before it listens, and removes it
    when it stops; :func:`recoveryd.attach` looks there by default. That suits a
    trainer of the same uid sharing the socket's directory (the pod's
    ``emptyDir``). A trainer of another uid (``allowed_uids``) cannot read that
    file: give both the same file then (e.g. one Kubernetes Secret mounted in
    both containers)."""
    allowed_uids: tuple[int, ...] = field(
        default_factory=lambda: parse_uids(env_str("RECOVERYD_SIDECAR_ALLOWED_UIDS"))
    )
    """Uids besides the sidecar's own whose processes may connect
    (``RECOVERYD_SIDECAR_ALLOWED_UIDS``, comma-separated; default none). The
    kernel says who connected (``SO_PEERCRED``); any other uid, root included,
    is closed unread, with its pid and uid logged."""
    max_sessions: int = field(default_factory=lambda: env_int("RECOVERYD_SIDECAR_MAX_SESSIONS", 64))
    """Connections served at once, attached or attaching (``RECOVERYD_SIDECAR_MAX_SESSIONS``,
    default 64: a sidecar serves the ranks of one pod, 8 at most on today's
    nodes, so 64 leaves room for restarts overlapping old sessions). Each one
    holds a thread; one past the limit is refused at once, without one."""
    attach_timeout: timedelta = field(
        default_factory=lambda: env_seconds(
            "RECOVERYD_SIDECAR_ATTACH_TIMEOUT", timedelta(seconds=5)
        )
    )
    """A connection must have sent its attach (and its state) within this
    (``RECOVERYD_SIDECAR_ATTACH_TIMEOUT``, default 5 s); it is closed otherwise.
    :func:`recoveryd.attach` sends both within milliseconds of connecting (it
    shares its memory before it connects)."""
    idle_timeout: timedelta = field(
        default_factory=lambda: env_seconds(
            "RECOVERYD_SIDECAR_IDLE_TIMEOUT", timedelta(seconds=120)
        )
    )
    """An attached session silent this long is ended, its rank reported unhealthy
    (``RECOVERYD_SIDECAR_IDLE_TIMEOUT``, default 120 s). Steps apart any time:
    an attachment pings every quarter of this when it has not called otherwise
    (from a thread of its own, so evaluation, checkpoints or compilation between
    steps do not count); what ends a session is a trainer whose process has
    stopped running Python for two minutes (stopped, or wedged)."""
    max_frame_bytes: int = field(
        default_factory=lambda: env_int(
            "RECOVERYD_SIDECAR_MAX_FRAME_BYTES", 256 * _MiB, what="an integer number of bytes"
        )
    )
    """The largest state a session may announce: header (the storages' layout)
    and manifest together (``RECOVERYD_SIDECAR_MAX_FRAME_BYTES``, default 256 MiB,
    the transport's ``max_manifest_bytes``). Each state frame is taken at the
    size its request announced, no larger; every other frame, and everything
    before the token is checked, at most 64 KiB."""
    require_sealed: bool = field(
        default_factory=lambda: env_bool("RECOVERYD_SIDECAR_REQUIRE_SEALED", True)
    )
    """Map only CPU memory sealed against shrinking (``RECOVERYD_SIDECAR_REQUIRE_SEALED``,
    default on). Off, an unsealed ``/dev/shm`` segment is accepted and its size
    checked before every request that touches it, which narrows, but does not
    close, the window in which a trainer shrinking it crashes the sidecar."""

    def __post_init__(self) -> None:
        if not self.socket_path:
            raise ConfigError("socket_path", self.socket_path, "must be a path")
        parent = os.path.dirname(os.path.abspath(self.socket_path))
        if not os.path.isdir(parent):
            raise ConfigError("socket_path", self.socket_path, f"directory {parent} does not exist")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", self.metrics_port, "must be a port number")
        if any(u < 0 for u in self.allowed_uids):
            raise ConfigError("allowed_uids", self.allowed_uids, "uids are not negative")
        if self.max_sessions < 1:
            raise ConfigError("max_sessions", self.max_sessions, "must be at least 1")
        for name in ("attach_timeout", "idle_timeout", "heartbeat_interval", "rendezvous_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(name, getattr(self, name), "must be positive")
        if self.max_frame_bytes < MIN_FRAME_BYTES:
            raise ConfigError(
                "max_frame_bytes", self.max_frame_bytes, f"must be at least {MIN_FRAME_BYTES}"
            )

    @property
    def token_path(self) -> str:
        """The token's file: ``token_file``, or the one generated next to the socket."""
        return self.token_file or default_token_file(self.socket_path)

    @classmethod
    def from_flags(cls, **flags: Any) -> SidecarConfig:
        """A config from command-line values: ``None`` keeps a field's default (its
        environment variable); seconds may be given for durations, and
        ``allowed_uids`` as ``"1000,1001"``.

        Raises:
            ConfigError: a value that does not fit its field.
        """
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in flags.items():
            if value is None:
                continue
            if name not in kinds:
                raise ConfigError(name, value, "not a field of SidecarConfig")
            if kinds[name] == "timedelta" and isinstance(value, int | float):
                value = timedelta(seconds=value)
            if name == "allowed_uids":
                value = (
                    parse_uids(value, name="allowed_uids")
                    if isinstance(value, str)
                    else tuple(value)
                )
            values[name] = value
        return cls(**values)
