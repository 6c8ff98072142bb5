"""The coordinator's door: who may call at all (authentication), and for which replica.

Every RPC but the gRPC health service passes :class:`Gate`, a server
interceptor: with a token configured, the call's metadata must carry one of
the accepted tokens; with a client CA configured, the caller must have
completed a TLS handshake with a certificate of that CA. A call that fails
either is refused ``UNAUTHENTICATED`` before any handler runs.

Which rank a caller may act for is decided in the servicer, per call
(:meth:`CoordinatorService._authorize`): by the rank's secret (handed out
by ``Register``) and, with client certificates, by the certificate's names
(:func:`identities_allow`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health

from recoveryd.credentials import Credentials
from recoveryd.errors import ConfigError

logger = logging.getLogger(__name__)

_OPEN = (f"/{health.SERVICE_NAME}/",)
"""Method prefixes anyone may call: health says nothing about the job, and
Kubernetes' gRPC probes carry no credentials."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or 0.0.0.0 / [::]: reachable from elsewhere


def authenticates_callers(credentials: Credentials) -> bool:
    """Whether the coordinator would know who calls: a token, or client certificates.

    A server certificate alone encrypts, but lets anyone who trusts the CA (a
    public fact) call.
    """
    return credentials.has_token or bool(credentials.tls_cert and credentials.tls_ca)


def check_exposure(bind_host: str, credentials: Credentials, *, insecure: bool) -> None:
    """Refuses to serve a non-loopback address to unauthenticated callers unless told ``insecure``.

    Raises:
        ConfigError: the coordinator would be open to anyone who reaches the port.
    """
    if authenticates_callers(credentials) or insecure or is_loopback(bind_host):
        return
    why = (
        "a server certificate alone encrypts, it does not say who calls"
        if credentials.tls
        else "no credentials were given"
    )
    raise ConfigError(
        "bind",
        bind_host,
        f"serving beyond this machine to callers it cannot authenticate ({why}) lets anyone "
        "who reaches the port steer every replica's recovery; pass --token-file "
        "(RECOVERYD_TOKEN_FILE) and/or --tls-ca (client certificates, with "
        "--tls-cert/--tls-key), or --insecure to accept that risk (e.g. a network only the "
        "job reaches)",
    )


def server_credentials(credentials: Credentials) -> grpc.ServerCredentials | None:
    """TLS for the server when it has a certificate (``None``: plaintext).

    The certificate, key and CA are read again when their files change, so
    they rotate without a restart. With a CA, every client must present a
    certificate of it.

    Raises:
        ConfigError: a CA without a server certificate.
    """
    if not credentials.tls_cert:
        if credentials.tls_ca:
            raise ConfigError(
                "tls_ca",
                credentials.tls_ca,
                "the coordinator checks client certificates only over TLS: also give it its "
                "own certificate and key (--tls-cert/--tls-key)",
            )
        return None
    current: list[tuple[bytes | None, ...]] = []

    def configuration() -> Any:
        key, cert, ca = (credentials.pem(n) for n in ("tls_key", "tls_cert", "tls_ca"))
        current[:] = [(key, cert, ca)]
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    initial = configuration()

    def fetch() -> Any:
        now = tuple(credentials.pem(n) for n in ("tls_key", "tls_cert", "tls_ca"))
        if current and now == current[0]:
            return None  # unchanged: keep serving the one in use
        logger.info("TLS certificate files changed: new handshakes use the new ones")
        return configuration()

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=bool(credentials.tls_ca)
    )


def certificate_names(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The caller's certificate's names: its CN and every SAN (grpc's peer identity
    alone is the SANs when there are any, the CN otherwise)."""
    auth = context.auth_context() or {}
    raw = [
        *auth.get("x509_common_name", []),
        *auth.get("x509_subject_alternative_name", []),
        *(context.peer_identities() or []),
    ]
    names: list[str] = []
    for r in raw:
        name = r.decode("utf-8", "replace") if isinstance(r, bytes) else str(r)
        if name and name not in names:
            names.append(name)
    return names


class Gate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses ``UNAUTHENTICATED`` every call without the job's credentials.

    Args:
        credentials: what the coordinator was started with.
    """

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._token = credentials.has_token
        self._certificates = bool(credentials.tls_cert and credentials.tls_ca)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN):
            return handler
        if self._token and not self._credentials.token_matches(details.invocation_metadata):
            return _refusal(handler, "no valid token (metadata 'authorization: Bearer ...')")
        return handler

    def requires_certificates(self) -> bool:
        """Whether callers hold client certificates (the servicer then checks their names)."""
        return self._certificates


def _refusal(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that aborts ``UNAUTHENTICATED`` without reading the request."""

    async def unary(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def stream(
        _request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - abort raises

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)
