"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, on ``meshflow dev``.

Every page runs under the dashboard's strict Content-Security-Policy; each test fails on any console
error or uncaught page error, which is how a blocked script or a broken live update shows up.
``MESHFLOW_SCREENSHOTS=1`` makes the last test save the README's screenshots under ``docs/img/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

import meshflow
from examples.approval import approve_expense
from examples.csv_import import import_csv
from examples.signup import process_signup
from meshflow.testing import wait_until

from .devstack import ROOT, DevStack

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it); never a Playwright download
SCREENSHOTS = ROOT / "docs" / "img"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Stack:
    nats: str
    web: str


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """``meshflow dev`` (nats-server, a worker for the examples, the dashboard) as users start it."""
    async with DevStack(tmp_path_factory.mktemp("dev")) as dev:
        yield Stack(nats=dev.nats, web=dev.web)
    assert dev.code == 0, dev.log()[-3000:]


@pytest.fixture(scope="module")
async def client(stack: Stack) -> AsyncIterator[meshflow.Client]:
    """A client of the dev stack (in place of conftest's, which has a nats-server of its own)."""
    async with meshflow.connect(stack.nats) as c:
        yield c


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():  # fail, not skip: CI must run these
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it on CI)")
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield launched
        await launched.close()


@pytest.fixture
def browser_errors() -> list[str]:
    """What the page fixture's tab logs as errors: console errors (CSP violations among them) and
    uncaught exceptions. A test that provokes one on purpose takes it out."""
    return []


@pytest.fixture
async def page(browser: Browser, stack: Stack, browser_errors: list[str]) -> AsyncIterator[Page]:
    """A fresh browser tab on the dashboard; the test fails if the page logs an error."""
    context = await browser.new_context(base_url=stack.web, viewport={"width": 1280, "height": 800})
    tab = await context.new_page()
    tab.on(
        "console",
        lambda m: browser_errors.append(f"{m.location['url']}: {m.text}") if m.type == "error" else None,
    )
    tab.on("pageerror", lambda e: browser_errors.append(f"uncaught: {e}"))
    yield tab
    await context.close()
    assert browser_errors == [], "the dashboard logged errors in the browser"


async def status_of(client: meshflow.Client, run_id: str) -> str | None:
    try:
        return (await client.get_run(run_id)).status.value
    except meshflow.RunNotFoundError:
        return None


async def send(client: meshflow.Client, name: str, **data: object) -> str:
    [event_id] = await client.send(meshflow.Event(name=name, data=data))
    return event_id


async def sleeping_signup(client: meshflow.Client, email: str) -> str:
    """Sign a user up; return the run once it sleeps its three days."""
    run_id = process_signup.run_id_for(await send(client, "user/signup", email=email))
    await wait_until(lambda: _is(client, run_id, "sleeping"), timeout=30, message=f"{run_id} sleeps")
    return run_id


async def _is(client: meshflow.Client, run_id: str, status: str) -> bool:
    return await status_of(client, run_id) == status


async def test_the_runs_page_leads_to_a_run_with_its_steps_and_what_it_waits_for(
    page: Page, client: meshflow.Client
) -> None:
    run_id = await sleeping_signup(client, "ada@example.com")

    await page.goto("/runs")
    await expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    await page.get_by_role("link", name=run_id).click()

    await expect(page).to_have_url(re.compile(f"/runs/{run_id}$"))
    await expect(page.locator("#run-status")).to_have_text("sleeping")
    steps = page.locator("table.steps tr.step td:first-child")
    await expect(steps.filter(has_text="create-account")).to_have_count(1)
    await expect(steps.filter(has_text="send-welcome")).to_have_count(1)
    await expect(page.locator("section.waiting")).to_contain_text("wait-for-onboarding")
    await expect(page.locator("section.waiting")).to_contain_text("sleeping until")


async def test_replay_opens_the_new_run_which_links_back_to_the_original(
    page: Page, client: meshflow.Client
) -> None:
    run_id = await sleeping_signup(client, "grace@example.com")

    await page.goto(f"/runs/{run_id}")
    await page.get_by_role("button", name="Replay").click()

    await page.wait_for_url(lambda url: "/runs/" in url and run_id not in url)
    new_id = page.url.rsplit("/", 1)[-1]
    await expect(page.get_by_role("heading", name=f"Run {new_id}")).to_be_visible()
    await expect(page.get_by_role("link", name=run_id)).to_have_attribute("href", f"/runs/{run_id}")
    assert (await client.get_run(new_id)).replay_of == run_id


async def test_cancel_stops_a_sleeping_run(page: Page, client: meshflow.Client) -> None:
    run_id = await sleeping_signup(client, "linus@example.com")

    await page.goto(f"/runs/{run_id}")
    await expect(page.locator("#run-status")).to_have_text("sleeping")
    await page.get_by_role("button", name="Cancel").click()

    await expect(page.locator("#run-status")).to_have_text("cancelled")
    await expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    await expect(page.locator("section.waiting")).to_have_count(0)
    assert await status_of(client, run_id) == "cancelled"


async def test_a_run_page_updates_live_as_the_run_goes_on(page: Page, client: meshflow.Client) -> None:
    """The page stays put; live.js swaps the run's body in when the server pushes a change (SSE)."""
    event_id = await send(client, "expense/submitted", expense_id="e-live", amount=420)
    run_id = approve_expense.run_id_for(event_id)
    await wait_until(lambda: _is(client, run_id, "waiting"), timeout=30, message=f"{run_id} waits")
    await page.goto(f"/runs/{run_id}")
    await expect(page.locator("#run-status")).to_have_text("waiting")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    await send(client, "expense/decided", expense_id="e-live", approved=True, by="ann")

    await expect(page.locator("#run-status")).to_have_text("completed")
    steps = page.locator("table.steps tr.step td:first-child")
    await expect(steps).to_have_count(3)
    for step in ("manager-decision", "pay-out", "notify"):
        await expect(steps.filter(has_text=step)).to_have_count(1)
    await expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    assert navigations == []

    await page.get_by_role("button", name="Replay").click()  # a form swapped in live still posts
    await page.wait_for_url(lambda url: run_id not in url)
    await expect(page.get_by_role("link", name=run_id)).to_be_visible()


async def test_the_send_form_sends_an_event_and_shows_the_runs_it_started(page: Page) -> None:
    await page.goto("/send")
    await page.get_by_label("Name").fill("expense/submitted")
    await page.get_by_label("Data (a JSON object)").fill('{"expense_id": "e-form", "amount": 42}')
    await page.get_by_role("button", name="Send").click()

    await expect(page).to_have_url(re.compile(r"/runs\?q="))
    run = page.locator("table.runs tbody tr", has_text="finance-approve-expense")

    async def listed() -> bool:
        # This list is not live: the worker may start the run just after the redirect lands.
        if await run.count():
            return True
        await page.reload()
        return False

    await wait_until(listed, timeout=15, message="the event's run is listed")
    await run.get_by_role("link").click()
    await expect(page.locator("#run-status")).to_have_text("waiting")
    await expect(page.locator("section.waiting")).to_contain_text("expense/decided")


async def test_the_send_form_explains_bad_json_and_keeps_what_was_typed(
    page: Page, browser_errors: list[str]
) -> None:
    await page.goto("/send")
    await page.get_by_label("Name").fill("user/signup")
    await page.get_by_label("Data (a JSON object)").fill("{email: nope}")
    await page.get_by_role("button", name="Send").click()

    await expect(page.locator("#error")).to_contain_text("data is not JSON")
    await expect(page.get_by_label("Name")).to_have_value("user/signup")
    await expect(page.get_by_label("Data (a JSON object)")).to_have_value("{email: nope}")
    # The form comes back with status 400, which Chromium logs; that one is expected.
    browser_errors.remove(
        f"{page.url}: Failed to load resource: the server responded with a status of 400 (Bad Request)"
    )


async def test_a_run_page_shows_each_attempts_error_and_what_the_run_logged(
    page: Page, client: meshflow.Client
) -> None:
    """The CSV import's flaky CRM: each chunk's failed attempt with its error, and the log lines
    (ctx.logger's and the CRM client's stdlib ones), filterable by step and level."""
    csv = "email,name\na@b.c,Ann\nb@c.d,Bob\nc@d.e,Cy"
    event = meshflow.Event(name="csv/uploaded", data={"name": "people.csv", "csv": csv})
    await client.send(event)
    run_id = import_csv.run_id_for(event)
    run = await client.wait_for_run(run_id, timeout=60)
    assert run.status is meshflow.RunStatus.COMPLETED
    await page.goto(f"/runs/{run_id}")

    errors = page.locator("table.attempts tr.attempt summary", has_text="ConnectionError: the CRM timed out")
    await expect(errors).to_have_count(2)  # the first attempt of each of the two chunks
    lines = page.locator("#log-lines tr.log")
    await expect(lines.filter(has_text="parsed the file")).to_have_count(1)
    await expect(lines.filter(has_text="the CRM did not answer within 10 s")).to_have_count(2)
    await expect(lines.filter(has_text="sending chunk 1 (1 rows) to the CRM")).to_have_count(2)
    await expect(page.locator("#log-state")).to_have_text("the run has ended")

    await page.select_option("#log-level", "warning")
    await expect(lines.filter(has_text="parsed the file")).to_be_hidden()
    await expect(lines.filter(has_text="the CRM did not answer within 10 s").first).to_be_visible()
    await page.select_option("#log-level", "debug")
    await page.select_option("#log-where", "(function)")  # logged by the body, outside steps
    await expect(lines.filter(has_text="sending chunk").first).to_be_hidden()
    await expect(lines.filter(has_text="parsed the file")).to_be_visible()


async def test_the_logs_panel_appends_lines_as_a_running_run_logs_them(
    page: Page, client: meshflow.Client
) -> None:
    """A run that waits for an approval logs after it: the line arrives on the open page (SSE)."""
    event_id = await send(client, "expense/submitted", expense_id="e-logs", amount=420)
    run_id = approve_expense.run_id_for(event_id)
    await wait_until(lambda: _is(client, run_id, "waiting"), timeout=30, message=f"{run_id} waits")
    await page.goto(f"/runs/{run_id}")
    await expect(page.locator("#log-state")).to_have_text("live")
    before = await page.locator("#log-lines tr.log").count()

    await send(client, "expense/decided", expense_id="e-logs", approved=True, by="ann")

    await expect(page.locator("#log-state")).to_have_text("the run has ended", timeout=15_000)
    assert await page.locator("#log-lines tr.log").count() > before
    await expect(page.locator("#log-lines tr.log", has_text="approved")).not_to_have_count(0)


async def test_every_page_renders_under_the_csp(page: Page, client: meshflow.Client) -> None:
    """Runs, a run, events, functions, workers and the send form; screenshots for the README if asked."""
    run_id = await sleeping_signup(client, "margaret@example.com")
    await send(client, "digest/user.due", user="ann")
    shoot = os.environ.get("MESHFLOW_SCREENSHOTS") == "1"
    pages = [
        ("/runs", "Runs", "runs"),
        (f"/runs/{run_id}", f"Run {run_id}", "run"),
        ("/events", "Events", "events"),
        ("/functions", "Functions", "functions"),
        ("/workers", "Workers", None),
        ("/send", "Send an event", "send"),
    ]
    for path, heading, image in pages:
        await page.goto(path)
        await expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        if shoot and image:
            await page.screenshot(path=SCREENSHOTS / f"{image}.png", full_page=True)
