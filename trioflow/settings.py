"""Settings: the configuration of trioflow, from environment variables and keywords.

:class:`Settings` is a frozen record of everything the command line tools
and the default services read: the model, whether an Anthropic API key is
present, the server's host, port, token and TLS files, buffer and history sizes, the
run limits, the cache and the metrics switch. Build it from the
environment with :meth:`Settings.from_env` (keywords override variables) or
directly with keywords::

    settings = Settings.from_env()                  # TRIOFLOW_* variables
    settings = Settings.from_env(port=0)            # a variable overridden
    settings = Settings(host="0.0.0.0", port=8080)  # no environment at all

Every value is checked; a bad one raises :class:`SettingsError`, which names
the variable (or keyword) and the value at fault, except for secrets, whose
value is never echoed. The API key itself is never read into the record:
only its presence (:attr:`Settings.has_api_key`). The server token is kept
(the server needs it) but hidden from ``repr`` and :meth:`Settings.to_dict`.

=============================  =====================  ==============
variable                       field                  default
=============================  =====================  ==============
``TRIOFLOW_MODEL``             ``model``              automatic
``ANTHROPIC_API_KEY``          ``has_api_key``        absent
``TRIOFLOW_HOST``              ``host``               ``127.0.0.1``
``TRIOFLOW_PORT``              ``port``               ``8080``
``TRIOFLOW_TOKEN``             ``token``              none
``TRIOFLOW_CERTFILE``          ``certfile``           none
``TRIOFLOW_KEYFILE``           ``keyfile``            none
``TRIOFLOW_HISTORY_SIZE``      ``history_size``       ``1024``
``TRIOFLOW_BUFFER_SIZE``       ``buffer_size``        ``256``
``TRIOFLOW_KEEPALIVE``         ``keepalive``          ``15`` s
``TRIOFLOW_MAX_ITERATIONS``    ``max_iterations``     ``10``
``TRIOFLOW_TIMEOUT``           ``timeout``            none
``TRIOFLOW_LOG_LEVEL``         ``log_level``          ``INFO``
``TRIOFLOW_CACHE_SIZE``        ``cache_size``         ``1024``
``TRIOFLOW_CACHE_TTL``         ``cache_ttl``          ``300`` s
``TRIOFLOW_METRICS``           ``metrics``            off
``TRIOFLOW_TELEMETRY``         ``telemetry``          on
=============================  =====================  ==============

An empty variable counts as unset.

The OpenAI-compatible model (``TRIOFLOW_MODEL=openai:NAME``, see
:class:`~trioflow.models.OpenAIModel`) reads its own two variables when it is
opened, and the record holds neither: ``OPENAI_API_KEY`` (the key) and
``TRIOFLOW_OPENAI_BASE_URL`` (the server, e.g. ``http://localhost:11434/v1``
for Ollama; OpenAI's when unset).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ENVIRONMENT_VARIABLES", "LOG_LEVELS", "Settings", "SettingsError", "check_token"]

LOG_LEVELS: frozenset[str] = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
"""The accepted values of ``log_level`` (case-insensitive on input)."""

ENVIRONMENT_VARIABLES: Mapping[str, str] = {
    "model": "TRIOFLOW_MODEL",
    "has_api_key": "ANTHROPIC_API_KEY",
    "host": "TRIOFLOW_HOST",
    "port": "TRIOFLOW_PORT",
    "token": "TRIOFLOW_TOKEN",
    "certfile": "TRIOFLOW_CERTFILE",
    "keyfile": "TRIOFLOW_KEYFILE",
    "history_size": "TRIOFLOW_HISTORY_SIZE",
    "buffer_size": "TRIOFLOW_BUFFER_SIZE",
    "keepalive": "TRIOFLOW_KEEPALIVE",
    "max_iterations": "TRIOFLOW_MAX_ITERATIONS",
    "timeout": "TRIOFLOW_TIMEOUT",
    "log_level": "TRIOFLOW_LOG_LEVEL",
    "cache_size": "TRIOFLOW_CACHE_SIZE",
    "cache_ttl": "TRIOFLOW_CACHE_TTL",
    "metrics": "TRIOFLOW_METRICS",
    "telemetry": "TRIOFLOW_TELEMETRY",
}
"""Each field of :class:`Settings` and the environment variable it is read from."""

_REDACTED = "***"
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,199}")
_HOST_RE = re.compile(r"[A-Za-z0-9._:\[\]%-]{1,253}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{8,4096}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SettingsError(ValueError):
    """A setting has a bad value.

    The message names the environment variable (when the value came from
    the environment) or the keyword, and the bad value, except for secrets
    (``TRIOFLOW_TOKEN``), whose value is never shown.

    Attributes:
        name: the variable or keyword at fault (``"TRIOFLOW_PORT"``, ``"port"``).
        value: the bad value, or ``None`` for a secret.
    """

    def __init__(self, name: str, value: object, expected: str, *, secret: bool = False) -> None:
        shown = "(value hidden)" if secret else f"not {value!r}"
        super().__init__(f"{name} must be {expected}, {shown}")
        self.name = name
        self.value = None if secret else value


# -- checks: each returns the normalised value or raises SettingsError --------------


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        ok = False
    else:
        ok = maximum is None or value <= maximum
    if not ok:
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise SettingsError(name, value, f"an integer {bounds}")
    assert isinstance(value, int)
    return value


def _check_seconds(name: str, value: object, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        expected = "a positive, finite number of seconds"
        raise SettingsError(name, value, expected + (" or unset" if optional else ""))
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(name, value, "a boolean (1/0, true/false, yes/no, on/off)")
    return value


def _check_model(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or _MODEL_RE.fullmatch(value) is None:
        raise SettingsError(
            name,
            value,
            "a model name such as 'scripted', 'claude', 'claude-...' or 'openai:NAME' (or unset)",
        )
    return value


def _check_host(name: str, value: object) -> str:
    if not isinstance(value, str) or _HOST_RE.fullmatch(value) is None:
        raise SettingsError(name, value, "a host name or IP address")
    return value


def _check_path(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise SettingsError(name, value, "a file path (or unset)")
    return value


def check_token(name: str, value: object) -> str | None:
    """``value`` if it is a valid token (or ``None``): 8 to 4096 printable ASCII characters.

    Raises:
        SettingsError: it is not; the message names ``name``, never the value.
    """
    if value is None:
        return None
    if not isinstance(value, str) or _TOKEN_RE.fullmatch(value) is None:
        raise SettingsError(
            name,
            value,
            "8 to 4096 printable ASCII characters without white space (or unset)",
            secret=True,
        )
    return value


def _check_log_level(name: str, value: object) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise SettingsError(name, value, "one of " + ", ".join(sorted(LOG_LEVELS)))
    return value.upper()


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "model": _check_model,
    "has_api_key": _check_bool,
    "host": _check_host,
    "port": lambda n, v: _check_int(n, v, 0, 65535),
    "token": check_token,
    "certfile": _check_path,
    "keyfile": _check_path,
    "history_size": lambda n, v: _check_int(n, v, 0),
    "buffer_size": lambda n, v: _check_int(n, v, 1),
    "keepalive": lambda n, v: _check_seconds(n, v, optional=False),
    "max_iterations": lambda n, v: _check_int(n, v, 1),
    "timeout": lambda n, v: _check_seconds(n, v, optional=True),
    "log_level": _check_log_level,
    "cache_size": lambda n, v: _check_int(n, v, 1),
    "cache_ttl": lambda n, v: _check_seconds(n, v, optional=True),
    "metrics": _check_bool,
    "telemetry": _check_bool,
}


# -- parsing environment strings -------------------------------------------------------


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise SettingsError(name, text, "an integer") from None


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise SettingsError(name, text, "a number of seconds") from None


def _parse_optional_seconds(name: str, text: str) -> float | None:
    if text.strip().lower() in {"none", "off"}:
        return None
    return _parse_float(name, text)


def _parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingsError(name, text, "a boolean (1/0, true/false, yes/no, on/off)")


def _text(name: str, text: str) -> str:
    return text.strip()


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "model": _text,
    "host": _text,
    "port": _parse_int,
    "token": lambda n, t: t,  # kept verbatim: a secret is never "cleaned up"
    "certfile": _text,
    "keyfile": _text,
    "history_size": _parse_int,
    "buffer_size": _parse_int,
    "keepalive": _parse_float,
    "max_iterations": _parse_int,
    "timeout": _parse_optional_seconds,
    "log_level": _text,
    "cache_size": _parse_int,
    "cache_ttl": _parse_optional_seconds,
    "metrics": _parse_bool,
    "telemetry": _parse_bool,
}


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """trioflow's configuration: a frozen, validated record.

    Build it with :meth:`from_env` to read the environment, or with keywords.
    Every field is checked on construction (also by
    :func:`dataclasses.replace`).

    Raises:
        SettingsError: a field has a bad value; the message names it.
    """

    model: str | None = None
    """The model to use (``"scripted"``, ``"claude"``, ``"claude-..."``, ``"openai:NAME"``);
    ``None`` picks one automatically (see :attr:`model_name`)."""
    has_api_key: bool = False
    """Whether ``ANTHROPIC_API_KEY`` is set. The key itself is never stored."""
    host: str = "127.0.0.1"
    """The interface ``trioflow serve`` listens on."""
    port: int = 8080
    """The port ``trioflow serve`` listens on (0 for any free port)."""
    token: str | None = None
    """The bearer token the server asks clients for; ``None`` for none. A
    secret: hidden from ``repr`` and :meth:`to_dict`."""
    certfile: str | None = None
    """The PEM certificate chain ``trioflow serve`` speaks HTTPS with (with
    :attr:`keyfile`); ``None``: plain HTTP. Whether it exists and can be
    read is checked when the server is configured, not here."""
    keyfile: str | None = None
    """The private key of :attr:`certfile` (PEM, not encrypted)."""
    history_size: int = 1024
    """How many events a bus retains for replay and resumes."""
    buffer_size: int = 256
    """The bound of a subscriber's channel, in events."""
    keepalive: float = 15.0
    """Seconds between keep-alive frames on idle streams."""
    max_iterations: int = 10
    """The most model turns of a run."""
    timeout: float | None = None
    """A run's time limit in seconds; ``None`` for none."""
    log_level: str = "INFO"
    """The log level, upper case (one of :data:`LOG_LEVELS`)."""
    cache_size: int = 1024
    """The most entries the default cache holds."""
    cache_ttl: float | None = 300.0
    """Seconds an entry of the default cache lives; ``None`` for ever."""
    metrics: bool = False
    """Whether to collect metrics for a Prometheus ``/metrics`` endpoint."""
    telemetry: bool = True
    """Whether the default event bus reports runs to OpenTelemetry (when
    ``opentelemetry-api`` is installed; see :mod:`trioflow.services`)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _CHECKS[field.name](field.name, value)
            if checked is not value:
                object.__setattr__(self, field.name, checked)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read the settings from environment variables, then apply ``overrides``.

        Args:
            environ: where to read the variables (default: :data:`os.environ`).
            **overrides: field values that win over the environment, as
                Python values (``port=0``, ``timeout=None``).

        Returns:
            The validated settings.

        Raises:
            SettingsError: a variable or an override has a bad value; the
                message names the variable (``TRIOFLOW_PORT``) or the keyword.
            TypeError: an override is not a field of :class:`Settings`.
        """
        env = os.environ if environ is None else environ
        unknown = set(overrides) - set(_CHECKS)
        if unknown:
            raise TypeError(
                f"unknown setting{'s' if len(unknown) > 1 else ''}: "
                + ", ".join(sorted(unknown))
                + " (known: "
                + ", ".join(_CHECKS)
                + ")"
            )
        values: dict[str, Any] = {}
        for field, variable in ENVIRONMENT_VARIABLES.items():
            if field in overrides:
                continue
            text = env.get(variable)
            if field == "has_api_key":
                values[field] = bool(text and text.strip())
                continue
            if text is None or not text.strip():
                continue
            parsed = _PARSERS[field](variable, text)
            values[field] = _CHECKS[field](variable, parsed)
        values.update(overrides)
        return cls(**values)

    @property
    def model_name(self) -> str:
        """The model to use: :attr:`model`, else ``"claude"`` with an API key, else ``"scripted"``."""
        if self.model is not None:
            return self.model
        return "claude" if self.has_api_key else "scripted"

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-compatible dict, with the token redacted.

        Returns:
            Every field by name; ``token`` is ``"***"`` when set, else ``None``.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["token"] is not None:
            out["token"] = _REDACTED
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Settings({fields})"
