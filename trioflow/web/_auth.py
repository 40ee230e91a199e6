"""Access control: the ``Host`` check, the bearer token and the ``Origin`` allow-list, as ASGI middleware.

Host
    Every request and WebSocket handshake but ``GET /healthz`` must name the
    server in its ``Host`` header: one of the names of
    :attr:`~trioflow.web.WebConfig.host_allow_list` (by default the
    loopback names and the bound address); ``403`` ``forbidden_host``
    otherwise, before the token is looked at. This defeats DNS rebinding,
    where a page of another site reaches a local server under its own name
    (:mod:`trioflow.web._hosts`). ``/healthz`` answers any ``Host``: load
    balancers probe it by address.

Token
    With a token configured, every request but the public ones (``/``,
    ``/healthz``, ``/favicon.ico`` and ``/static/...``: the page must load
    before it can ask for the token) needs ``Authorization: Bearer <token>``;
    ``401`` otherwise, with ``WWW-Authenticate: Bearer``. Browsers cannot set
    headers on ``EventSource`` and ``WebSocket``, so the event stream
    (``GET /runs/{id}/events``) and the WebSocket endpoints also take the
    token as ``?token=<token>``. Tokens are compared in constant time.

Origin
    A browser sends ``Origin`` with every WebSocket handshake and every
    cross-site ``POST``. Those are allowed only from the server's own origin
    (the ``Origin`` host and port equal the ``Host`` header, and that
    ``Host`` is on the allow-list above: a rebinding page controls its
    ``Host`` too, so equality alone proves nothing) and the configured
    :attr:`~trioflow.web.WebConfig.allowed_origins` (``"*"`` for any);
    ``403`` otherwise. Requests without ``Origin`` come from non-browser
    clients and pass. Together with ``POST /runs`` accepting only
    ``application/json`` (which a cross-site page cannot send without a CORS
    preflight this server never grants), this keeps other web sites from
    driving the API through a visitor's browser.
"""

from __future__ import annotations

import hmac
import re
import urllib.parse
from collections.abc import Collection

from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from trioflow.web._errors import ApiError
from trioflow.web._hosts import ANY_HOST, HostAllowList

__all__ = ["ANY_HOST_PATHS", "PUBLIC_PATHS", "AccessControl", "AccessPolicy"]

ANY_HOST_PATHS = frozenset({"/healthz"})
"""Paths answered whatever the ``Host`` header (load balancers probe by address)."""

PUBLIC_PATHS = frozenset({"/", "/healthz", "/favicon.ico"})
"""Paths open without a token (besides everything under ``/static/``)."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_EVENTS_PATH = re.compile(r"/runs/[^/]+/events")


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


class AccessPolicy:
    """The ``Host``, token and ``Origin`` rules of one server, built once per application.

    :class:`AccessControl` applies it to every request; the event stream
    served on the connection itself (:mod:`trioflow.web._direct`) asks it too,
    through :func:`~trioflow.web._sse.event_stream_answer`.

    Args:
        token: the token every non-public request must carry; ``None`` for none.
        allowed_origins: origins allowed besides the server's own; ``"*"`` for any.
        allowed_hosts: the ``Host`` values to answer
            (:attr:`WebConfig.host_allow_list <trioflow.web.WebConfig.host_allow_list>`);
            the default, ``"*"``, answers any.
    """

    def __init__(
        self,
        *,
        token: str | None,
        allowed_origins: Collection[str] = (),
        allowed_hosts: HostAllowList | None = None,
    ) -> None:
        self._token = token.encode() if token else None
        self._origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)
        self._hosts = allowed_hosts if allowed_hosts is not None else HostAllowList([ANY_HOST])

    def check(self, scope: Scope) -> ApiError | None:
        """The error to answer ``scope`` with, or ``None`` to let it through."""
        headers = Headers(scope=scope)
        path: str = scope["path"]
        websocket = scope["type"] == "websocket"
        method = scope.get("method", "GET")
        host = headers.get("host")
        if path not in ANY_HOST_PATHS and not self._hosts.allows(host):
            return ApiError(
                403,
                "forbidden_host",
                "this server does not answer to "
                + ("requests without a Host header" if host is None else f"the host {host!r}")
                + "; add the name to the server's allowed hosts (--allowed-host)",
            )
        if self._token is not None and not _is_public(path):
            supplied = _bearer(headers.get("authorization"))
            if supplied is None and (
                websocket or (method == "GET" and _EVENTS_PATH.fullmatch(path))
            ):
                supplied = QueryParams(scope.get("query_string", b"")).get("token") or None
            if supplied is None:
                return ApiError(
                    401,
                    "unauthorized",
                    "this endpoint needs the server's token: send 'Authorization: Bearer <token>'",
                    headers={"WWW-Authenticate": 'Bearer realm="trioflow"'},
                )
            if not hmac.compare_digest(supplied.encode(), self._token):
                return ApiError(
                    401,
                    "invalid_token",
                    "the token is not valid for this server",
                    headers={"WWW-Authenticate": 'Bearer realm="trioflow", error="invalid_token"'},
                )
        if (websocket or method not in _SAFE_METHODS) and not self.origin_allowed(headers):
            return ApiError(
                403,
                "forbidden_origin",
                f"requests from origin {headers.get('origin')!r} are not allowed; "
                "add it to the server's allowed origins",
            )
        return None

    def origin_allowed(self, headers: Headers) -> bool:
        """Whether the request's ``Origin`` (if any) is the server's own or an allowed one.

        The server's own origin is one whose host and port equal the
        ``Host`` header, when that ``Host`` is on the allow-list.
        """
        origin = headers.get("origin")
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if "*" in self._origins or origin in self._origins:
            return True
        host = headers.get("host")
        if host is None or origin == "null" or not self._hosts.allows(host):
            return False
        try:
            netloc = urllib.parse.urlsplit(origin).netloc
        except ValueError:  # "http://[::1": not an origin at all
            return False
        return netloc == host.lower()


class AccessControl:
    """ASGI middleware checking the ``Host``, the bearer token and the ``Origin`` of requests.

    Args:
        app: the application to protect.
        policy: the rules (:class:`AccessPolicy`), made once for the application.
    """

    def __init__(self, app: ASGIApp, *, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer ``401``/``403`` (also to a WebSocket handshake)."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        error = self.policy.check(scope)
        if error is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await error.response()(scope, receive, send)
        else:
            await deny_websocket(scope, receive, send, error)


async def deny_websocket(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    """Refuse a WebSocket handshake with ``error`` as an HTTP response.

    Uses the ASGI ``websocket.http.response`` extension when the server has
    it (Hypercorn does), so the client sees the status and the JSON body;
    otherwise closes the handshake, which servers answer with ``403``.
    """
    if "websocket.http.response" in scope.get("extensions", {}):
        response = error.response()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error.code})
