"""The browser page (``trioflow/web/static/index.html``) in a real headless Chromium.

The server runs in the test's nursery on Trio; Playwright's sync API (which
runs an asyncio loop of its own) drives the browser in a worker thread
(``trio.to_thread.run_sync``), so the two event loops never meet.

Chromium is Debian's ``/usr/bin/chromium`` (CI installs the ``chromium``
package with apt; set ``TRIOFLOW_CHROMIUM`` to use another binary). Without
it these tests skip, saying what to install; with ``TRIOFLOW_REQUIRE=chromium``
(as in CI) a missing browser fails them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trio
from conftest import require, talker
from playwright.sync_api import Page, expect, sync_playwright

from trioflow import Agent, RunStatus, ScriptedModel, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.web import WebConfig, create_app, serve

if TYPE_CHECKING:
    from conftest import StartWebServer
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")

CHROMIUM = Path(os.environ.get("TRIOFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000
TASK = "What is 25 * 4?"
ANSWER = "Let me calculate that.\n\n25 * 4 = 100."

expect.set_options(timeout=TIMEOUT_MS)

# Records every state the status pill shows, in order (repeats collapsed).
WATCH_STATUS = """() => {
    const status = document.getElementById("status");
    window.statusHistory = [status.dataset.state];
    new MutationObserver(() => {
        const state = status.dataset.state;
        if (window.statusHistory.at(-1) !== state) window.statusHistory.push(state);
    }).observe(status, {attributes: true, childList: true, subtree: true, characterData: true});
}"""

# Every seq the event log shows (a row of coalesced tokens lists all of its seqs).
LOGGED_SEQS = """() => [...document.querySelectorAll("#log li[data-seq]")].flatMap(
    (row) => (row.dataset.seqs || row.dataset.seq).split(" ").map(Number))"""


Browse = Callable[[str, Callable[[Page], T]], Awaitable[T]]


@pytest.fixture
def chromium() -> str:
    found = CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)
    require("chromium", found, f"no {CHROMIUM}; apt-get install chromium, or set TRIOFLOW_CHROMIUM")
    return str(CHROMIUM)


@pytest.fixture
def browse(chromium: str, tmp_path: Path) -> Browse[Any]:
    """``await browse(url, script)``: open ``url`` in a new headless Chromium and run ``script(page)``.

    The browser runs in a worker thread; ``script`` uses Playwright's sync API
    and its return value is returned. The page's last state is saved to
    ``tmp_path / "page.png"``, and an uncaught JavaScript error fails the test.
    """

    def drive(url: str, script: Callable[[Page], T]) -> T:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.set_default_timeout(TIMEOUT_MS)
                errors: list[Exception] = []
                page.on("pageerror", lambda error: errors.append(error))
                page.goto(url)
                page.evaluate(WATCH_STATUS)
                try:
                    result = script(page)
                finally:
                    page.screenshot(path=tmp_path / "page.png", full_page=True)
                assert not errors, f"JavaScript errors on the page: {errors}"
                return result
            finally:
                browser.close()

    async def run(url: str, script: Callable[[Page], T]) -> T:
        return await trio.to_thread.run_sync(drive, url, script)

    return run


def calculator_agent(pace: float) -> Agent:
    """The offline calculator agent, saying ``pace`` words per second (nine words in all)."""
    return Agent(ScriptedModel(pace=pace), tools=[calculator])


def run_task(page: Page, task: str = TASK) -> None:
    page.fill("#task", task)
    page.click("#start")


def expect_calculator_run_done(page: Page) -> None:
    """The page shows the answer, the calculator's card with 100, status done, 100 %."""
    expect(page.locator("#status")).to_have_text("done")
    assert page.locator("#output").text_content() == ANSWER
    card = page.locator('#tools li[data-tool="calculator"]')
    expect(card).to_have_count(1)
    expect(card).to_have_attribute("data-state", "completed")
    expect(card.locator(".input")).to_contain_text('"expression": "25 * 4"')
    expect(card.locator(".result")).to_have_text("100")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#progress-text")).to_contain_text("100%")
    expect(page.locator('#log li[data-type="flow.completed"] .badge')).to_have_text(
        "flow.completed"
    )


async def test_page_streams_a_run_to_done(
    start_web_server: StartWebServer, browse: Browse[Any], tmp_path: Path
) -> None:
    server = await start_web_server(agent=calculator_agent(pace=8))

    def script(page: Page) -> dict[str, Any]:
        run_task(page)
        expect(page.locator("#status")).to_have_text("live")
        expect(page.locator("#output")).to_contain_text("Let me")  # tokens arrive live
        expect(page.locator("#cancel")).to_be_enabled()
        expect_calculator_run_done(page)
        expect(page.locator("#cancel")).to_be_disabled()
        expect(page.locator("#start")).to_be_enabled()
        seen = {
            "url": page.url,
            "states": page.evaluate("window.statusHistory"),
            "seqs": page.evaluate(LOGGED_SEQS),
            "run_id": page.locator("#run-id").text_content(),
        }
        page.reload()  # the address names the run: the page replays it
        expect_calculator_run_done(page)
        seen["replayed"] = page.evaluate(LOGGED_SEQS)
        return seen

    seen = await browse(f"{server.url}/", script)

    run = server.executor.get_run(seen["run_id"])
    assert run.status == RunStatus.COMPLETED
    assert seen["states"] == ["idle", "connecting", "live", "done"]
    assert seen["seqs"] == list(range(1, run.last_seq + 1))
    assert seen["replayed"] == seen["seqs"]
    thread_id = run.metadata["thread_id"]
    assert seen["url"] == f"{server.url}/?thread={thread_id}&run={run.run_id}"
    assert (tmp_path / "page.png").stat().st_size > 0


async def test_cancel_button_cancels_the_run(
    start_web_server: StartWebServer, browse: Browse[Any]
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=20))  # twenty seconds

    def script(page: Page) -> str | None:
        page.fill("#task", "talk for a while")
        page.press("#task", "Enter")  # Enter starts the run
        expect(page.locator("#output")).to_contain_text("w2")
        page.click("#cancel")
        expect(page.locator("#status")).to_have_text("cancelled")
        expect(page.locator("#status")).to_have_attribute("data-state", "cancelled")
        expect(page.locator('#log li[data-type="flow.cancelled"] .badge')).to_have_text(
            "flow.cancelled"
        )
        expect(page.locator("#progress")).to_have_attribute("data-state", "cancelled")
        expect(page.locator("#progress-text")).to_have_text(
            "0% \u00b7 cancelled: cancelled by client"
        )
        expect(page.locator("#cancel")).to_be_disabled()
        expect(page.locator("#start")).to_be_enabled()
        assert "w399" not in (page.locator("#output").text_content() or "")
        return page.locator("#run-id").text_content()

    run_id = await browse(f"{server.url}/", script)

    run = server.executor.get_run(run_id or "")
    assert run.status == RunStatus.CANCELLED
    assert run.result is not None
    assert run.result.reason == "cancelled by client"


async def test_page_passes_the_token_from_its_address(
    start_web_server: StartWebServer, browse: Browse[Any]
) -> None:
    server = await start_web_server(agent=calculator_agent(pace=20), token="secret")

    def script(page: Page) -> None:
        run_task(page)  # without the token: refused
        expect(page.locator("#status")).to_have_text("failed")
        expect(page.locator("#error")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("unauthorized")

        page.goto(f"{server.url}/?token=secret")
        run_task(page)
        expect_calculator_run_done(page)
        expect(page.locator("#error")).to_be_hidden()
        assert re.match(
            rf"{re.escape(server.url)}/\?token=secret&thread=thread_\w+&run=run_", page.url
        )

    await browse(f"{server.url}/", script)
    assert [run.status for run in server.executor.runs.values()] == [RunStatus.COMPLETED]


@dataclasses.dataclass
class StreamRequests:
    """What :class:`EndFirstEventStream` saw."""

    last_event_ids: list[str | None] = dataclasses.field(default_factory=list)
    """The ``Last-Event-ID`` header of every event stream request, in order."""
    cut_after: int | None = None
    """The seq of the last event the first stream delivered before it was ended."""


class EndFirstEventStream:
    """ASGI middleware ending the first event stream once it has sent ``events`` events.

    To the browser this is a dropped connection: ``EventSource`` reconnects
    by itself, sending ``Last-Event-ID``.
    """

    def __init__(self, app: ASGIApp, *, events: int, seen: StreamRequests) -> None:
        self.app = app
        self.events = events
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/events"):
            await self.app(scope, receive, send)
            return
        last_event_id = dict(scope["headers"]).get(b"last-event-id")
        self.seen.last_event_ids.append(last_event_id.decode() if last_event_id else None)
        if len(self.seen.last_event_ids) > 1:
            await self.app(scope, receive, send)
            return
        seqs: list[int] = []
        with trio.CancelScope() as stream:

            async def cut(message: Message) -> None:
                if message["type"] == "http.response.body":
                    seqs.extend(int(s) for s in re.findall(rb"^id: (\d+)$", message["body"], re.M))
                    if len(seqs) >= self.events:
                        self.seen.cut_after = seqs[-1]
                        await send({**message, "more_body": False})
                        stream.cancel()
                        await trio.lowlevel.checkpoint()  # raises Cancelled: the app stops
                await send(message)

            await self.app(scope, receive, cut)


async def test_page_resumes_after_a_dropped_connection(
    nursery: trio.Nursery, browse: Browse[Any]
) -> None:
    executor = StreamingFlowExecutor()
    app = create_app(
        executor, agent=calculator_agent(pace=20), config=WebConfig(port=0, retry=0.05)
    )
    requests = StreamRequests()
    app.add_middleware(EndFirstEventStream, events=6, seen=requests)
    urls: list[str] = await nursery.start(functools.partial(serve, app))

    def script(page: Page) -> dict[str, Any]:
        run_task(page)
        expect_calculator_run_done(page)
        notes = page.locator('#log li[data-type="connection"] .summary')
        expect(notes).to_have_count(2)
        return {
            "states": page.evaluate("window.statusHistory"),
            "seqs": page.evaluate(LOGGED_SEQS),
            "notes": notes.all_text_contents(),
            "run_id": page.locator("#run-id").text_content(),
        }

    seen = await browse(f"{urls[0]}/", script)

    cut = requests.cut_after
    assert cut is not None
    assert requests.last_event_ids == [None, str(cut)]
    run = executor.get_run(seen["run_id"])
    assert seen["seqs"] == list(range(1, run.last_seq + 1))  # no gap, no duplicate
    assert seen["notes"] == [
        f"connection lost after event {cut}; reconnecting",
        f"reconnected: resuming after event {cut}",
    ]
    assert seen["states"] == ["idle", "connecting", "live", "reconnecting", "live", "done"]


# -- conversations and approvals (issue #15) ---------------------------------------------------


async def test_the_page_is_a_conversation(
    start_web_server: StartWebServer, browse: Browse[Any]
) -> None:
    server = await start_web_server(agent=lambda request: calculator_agent(pace=0))

    def turns(page: Page) -> list[tuple[str | None, str | None]]:
        rows = page.locator("#conversation li")
        return [
            (rows.nth(i).get_attribute("data-role"), rows.nth(i).text_content())
            for i in range(rows.count())
        ]

    def script(page: Page) -> dict[str, Any]:
        run_task(page, "What is 25 * 4?")
        expect(page.locator("#status")).to_have_text("done")
        run_task(page, "What is 2 + 3?")
        expect(page.locator("#conversation li")).to_have_count(4)
        expect(page.locator("#status")).to_have_text("done")
        live = turns(page)
        thread_id = page.locator("#thread-id").text_content()
        page.reload()  # the address names the thread: the conversation comes back
        expect(page.locator("#status")).to_have_text("done")
        expect(page.locator("#conversation li")).to_have_count(4)
        reloaded = turns(page)
        page.click("#new-thread")
        expect(page.locator("#conversation li")).to_have_count(0)
        expect(page.locator("#thread-id")).to_have_text("")
        return {"live": live, "reloaded": reloaded, "thread_id": thread_id}

    seen = await browse(f"{server.url}/", script)
    assert seen["live"] == [
        ("user", "What is 25 * 4?"),
        ("assistant", ANSWER),
        ("user", "What is 2 + 3?"),
        ("assistant", "Let me calculate that.\n\n2 + 3 = 5."),
    ]
    assert seen["reloaded"] == seen["live"]
    thread = server.hub.threads.get(seen["thread_id"])
    assert len(thread.runs) == 2 and len(thread.messages) == 8


async def test_approve_and_deny_buttons_decide_on_tool_calls(
    start_web_server: StartWebServer, browse: Browse[Any]
) -> None:
    asking = dataclasses.replace(calculator, requires_approval=True)
    server = await start_web_server(
        agent=lambda request: Agent(ScriptedModel(pace=0), tools=[asking])
    )

    def script(page: Page) -> None:
        run_task(page, "What is 25 * 4?")
        card = page.locator('#tools li[data-tool="calculator"]')
        expect(card).to_have_attribute("data-state", "waiting")
        expect(card.locator(".input")).to_contain_text('"expression": "25 * 4"')
        expect(page.locator("#status")).to_have_text("live")
        card.locator('[data-testid="approve"]').click()
        expect(card).to_have_attribute("data-state", "completed")
        expect(card.locator(".result")).to_have_text("100")
        expect(card.locator('[data-testid="approve"]')).to_have_count(0)
        expect(page.locator("#status")).to_have_text("done")

        run_task(page, "What is 2 + 3?")
        card = page.locator('#tools li[data-tool="calculator"]')
        expect(card).to_have_attribute("data-state", "waiting")
        card.locator('[data-testid="deny"]').click()
        expect(card).to_have_attribute("data-state", "denied")
        expect(card.locator(".result")).to_have_text("denied in the browser")
        expect(page.locator("#status")).to_have_text("done")
        expect(page.locator("#output")).to_contain_text("denied")

    await browse(f"{server.url}/", script)
    runs = list(server.executor.runs.values())
    assert [r.status for r in runs] == [RunStatus.COMPLETED, RunStatus.COMPLETED]
    assert runs[0].result is not None and "100" in runs[0].result.output


async def test_the_event_log_shows_the_raw_stream_in_any_format(
    start_web_server: StartWebServer, browse: Browse[Any]
) -> None:
    server = await start_web_server(agent=calculator_agent(pace=0), token="s3cret-token-1")

    def script(page: Page) -> dict[str, str]:
        run_task(page)
        expect_calculator_run_done(page)
        shown: dict[str, str] = {}
        for fmt, last in (
            ("agui", '"type":"RUN_FINISHED"'),
            ("vercel", "data: [DONE]"),
            ("ndjson", '"type":"flow.completed"'),
            ("sse", "event: flow.completed"),
        ):
            page.select_option("#log-format", fmt)
            expect(page.locator("#raw")).to_be_visible()
            expect(page.locator("#log")).to_be_hidden()
            expect(page.locator("#raw")).to_contain_text(last)
            shown[fmt] = page.locator("#raw").text_content() or ""
        page.select_option("#log-format", "")
        expect(page.locator("#raw")).to_be_hidden()
        expect(page.locator("#log")).to_be_visible()
        return shown

    shown = await browse(f"{server.url}/?token=s3cret-token-1", script)
    assert '"type":"RUN_STARTED"' in shown["agui"]
    assert '"type":"tool-output-available"' in shown["vercel"]
    assert shown["ndjson"].splitlines()[0].startswith('{"id":1,')
    assert shown["sse"].startswith("retry:")
