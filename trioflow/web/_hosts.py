"""The ``Host`` allow-list that keeps DNS rebinding out: :class:`HostAllowList`.

A web page at ``http://rebind.evil:8080`` whose name its owner then points
at ``127.0.0.1`` is, to the visitor's browser, still the origin
``rebind.evil:8080``: it may ``POST`` to it, open WebSockets and read the
answers, and they reach a server listening on the loopback interface. What
such a request cannot hide is its ``Host`` header, which names
``rebind.evil``. So the server answers only requests whose ``Host`` names
it (:attr:`~trioflow.web.WebConfig.allowed_hosts`, and by default the
loopback names and the bound address), and judges an ``Origin`` to be its
own only when the ``Host`` it equals is one of those names.

An entry is a host name or an IP address (IPv6 in brackets or bare), with or
without a port: ``agents.example.com`` matches that name with any port,
``agents.example.com:8443`` only that port, ``*`` any ``Host`` at all.
Names compare without regard to case and to a trailing dot.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

__all__ = [
    "ANY_HOST",
    "LOOPBACK_NAMES",
    "HostAllowList",
    "is_loopback",
    "is_wildcard",
    "parse_host",
]

ANY_HOST = "*"
"""The allow-list entry that accepts any ``Host`` (no protection against DNS rebinding)."""

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
"""The names of the loopback interface, allowed (with any port) whenever the
server is bound to a loopback or a wildcard address."""

_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,252})|\[[0-9a-f:.]{2,45}(?:%[a-z0-9_.-]+)?\]")


def parse_host(value: str) -> tuple[str, int | None] | None:
    """Split a ``Host`` header value (or an allow-list entry) into its name and port.

    The name is lower case, without a trailing dot, an IPv6 address in
    brackets (a bare one is accepted and bracketed).

    Returns:
        ``(name, port)`` with ``port`` ``None`` when absent, or ``None`` when
        ``value`` is not a well-formed host (an empty name, a bad port,
        characters no host name has: white space, ``/``, ``@``, control
        characters...).
    """
    if not value.isascii():
        return None
    text = value.lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        name, rest = text[: end + 1], text[end + 1 :]
    elif text.count(":") > 1:
        name, rest = f"[{text}]", ""
    else:
        name, colon, port = text.partition(":")
        rest = colon + port
    number: int | None = None
    if rest:
        digits = rest[1:]
        if rest[0] != ":" or not digits.isdigit() or len(digits) > 5 or int(digits) > 65535:
            return None
        number = int(digits)
    if not name.startswith("["):
        name = name.removesuffix(".")
    if _NAME.fullmatch(name) is None:
        return None
    return name, number


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface (``0.0.0.0``, ``::``, ``""``)."""
    address = _address(host)
    return host == "" or (address is not None and address.is_unspecified)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    address = _address(host)
    return host.lower().rstrip(".") == "localhost" or (address is not None and address.is_loopback)


class HostAllowList:
    """The ``Host`` values a server answers to.

    Args:
        entries: allow-list entries (see the module documentation); ``"*"``
            among them allows any ``Host``.

    Raises:
        ValueError: an entry is not a host name or address with an optional port.
    """

    __slots__ = ("_any", "_entries")

    def __init__(self, entries: Iterable[str]) -> None:
        self._any = False
        self._entries: set[tuple[str, int | None]] = set()
        for entry in entries:
            if entry == ANY_HOST:
                self._any = True
                continue
            parsed = parse_host(entry) if isinstance(entry, str) else None
            if parsed is None:
                raise ValueError(
                    f"{entry!r} is not a host name or address with an optional port "
                    "(such as 'agents.example.com' or 'agents.example.com:8443')"
                )
            self._entries.add(parsed)

    @property
    def any(self) -> bool:
        """Whether every ``Host`` is allowed (the list holds ``"*"``)."""
        return self._any

    def allows(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header value (``None``: none) is for this server."""
        if self._any:
            return True
        if host is None:
            return False
        parsed = parse_host(host)
        if parsed is None:
            return False
        name, port = parsed
        return (name, None) in self._entries or (port is not None and parsed in self._entries)

    def __repr__(self) -> str:
        names = sorted(f"{n}:{p}" if p is not None else n for n, p in self._entries)
        return f"HostAllowList({[*names, *([ANY_HOST] if self._any else [])]!r})"
