"""Tool approvals across processes, against a real redis-server: a call waiting in a worker
(or on another node) is listed and decided from any serve node, over HTTP and from Python;
a decision is taken once whichever node takes it; a lost message is caught up."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import http_client, post_run

from trioflow import Agent, FlowEvent, ScriptedModel, Turn
from trioflow.approvals import ApprovalError
from trioflow.handle import RunStatus

pytest.importorskip("coredis")

from test_approvals import (  # the tool that asks, its log, and the fixture clearing it
    no_transfers,  # noqa: F401 (autouse)
    transfer,
    transfers,
)
from test_redis_nodes import executor_and_tail
from test_redis_serve import start_node

from trioflow.redis import (
    RedisRunStore,
    RemoteRun,
    listen_for_cancels,
    open_node_tail,
    open_redis,
    open_remote_run,
    open_worker,
    request_decision,
)

if TYPE_CHECKING:
    from conftest import OpenSSE

    from trioflow.requests import RunRequest


def bank(**options: Any) -> Agent:
    turns = [Turn(tool_calls=[("transfer", {"amount": 5, "to": "ann"})]), Turn(text="done")]
    return Agent(ScriptedModel(turns), tools=[transfer], **options)


def bank_factory(request: RunRequest) -> Agent:
    return bank()


async def until(run: RemoteRun, type: str, after: int = 0) -> FlowEvent:
    async with run.subscribe(after=after) as events:
        async for event in events:
            if event.type == type:
                return event
    raise AssertionError(f"no {type}")


async def test_a_call_waiting_in_a_worker_is_decided_over_http_on_another_node(
    redis_url: str, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, bank_factory, enqueue=True)
        b = await start_node(nursery, redis_url, bank_factory)
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            async with open_worker(
                store, agent_factory=bank_factory, reap_interval=None, name="w1"
            ) as worker:
                run_id = (await post_run(a.url, "pay ann")).json()["run_id"]
                async with open_sse(b.url, f"/runs/{run_id}/events") as stream:
                    while (frame := await stream.next()) is not None:
                        if frame.event == "tool.approval_required":
                            break
                    assert frame is not None
                    call_id = frame.json()["data"]["call_id"]
                    async with http_client(b) as http:
                        listed = (await http.get(f"/runs/{run_id}/approvals")).json()
                        assert [p["call_id"] for p in listed["approvals"]] == [call_id]
                        assert listed["approvals"][0]["input"] == {"amount": 5, "to": "ann"}
                        path = f"/runs/{run_id}/approvals/{call_id}"
                        bad = await http.post(path, json={"decision": "edit", "input": {"to": 1}})
                        assert bad.status_code == 400, bad.text
                        assert bad.json()["error"]["code"] == "invalid_input"
                        unknown = await http.post(
                            f"/runs/{run_id}/approvals/call_nope", json={"decision": "approve"}
                        )
                        assert unknown.status_code == 404
                        assert unknown.json()["error"]["code"] == "approval_not_found"
                        edit = {"decision": "edit", "input": {"amount": 7, "to": "bob"}}
                        done = await http.post(path, json=edit)
                        assert done.status_code == 200, done.text
                        assert done.json()["decision"] == "edit"
                        again = await http.post(path, json={"decision": "approve"})
                        assert again.status_code == 409
                        assert again.json()["error"]["code"] == "approval_decided"
                    frames = await stream.events()
                types = [f.event for f in frames]
                assert types[0] == "tool.approved" and frames[0].json()["data"]["edited"]
                assert types[-1] == "flow.completed"
                assert transfers == [(7, "bob")]  # run by the worker, with the edited input
                assert worker.statistics().completed == 1
                async with http_client(a) as http:  # nothing waits any more, anywhere
                    listed = (await http.get(f"/runs/{run_id}/approvals")).json()
                    assert listed["approvals"] == []


async def test_two_nodes_deciding_the_same_call_at_once_exactly_one_wins(redis_url: str) -> None:
    with trio.fail_after(20):
        async with (
            executor_and_tail(redis_url, flush_interval=0.002) as (executor, store_a, tail),
            open_redis(redis_url) as client_c,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(listen_for_cancels, store_a, executor)
            run = await executor.start(bank(), "pay")
            remote = await open_remote_run(tail.store, tail, run.run_id)
            asked = await until(remote, "tool.approval_required")
            call_id = asked.data["call_id"]
            await remote.refresh()
            assert [p.call_id for p in remote.pending_approvals()] == [call_id]
            assert remote.to_dict()["approvals"][0]["tool"] == "transfer"
            other = await open_remote_run(RedisRunStore(client_c), tail, run.run_id)
            outcomes: list[str] = []

            async def decide(node: RemoteRun, decision: str, reason: str | None = None) -> None:
                try:
                    await node.send_decision(call_id, decision, reason=reason)
                    outcomes.append(decision)
                except ApprovalError as exc:
                    outcomes.append("refused" if exc.decided else "unknown")

            async with trio.open_nursery() as racing:
                racing.start_soon(decide, remote, "deny", "not today")
                racing.start_soon(decide, other, "approve")
            assert sorted(outcomes)[-1] == "refused" and len(outcomes) == 2
            won = next(o for o in outcomes if o != "refused")
            result = await run.wait()
            assert result.status == RunStatus.COMPLETED
            async with run.subscribe(after=0) as events:
                types = [e.type async for e in events]
            assert ("tool.denied" in types) == (won == "deny")
            assert ("tool.approved" in types) == (won == "approve")
            assert transfers == ([] if won == "deny" else [(5, "ann")])
            with pytest.raises(ApprovalError) as late:
                await remote.send_decision(call_id, "approve")
            assert late.value.decided
            nursery.cancel_scope.cancel()


async def test_unknown_and_ended_calls_and_bad_decisions_are_refused(redis_url: str) -> None:
    with trio.fail_after(20):
        async with (
            executor_and_tail(redis_url, flush_interval=0.002) as (executor, store_a, tail),
            trio.open_nursery() as nursery,
        ):
            await nursery.start(listen_for_cancels, store_a, executor)
            run = await executor.start(bank(approval_timeout=0.3), "pay")
            remote = await open_remote_run(tail.store, tail, run.run_id)
            asked = await until(remote, "tool.approval_required")
            call_id = asked.data["call_id"]
            with pytest.raises(ApprovalError) as unknown:
                await request_decision(tail.store, run.run_id, "call_nope", "approve")
            assert not unknown.value.decided
            with pytest.raises(KeyError):
                await request_decision(tail.store, "run_nope", call_id, "approve")
            for bad in (
                {"decision": "maybe"},
                {"decision": "approve", "reason": "why"},
                {"decision": "edit"},
                {"decision": "deny", "input": {"amount": 1}},
            ):
                with pytest.raises(ValueError):
                    await request_decision(tail.store, run.run_id, call_id, **bad)
            denied = await until(remote, "tool.denied")  # the approval timeout
            assert denied.data["timed_out"]
            await run.wait()
            await remote.refresh()
            assert remote.pending_approvals() == []
            with pytest.raises(ApprovalError) as late:
                await request_decision(tail.store, run.run_id, call_id, "approve")
            assert late.value.decided
            assert transfers == []
            nursery.cancel_scope.cancel()


async def test_a_decision_whose_message_was_lost_is_caught_up_by_the_listener(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with executor_and_tail(redis_url, flush_interval=0.002) as (executor, store_a, tail):
            run = await executor.start(bank(), "pay")
            remote = await open_remote_run(tail.store, tail, run.run_id)
            asked = await until(remote, "tool.approval_required")
            # Nobody listens: the message is lost; the marker stays.
            await request_decision(tail.store, run.run_id, asked.data["call_id"], "approve")
            await trio.sleep(0.05)
            assert run.pending_approvals() != []
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda **kw: listen_for_cancels(store_a, executor, check_interval=0.05, **kw)
                )
                assert (await run.wait()).status == RunStatus.COMPLETED
                nursery.cancel_scope.cancel()
            assert transfers == [(5, "ann")]


async def test_a_worker_reads_a_decision_marker_at_its_heartbeat(redis_url: str) -> None:
    with trio.fail_after(20):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            from trioflow.redis import submit

            async with (
                open_node_tail(store) as tail,
                open_worker(
                    store, agent_factory=bank_factory, heartbeat=0.1, reap_interval=None
                ) as worker,
            ):
                run_id = await submit(store, {"task": "pay"})
                while True:  # until the call waits (the record's index says so)
                    record = await store.get(run_id)
                    if record.pending_approvals():
                        break
                    await trio.sleep(0.02)
                call_id = record.pending_approvals()[0].call_id
                # The marker alone, as if the message were lost on the way.
                body = {"run_id": run_id, "call_id": call_id, "decision": "deny", "reason": "no"}
                await client.hset(store.keys.run(run_id), {f"decision:{call_id}": json.dumps(body)})
                remote = RemoteRun(store, tail, await store.get(run_id))
                async with remote.subscribe(after=0) as stream:
                    events = [e async for e in stream]
                denied = next(e for e in events if e.type == "tool.denied")
                assert denied.data["reason"] == "no" and not denied.data["timed_out"]
                assert events[-1].type == "flow.completed"
                assert worker.statistics().completed == 1


async def test_the_index_takes_approval_events_only(redis_url: str) -> None:
    """Text that looks like an approval inside a token or a custom event's data is not indexed."""

    def event(seq: int, type: str, data: dict[str, Any], run_id: str) -> FlowEvent:
        return FlowEvent(type, data, 1.0, seq, run_id)

    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            run_id = (await store.create()).run_id
            epoch = await store.claim(run_id)
            asked = {"tool": "transfer", "call_id": "c1", "iteration": 1, "input": {"a": [1]}}
            async with store.open_history(run_id, epoch=epoch) as history:
                history.extend(
                    [
                        event(1, "token.received", {"token": '"type":"tool.denied","call_id":"x"'}, run_id),
                        event(2, "custom.x", {"type": "tool.approval_required", "call_id": "y"}, run_id),
                        event(3, "tool.approval_required", {**asked, "timeout": None}, run_id),
                        event(4, "tool.started", {"tool": "t", "call_id": "c2"}, run_id),
                        event(5, "tool.approval_required", {**asked, "call_id": "c3", "timeout": 5}, run_id),
                        event(6, "tool.denied", {"tool": "transfer", "call_id": "c3"}, run_id),
                    ]
                )  # fmt: skip
                await history.flush()
            record = await store.get(run_id)
            assert set(record.approvals) == {"c1", "c3"}
            assert record.decided == {"c3"}
            pending = record.pending_approvals()
            assert [(p.call_id, p.tool, p.input, p.timeout) for p in pending] == [
                ("c1", "transfer", {"a": [1]}, None)
            ]


async def test_a_new_attempt_forgets_the_calls_of_the_one_before(redis_url: str) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            run_id = (await store.create()).run_id
            epoch = await store.claim(run_id)
            asked = {"tool": "transfer", "call_id": "c1", "iteration": 1, "input": {}}
            async with store.open_history(run_id, epoch=epoch) as history:
                history.extend(
                    [
                        FlowEvent("tool.approval_required", {**asked, "timeout": None}, 1.0, 1, run_id),
                        FlowEvent("tool.approval_required", {**asked, "call_id": "c2", "timeout": None}, 1.0, 2, run_id),
                        FlowEvent("tool.denied", {"tool": "transfer", "call_id": "c2"}, 1.0, 3, run_id),
                    ]
                )  # fmt: skip
                await history.flush()
            record = await store.get(run_id)
            assert set(record.approvals) == {"c1", "c2"} and record.decided == {"c2"}
            await store.claim(run_id)  # attempt 2: the same call ids may come again
            record = await store.get(run_id)
            assert record.approvals == {} and record.decided == frozenset()
            assert record.attempt == 2


async def test_a_call_decided_on_its_own_node_is_decided_for_every_node(
    redis_url: str, nursery: trio.Nursery
) -> None:
    """Node A executes the run and takes a decision: the marker is written first, so node B,
    deciding the same call a moment later, gets 409 (not a second 200 for another decision)."""
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, bank_factory)
        b = await start_node(nursery, redis_url, bank_factory)
        run_id = (await post_run(a.url, "pay ann")).json()["run_id"]
        run = a.hub.executor.get_run(run_id)
        async with run.subscribe(after=0) as events:
            async for event in events:
                if event.type == "tool.approval_required":
                    call_id = event.data["call_id"]
                    break
        async with http_client(a) as on_a, http_client(b) as on_b:
            path = f"/runs/{run_id}/approvals/{call_id}"
            first = await on_a.post(path, json={"decision": "deny", "reason": "no"})
            second = await on_b.post(path, json={"decision": "approve"})
        assert first.status_code == 200, first.text
        assert second.status_code == 409, second.text
        assert (await run.wait()).status == RunStatus.COMPLETED
        assert transfers == []


async def test_a_per_run_websocket_on_another_node_decides_a_call_asked_after_it_connected(
    redis_url: str, nursery: trio.Nursery, open_ws: Any
) -> None:
    from conftest import receive, send

    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, bank_factory, enqueue=True)
        b = await start_node(nursery, redis_url, bank_factory)
        async with (
            open_redis(redis_url) as client,
            open_worker(RedisRunStore(client), agent_factory=bank_factory, reap_interval=None),
        ):
            run_id = (await post_run(a.url, "pay ann")).json()["run_id"]
            async with open_ws(f"{b.ws_url}/runs/{run_id}/ws") as socket:
                while (frame := await receive(socket)).get("type") != "tool.approval_required":
                    pass
                call = frame["data"]["call_id"]
                await send(socket, {"action": "decide", "call_id": call, "decision": "approve"})
                while (frame := await receive(socket)).get("type") != "decided":
                    assert frame.get("type") != "error", frame
                assert frame["decision"] == "approve"
                while (frame := await receive(socket)).get("type") != "flow.completed":
                    pass
        assert transfers == [(5, "ann")]
