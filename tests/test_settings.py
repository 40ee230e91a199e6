from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from trioflow.settings import ENVIRONMENT_VARIABLES, Settings, SettingsError

SECRET_TOKEN = "s3cr3t-token-value"
SECRET_KEY = "sk-ant-very-secret-key"


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.token is None
    assert settings.has_api_key is False
    assert settings.model_name == "scripted"
    assert settings.timeout is None
    assert settings.log_level == "INFO"


def test_every_variable_is_read() -> None:
    env = {
        "TRIOFLOW_MODEL": "claude-sonnet-4-5",
        "ANTHROPIC_API_KEY": SECRET_KEY,
        "TRIOFLOW_HOST": "0.0.0.0",
        "TRIOFLOW_PORT": "8080",
        "TRIOFLOW_TOKEN": SECRET_TOKEN,
        "TRIOFLOW_CERTFILE": " /etc/trioflow/cert.pem ",
        "TRIOFLOW_KEYFILE": "/etc/trioflow/key.pem",
        "TRIOFLOW_HISTORY_SIZE": "50",
        "TRIOFLOW_BUFFER_SIZE": "16",
        "TRIOFLOW_KEEPALIVE": "2.5",
        "TRIOFLOW_MAX_ITERATIONS": "3",
        "TRIOFLOW_TIMEOUT": "30",
        "TRIOFLOW_LOG_LEVEL": "debug",
        "TRIOFLOW_CACHE_SIZE": "10",
        "TRIOFLOW_CACHE_TTL": "none",
        "TRIOFLOW_METRICS": "yes",
        "TRIOFLOW_TELEMETRY": "off",
    }
    assert set(env) == set(ENVIRONMENT_VARIABLES.values())
    settings = Settings.from_env(env)
    assert settings == Settings(
        model="claude-sonnet-4-5",
        has_api_key=True,
        host="0.0.0.0",
        port=8080,
        token=SECRET_TOKEN,
        certfile="/etc/trioflow/cert.pem",
        keyfile="/etc/trioflow/key.pem",
        history_size=50,
        buffer_size=16,
        keepalive=2.5,
        max_iterations=3,
        timeout=30.0,
        log_level="DEBUG",
        cache_size=10,
        cache_ttl=None,
        metrics=True,
        telemetry=False,
    )


def test_keyword_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"TRIOFLOW_PORT": "9000", "TRIOFLOW_HOST": "::1"}, port=0)
    assert settings.port == 0
    assert settings.host == "::1"


def test_an_override_skips_a_bad_variable() -> None:
    assert Settings.from_env({"TRIOFLOW_PORT": "nope"}, port=1).port == 1


def test_empty_variables_count_as_unset() -> None:
    assert Settings.from_env({"TRIOFLOW_PORT": "", "TRIOFLOW_TIMEOUT": "  "}) == Settings()


def test_the_api_key_is_only_a_presence_flag() -> None:
    settings = Settings.from_env({"ANTHROPIC_API_KEY": SECRET_KEY})
    assert settings.has_api_key is True
    assert settings.model_name == "claude"
    assert SECRET_KEY not in repr(settings)
    assert SECRET_KEY not in str(settings.to_dict())
    assert all(getattr(settings, f.name) != SECRET_KEY for f in dataclasses.fields(settings))


def test_the_token_is_hidden_from_repr_and_to_dict() -> None:
    settings = Settings(token=SECRET_TOKEN)
    assert settings.token == SECRET_TOKEN
    assert SECRET_TOKEN not in repr(settings)
    assert settings.to_dict()["token"] == "***"
    assert Settings().to_dict()["token"] is None


def test_to_dict_holds_every_field() -> None:
    data = Settings().to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(Settings)}
    assert data["port"] == 8080


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TRIOFLOW_PORT", "http", "TRIOFLOW_PORT must be an integer, not 'http'"),
        ("TRIOFLOW_PORT", "70000", "TRIOFLOW_PORT must be an integer from 0 to 65535, not 70000"),
        ("TRIOFLOW_PORT", "-1", "TRIOFLOW_PORT must be an integer from 0 to 65535, not -1"),
        ("TRIOFLOW_BUFFER_SIZE", "0", "TRIOFLOW_BUFFER_SIZE must be an integer >= 1, not 0"),
        ("TRIOFLOW_HISTORY_SIZE", "-5", "TRIOFLOW_HISTORY_SIZE must be an integer >= 0, not -5"),
        ("TRIOFLOW_MAX_ITERATIONS", "0", "TRIOFLOW_MAX_ITERATIONS must be an integer >= 1"),
        ("TRIOFLOW_TIMEOUT", "-3", "TRIOFLOW_TIMEOUT must be a positive, finite number"),
        ("TRIOFLOW_TIMEOUT", "inf", "TRIOFLOW_TIMEOUT must be a positive, finite number"),
        ("TRIOFLOW_KEEPALIVE", "soon", "TRIOFLOW_KEEPALIVE must be a number of seconds"),
        ("TRIOFLOW_LOG_LEVEL", "LOUD", "TRIOFLOW_LOG_LEVEL must be one of CRITICAL, DEBUG"),
        ("TRIOFLOW_METRICS", "maybe", "TRIOFLOW_METRICS must be a boolean"),
        ("TRIOFLOW_MODEL", "gpt 4", "TRIOFLOW_MODEL must be a model name"),
        ("TRIOFLOW_HOST", "my host", "TRIOFLOW_HOST must be a host name or IP address"),
    ],
)
def test_bad_variables_raise_SettingsError_naming_variable_and_value(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert str(info.value).startswith(expected)
    assert info.value.name == variable
    assert isinstance(info.value, ValueError)


def test_a_bad_token_is_reported_without_its_value() -> None:
    bad = "short tok"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TRIOFLOW_TOKEN": bad})
    assert info.value.name == "TRIOFLOW_TOKEN"
    assert bad not in str(info.value)
    assert "hidden" in str(info.value)
    assert info.value.value is None


def test_bad_keywords_raise_SettingsError_naming_the_keyword() -> None:
    with pytest.raises(SettingsError, match=r"^port must be an integer from 0 to 65535, not '80'"):
        Settings(port="80")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"^timeout must be"):
        Settings.from_env({}, timeout=0)
    with pytest.raises(SettingsError, match=r"^metrics must be a boolean"):
        Settings(metrics=1)  # type: ignore[arg-type]


def test_unknown_override_is_a_TypeError() -> None:
    with pytest.raises(TypeError, match="unknown setting: colour"):
        Settings.from_env({}, colour="blue")


def test_replace_validates_too() -> None:
    with pytest.raises(SettingsError, match=r"^buffer_size"):
        dataclasses.replace(Settings(), buffer_size=0)
    assert dataclasses.replace(Settings(), log_level="warning").log_level == "WARNING"


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


@given(port=st.integers(min_value=0, max_value=65535))
def test_any_valid_port_round_trips_through_the_environment(port: int) -> None:
    assert Settings.from_env({"TRIOFLOW_PORT": str(port)}).port == port


@given(token=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8))
def test_a_token_never_appears_in_repr(token: str) -> None:
    assume(token not in repr(Settings(token="********")))  # e.g. "127.0.0.1" is the host
    settings = Settings(token=token)
    assert token not in repr(settings)
    assert token not in str(settings.to_dict())
