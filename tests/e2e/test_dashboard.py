"""The web dashboard at /ui, end to end in headless Chromium against real servers.

Each page loads without console errors or uncaught exceptions, fetches nothing
but this server, shows the demo's functions, devices and cost, and a run's
timeline after one workflow run, and picks up new data without a reload. With a
token configured the pages are read-only until the token is typed in; then the
resume and replay buttons act. Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from browser import Page, launch, open_page
from e2e_helpers import MODELS, REQUEST_TIMEOUT_S, start, stop_checked

from smss.client import Client
from smss.testing.server import ServerProcess

pytestmark = pytest.mark.slow

TOKEN = "dashboard-test-token-0123456789"
WAIT_MS = 30_000  # generous bounds on what the page shows; the page itself refreshes every 2 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    with open_page(browser) as p:
        yield p


def _frame_run(url: str, session: str) -> dict[str, Any]:
    frame = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    body = {
        "session": session,
        "inputs": [
            {"name": "frame", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": frame.ravel().tolist()}
        ],
    }
    r = httpx.post(f"{url}/v1/workflows/behavior/runs", json=body, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["status"] == "completed", out
    return out


def _only_this_server(page: Page, url: str) -> None:
    foreign = [u for u in page.requested if not u.startswith(url) and not u.startswith("data:")]
    assert not foreign, f"the dashboard fetched from elsewhere: {foreign}"


def test_the_pages_show_the_demo_and_a_runs_timeline(demo_server: ServerProcess, page: Page) -> None:
    url = demo_server.url
    x = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
    for _ in range(5):
        assert httpx.post(f"{url}/v2/models/mlp/infer", json=x, timeout=REQUEST_TIMEOUT_S).status_code == 200
    run = _frame_run(url, "dash-1")
    p = page.page

    p.goto(f"{url}/ui#functions")
    table = p.locator("#functions-table")
    for name in ("mlp", "cnn", "mlp_onnx", "behavior_perceive", "behavior_track", "behavior_respond"):
        p.wait_for_selector(f'#functions-table tr[data-function="{name}"]', timeout=WAIT_MS)
    tiers = table.locator(".badge").all_inner_texts()
    assert set(tiers) <= {"warm", "standby", "resident", "cold", "no runtime", "no_runtime"}, tiers
    # Traffic while the page is open: the request rate shows it without a reload (the
    # page's CSP forbids eval, so the test polls the cell rather than a JS predicate).
    rate = p.locator('#functions-table tr[data-function="mlp"] td').nth(6)
    none = ("\N{EN DASH}", "0")  # what the cell shows with no rate yet
    shown = []
    for _ in range(30):
        for _ in range(5):
            httpx.post(f"{url}/v2/models/mlp/infer", json=x, timeout=REQUEST_TIMEOUT_S)
        p.wait_for_timeout(500)
        shown.append(rate.inner_text())
        if shown[-1] not in none and len(shown) >= 8:
            break
    assert shown[-1] not in none, f"mlp's request rate never showed: {shown}"
    p.wait_for_selector("section.card svg.chart path.series", state="attached", timeout=WAIT_MS)
    assert p.locator("h2", has_text="Instance starts by tier").count() == 1
    page.screenshot("dashboard-functions")

    p.goto(f"{url}/ui#nodes")
    p.wait_for_selector(".memmap .seg", timeout=WAIT_MS)
    assert p.get_by_text("cpu:0").count() >= 1
    assert p.get_by_text("weight store").count() >= 1
    page.screenshot("dashboard-nodes")

    p.goto(f"{url}/ui#runs")
    p.wait_for_selector(f'#runs-table tr[data-run="{run["run_id"]}"]', timeout=WAIT_MS)
    # A run started while the page is open appears without a reload.
    later = _frame_run(url, "dash-2")
    p.wait_for_selector(f'#runs-table tr[data-run="{later["run_id"]}"]', timeout=WAIT_MS)
    # The filter: only failed runs listed (other tests may have left some), or none.
    p.select_option("select[name=status]", "failed")
    p.wait_for_selector(f'#runs-table tr[data-run="{run["run_id"]}"]', state="detached", timeout=WAIT_MS)
    statuses = p.locator("#runs-table tbody .badge").all_inner_texts()
    assert set(statuses) <= {"failed"}, statuses
    p.select_option("select[name=status]", "completed")
    p.locator(f'#runs-table tr[data-run="{run["run_id"]}"]').click()

    p.wait_for_selector("#gantt rect.bar.completed", timeout=WAIT_MS)
    assert p.locator("#gantt rect.bar.completed").count() == 3  # perceive, track, respond
    for stage in ("perceive", "track", "respond"):
        assert p.locator("#gantt text", has_text=stage).count() >= 1
    assert p.locator("#replay").is_enabled()  # no token configured: the server lets anyone act
    page.screenshot("dashboard-run")

    p.goto(f"{url}/ui#cost")
    p.wait_for_selector("#cost-table", timeout=WAIT_MS)
    assert "TOTAL" in p.locator("#cost-table").inner_text()
    p.wait_for_selector("section.card svg.chart path.series", state="attached", timeout=WAIT_MS)
    page.screenshot("dashboard-cost")

    assert not page.problems, page.problems
    _only_this_server(page, url)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start(tmp_path_factory.mktemp("dashboard-token"), ["--token", TOKEN, "--keep-alive", "60"])
    try:
        with Client(server.url, TOKEN) as client:
            client.deploy(f"{MODELS / 'picky.py'}:Picky")
        workflow = {
            "name": "picky_flow",
            "stages": [{"name": "check", "function": "picky", "inputs": {"x": "request.x"}, "retries": 1}],
            "outputs": {"y": "check.y"},
        }
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{server.url}/v1/workflows", json=workflow, headers=auth, timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 201, r.text
        yield server
    finally:
        stop_checked(server)


def _failed_run(url: str) -> str:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [-1, 0, 0, 0]}]}
    r = httpx.post(f"{url}/v1/workflows/picky_flow/runs", json=body, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed", r.text
    run_id: str = r.json()["run_id"]
    return run_id


def test_actions_need_the_admin_token(token_server: ServerProcess, page: Page, tmp_path: Path) -> None:
    url = token_server.url
    run_id = _failed_run(url)
    p = page.page
    p.goto(f"{url}/ui#run/{run_id}")
    p.wait_for_selector("text=Run logs need the admin token", timeout=WAIT_MS)
    assert p.locator("#access").inner_text() == "read-only"
    assert not p.locator("#replay").is_enabled()

    p.fill("#token", TOKEN)
    p.click("#token-form button[type=submit]")
    p.wait_for_selector("#gantt rect.bar.failed", timeout=WAIT_MS)
    assert p.locator("#access").inner_text() == "admin"
    # The first attempt failed and was retried; the last one failed the run.
    assert p.locator("#gantt rect.bar.retried").count() == 1
    assert "picky refuses negative input" in p.locator(".failure").inner_text()
    page.screenshot("dashboard-failed-run")

    p.select_option("#replay-stage", "check")
    p.click("#replay")
    # The page's CSP forbids eval: wait on the URL, not on a JavaScript expression.
    p.wait_for_url(lambda url: "#run/" in url and not url.endswith(run_id), timeout=WAIT_MS)
    replayed = p.url.rsplit("/", 1)[1]
    assert replayed != run_id
    p.wait_for_selector("#gantt rect.bar", timeout=WAIT_MS)

    p.click("#resume")
    p.wait_for_selector("#action-message:has-text('resume: run')", timeout=WAIT_MS)
    assert not page.problems, page.problems
    _only_this_server(page, url)
