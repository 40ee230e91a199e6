"""The SSE codec (:mod:`trioflow.sse`) and the shared protocol names (:mod:`trioflow.protocol`)."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st

from trioflow import FlowEvent
from trioflow.protocol import (
    ERROR_EVENT,
    RENAMED_EVENTS,
    encode_error,
    encode_event,
    error_info,
    event_name,
)
from trioflow.sse import (
    BOM,
    ServerSentEvent,
    SSEDecoder,
    SSELineDecoder,
    encode,
    event_frame,
    parse_line,
)

# -- encoding -------------------------------------------------------------------


def test_encode_writes_the_fields_in_order_with_one_space() -> None:
    assert encode('{"a":1}', event="tick", id=7) == 'id: 7\nevent: tick\ndata: {"a":1}\n\n'
    assert encode("x") == "data: x\n\n"
    assert encode("") == "data: \n\n"
    assert encode(retry=3000) == "retry: 3000\n\n"
    assert encode(comment="keepalive") == ": keepalive\n\n"
    assert encode(comment="two\nlines") == ": two\n: lines\n\n"
    assert encode(comment="") == ":\n\n"
    assert encode("d", event="e", id="i", retry=5, comment="c") == (
        ": c\nretry: 5\nid: i\nevent: e\ndata: d\n\n"
    )


def test_encode_splits_data_at_every_line_break() -> None:
    assert encode("a\nb\r\nc\rd") == "data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert encode("\n") == "data: \ndata: \n\n"
    assert encode("end\n") == "data: end\ndata: \n\n"


@given(
    id=st.integers(0, 2**53),
    event=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1),
    data=st.text(st.characters(blacklist_categories=("Cs", "Cc"))),
)
def test_event_frame_is_encode_without_the_checks(id: int, event: str, data: str) -> None:
    assert event_frame(id, event, data) == encode(data, event=event, id=id)


@pytest.mark.parametrize(
    "kwargs",
    [{"event": "a\nb"}, {"event": "a\rb"}, {"id": "1\n"}, {"id": "a\0b"}, {"retry": -1}],
)
def test_encode_refuses_values_that_would_break_the_frame(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SSE"):
        encode("x", **kwargs)  # type: ignore[arg-type]


# -- decoding: the spec's rules ------------------------------------------------


def feed_bytewise(decoder: SSEDecoder, body: bytes) -> list[ServerSentEvent]:
    events = [e for i in range(len(body)) for e in decoder.feed(body[i : i + 1])]
    return events + decoder.close()


def test_decoder_follows_the_event_stream_spec() -> None:
    body = (
        BOM + b"retry: 250\r\n"
        b": a comment\r\n\r\n"
        b"id: 7\revent: a\rdata: one\rdata:two\r\r"
        b"data: no id here\nunknown: field\n\n"
        b"id: 8\n\n"
        b"retry: soon\nevent: b\ndata\n\n"
        b"id: bad\0id\ndata:  two spaces\n\n"
        b"data: cut off at the end"
    )
    for decoder, got in [
        (d := SSEDecoder(), feed_bytewise(d, body)),
        (d2 := SSEDecoder(), d2.feed(body) + d2.close()),
    ]:
        assert [(e.event, e.data, e.id) for e in got] == [
            ("a", "one\ntwo", "7"),
            ("message", "no id here", "7"),
            ("b", "", "8"),
            ("message", " two spaces", "8"),
        ]
        assert decoder.retry == 250
        assert decoder.last_event_id == "8"


def test_a_final_cr_ends_the_last_line_at_the_end_of_the_body() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\r") == []  # the last CR might be half a CRLF
    assert decoder.close() == [ServerSentEvent("message", "x", "")]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r") == []
    assert decoder.close() == []  # no blank line: not dispatched


def test_a_bom_is_skipped_only_at_the_start_even_when_split() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(BOM[:1]) == []
    assert decoder.feed(BOM[1:2]) == []
    assert decoder.feed(BOM[2:] + b"data: a\n\n") == [ServerSentEvent("message", "a", "")]
    assert decoder.feed(BOM + b"data: b\n\n") == []  # a field named "\ufeffdata": ignored


def test_decoding_errors_replace_or_raise() -> None:
    assert SSEDecoder().feed(b"data: \xff\n\n") == [ServerSentEvent("message", "\ufffd", "")]
    strict = SSEDecoder(errors="strict")
    assert strict.feed(b"data: \xe2\x82") == []  # a character split between chunks is fine
    assert strict.feed(b"\xac\n\n") == [ServerSentEvent("message", "\u20ac", "")]
    with pytest.raises(UnicodeDecodeError):
        strict.feed(b"data: \xff\n\n")


def test_line_decoder_and_parse_line() -> None:
    lines = SSELineDecoder()
    assert lines.feed(b": hi\r\nid: 1\rdata") == [": hi", "id: 1"]
    assert lines.pending
    assert lines.feed(b":x\n\n") == ["data:x", ""]
    assert not lines.pending
    assert [parse_line(line) for line in [": hi", "id: 1", "data:x", "data", "a:b: c"]] == [
        ("", "hi"),
        ("id", "1"),
        ("data", "x"),
        ("data", ""),
        ("a", "b: c"),
    ]


# -- round trips, at any chunk boundary, against httpx-sse as an oracle ----------

# Text without surrogates (not encodable) and without NUL (ids drop it).
texts = st.text(st.characters(blacklist_categories=("Cs",)))
names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1
)
ids = st.one_of(
    st.none(),
    st.integers(0, 2**53),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0")),
)
frames = st.tuples(texts, st.one_of(st.none(), names), ids)


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def expected(sent: list[tuple[str, str | None, str | int | None]]) -> list[ServerSentEvent]:
    out = []
    last_id = ""
    for data, event, id in sent:
        if id is not None:
            last_id = str(id)
        normalised = data.replace("\r\n", "\n").replace("\r", "\n")
        out.append(ServerSentEvent(event if event else "message", normalised, last_id))
    return out


def oracle(chunks: list[bytes]) -> list[tuple[str, str, str]]:
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=iter(chunks)
    )
    return [(e.event, e.data, e.id) for e in EventSource(response).iter_sse()]


@settings(max_examples=300)
@given(
    sent=st.lists(frames, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    retry=st.one_of(st.none(), st.integers(0, 10**6)),
    comment=st.one_of(st.none(), texts),
)
def test_encode_then_decode_round_trips_at_any_chunk_boundary(
    sent: list[tuple[str, str | None, str | int | None]],
    cuts: list[int],
    retry: int | None,
    comment: str | None,
) -> None:
    head = encode(retry=retry, comment=comment) if retry is not None or comment is not None else ""
    body = (head + "".join(encode(d, event=e, id=i) for d, e, i in sent)).encode()
    chunks = split(body, cuts)
    decoder = SSEDecoder(errors="strict")
    decoded = [e for c in chunks for e in decoder.feed(c)] + decoder.close()
    assert decoded == expected(sent)
    assert decoder.retry == retry
    # httpx-sse reads the same events (without the head: unlike the spec, it
    # also reports a frame without data).
    frames_only = "".join(encode(d, event=e, id=i) for d, e, i in sent).encode()
    assert oracle(split(frames_only, cuts)) == [(e.event, e.data, e.id) for e in decoded]


@given(events=st.lists(st.tuples(names, texts), max_size=5), cuts=st.lists(st.integers()))
def test_events_in_any_line_ending_decode_the_same(
    events: list[tuple[str, str]], cuts: list[int]
) -> None:
    lf = "".join(encode(d, event=e) for e, d in events)
    results = []
    for newline in ["\n", "\r\n", "\r"]:
        body = lf.replace("\n", newline).encode()
        decoder = SSEDecoder()
        results.append([e for c in split(body, cuts) for e in decoder.feed(c)] + decoder.close())
    assert results[0] == results[1] == results[2] == expected([(d, e, None) for e, d in events])


# -- the protocol ---------------------------------------------------------------


def test_events_go_out_under_their_protocol_name() -> None:
    token = FlowEvent("token.received", {"token": "a\nb"}, 1.0, 3, "r")
    assert (
        encode_event(token)
        == token.to_sse()
        == (f"id: 3\nevent: token.received\ndata: {token.to_json()}\n\n")
    )
    for type, name in RENAMED_EVENTS.items():
        event = FlowEvent(type, {}, 1.0, 4, "r")
        assert event_name(type) == name
        assert encode_event(event) == f"id: 4\nevent: {name}\ndata: {event.to_json()}\n\n"
        (decoded,) = SSEDecoder().feed(encode_event(event).encode())
        assert FlowEvent.from_json(decoded.data) == event


def test_error_frames_have_no_id() -> None:
    frame = encode_error("evicted", "behind", last_seq=3)
    assert (
        frame
        == f'event: {ERROR_EVENT}\ndata: {{"code":"evicted","message":"behind","last_seq":3}}\n\n'
    )
    (decoded,) = SSEDecoder().feed(frame.encode())
    assert decoded.id == ""
    assert json.loads(decoded.data) == {"code": "evicted", "message": "behind", "last_seq": 3}


def test_error_info_is_the_one_error_shape() -> None:
    assert error_info(ValueError("bad")) == {"type": "ValueError", "message": "bad"}
    assert error_info("plain") == {"type": "Error", "message": "plain"}
    event = FlowEvent.create("x", {"e": KeyError("k")})
    assert json.loads(event.to_json())["data"]["e"] == error_info(KeyError("k"))
