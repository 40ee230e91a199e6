"""The web server's options: :class:`WebConfig`."""

from __future__ import annotations

import dataclasses
import math
import re
import resource
from pathlib import Path

from trioflow.web._hosts import LOOPBACK_NAMES, HostAllowList, is_loopback, is_wildcard, parse_host

__all__ = ["DEFAULT_STATIC_DIR", "TOKEN_ENV", "WebConfig", "default_max_connections"]

TOKEN_ENV = "TRIOFLOW_TOKEN"
"""The environment variable ``trioflow serve`` reads the bearer token from."""

DEFAULT_STATIC_DIR = Path(__file__).with_name("static")
"""The folder served at ``/static/`` (with its ``index.html`` at ``/``)."""

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def default_max_connections() -> int:
    """The default connection cap: what the process's file-descriptor limit leaves room for.

    Each connection holds one descriptor, its socket, and the process keeps
    a sixty-fourth of the limit for itself, at least 16 (the server itself
    holds about 11: standard streams, the listener, Trio's wake-up pipe and
    epoll; the rest is for files and the model's connections):
    ``RLIMIT_NOFILE - max(16, RLIMIT_NOFILE // 64)``, so 1,008 under
    ``ulimit -n 1024``; at least 16 and at most 10,000. Running out anyway
    is not fatal: the accept loop logs it once and waits for a descriptor.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        soft = 1 << 20
    return max(16, min(10_000, soft - max(16, soft // 64)))


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number, not {value!r}")


def _count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value!r}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WebConfig:
    """Everything :func:`~trioflow.web.create_app` and :func:`~trioflow.web.serve` can be told.

    All options are keyword-only and have safe defaults: the server binds
    the loopback interface, needs no token, and bounds every buffer.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option is out of range (a port outside 0-65535, a
            non-positive time or size, an empty token or one with characters
            an HTTP header cannot carry, a malformed allowed host, a wildcard
            ``host`` without ``allowed_hosts``, only one of ``certfile``
            and ``keyfile``, a certificate or key that cannot be read or
            that do not match).
    """

    host: str = "127.0.0.1"
    """The interface to bind. Only the loopback interface by default."""
    port: int = 8080
    """The TCP port; ``0`` picks a free one (:func:`~trioflow.web.serve` reports it)."""
    token: str | None = None
    """With a token, every endpoint but ``/healthz`` and the page (``/`` and
    ``/static/...``) requires ``Authorization: Bearer <token>``; the event
    stream and the WebSocket endpoints also accept ``?token=<token>``, for
    browsers, whose ``EventSource`` and ``WebSocket`` cannot set headers.
    It must be printable ASCII without white space (``!`` to ``~``): a token
    with other characters could never arrive intact in a header."""
    allowed_origins: frozenset[str] = frozenset()
    """Origins (``"https://app.example"``) allowed to open WebSockets and to
    ``POST``, besides the server's own origin. Requests without an ``Origin``
    header (non-browser clients) are always allowed; ``"*"`` allows any."""
    allowed_hosts: frozenset[str] = frozenset()
    """More names (``"agents.example.com"``, ``"agents.example.com:8443"``)
    clients may reach the server by, as sent in the ``Host`` header. The
    server always answers to the loopback names (``localhost``,
    ``127.0.0.1``, ``[::1]``) when bound to a loopback or wildcard address,
    and to the bound address itself; a name without a port matches any
    port. A request with any other ``Host`` is refused with ``403``
    ``forbidden_host`` (except ``GET /healthz``, which load balancers probe
    with a ``Host`` of their own), which defeats DNS rebinding. Binding a
    wildcard address (``0.0.0.0``, ``::``) requires this option; ``"*"``
    allows any ``Host`` and gives up that protection (only behind a proxy
    that checks ``Host`` itself). See :attr:`host_allow_list`."""
    max_body: int = 64 * 1024
    """The largest request body (and WebSocket message) accepted, in bytes.
    A larger WebSocket message gets a ``message_too_large`` error frame, up
    to :attr:`websocket_message_ceiling`, above which the server closes the
    connection with code ``1009``."""
    keepalive: float = 15.0
    """Seconds of silence after which an event stream sends a ``: keepalive`` comment."""
    retry: float = 3.0
    """Seconds a browser's ``EventSource`` waits before reconnecting (the ``retry:`` field)."""
    buffer: int = 256
    """Events buffered per connection and run; a client that falls further
    behind is evicted and resumes from the run's history."""
    max_running: int = 64
    """The most runs going at once; ``POST /runs`` answers ``429`` beyond it."""
    max_runs_per_socket: int = 32
    """The most runs one ``/ws`` connection may follow at once."""
    allowed_models: tuple[str, ...] = ()
    """The models a request may name (``"model"`` of ``POST /runs``), as
    :func:`~trioflow.models.open_model` takes them (``"claude-..."``,
    ``"openai:NAME"``, ``"scripted"``); a request naming another is ``400``
    ``model_not_allowed``. Empty (the default): every run uses the server's
    own model. The server's choice, never a client's alone; a named model
    is opened for its run and closed after it."""
    max_threads: int = 1000
    """The most conversations (``/threads``) retained; a new one makes the
    server forget the oldest one with no run going."""
    max_thread_messages: int = 1000
    """The most messages a thread holds; a run that would pass it is ``409``
    ``thread_full``."""
    thread_retention: float | None = None
    """With the Redis backend: seconds an idle thread is kept after its last
    activity (made, a run begun or ended), as a TTL on its keys; ``None``
    (the default): kept until :attr:`max_threads` makes room. In memory,
    threads last as long as the process."""
    shutdown_timeout: float = 10.0
    """Seconds a graceful shutdown may take, from its start: runs are
    cancelled and streams deliver their terminal event meanwhile; then every
    connection still open is closed by force, whatever it is doing."""
    write_timeout: float = 30.0
    """Seconds a write to a connection may make no progress (the peer stopped
    reading, or the connection is half-open) before the connection is closed.
    An event-stream client can resume with ``Last-Event-ID``."""
    header_timeout: float = 5.0
    """Seconds a connection may wait for the head of its next request: a new
    connection for its first one, a keep-alive connection between requests.
    Then it is closed (this is what ends a slowloris client). Over HTTPS, a
    new connection also has this long to complete its TLS handshake."""
    body_timeout: float = 10.0
    """Seconds a request body may take between two parts of it: a client
    that stops sending mid-body is answered ``408`` and its connection closed."""
    max_connections: int | None = None
    """The most connections open at once; beyond it, :func:`~trioflow.web.serve`
    answers new connections with ``503`` (``/healthz`` with its status) and
    closes them (over HTTPS it closes them without an answer: the client's
    first bytes are a TLS handshake, not a request). ``None``: what the
    file-descriptor limit leaves room for (:func:`default_max_connections`)."""
    certfile: Path | None = None
    """A PEM certificate chain: with :attr:`keyfile`, :func:`~trioflow.web.serve`
    speaks HTTPS only (its URLs are ``https://``), HTTP/2 with the clients that
    negotiate it by ALPN (browsers do) and HTTP/1.1 with the others. Both or
    neither; the files must be readable and the key must match the
    certificate. A client that does not complete its TLS handshake within
    :attr:`header_timeout` is closed."""
    keyfile: Path | None = None
    """The private key of :attr:`certfile` (PEM, not encrypted)."""
    static_dir: Path = DEFAULT_STATIC_DIR
    """The folder served at ``/static/``; its ``index.html`` is the page at ``/``."""
    access_log: bool = False
    """Log every request (to the ``trioflow.web`` logger)."""
    direct_writes: bool = True
    """Under :func:`~trioflow.web.serve`, serve event streams and WebSockets
    on the connection itself (:mod:`trioflow.web._direct`,
    :mod:`trioflow.web._direct_ws`): no HTTP machinery, no ASGI, the run's
    fan-out writing chunks (frames) straight to the socket. Much cheaper per
    connection and per event; turned off by itself when ASGI middleware was
    added to the application after :func:`~trioflow.web.create_app` (it
    would not see the event streams and WebSockets).
    ``False``: every request goes through Hypercorn and the ASGI application."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, not {self.host!r}")
        _count("port", self.port, 0)
        if self.port > 65535:
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise ValueError("token must be a non-empty string or None")
        if self.token is not None and _TOKEN_CHARS.fullmatch(self.token) is None:
            raise ValueError(
                "token must be printable ASCII without white space or control characters "
                "(an HTTP header cannot carry it otherwise)"
            )
        origins: object = self.allowed_origins
        if isinstance(origins, str):
            raise TypeError("allowed_origins must be a collection of origins, not a string")
        object.__setattr__(
            self, "allowed_origins", frozenset(o.rstrip("/") for o in self.allowed_origins)
        )
        hosts: object = self.allowed_hosts
        if isinstance(hosts, str):
            raise TypeError("allowed_hosts must be a collection of host names, not a string")
        object.__setattr__(self, "allowed_hosts", frozenset(self.allowed_hosts))
        models: object = self.allowed_models
        if isinstance(models, str):
            raise TypeError("allowed_models must be a collection of model names, not a string")
        object.__setattr__(self, "allowed_models", tuple(self.allowed_models))
        HostAllowList(self.allowed_hosts)  # raises ValueError for a malformed entry
        if is_wildcard(self.host) and not self.allowed_hosts:
            raise ValueError(
                f"binding {self.host!r} (every interface) needs allowed_hosts "
                "(trioflow serve --allowed-host NAME): the names clients reach the server by; "
                "'*' accepts any Host header, without protection against DNS rebinding"
            )
        _count("max_body", self.max_body)
        _positive("keepalive", self.keepalive)
        _positive("retry", self.retry)
        _count("buffer", self.buffer)
        _count("max_running", self.max_running)
        _count("max_runs_per_socket", self.max_runs_per_socket)
        _count("max_threads", self.max_threads)
        _count("max_thread_messages", self.max_thread_messages)
        if self.thread_retention is not None:
            _positive("thread_retention", self.thread_retention)
        _positive("shutdown_timeout", self.shutdown_timeout)
        _positive("write_timeout", self.write_timeout)
        _positive("header_timeout", self.header_timeout)
        _positive("body_timeout", self.body_timeout)
        if self.max_connections is not None:
            _count("max_connections", self.max_connections)
        if not isinstance(self.direct_writes, bool):
            raise TypeError(f"direct_writes must be a bool, not {self.direct_writes!r}")
        object.__setattr__(self, "static_dir", Path(self.static_dir))
        self._check_tls()

    def _check_tls(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            given, missing = (
                ("certfile", "keyfile") if self.keyfile is None else ("keyfile", "certfile")
            )
            raise ValueError(
                f"{given} needs {missing} too: TLS takes both a certificate and its key"
            )
        if self.certfile is None or self.keyfile is None:
            return
        object.__setattr__(self, "certfile", Path(self.certfile))
        object.__setattr__(self, "keyfile", Path(self.keyfile))
        from trioflow.web._tls import server_context  # the web stack: only with TLS

        server_context(self.certfile, self.keyfile)  # raises ValueError for unusable files

    @property
    def scheme(self) -> str:
        """``"https"`` with :attr:`certfile` and :attr:`keyfile`, else ``"http"``."""
        return "http" if self.certfile is None else "https"

    @property
    def host_allow_list(self) -> HostAllowList:
        """The ``Host`` values the server answers to.

        :attr:`allowed_hosts`, the loopback names when bound to a loopback
        or wildcard address, and the bound address itself (unless a wildcard).
        """
        names = set(self.allowed_hosts)
        if is_loopback(self.host) or is_wildcard(self.host):
            names |= LOOPBACK_NAMES
        if not is_wildcard(self.host) and parse_host(self.host) is not None:
            names.add(self.host)
        return HostAllowList(names)

    @property
    def websocket_message_ceiling(self) -> int:
        """The largest WebSocket message the server reads at all: ``2 * max_body + 64 KiB`` bytes.

        A message above :attr:`max_body` but within this gets a
        ``message_too_large`` error frame and the connection stays open; the
        server (Hypercorn) buffers a whole message before the application
        sees it, so beyond this bound it closes the connection with ``1009``
        instead of buffering without limit. Twice the limit leaves room for
        the common mistake (a message somewhat too large); the 64 KiB of
        slack keeps a small ``max_body`` from turning every near miss into a
        closed connection.
        """
        return 2 * self.max_body + 64 * 1024
