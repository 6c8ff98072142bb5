"""What an attach must show before a sidecar takes anything large from it, and how large.

A connection's first frame is checked here: an attach, of this sidecar's
frames version, with neither payload nor descriptors, presenting the token
(compared in constant time). Its announced state then gets limits of its
own size: a state frame is read at the size its request announced, within
``max_frame_bytes``, with no more descriptors than its layout can describe.
Everything else a session reads is a :data:`CONTROL` frame.
"""

from __future__ import annotations

from recoveryd.errors import (
    ConfigError,
    LimitExceededError,
    ManifestError,
    PermissionDeniedError,
)
from recoveryd.sidecar import frames, trust, wire
from recoveryd.sidecar.config import SidecarConfig

CONTROL = wire.Limits(header_bytes=64 << 10)
"""Every frame but a state: an attach, a request (labels and all fit in 64 KiB)."""
BYTES_PER_DESCRIPTOR = 64
"""A CPU storage's handle takes more than this in the layout's JSON: a state
announcing more descriptors than its layout could describe is refused."""


def check_attach(f: wire.Frame, config: SidecarConfig, token: str) -> frames.Attach:
    """The attach a connection's first frame carries, if it may attach.

    Raises:
        ConfigError: not an attach, or of another frames version.
        MalformedFrameError: not a well-formed attach.
        ManifestError: it carries a payload or descriptors.
        PermissionDeniedError: its token is not ``token``.
    """
    if f.op != frames.Attach.OP:
        raise ConfigError("op", f.op, "a connection's first request must be an attach")
    version = f.header.get("version")  # first: another version's attach may not decode
    if version != frames.FRAMES_VERSION:
        raise ConfigError(
            "frames version",
            version,
            f"this sidecar speaks version {frames.FRAMES_VERSION}: run the same recoveryd "
            "version in the trainer and in its sidecar",
        )
    request = frames.decode_request(f.header)
    assert isinstance(request, frames.Attach)
    if f.fds or f.payload:
        raise ManifestError("an attach carries neither descriptors nor a payload")
    if not trust.same_secret(request.token, token):
        read = f"the token read from {request.token_file}" if request.token_file else "its token"
        raise PermissionDeniedError(
            request.replica_id,
            request.group_rank,
            f"the sidecar at {config.socket_path} refused {read}: present the token in "
            f"{config.token_path} (recoveryd.attach's token_file, RECOVERYD_SIDECAR_TOKEN_FILE; "
            "by default the sidecar writes a new one next to its socket at every start)",
        )
    return request


def state_limits(size: frames.StateSize, who: str, max_frame_bytes: int) -> wire.Limits:
    """The limits of a state frame: the sizes its request announced.

    Raises:
        LimitExceededError: the state is larger than ``max_frame_bytes``.
        ManifestError: the announcement cannot be true.
    """
    if min(size.layout_bytes, size.manifest_bytes, size.descriptors) < 0:
        raise ManifestError(f"{who} announced a state of negative size ({size})")
    total = size.layout_bytes + size.manifest_bytes
    if total > max_frame_bytes:
        raise LimitExceededError(
            "RECOVERYD_SIDECAR_MAX_FRAME_BYTES",
            total,
            max_frame_bytes,
            what=f"the state of {who} (bytes)",
        )
    room = size.layout_bytes // BYTES_PER_DESCRIPTOR
    if size.descriptors > room:
        raise ManifestError(
            f"{who} announced {size.descriptors} descriptors with a layout of "
            f"{size.layout_bytes} bytes (room for {room})"
        )
    return wire.Limits(
        header_bytes=size.layout_bytes, payload_bytes=size.manifest_bytes, fds=size.descriptors
    )
