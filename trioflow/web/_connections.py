"""The server's connections: a write timeout on each, a cap on how many, and a forced close.

:func:`~trioflow.web.serve` wraps every accepted TCP connection in a
:class:`GuardedStream`, registered in the server's :class:`Connections`, and
serves it (an event stream, :mod:`trioflow.web._direct`) or hands it to
Hypercorn (everything else, with the bytes already read pushed back in front
by :meth:`GuardedStream.unread`) as that:

* **Write timeout.** A write that makes no progress for
  :attr:`~trioflow.web.WebConfig.write_timeout` seconds (the peer's receive
  window stays shut: it stopped reading, or the connection is half-open)
  closes the connection and raises :exc:`trio.BrokenResourceError` to the
  writer. Hypercorn writes under a shielded cancel scope with no timeout of
  its own, so without this one such peer could hold a shutdown forever.
* **Forced close.** :meth:`Connections.close_all` shuts every connection
  down at once, from outside, whatever it is doing: a task blocked writing
  to or reading from it (shielded or not) gets
  :exc:`trio.ClosedResourceError` immediately. This is how a shutdown ends
  on time.
* **The cap.** :meth:`Connections.full` says when
  :attr:`~trioflow.web.WebConfig.max_connections` are open; the server then
  answers new connections itself with a short ``503`` (see
  :func:`~trioflow.web._server.serve`), and logs one warning until there is
  room again.
"""

from __future__ import annotations

import logging
import socket as _socket

import trio

__all__ = ["Connections", "GuardedStream"]

_log = logging.getLogger("trioflow.web")


class GuardedStream(trio.abc.HalfCloseableStream):
    """A TCP connection with a write timeout, that its :class:`Connections` can close by force.

    It has the interface Hypercorn's connection server uses (``socket``,
    ``send_all``, ``receive_some``, ``send_eof``, ``aclose``). Made by
    :meth:`Connections.guard`.
    """

    def __init__(self, stream: trio.SocketStream, registry: Connections) -> None:
        self._stream = stream
        self._registry = registry
        self._aborted = False
        self._unread = b""

    @property
    def socket(self) -> trio.socket.SocketType:
        """The connection's Trio socket."""
        return self._stream.socket

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, closing the connection if the peer takes nothing for the write timeout.

        Raises:
            trio.BrokenResourceError: the peer is gone, or took nothing for
                the write timeout (the connection is then closed).
            trio.ClosedResourceError: the connection was closed (by force).
        """
        if self._aborted:
            raise trio.ClosedResourceError("the connection was closed by the server")
        sock = self._stream.socket
        timeout = self._registry.write_timeout
        with memoryview(data) as view:
            if not view:
                await trio.lowlevel.checkpoint()
                return
            sent = 0
            while sent < len(view):
                with trio.move_on_after(timeout) as scope:
                    try:
                        sent += await sock.send(view[sent:])
                    except trio.ClosedResourceError:
                        raise
                    except OSError as exc:
                        if self._aborted:
                            raise trio.ClosedResourceError(
                                "the connection was closed by the server"
                            ) from None
                        raise trio.BrokenResourceError(str(exc)) from exc
                if scope.cancelled_caught:
                    self._registry.log_write_timeout(self)
                    self.abort()
                    raise trio.BrokenResourceError(
                        f"the peer took nothing for {timeout:g} s (write timeout)"
                    )

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until a :meth:`send_all` might not block."""
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive what the peer sent (``b""`` at its end of file).

        Raises:
            trio.BrokenResourceError: the peer reset the connection.
            trio.ClosedResourceError: the connection was closed (by force).
        """
        if self._unread:
            if self._aborted:
                raise trio.ClosedResourceError("the connection was closed by the server")
            size = len(self._unread) if max_bytes is None else max_bytes
            data, self._unread = self._unread[:size], self._unread[size:]
            await trio.lowlevel.checkpoint()
            return data
        try:
            return bytes(await self._stream.receive_some(max_bytes))
        except trio.BrokenResourceError:
            if self._aborted:
                raise trio.ClosedResourceError("the connection was closed by the server") from None
            raise

    def unread(self, data: bytes) -> None:
        """Push ``data`` back: :meth:`receive_some` returns it first.

        How the server hands Hypercorn a connection whose first request head
        it has read itself.
        """
        self._unread = data + self._unread

    async def send_eof(self) -> None:
        """Shut the sending side down (the peer reads end of file)."""
        await self._stream.send_eof()

    def abort(self) -> None:
        """Close the connection now: every task using it gets :exc:`trio.ClosedResourceError`.

        The TCP connection is shut down both ways first, so the peer sees it
        end even where another descriptor still refers to the socket.
        """
        if self._aborted:
            return
        self._aborted = True
        sock = self._stream.socket
        try:
            sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        sock.close()  # wakes every task waiting on it with ClosedResourceError
        self._registry.discard(self)

    async def aclose(self) -> None:
        """Close the connection (it leaves its registry)."""
        self._registry.discard(self)
        await self._stream.aclose()


class Connections:
    """The open connections of one server: their cap, write timeout and forced close.

    Args:
        max_connections: how many may be open at once (:meth:`full` beyond).
        write_timeout: seconds a write may make no progress before its
            connection is closed.
    """

    def __init__(self, *, max_connections: int, write_timeout: float) -> None:
        self.max_connections = max_connections
        self.write_timeout = write_timeout
        self._open: set[GuardedStream] = set()
        self._empty = trio.Event()
        self._empty.set()
        self._refusing = False

    def __len__(self) -> int:
        return len(self._open)

    def full(self) -> bool:
        """Whether ``max_connections`` connections are open."""
        return len(self._open) >= self.max_connections

    def guard(self, stream: trio.SocketStream) -> GuardedStream:
        """Register ``stream`` and return it guarded."""
        guarded = GuardedStream(stream, self)
        if not self._open:
            self._empty = trio.Event()
        self._open.add(guarded)
        return guarded

    def discard(self, stream: GuardedStream) -> None:
        """Forget ``stream`` (closed); nothing if it was not registered."""
        if stream in self._open:
            self._open.discard(stream)
            if not self._open:
                self._empty.set()
            if self._refusing and len(self._open) < self.max_connections:
                self._refusing = False
                _log.warning("below the connection limit again: accepting connections")

    def refusing(self) -> None:
        """A connection is being refused for the cap: log it, once until there is room again."""
        if not self._refusing:
            self._refusing = True
            _log.warning(
                "%d connections are open, the limit (max_connections): "
                "new connections are answered 503 until some close",
                len(self._open),
            )

    def log_write_timeout(self, stream: GuardedStream) -> None:
        """Log a connection closed for its write timeout."""
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = "?"
        _log.info(
            "closing the connection from %s: it took nothing for %g s", peer, self.write_timeout
        )

    async def wait_empty(self) -> None:
        """Wait until no connection is open."""
        await self._empty.wait()

    def close_all(self) -> int:
        """Close every open connection by force (:meth:`GuardedStream.abort`); return how many."""
        streams = list(self._open)
        for stream in streams:
            stream.abort()
        return len(streams)
