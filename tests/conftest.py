"""Shared fixtures. Request ``autojump_clock`` to run a test on a MockClock that
jumps ahead whenever every task is blocked (timeouts and backoff become exact)."""

from __future__ import annotations

import pytest
import trio
import trio.testing


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)
