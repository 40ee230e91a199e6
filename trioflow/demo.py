"""The demo agent: the one home of the agent trioflow runs when you give it none.

The CLI (``trioflow run``, ``trioflow serve``) and the web server
(:func:`trioflow.web.create_app` without ``agent=``) run :func:`default_agent`:
a model with the built-in :data:`~trioflow.builtin.calculator` tool (the offline
:class:`~trioflow.models.ScriptedModel` unless a model is given). Nothing
else in trioflow names the calculator, so the agent a server runs is pure
configuration: pass your own :class:`~trioflow.Agent`, or a factory, instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trioflow.agent import Agent
from trioflow.builtin import calculator
from trioflow.models._base import Model, ToolCall
from trioflow.models._scripted import ScriptedModel

__all__ = ["default_agent", "default_agent_factory"]


def default_agent(
    model: Model | None = None,
    *,
    system: str | None = None,
    max_iterations: int = 10,
    approval: Callable[[ToolCall], bool] | None = None,
) -> Agent:
    """The demo agent: ``model`` (the offline scripted one if ``None``) with the calculator tool.

    ``approval``: which tool calls wait for a person (see :mod:`trioflow.approvals`).

    Raises:
        ValueError: ``max_iterations`` is below 1.
    """
    return Agent(
        model, tools=[calculator], system=system, max_iterations=max_iterations, approval=approval
    )


def default_agent_factory(
    model: Model | None = None, *, system: str | None = None, max_iterations: int = 10
) -> Callable[[Any], Agent]:
    """A factory of :func:`default_agent` per run (whatever its argument: a web request, ...).

    The scripted model records every call it serves, so each run gets a
    fresh one (with the same pace); other models are shared by all runs.
    """

    def make(request: Any = None) -> Agent:
        run_model: Model
        if model is None:
            run_model = ScriptedModel()
        elif isinstance(model, ScriptedModel):
            run_model = ScriptedModel(pace=model.pace)
        else:
            run_model = model
        return default_agent(run_model, system=system, max_iterations=max_iterations)

    return make
