"""Tool approvals across processes: :func:`request_decision` and :func:`apply_decision`.

A run executed by a worker (or by another serve node) waits for a person's
decision on a tool call (:mod:`trioflow.approvals`) in that process; the
person may be connected to any node. Three pieces make the decision reach it:

* **the index**: the history's append script records every
  ``tool.approval_required`` event in the run's record (field
  ``approval:<call_id>``) in the same step as it writes the event, and every
  ``tool.approved``/``tool.denied`` in ``decision:<call_id>``; whoever saw
  the event finds the call there (:attr:`RunRecord.approvals
  <trioflow.redis.RunRecord.approvals>`, :meth:`RunRecord.pending_approvals
  <trioflow.redis.RunRecord.pending_approvals>`);
* **the decision**: :func:`request_decision` checks, in one script, that
  the call asked and is not decided and that the run has not ended, then
  writes the durable marker ``decision:<call_id>`` and publishes it on
  :attr:`~trioflow.redis.Keys.decision_channel`: of two nodes deciding the
  same call at once, exactly one succeeds;
* **the delivery**: the process executing the run hears the message (a
  worker, or :func:`~trioflow.redis.listen_for_cancels` beside a serve
  node's executor) and decides its waiting call (:func:`apply_decision`);
  a message lost while its subscription was reconnecting is found by the
  check of the markers of the run's waiting calls at its next heartbeat.

The edit's new input is checked against the tool's schema by the node that
takes the decision (the same agent factory builds the run's agent on every
process) and again where the call runs; should that second check refuse it,
the call is denied with the reason, so that nothing waits for ever.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trioflow.approvals import ApprovalDecision, ApprovalError, check_decision
from trioflow.tools import ToolInputError

if TYPE_CHECKING:
    from trioflow.handle import RunHandle
    from trioflow.redis._store import RedisRunStore

__all__ = ["apply_decision", "apply_decision_markers", "decision_message", "request_decision"]

_log = logging.getLogger("trioflow.redis")

_DECIDE_SCRIPT = """
-- KEYS[1]: the run's record. ARGV[1]: the call id, ARGV[2]: the decision's JSON,
-- ARGV[3]: the channel, ARGV[4]: the message.
-- Returns 'OK', or 'NORUN', 'UNKNOWN' (no such call asked), 'DECIDED' (decided, or the run ended).
local asked = redis.call('HEXISTS', KEYS[1], 'approval:' .. ARGV[1])
if asked == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 'NORUN' end
  return 'UNKNOWN'
end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' or status == 'cancelled' then return 'DECIDED' end
if redis.call('HSETNX', KEYS[1], 'decision:' .. ARGV[1], ARGV[2]) == 0 then return 'DECIDED' end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 'OK'
"""


def decision_message(
    run_id: str,
    call_id: str,
    decision: ApprovalDecision,
    reason: str | None,
    input: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The decision as written to the record's marker and published: a JSON-compatible dict."""
    return {
        "run_id": run_id,
        "call_id": call_id,
        "decision": str(decision),
        "reason": reason,
        "input": None if input is None else dict(input),
    }


async def request_decision(
    store: RedisRunStore,
    run_id: str,
    call_id: str,
    decision: ApprovalDecision | str,
    *,
    reason: str | None = None,
    input: Mapping[str, Any] | None = None,
) -> None:
    """Take a decision on a waiting tool call of a run executed by any process.

    Checks and writes in one script (see the module): the decision is taken
    once, whichever node takes it. The edit's ``input`` is not checked here
    against the tool's schema (a :class:`~trioflow.redis.RemoteRun` of a
    serve node checks it first).

    Raises:
        KeyError: no such run (or its keys expired).
        ~trioflow.approvals.ApprovalError: no call ``call_id`` of the run
            asked for approval (``decided=False``), or it was decided
            already, timed out, or the run ended (``decided=True``).
        ValueError: ``decision`` is not an :class:`~trioflow.approvals.ApprovalDecision`
            value; ``input`` without an edit or an edit without it;
            ``reason`` with anything but a denial.
        coredis.exceptions.RedisError: Redis failed.
    """
    decision = check_decision(decision, reason=reason, input=input)
    body = decision_message(run_id, call_id, decision, reason, input)
    text = json.dumps(body, separators=(",", ":"))
    keys = store.keys
    script = store.client.register_script(_DECIDE_SCRIPT)
    reply: object = await script([keys.run(run_id)], [call_id, text, keys.decision_channel, text])
    answer = reply.decode() if isinstance(reply, bytes) else str(reply)
    if answer == "NORUN":
        raise KeyError(f"no run with id {run_id!r}")
    if answer != "OK":
        raise ApprovalError(call_id, decided=answer == "DECIDED")


def apply_decision(run: RunHandle, body: Mapping[str, Any]) -> bool:
    """Decide ``run``'s waiting call as ``body`` (:func:`decision_message`) says; True if taken.

    Where the call runs: a call no longer waiting (decided here already,
    timed out) is left as it is; an edit this process's check of the
    tool's schema refuses denies the call with the reason, so nothing waits
    on a decision that cannot be applied. Never raises for a bad ``body``:
    it is logged and ignored.
    """
    try:
        call_id = str(body["call_id"])
        decision = ApprovalDecision(body["decision"])
        reason = body.get("reason")
        edited = body.get("input")
    except (KeyError, ValueError, TypeError):
        _log.warning("ignoring a malformed decision: %r", body)
        return False
    try:
        run.decide(
            call_id,
            decision,
            reason=None if reason is None else str(reason),
            input=edited if isinstance(edited, Mapping) else None,
        )
    except ApprovalError:
        return False
    except (ToolInputError, ValueError) as exc:
        _log.warning(
            "run %s: the decision on %s refused here (%s); denied", run.run_id, call_id, exc
        )
        try:
            run.decide(call_id, ApprovalDecision.DENY, reason=f"the decision was refused: {exc}")
        except (ApprovalError, ValueError):
            return False
    return True


async def apply_decision_markers(store: RedisRunStore, run: RunHandle) -> int:
    """Apply the durable decisions on ``run``'s calls waiting here (a lost message's catch-up).

    One ``HMGET`` of the ``decision:<call_id>`` markers of the run's waiting
    calls; nothing is read when none waits. Returns how many were taken.

    Raises:
        coredis.exceptions.RedisError: Redis failed.
    """
    waiting = [p.call_id for p in run.pending_approvals()]
    if not waiting:
        return 0
    values = await store.client.hmget(
        store.keys.run(run.run_id), [f"decision:{c}" for c in waiting]
    )
    taken = 0
    for value in values:
        if value is None:
            continue
        try:
            body = json.loads(value)
        except ValueError:
            continue
        if isinstance(body, dict) and "decision" in body:  # a person's (not the run's own event)
            taken += apply_decision(run, body)
    return taken
