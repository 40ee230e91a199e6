"""Tool approvals: a call waits for a person to approve, deny or edit it, from Python and
over HTTP; timeouts deny; every bad decision is a clear error and nothing is left waiting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from conftest import http_client, start_run

from trioflow import (
    Agent,
    FlowEvent,
    Run,
    ScriptedModel,
    StreamingFlowExecutor,
    ToolInputError,
    Turn,
    tool,
)
from trioflow.approvals import ApprovalError

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer

transfers: list[tuple[int, str]] = []


@tool(requires_approval=True)
async def transfer(amount: int, to: str) -> str:
    """Move money.

    Args:
        amount: how much.
        to: to whom.
    """
    transfers.append((amount, to))
    return f"sent {amount} to {to}"


@tool
async def balance() -> int:
    """The balance."""
    return 1000


def bank(*calls: tuple[str, dict[str, Any]], **options: Any) -> Agent:
    model = ScriptedModel([Turn(tool_calls=list(calls)), Turn(text="done")])
    return Agent(model, tools=[transfer, balance], **options)


@pytest.fixture(autouse=True)
def no_transfers() -> None:
    transfers.clear()


async def until(run: Run, seen: list[FlowEvent], type: str) -> FlowEvent:
    """Read the run's events into ``seen`` until one of ``type``; return it."""
    async with run.subscribe(after=len(seen)) as events:
        async for event in events:
            seen.append(event)
            if event.type == type:
                return event
    raise AssertionError(f"no {type} in {[e.type for e in seen]}")


async def finish(run: Run, seen: list[FlowEvent]) -> list[str]:
    async with run.subscribe(after=len(seen)) as events:
        seen.extend([event async for event in events])
    return [e.type for e in seen]


async def test_an_approved_call_runs_after_its_approval() -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(bank(("transfer", {"amount": 5, "to": "ann"})), "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        assert asked.data["input"] == {"amount": 5, "to": "ann"}
        assert asked.data["timeout"] is None
        assert [p.call_id for p in run.pending_approvals()] == [asked.data["call_id"]]
        assert run.to_dict()["approvals"][0]["tool"] == "transfer"
        assert transfers == []  # nothing ran yet
        run.approve(asked.data["call_id"])
        types = await finish(run, seen)
    assert types.index("tool.approval_required") < types.index("tool.approved")
    assert types.index("tool.approved") < types.index("tool.started")
    assert types.index("tool.started") < types.index("tool.completed")
    assert transfers == [(5, "ann")]
    assert run.pending_approvals() == []
    assert types[-1] == "flow.completed"


async def test_a_denied_call_does_not_run_and_the_model_reads_why() -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(bank(("transfer", {"amount": 5, "to": "eve"})), "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        run.deny(asked.data["call_id"], "eve is not a customer")
        types = await finish(run, seen)
    assert transfers == []
    assert "tool.started" not in types
    (denied,) = [e for e in seen if e.type == "tool.denied"]
    assert denied.data["reason"] == "eve is not a customer" and not denied.data["timed_out"]
    results = [e for e in seen if e.type == "add_message" and "tool_results" in e.data]
    (block,) = results[0].data["tool_results"]
    assert block["is_error"] and "eve is not a customer" in block["content"]
    assert types[-1] == "flow.completed"  # a denial is the model's to handle


async def test_an_edit_is_checked_against_the_schema_then_runs_with_the_new_input() -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(bank(("transfer", {"amount": 500, "to": "bob"})), "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        call_id = asked.data["call_id"]
        with pytest.raises(ToolInputError, match="amount"):
            run.edit(call_id, {"amount": "lots", "to": "bob"})
        assert [p.call_id for p in run.pending_approvals()] == [call_id]  # still waiting
        run.edit(call_id, {"amount": 50, "to": "bob"})
        await finish(run, seen)
    (approved,) = [e for e in seen if e.type == "tool.approved"]
    assert approved.data["edited"] and approved.data["input"] == {"amount": 50, "to": "bob"}
    (started,) = [e for e in seen if e.type == "tool.started"]
    assert started.data["input"] == {"amount": 50, "to": "bob"}
    assert transfers == [(50, "bob")]


async def test_nobody_deciding_in_time_is_a_denial(autojump_clock: trio.testing.MockClock) -> None:
    agent = bank(("transfer", {"amount": 5, "to": "ann"}), approval_timeout=30)
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(agent, "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        assert asked.data["timeout"] == 30
        start = trio.current_time()
        await finish(run, seen)
        assert trio.current_time() - start == pytest.approx(30, abs=0.5)
        with pytest.raises(ApprovalError) as late:
            run.approve(asked.data["call_id"])
    assert late.value.decided
    (denied,) = [e for e in seen if e.type == "tool.denied"]
    assert denied.data["timed_out"] and denied.data["reason"] == "no decision within 30 s"
    assert transfers == []


async def test_the_agents_policy_picks_the_calls_that_wait() -> None:
    agent = bank(
        ("balance", {}),
        ("transfer", {"amount": 5, "to": "ann"}),
        approval=lambda call: call.name == "balance",
    )
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(agent, "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(p.tool for p in run.pending_approvals()) == ["balance", "transfer"]
        assert asked.data["tool"] in {"balance", "transfer"}
        for pending in run.pending_approvals():
            run.approve(pending.call_id)
        types = await finish(run, seen)
    assert types.count("tool.approved") == 2 and types.count("tool.completed") == 2


async def test_concurrent_calls_are_decided_one_by_one() -> None:
    agent = bank(("transfer", {"amount": 1, "to": "ann"}), ("transfer", {"amount": 2, "to": "eve"}))
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(agent, "pay")
        seen: list[FlowEvent] = []
        await until(run, seen, "tool.approval_required")
        await trio.testing.wait_all_tasks_blocked()
        # The calls start concurrently: in either order (Trio schedules them so).
        by_to = {p.input["to"]: p for p in run.pending_approvals()}
        assert sorted(by_to) == ["ann", "eve"]
        run.deny(by_to["eve"].call_id, "no")
        await trio.testing.wait_all_tasks_blocked()
        assert run.pending_approvals() == [by_to["ann"]]
        run.approve(by_to["ann"].call_id)
        await finish(run, seen)
    assert transfers == [(1, "ann")]
    results = [e for e in seen if e.type == "add_message" and "tool_results" in e.data]
    blocks = results[0].data["tool_results"]
    assert [b["is_error"] for b in blocks] == [False, True]  # in the model's order


async def test_every_bad_decision_is_a_clear_error() -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(bank(("transfer", {"amount": 5, "to": "ann"})), "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        call_id = asked.data["call_id"]
        with pytest.raises(ApprovalError) as unknown:
            run.approve("toolu_nope")
        assert not unknown.value.decided
        with pytest.raises(ValueError, match="not a valid ApprovalDecision"):
            run.decide(call_id, "maybe")
        with pytest.raises(ValueError, match="'input' goes with an edit"):
            run.decide(call_id, "deny", input={"amount": 1, "to": "x"})
        with pytest.raises(ValueError, match="'reason' goes with a denial"):
            run.decide(call_id, "approve", reason="why not")
        with pytest.raises(ValueError, match="needs the new 'input'"):
            run.decide(call_id, "edit")
        assert len(run.pending_approvals()) == 1  # none of them decided it
        run.approve(call_id)
        with pytest.raises(ApprovalError) as twice:
            run.deny(call_id)
        assert twice.value.decided
        await finish(run, seen)


async def test_cancelling_a_waiting_run_leaves_nothing_waiting() -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(bank(("transfer", {"amount": 5, "to": "ann"})), "pay")
        seen: list[FlowEvent] = []
        asked = await until(run, seen, "tool.approval_required")
        run.cancel("bored")
        types = await finish(run, seen)
        assert run.pending_approvals() == []
        with pytest.raises(ApprovalError):
            run.approve(asked.data["call_id"])
    assert types[-1] == "flow.cancelled" and transfers == []


# -- over HTTP ------------------------------------------------------------------------------


async def test_approvals_over_http(start_web_server: StartWebServer, open_sse: OpenSSE) -> None:
    server = await start_web_server(
        agent=lambda request: bank(("transfer", {"amount": 500, "to": "bob"}))
    )
    run_id = await start_run(server, "pay")
    names: list[str | None] = []
    with trio.fail_after(10):
        async with (
            open_sse(server.url, f"/runs/{run_id}/events") as stream,
            http_client(server) as http,
        ):
            while (frame := await stream.next()) is not None:
                names.append(frame.event)
                if frame.event != "tool.approval_required":
                    continue
                call_id = frame.json()["data"]["call_id"]
                listing = (await http.get(f"/runs/{run_id}/approvals")).json()
                assert [a["call_id"] for a in listing["approvals"]] == [call_id]
                url = f"/runs/{run_id}/approvals/{call_id}"
                answers = [
                    await http.post(url, json={"decision": "edit", "input": {"amount": "x"}}),
                    await http.post(url, json={"decision": "perhaps"}),
                    await http.post(url, json={"decision": "approve", "extra": 1}),
                    await http.post(url, json=["approve"]),
                    await http.post(
                        f"/runs/{run_id}/approvals/toolu_nope", json={"decision": "approve"}
                    ),
                    await http.post("/runs/run_nope/approvals/x", json={"decision": "approve"}),
                ]
                assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == [
                    (400, "invalid_input"),
                    (400, "invalid_request"),
                    (400, "invalid_request"),
                    (400, "invalid_request"),
                    (404, "approval_not_found"),
                    (404, "run_not_found"),
                ]
                edited = await http.post(
                    url, json={"decision": "edit", "input": {"amount": 50, "to": "bob"}}
                )
                assert edited.status_code == 200
                assert edited.json() == {"run_id": run_id, "call_id": call_id, "decision": "edit"}
                again = await http.post(url, json={"decision": "approve"})
                assert (again.status_code, again.json()["error"]["code"]) == (
                    409,
                    "approval_decided",
                )
    assert (
        names.index("tool.approved") < names.index("tool.started") < names.index("tool.completed")
    )
    assert names[-1] == "flow.completed"
    assert transfers == [(50, "bob")]
