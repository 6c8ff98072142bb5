"""Who may talk to the coordinator: a per-job bearer token, TLS with client certificates, or both.

Both ends of the control plane read the same settings: ``--token-file`` /
``RECOVERYD_TOKEN_FILE`` (a file of one or more tokens, one per line: the
first is the one this process sends, every line is accepted, so a token is
rotated by adding the new one, rolling the job, then removing the old one),
and ``--tls-cert`` / ``--tls-key`` / ``--tls-ca`` (``RECOVERYD_TLS_CERT``,
``RECOVERYD_TLS_KEY``, ``RECOVERYD_TLS_CA``; PEM files). On the coordinator
the certificate and key are its server identity and the CA, when given, is
the one every client certificate must chain to; on an agent they are its
client identity and the CA the coordinator's certificate must chain to.

The token file is read again when it changes (looked at once a second at
most), on both sides, so a Secret that Kubernetes updates in place takes
effect without a restart; so are the coordinator's certificate, key and CA
(new handshakes use them). An agent reads its own certificate when its
channel opens: restart it after a renewal. The server side
lives in :mod:`recoveryd.coordinator.gate`; this module is what both sides
share: loading, the token header, and the client's channel.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from recoveryd._time import env_str
from recoveryd.errors import ConfigError

logger = logging.getLogger(__name__)

TOKEN_HEADER = "authorization"
"""The metadata key the token travels in, as ``Bearer <token>``."""
MIN_TOKEN_CHARS = 16
"""A token shorter than this is refused as too easy to guess."""
MAX_TOKEN_CHARS = 4096
_RELOAD_S = 1.0
"""How often, at most, a changed file is read again."""


class _Watched:
    """A file's contents, read again when its modification time or size changes."""

    def __init__(self, path: str, parse: Callable[[bytes], Any], what: str) -> None:
        self.path = path
        self._parse = parse
        self._what = what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._value: Any = None
        self.value()  # a file that cannot be read now is a configuration error, raised here

    def _read(self) -> tuple[tuple[int, int], Any]:
        try:
            st = os.stat(self.path)
            with open(self.path, "rb") as fh:
                raw = fh.read(1 << 20)
        except OSError as err:
            raise ConfigError(self._what, self.path, f"cannot be read: {err.strerror}") from None
        return (st.st_mtime_ns, st.st_size), self._parse(raw)

    def value(self) -> Any:
        """The parsed contents (a file that changed into something invalid keeps the old ones)."""
        now = time.monotonic()
        with self._lock:
            if self._stamp is not None and now - self._checked < _RELOAD_S:
                return self._value
            self._checked = now
            if self._stamp is None:  # the first read: a file that cannot be read is an error
                self._stamp, self._value = self._read()
                return self._value
            try:
                st = os.stat(self.path)
                if self._stamp != (st.st_mtime_ns, st.st_size):
                    self._stamp, self._value = self._read()
            except (OSError, ConfigError) as err:
                logger.warning(
                    "%s %s: keeping what was read before: %s", self._what, self.path, err
                )
            return self._value


def _tokens(raw: bytes) -> tuple[str, ...]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError("token", "<file>", "must be ASCII") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ConfigError("token", "<file>", "the file holds no token")
    for t in tokens:
        if not MIN_TOKEN_CHARS <= len(t) <= MAX_TOKEN_CHARS or not t.isprintable() or " " in t:
            raise ConfigError(
                "token",
                f"<{len(t)} characters>",
                f"must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} printable characters without "
                "spaces (e.g. `openssl rand -hex 32`)",
            )
    return tokens


def _pem(what: str) -> Callable[[bytes], bytes]:
    def parse(raw: bytes) -> bytes:
        if b"-----BEGIN " not in raw:
            raise ConfigError(what, "<file>", "is not a PEM file")
        return raw

    return parse


@dataclass(frozen=True, kw_only=True, slots=True)
class Credentials:
    """What this process presents to (or demands from) the other end of the control plane.

    Build it with :meth:`load` or :meth:`from_env`; the default holds nothing
    (an unauthenticated, plaintext control plane).
    """

    token_file: str = ""
    """A file of tokens, one per line (the first is sent; all are accepted)."""
    tls_cert: str = ""
    """PEM certificate chain: the coordinator's server identity, or an agent's client identity."""
    tls_key: str = ""
    """PEM private key of :attr:`tls_cert`."""
    tls_ca: str = ""
    """PEM CA bundle: on the coordinator, the CA client certificates must chain to
    (mutual TLS); on an agent, the CA the coordinator's certificate must chain to."""
    tls_server_name: str = ""
    """The name the coordinator's certificate is checked against, when the
    address dialled is not in it (e.g. an IP address); empty: the address's host."""
    _token: _Watched | None = field(default=None, init=False, repr=False, compare=False)
    _files: dict[str, _Watched] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                "tls_cert" if self.tls_key else "tls_key",
                "",
                "a TLS certificate and its key are given together",
            )
        if self.token_file:
            object.__setattr__(self, "_token", _Watched(self.token_file, _tokens, "token_file"))
        files = self._files
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path:
                files[name] = _Watched(path, _pem(name), name)

    @classmethod
    def load(
        cls,
        *,
        token_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        tls_server_name: str | None = None,
    ) -> Credentials:
        """Credentials from files; an argument left ``None`` comes from its ``RECOVERYD_*`` variable.

        Raises:
            ConfigError: a file cannot be read or does not hold what it should.
        """
        return cls(
            token_file=token_file if token_file is not None else env_str("RECOVERYD_TOKEN_FILE"),
            tls_cert=tls_cert if tls_cert is not None else env_str("RECOVERYD_TLS_CERT"),
            tls_key=tls_key if tls_key is not None else env_str("RECOVERYD_TLS_KEY"),
            tls_ca=tls_ca if tls_ca is not None else env_str("RECOVERYD_TLS_CA"),
            tls_server_name=(
                tls_server_name
                if tls_server_name is not None
                else env_str("RECOVERYD_TLS_SERVER_NAME")
            ),
        )

    @classmethod
    def from_env(cls) -> Credentials:
        """Credentials named by ``RECOVERYD_TOKEN_FILE`` and ``RECOVERYD_TLS_*``."""
        return cls.load()

    # ---- what is configured ------------------------------------------------------

    @property
    def has_token(self) -> bool:
        return self._token is not None

    @property
    def tls(self) -> bool:
        """Whether this side speaks TLS (a certificate, or on an agent a CA to check one)."""
        return bool(self.tls_cert or self.tls_ca)

    @property
    def any(self) -> bool:
        """Whether anything authenticates this control plane."""
        return self.has_token or self.tls

    def describe(self) -> str:
        """What is in use, for logs (never a secret)."""
        parts = []
        if self.has_token:
            parts.append(f"token from {self.token_file}")
        if self.tls_cert:
            parts.append(f"TLS certificate {self.tls_cert}")
        if self.tls_ca:
            parts.append(f"CA {self.tls_ca}")
        return ", ".join(parts) or "none (unauthenticated)"

    # ---- tokens ----------------------------------------------------------------

    def tokens(self) -> tuple[str, ...]:
        """Every accepted token (empty: no token configured)."""
        return self._token.value() if self._token is not None else ()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What this process sends with each call (the first token, if any)."""
        tokens = self.tokens()
        return ((TOKEN_HEADER, f"Bearer {tokens[0]}"),) if tokens else ()

    def token_matches(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """Whether the call's metadata carries one of the accepted tokens (constant time)."""
        sent = ""
        for key, value in metadata or ():
            if key == TOKEN_HEADER:
                sent = value.decode("latin-1") if isinstance(value, bytes) else value
                break
        scheme, _, presented = sent.partition(" ")
        if scheme != "Bearer" or not presented:
            return False
        ok = False
        for token in self.tokens():  # every token compared: the time does not say which matched
            ok |= hmac.compare_digest(presented.encode(), token.encode())
        return ok

    # ---- TLS -------------------------------------------------------------------

    def pem(self, name: str) -> bytes | None:
        """The current contents of ``tls_cert``, ``tls_key`` or ``tls_ca`` (``None``: not given)."""
        watched = self._files.get(name)
        return watched.value() if watched is not None else None

    # ---- the client's channel --------------------------------------------------

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``address`` that presents these credentials on every call.

        TLS when a certificate or CA is configured, plaintext otherwise; the
        token (if any) goes in each call's metadata either way. Over
        plaintext a token can be read by anyone on the path: keep such a
        control plane on the job's own network, or add TLS.
        """
        opts = list(options)
        if self.tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.pem("tls_ca"),
                private_key=self.pem("tls_key"),
                certificate_chain=self.pem("tls_cert"),
            )
            if self.tls_server_name:
                opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
            channel = grpc.secure_channel(address, creds, options=opts)
        else:
            channel = grpc.insecure_channel(address, options=opts)
        if self.has_token:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(self))
        return channel


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the token to every call's metadata (read afresh, so a rotated file takes effect)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def _with_token(self, details: Any) -> Any:
        metadata = [(k, v) for k, v in (details.metadata or ()) if k != TOKEN_HEADER] + list(
            self._credentials.metadata()
        )
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


@dataclass(frozen=True, slots=True)
class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]]
    credentials: Any
    wait_for_ready: bool | None
    compression: Any
