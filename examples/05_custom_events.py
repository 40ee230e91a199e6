"""Tutorial 5: domain events of your own, with handlers, aggregation and history.

Shows how an application puts its own events on a trioflow bus:

* ``TradeEvent``, a :class:`trioflow.FlowEvent` subclass with the domain's
  types (``trade.executed``, ``price.alert``, ``risk.warning``,
  ``portfolio.update``) as constants and factories;
* a bus opened with ``event_class=TradeEvent``, so events keep their class;
* handlers: a desk that prints every domain event, and a book that
  aggregates the trades (volume, cash, position, profit);
* a late subscriber, an auditor that joins in the middle of the session and
  catches up from the bus's history (``subscribe(after=0)``) before it
  follows live events: no event is missed, none is seen twice;
* the agent checks the session's profit with the calculator; its run's
  events travel on the same bus, and the calculator here is a tool that
  emits a domain event of its own during the run (``profit.checked``,
  through its :class:`trioflow.ToolContext`), which the desk sees like any
  other.

Run it::

    python examples/05_custom_events.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second, and sets the pace of the price feed too.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, ClassVar, Self

import trio

from trioflow import (
    Agent,
    EventBus,
    FlowEvent,
    StreamingFlowExecutor,
    Tool,
    ToolContext,
    open_event_bus,
)
from trioflow.builtin import calculator
from trioflow.models import open_model


class TradeEvent(FlowEvent):
    """The trading desk's events."""

    __slots__ = ()  # as lean as FlowEvent: no per-instance __dict__

    TRADE_EXECUTED: ClassVar[str] = "trade.executed"
    PRICE_ALERT: ClassVar[str] = "price.alert"
    RISK_WARNING: ClassVar[str] = "risk.warning"
    PORTFOLIO_UPDATE: ClassVar[str] = "portfolio.update"
    PROFIT_CHECKED: ClassVar[str] = "profit.checked"
    DOMAIN_TYPES: ClassVar[frozenset[str]] = frozenset(
        {TRADE_EXECUTED, PRICE_ALERT, RISK_WARNING, PORTFOLIO_UPDATE, PROFIT_CHECKED}
    )

    @classmethod
    def trade_executed(cls, symbol: str, side: str, quantity: int, price: float) -> Self:
        return cls.create(
            cls.TRADE_EXECUTED,
            {"symbol": symbol, "side": side, "quantity": quantity, "price": price},
        )

    @classmethod
    def price_alert(cls, symbol: str, price: float, change_percent: float) -> Self:
        return cls.create(
            cls.PRICE_ALERT, {"symbol": symbol, "price": price, "change_percent": change_percent}
        )

    @classmethod
    def risk_warning(cls, symbol: str, exposure: float, limit: float) -> Self:
        return cls.create(
            cls.RISK_WARNING, {"symbol": symbol, "exposure": exposure, "limit": limit}
        )

    @classmethod
    def portfolio_update(cls, position: int, value: float) -> Self:
        return cls.create(cls.PORTFOLIO_UPDATE, {"position": position, "value": value})

    def is_trade(self) -> bool:
        return self.type == self.TRADE_EXECUTED


SYMBOL = "ACME"
PRICES = [100.0, 96.5, 92.0, 93.0, 97.0, 97.5]
ALERT_PERCENT = 3.0
EXPOSURE_LIMIT = 1500.0
AUDITOR_JOINS_AT_TICK = 3


def describe(event: FlowEvent) -> str:
    d = event.data
    if event.type == TradeEvent.TRADE_EXECUTED:
        return f"{d['side']} {d['quantity']} {d['symbol']} @ {d['price']:.2f}"
    if event.type == TradeEvent.PRICE_ALERT:
        return f"{d['symbol']} moved {d['change_percent']:+.1f}% to {d['price']:.2f}"
    if event.type == TradeEvent.RISK_WARNING:
        return f"{d['symbol']} exposure {d['exposure']:.2f} is over the limit of {d['limit']:.2f}"
    if event.type == TradeEvent.PROFIT_CHECKED:
        return f"{d['expression']} = {d['result']} (by the agent's tool, call {d['call_id']})"
    return f"position {d['position']} {SYMBOL}, worth {d['value']:.2f}"


async def desk(event: FlowEvent) -> None:
    """A handler: print every domain event as it happens."""
    print(f"  #{event.seq:<3} {event.type:<17} {describe(event)}")


class Book:
    """Aggregation: what the trades add up to."""

    def __init__(self) -> None:
        self.trades = 0
        self.volume = 0
        self.cash = 0.0

    def on_trade(self, event: FlowEvent) -> None:
        assert isinstance(event, TradeEvent)  # the bus kept the class
        d = event.data
        sign = 1 if d["side"] == "SELL" else -1
        self.trades += 1
        self.volume += d["quantity"]
        self.cash += sign * d["quantity"] * d["price"]


class Strategy:
    """A toy strategy: buy 10 on a drop of 3% or more, sell everything on a rise of 3% or more."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.position = 0
        self.previous: float | None = None

    async def on_price(self, price: float) -> None:
        previous, self.previous = self.previous, price
        if previous is None:
            return
        change = (price - previous) / previous * 100
        if abs(change) < ALERT_PERCENT:
            return
        await self.bus.emit(TradeEvent.price_alert(SYMBOL, price, round(change, 2)))
        if change < 0:
            side, quantity = "BUY", 10
        elif self.position:
            side, quantity = "SELL", self.position
        else:
            return
        await self.bus.emit(TradeEvent.trade_executed(SYMBOL, side, quantity, price))
        self.position += quantity if side == "BUY" else -quantity
        exposure = self.position * price
        await self.bus.emit(TradeEvent.portfolio_update(self.position, exposure))
        if exposure > EXPOSURE_LIMIT:
            await self.bus.emit(TradeEvent.risk_warning(SYMBOL, exposure, EXPOSURE_LIMIT))


async def _checked(ctx: ToolContext, **arguments: Any) -> Any:
    """The calculator, and a domain event of its own in the run's stream when it has a result."""
    result = await calculator.invoke(arguments)
    await ctx.emit(
        TradeEvent.PROFIT_CHECKED, {"expression": arguments.get("expression"), "result": result}
    )
    return result


checked_calculator = Tool(
    name=calculator.name,  # the name the model calls
    description=calculator.description,
    input_schema=calculator.input_schema,
    function=_checked,
    context="ctx",  # the parameter that receives the call's ToolContext
)


async def auditor(bus: EventBus, *, task_status: trio.TaskStatus[None]) -> None:
    """Join late, replay the history from the first event, then follow live events."""
    async with bus.subscribe(after=0, types=TradeEvent.DOMAIN_TYPES, name="auditor") as events:
        joined_at = bus.last_seq
        print(f"  auditor joins at seq {joined_at} and catches up from the history")
        task_status.started()
        replayed: list[int] = []
        live: list[int] = []
        async for event in events:
            (replayed if event.seq <= joined_at else live).append(event.seq)
    seqs = replayed + live
    assert seqs == sorted(set(seqs))  # in order, no duplicates
    print(f"  auditor: {len(replayed)} events replayed from history {replayed},")
    print(f"           {len(live)} received live {live}")


async def main(pace: float) -> None:
    interval = 5 / pace if pace else 0.0
    book = Book()
    # The bus closes first (contexts exit in reverse order), so the auditor's
    # subscription ends and the nursery that runs the auditor can exit.
    async with (
        open_model(pace=pace) as model,
        trio.open_nursery() as nursery,
        open_event_bus(event_class=TradeEvent, name="desk") as bus,
    ):
        bus.add_listener(desk, types=TradeEvent.DOMAIN_TYPES, name="desk")
        bus.add_listener(book.on_trade, types={TradeEvent.TRADE_EXECUTED}, name="book")

        print(f"Trading {SYMBOL} on {len(PRICES)} price ticks:")
        strategy = Strategy(bus)
        for tick, price in enumerate(PRICES):
            if tick == AUDITOR_JOINS_AT_TICK:
                await nursery.start(auditor, bus)  # a late subscriber joins mid-session
            await strategy.on_price(price)
            await trio.sleep(interval)

        task = "What is 20 * 97 - (10 * 96.5 + 10 * 92)?"
        print(f"Asking the agent to check the profit: {task}")
        agent = Agent(model, tools=[checked_calculator])
        result = await StreamingFlowExecutor(bus=bus).run(agent, task, timeout=60)
        print(f"  agent: {result.output}")
    # The bus is closed: the handlers are done and the auditor's iteration has ended.

    print(f"Book: {book.trades} trades, {book.volume} shares traded, profit {book.cash:+.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Domain events on a trioflow bus.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
