"""Tool approvals: a person approves, denies or edits a tool call before it runs.

A tool made with ``@tool(requires_approval=True)``, or a call an agent's
``approval`` policy picks, does not run as soon as the model asks for it.
The agent emits ``tool.approval_required`` (the call's ``tool``,
``call_id``, ``iteration``, ``input`` and the approval ``timeout``) and
waits, without holding anything busy, for one decision
(:class:`ApprovalDecision`):

* **approve**: the call runs with the model's input (``tool.approved``,
  then ``tool.started`` ...);
* **edit**: the call runs with new input, checked against the tool's schema
  first (an edit that does not match is refused with
  :exc:`~trioflow.ToolInputError` and the call still waits);
* **deny**, with a reason: the call does not run (``tool.denied``) and the
  model is told it was denied and why, as the call's error result.

With an approval timeout, a call nobody decides on in time is denied
(``tool.denied`` with ``timed_out: true``). A decision is taken once: a
second one for the same call, or one for a call no one asked about, is an
:exc:`ApprovalError`.

Decisions reach a run through :meth:`trioflow.Run.approve`,
:meth:`~trioflow.Run.deny` and :meth:`~trioflow.Run.edit` (or
:meth:`~trioflow.Run.decide`); over HTTP, ``POST
/runs/{id}/approvals/{call_id}``. An :class:`~trioflow.Agent` run on its
own takes them through its :class:`~trioflow.agent.RunControl`'s
:attr:`~trioflow.agent.RunControl.approvals`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from trioflow.tools import Tool

__all__ = ["ApprovalDecision", "ApprovalError", "Approvals", "PendingApproval", "check_decision"]


class ApprovalDecision(enum.StrEnum):
    """What a person decided about a tool call."""

    APPROVE = "approve"
    """Run the call with the model's input."""
    DENY = "deny"
    """Do not run it; the model is told why."""
    EDIT = "edit"
    """Run the call with new input (checked against the tool's schema)."""


class ApprovalError(LookupError):
    """No call of the run awaits a decision under that id.

    Attributes:
        call_id: the id asked about.
        decided: True when the call was decided already (or timed out),
            False when no call of that id asked for approval.
    """

    def __init__(self, call_id: str, *, decided: bool) -> None:
        what = "was decided already" if decided else "is not awaiting approval"
        super().__init__(f"tool call {call_id!r} {what}")
        self.call_id = call_id
        self.decided = decided


@dataclasses.dataclass(slots=True, eq=False)
class PendingApproval:
    """A tool call waiting for a decision (see :meth:`Approvals.pending`)."""

    call_id: str
    """The model's id of the call."""
    tool: str
    """The tool's name."""
    input: dict[str, Any]
    """The input the model gave (what ``approve`` runs the call with)."""
    iteration: int
    """The agent's iteration of the call."""
    timeout: float | None
    """Seconds the call waits before it is denied (``None``: no limit)."""
    decision: ApprovalDecision | None = None
    """The decision, once taken."""
    reason: str | None = None
    """The reason of a denial."""
    timed_out: bool = False
    """Whether nobody decided in time (the call was denied)."""
    _tool: Tool | None = dataclasses.field(default=None, repr=False)
    _decided: trio.Event = dataclasses.field(default_factory=trio.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view: ``call_id``, ``tool``, ``input``, ``iteration``, ``timeout``."""
        return {
            "call_id": self.call_id,
            "tool": self.tool,
            "input": self.input,
            "iteration": self.iteration,
            "timeout": self.timeout,
        }


def check_decision(
    decision: ApprovalDecision | str,
    *,
    reason: str | None = None,
    input: Mapping[str, Any] | None = None,
) -> ApprovalDecision:
    """The decision, checked with what goes with it (the one rule, wherever it is taken).

    Raises:
        ValueError: ``decision`` is not an :class:`ApprovalDecision` value;
            ``input`` is missing for an edit or given for another decision;
            ``reason`` is given for anything but a denial.
    """
    decision = ApprovalDecision(decision)
    if decision is ApprovalDecision.EDIT and input is None:
        raise ValueError("an edit needs the new 'input'")
    if decision is not ApprovalDecision.EDIT and input is not None:
        raise ValueError(f"'input' goes with an edit, not with {decision.value!r}")
    if reason is not None and decision is not ApprovalDecision.DENY:
        raise ValueError(f"'reason' goes with a denial, not with {decision.value!r}")
    return decision


_DECIDED_KEPT = 1024
"""How many decided call ids a run remembers (to tell "decided" from "unknown")."""


class Approvals:
    """One run's tool calls waiting for a person, and the decisions taken.

    The agent asks (:meth:`ask`, then :meth:`wait`); anyone holding the
    run decides (:meth:`decide`). Not thread-safe: call it from the run's Trio thread.
    """

    __slots__ = ("_decided", "_pending")

    def __init__(self) -> None:
        self._pending: dict[str, PendingApproval] = {}
        self._decided: dict[str, None] = {}  # an ordered set, bounded by _DECIDED_KEPT

    def pending(self) -> list[PendingApproval]:
        """The calls waiting for a decision now, in the order they asked."""
        return list(self._pending.values())

    def decide(
        self,
        call_id: str,
        decision: ApprovalDecision | str,
        *,
        reason: str | None = None,
        input: Mapping[str, Any] | None = None,
    ) -> PendingApproval:
        """Take the decision on call ``call_id``; the waiting call goes on at once.

        Args:
            call_id: the call (``call_id`` of its ``tool.approval_required``).
            decision: approve, deny or edit.
            reason: why, for a denial (the model reads it).
            input: the new input, for an edit (and only then).

        Returns:
            The call, with its decision.

        Raises:
            ApprovalError: no call ``call_id`` awaits a decision (unknown, or
                decided already).
            ValueError: ``decision`` is not an :class:`ApprovalDecision`
                value; ``input`` is missing for an edit or given for another
                decision; ``reason`` is given for an approval.
            ~trioflow.ToolInputError: the edited input does not match the
                tool's schema (the call still waits).
        """
        pending = self._pending.get(call_id)
        if pending is None:
            raise ApprovalError(call_id, decided=call_id in self._decided)
        decision = check_decision(decision, reason=reason, input=input)
        if input is not None:
            if pending._tool is not None:
                pending._tool.validate(input)
            pending.input = dict(input)
        pending.decision = decision
        pending.reason = reason
        self._close(pending)
        return pending

    def ask(
        self,
        *,
        call_id: str,
        tool: Tool,
        input: Mapping[str, Any],
        iteration: int,
        timeout: float | None,
    ) -> PendingApproval:
        """Register the call as waiting for a decision (then announce it, then :meth:`wait`).

        Raises:
            ValueError: ``call_id`` is waiting already, or ``timeout`` is
                not a positive number.
        """
        if call_id in self._pending:
            raise ValueError(f"tool call {call_id!r} is waiting for approval already")
        if timeout is not None and not (0 < timeout < math.inf):
            raise ValueError(f"approval timeout must be a positive number, not {timeout!r}")
        pending = PendingApproval(call_id, tool.name, dict(input), iteration, timeout, _tool=tool)
        self._pending[call_id] = pending
        return pending

    async def wait(self, pending: PendingApproval) -> PendingApproval:
        """Wait for the decision on ``pending`` (from :meth:`ask`); a denial once its timeout expires.

        Cancellation withdraws the call (a later decision on it is an
        :exc:`ApprovalError`).
        """
        timeout = pending.timeout
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await pending._decided.wait()
        finally:
            if pending.decision is None:  # timed out, or cancelled: withdrawn
                self._close(pending)
        if pending.decision is None:
            pending.decision = ApprovalDecision.DENY
            pending.timed_out = True
            pending.reason = f"no decision within {timeout:g} s"
        return pending

    def withdraw(self, pending: PendingApproval) -> None:
        """Take ``pending`` back undecided (its announcement failed): a decision on it is refused."""
        if pending.decision is None:
            self._close(pending)

    def _close(self, pending: PendingApproval) -> None:
        self._pending.pop(pending.call_id, None)
        self._decided[pending.call_id] = None
        if len(self._decided) > _DECIDED_KEPT:
            del self._decided[next(iter(self._decided))]
        pending._decided.set()
