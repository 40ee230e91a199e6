"""HTTPS for :func:`~trioflow.web.serve`: the server's TLS context and each connection's handshake.

With :attr:`~trioflow.web.WebConfig.certfile` and
:attr:`~trioflow.web.WebConfig.keyfile`, the server speaks only TLS. The
context is Hypercorn's own (:meth:`hypercorn.config.Config.create_ssl_context`:
TLS 1.2 or later, no compression, ALPN offering ``h2`` then ``http/1.1``).
Each accepted connection, already a
:class:`~trioflow.web._connections.GuardedStream`, is wrapped in a
:class:`trio.SSLStream` (:meth:`TLS.serve_connection`):

* **The handshake is bounded** by :attr:`~trioflow.web.WebConfig.header_timeout`,
  like the head of a cleartext request: a client that connects and never
  completes it is closed. A failed handshake (a cleartext request, a client
  that rejects the certificate) is one ``info`` line on the ``trioflow.web``
  logger, without a traceback.
* **Then Hypercorn serves it** as it serves its own TLS connections
  (``https_compatible``, as Hypercorn's listeners: an end of file without a
  ``close_notify`` is an ordinary end of the connection): HTTP/2
  when the client chose ``h2`` by ALPN (browsers do, so they are not held to
  six event streams per origin), HTTP/1.1 otherwise. A TLS connection never
  takes the event stream's fast path (:mod:`trioflow.web._direct` serves
  cleartext connections only): every byte goes through the TLS layer, by the
  ordinary ASGI path.
* **The guarantees of every connection hold**: the TLS stream writes through
  the guarded stream, so the write timeout applies, and
  :meth:`~trioflow.web._connections.Connections.close_all` closes a TLS
  connection like any other, whatever it is doing.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig

from trioflow.web._connections import GuardedStream

__all__ = ["TLS", "server_context"]

_log = logging.getLogger("trioflow.web")


def _check_readable(name: str, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{name} {os.fspath(path)!r} is not a file")
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ValueError(
            f"{name} {os.fspath(path)!r} cannot be read: {exc.strerror or exc}"
        ) from None


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """The server's TLS context for the certificate chain ``certfile`` and its key ``keyfile``.

    Hypercorn's own context (TLS 1.2 or later, ALPN ``h2`` and
    ``http/1.1``). Both files are PEM; the key must not be encrypted (there
    is no one to ask for a pass phrase).

    Raises:
        ValueError: a file is missing or cannot be read, is not a PEM
            certificate chain or key, the key is encrypted, or it does not
            match the certificate.
    """
    _check_readable("certfile", certfile)
    _check_readable("keyfile", keyfile)
    config = HypercornConfig()
    config.certfile = os.fspath(certfile)
    config.keyfile = os.fspath(keyfile)
    # An encrypted key fails with an error instead of prompting on the terminal.
    config.keyfile_password = ""
    try:
        context = config.create_ssl_context()
    except ssl.SSLError as exc:
        reason = exc.reason or exc.strerror or str(exc)
        raise ValueError(
            f"cannot use certfile {os.fspath(certfile)!r} with keyfile {os.fspath(keyfile)!r}: "
            f"{reason} (both PEM, the key unencrypted and matching the certificate)"
        ) from None
    assert context is not None  # certfile is set
    return context


class TLS:
    """The TLS side of one server: its context, and how a connection gets through its handshake.

    Args:
        context: the server's context (:func:`server_context`).
        handshake_timeout: seconds a new connection has to complete its handshake.
    """

    def __init__(self, context: ssl.SSLContext, *, handshake_timeout: float) -> None:
        self.context = context
        self.handshake_timeout = handshake_timeout

    async def serve_connection(
        self,
        stream: GuardedStream,
        handle: Callable[[trio.SSLStream[GuardedStream]], Awaitable[None]],
    ) -> None:
        """Complete the handshake on ``stream``, then ``handle`` the TLS stream.

        A handshake that fails or does not complete within the handshake
        timeout is logged on one line and returns, leaving ``stream`` for
        the caller to close. Errors of a connection that is already gone
        (closed by the peer, or by :meth:`~trioflow.web._connections.Connections.close_all`)
        end ``handle`` quietly.
        """
        # As Hypercorn's own TLS listeners: a peer's end of file without a
        # close_notify (most HTTPS clients) is an ordinary end of the
        # connection, which Hypercorn closes at once (otherwise the broken
        # read would leave it open until the keep-alive timeout).
        secure = trio.SSLStream(stream, self.context, server_side=True, https_compatible=True)
        with trio.move_on_after(self.handshake_timeout) as scope:
            try:
                await secure.do_handshake()
            except trio.BrokenResourceError as exc:
                _log.info("TLS handshake with %s failed: %s", _peer(stream), _reason(exc))
                return
            except trio.ClosedResourceError:
                return  # closed by the server (a forced shutdown)
        if scope.cancelled_caught:
            _log.info(
                "closing the connection from %s: no TLS handshake within %g s",
                _peer(stream),
                self.handshake_timeout,
            )
            return
        try:
            await handle(secure)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the close_notify of a connection that was gone already


def _reason(exc: trio.BrokenResourceError) -> str:
    """Why a handshake failed, in a few words: ``[SSL: HTTP_REQUEST] http request``."""
    cause = exc.__cause__ or exc
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(cause)).strip()
    return text or "the connection ended"


def _peer(stream: GuardedStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except (OSError, ValueError, TypeError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
