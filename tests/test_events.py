from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Self

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given
from hypothesis import strategies as st

from trioflow import TERMINAL_TYPES, EventType, FlowEvent
from trioflow.events import validate_event_type

PHP_TYPES = [
    "flow.started", "flow.completed", "flow.failed", "flow.paused", "flow.resumed",
    "token.received", "token.chunk", "iteration.started", "iteration.completed",
    "iteration.failed", "tool.started", "tool.completed", "tool.failed", "progress.update",
    "step.started", "step.completed", "add_message", "remove_message", "vertex.started",
    "end_vertex", "vertices_sorted", "build_start", "build_end", "error", "warning", "info",
]  # fmt: skip


TRIOFLOW_TYPES = {
    "flow.cancelled",
    "tool.progress",
    "tool.approval_required",
    "tool.approved",
    "tool.denied",
    "tool.input_delta",
}


def test_event_type_has_every_php_value_plus_trioflows_own():
    values = {t.value for t in EventType}
    assert values == set(PHP_TYPES) | TRIOFLOW_TYPES
    assert EventType.TOKEN_RECEIVED == "token.received"


def test_flow_event_is_immutable():
    event = FlowEvent.token("hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 3  # type: ignore[misc]


def test_factories_build_expected_types_and_data():
    assert FlowEvent.flow_started("task").type == "flow.started"
    assert FlowEvent.flow_completed("out").data["output"] == "out"
    failed = FlowEvent.flow_failed(ValueError("boom"))
    assert failed.data["error"] == {"type": "ValueError", "message": "boom"}
    assert FlowEvent.token("x").data == {"token": "x"}
    assert FlowEvent.iteration_started(2).data == {"iteration": 2}
    assert FlowEvent.iteration_completed(2).type == "iteration.completed"
    assert FlowEvent.tool_started("calc", {"a": 1}).data == {"tool": "calc", "input": {"a": 1}}
    assert FlowEvent.tool_completed("calc", 3).data == {"tool": "calc", "result": 3}
    assert FlowEvent.tool_failed("calc", "bad").data["error"]["message"] == "bad"
    progress = FlowEvent.progress(50.0, current=1, total=2)
    assert progress.data == {"percent": 50.0, "current": 1, "total": 2}
    assert FlowEvent.error("oops").data == {"message": "oops"}
    assert FlowEvent.flow_cancelled("timeout").data == {"reason": "timeout"}
    assert FlowEvent.token("x", run_id="r1").run_id == "r1"


def test_unsequenced_events_have_seq_zero():
    assert FlowEvent.token("x").seq == 0


def test_predicates():
    assert FlowEvent.token("x").is_token()
    assert FlowEvent.token_chunk("xy", 2).is_token()
    assert FlowEvent.flow_started().is_flow_event()
    assert FlowEvent.error("e").is_error()
    assert FlowEvent.tool_failed("t", "e").is_error()
    assert FlowEvent.create("trade.failed").is_error()
    assert not FlowEvent.token("x").is_error()
    assert FlowEvent.progress(1).is_progress()
    assert FlowEvent.tool_started("t", {}).is_tool_event()
    for t in TERMINAL_TYPES:
        assert FlowEvent.create(t).is_terminal()
    assert not FlowEvent.flow_started().is_terminal()


def test_custom_string_type_is_accepted():
    event = FlowEvent.create("trade.executed", {"symbol": "ACME"})
    assert event.type == "trade.executed"
    assert event.to_dict()["type"] == "trade.executed"


class TradeEvent(FlowEvent):
    TRADE_EXECUTED: ClassVar[str] = "trade.executed"

    @classmethod
    def trade_executed(cls, symbol: str, qty: int) -> Self:
        return cls.create(cls.TRADE_EXECUTED, {"symbol": symbol, "qty": qty})


def test_subclass_with_constants_and_factories():
    event = TradeEvent.trade_executed("ACME", 3)
    assert isinstance(event, TradeEvent)
    assert event.type == "trade.executed"
    assert TradeEvent.from_dict(event.to_dict()) == event
    assert isinstance(TradeEvent.from_dict(event.to_dict()), TradeEvent)


@pytest.mark.parametrize("bad", ["", "has space", "new\nline", "tab\t", "x" * 201, "nul\x00"])
def test_invalid_event_types_are_rejected(bad: str):
    with pytest.raises(ValueError, match="invalid event type"):
        FlowEvent.create(bad)


def test_non_string_type_is_a_type_error():
    with pytest.raises(TypeError):
        validate_event_type(3)  # type: ignore[arg-type]


def test_to_dict_shape():
    event = FlowEvent("token.received", {"token": "a"}, 12.5, 7, "run-1")
    assert event.to_dict() == {
        "id": 7,
        "run_id": "run-1",
        "type": "token.received",
        "data": {"token": "a"},
        "timestamp": 12.5,
    }
    assert json.loads(event.to_json()) == event.to_dict()


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({}, "'type'"),
        ({"type": 3}, "'type'"),
        ({"type": "bad type"}, "'type'"),
        ({"type": "x", "data": [1]}, "'data'"),
        ({"type": "x", "id": -1}, "'id'"),
        ({"type": "x", "id": "1"}, "'id'"),
        ({"type": "x", "timestamp": "now"}, "'timestamp'"),
        ({"type": "x", "run_id": 5}, "'run_id'"),
    ],
)
def test_from_dict_names_the_bad_field(obj: dict[str, Any], field: str):
    with pytest.raises(ValueError, match=field):
        FlowEvent.from_dict(obj)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="JSON object"):
        FlowEvent.from_dict([1, 2])  # type: ignore[arg-type]


def test_from_json_reports_invalid_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        FlowEvent.from_json("{nope")


def test_to_json_encodes_non_json_values_safely():
    event = FlowEvent.create("x", {"s": {1, 2}, "t": (1, 2), "e": ValueError("v")})
    data = json.loads(event.to_json())["data"]
    assert sorted(data["s"]) == [1, 2]
    assert data["t"] == [1, 2]
    assert data["e"] == {"type": "ValueError", "message": "v"}


def parse_sse(text: str) -> list[Any]:
    """The events of ``text`` as httpx-sse (an independent parser) reads them."""
    headers = {"content-type": "text/event-stream"}
    return list(EventSource(httpx.Response(200, headers=headers, content=text.encode())).iter_sse())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@given(
    data=st.dictionaries(st.text(), json_values, max_size=5),
    seq=st.integers(min_value=0, max_value=2**53),
    run_id=st.none() | st.text(),
    etype=st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,10}){0,2}", fullmatch=True),
)
def test_sse_frame_round_trips_through_an_independent_parser(
    data: dict[str, Any], seq: int, run_id: str | None, etype: str
):
    event = FlowEvent(etype, data, 1.5, seq, run_id)
    frame = event.to_sse()
    parsed = parse_sse(frame + frame)
    assert len(parsed) == 2
    for sse in parsed:
        assert sse.event == etype
        assert sse.id == str(seq)
        assert FlowEvent.from_json(sse.data) == event


def test_sse_frame_survives_multiline_and_control_characters():
    event = FlowEvent("token.received", {"token": "a\nb\r\nc\rd\x00\u2028\U0001f600"}, 1.0, 3)
    frame = event.to_sse()
    assert frame.count("\n\n") == 1 and frame.endswith("\n\n")
    (sse,) = parse_sse(frame)
    assert FlowEvent.from_json(sse.data).data["token"] == "a\nb\r\nc\rd\x00\u2028\U0001f600"
