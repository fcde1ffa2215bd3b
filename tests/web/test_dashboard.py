"""The dashboard in headless Chromium, against ``celery spawn serve`` and trees a real worker made.

Three ways in: ``chromium --dump-dom`` (what the page shows once its
JavaScript ran), ``chromium --screenshot`` (kept under test-artifacts/), and
chromedriver's WebDriver protocol (plain HTTP, no Selenium) to click: expand
and collapse nodes, open another tree, and watch a running tree refresh
itself until it finishes.
"""
from __future__ import annotations

import base64
import contextlib
import json
import re
import struct
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_spawn import get_state
from celery_spawn.handlers import default_operation_id
from celery_spawn.store import queries
from tests.harness import COMBINATIONS, free_port, wait_for
from tests.web.helpers import TIMEOUT, require_program, served

# One store is enough here: the page reads the API, which test_api and test_js_client run on every store.
pytestmark = pytest.mark.parametrize("backend", COMBINATIONS[:1], indirect=True, scope="module")

WINDOW = (1400, 1000)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser() -> str:
    return require_program("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def server(backend, trees, artifacts):
    with served(backend.env(), "--port", "0", log=artifacts / f"serve-dashboard-{backend.name}.log") as running:
        yield running


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                            timeout=90, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def dump_dom(browser: str, profile: Path, url: str) -> str:
    """The DOM after the page's scripts ran (virtual time: timers run, network waits are not counted)."""
    return chromium(browser, profile, "--virtual-time-budget=6000", "--dump-dom", url).stdout


def elements(dom: str, tag: str, class_: str = "", **attrs: str) -> list[str]:
    """Opening tags of ``tag`` with these classes (among others) and attribute values (data_job_id=...)."""
    found = []
    for match in re.finditer(rf"<{tag}\b[^>]*>", dom):
        element = match.group(0)
        if not set(class_.split()) <= set((attribute(element, "class") or "").split()):
            continue
        if all(f'{name.replace("_", "-")}="{value}"' in element for name, value in attrs.items()):
            found.append(element)
    return found


def attribute(element: str, name: str) -> str | None:
    match = re.search(rf'\b{name}="([^"]*)"', element)
    return match.group(1) if match else None


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


# ---- what the page shows ------------------------------------------------------------------------
def test_dashboard_shows_operations_stats_and_tree(browser, server, trees, client_app, tmp_path, artifacts):
    dom = dump_dom(browser, tmp_path / "profile", f"{server.url}/?job={trees.nested}")

    # Recent operations: one row per operation, with state and a progress bar.
    rows = elements(dom, "tr", class_="operation")
    assert len(rows) == 10
    dataset_row = elements(dom, "tr", data_operation_id=trees.dataset_op)
    assert len(dataset_row) == 1 and attribute(dataset_row[0], "data-state") == "succeeded"
    row_html = dom.split(dataset_row[0], 1)[1].split("</tr>", 1)[0]
    assert 'data-done="11" data-total="11"' in row_html and "11/11 (100%)" in row_html
    assert "dataset_processor" in row_html and trees.queue in row_html
    refused = elements(dom, "tr", data_operation_id=trees.refused_op)
    assert attribute(refused[0], "data-state") == "failed"

    # Stats for the last 24 hours.
    assert re.search(r'data-stat="operations"><div class="value">10</div>', dom)
    assert re.search(r'data-stat="children"><div class="value">28</div>', dom)

    # The tree: the first two levels open, the third collapsed (its leaves are not drawn).
    assert 'data-tree-state="finished"' in dom
    nodes = elements(dom, "li", class_="node")
    shown = {attribute(node, "data-job-id"): node for node in nodes}
    with get_state(client_app).store.read() as conn:
        below = queries.descendants(conn, trees.nested)
    expected = {trees.nested} | {row["id"] for row in below if row["distance"] <= 2}
    assert set(shown) == expected and len(shown) == 7
    assert {attribute(node, "data-state") for node in nodes} == {"succeeded"}
    collapsed = [node for node in nodes if attribute(node, "aria-expanded") == "false"]
    assert len(collapsed) == 4 and all(attribute(node, "data-depth") == "2" for node in collapsed)
    # Progress per operation on each parent: 2 of 2 children done.
    root_op = elements(dom, "div", class_="progress mini", data_operation_id=trees.nested_op)
    assert len(root_op) == 1 and 'data-done="2" data-total="2"' in root_op[0]
    assert "15 jobs, 4 levels" in dom

    shot = artifacts / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(browser, tmp_path / "profile", "--virtual-time-budget=6000", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             f"--screenshot={shot}", f"{server.url}/?job={trees.nested}")
    assert png_size(shot) == WINDOW and shot.stat().st_size > 20_000


# ---- clicking: WebDriver over HTTP --------------------------------------------------------------
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class WebDriver:
    """The few WebDriver commands these tests need, spoken to chromedriver over HTTP."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session: str | None = None

    def call(self, method: str, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"WebDriver {method} {path}: {exc.read()[:500]!r}") from None

    def start(self, browser: str, profile: Path) -> WebDriver:
        options = {"binary": browser, "args": [*FLAGS, f"--user-data-dir={profile}",
                                               f"--window-size={WINDOW[0]},{WINDOW[1]}"]}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]
        return self

    def s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def open(self, url: str) -> None:
        self.call("POST", self.s("/url"), {"url": url})

    def js(self, script: str, *args):
        return self.call("POST", self.s("/execute/sync"), {"script": script, "args": list(args)})

    def click(self, css: str) -> None:
        element = self.call("POST", self.s("/element"), {"using": "css selector", "value": css})
        self.call("POST", self.s(f"/element/{element[ELEMENT]}/click"), {})

    def until(self, script: str, what: str, timeout: float = 30, *args):
        return wait_for(lambda: self.js(script, *args), timeout, interval=0.1, what=what)

    def quit(self) -> None:
        if self.session:
            with contextlib.suppress(Exception):
                self.call("DELETE", self.s(""))


@pytest.fixture(scope="module")
def driver(browser, tmp_path_factory, artifacts) -> Iterator[WebDriver]:
    chromedriver = require_program("chromedriver")
    port = free_port()
    log = open(artifacts / "chromedriver.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([chromedriver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT)
    web = WebDriver(port)
    try:
        wait_for(lambda: _ready(web), 30, what="chromedriver")
        yield web.start(browser, tmp_path_factory.mktemp("webdriver-profile"))
    finally:
        web.quit()
        proc.terminate()
        proc.wait(15)
        log.close()


def _ready(web: WebDriver) -> bool:
    with contextlib.suppress(OSError, AssertionError):
        return bool(web.call("GET", "/status")["ready"])
    return False


NODES = "return document.querySelectorAll('li.node').length"
TREE_STATE = "const m = document.querySelector('[data-tree-state]'); return m && m.dataset.treeState"


def test_tree_is_interactive(driver, server, trees):
    driver.open(f"{server.url}/?job={trees.nested}")
    driver.until(TREE_STATE, "the tree to load")
    assert driver.js(NODES) == 7
    middle = f"li.node[data-job-id='{trees.middle}']"
    assert driver.js(f"return document.querySelector(\"{middle}\").getAttribute('aria-expanded')") == "false"

    driver.click(f"{middle} > .line > button.toggle")  # expand: its two leaves appear
    driver.until(NODES + " === 9", "two leaves drawn")
    leaves = driver.js(f"return [...document.querySelectorAll(\"{middle} li.node\")].map(n => n.dataset.jobId)")
    assert trees.deepest in leaves and len(leaves) == 2
    driver.click(f"{middle} > .line > button.toggle")  # and collapse again
    driver.until(NODES + " === 7", "leaves hidden")

    driver.click("#tree-meta button:nth-of-type(1)")  # Expand all
    driver.until(NODES + " === 15", "every node drawn")
    driver.click("#tree-meta button:nth-of-type(2)")  # Collapse all
    driver.until(NODES + " === 1", "only the root")

    # An operation row opens its parent's tree, and the address says which.
    driver.click(f"tr.operation[data-operation-id='{trees.dataset_op}'] button.link")
    driver.until(f"return document.querySelector(\"li.node[data-job-id='{trees.dataset}']\") !== null",
                 "the dataset tree")
    assert driver.js(NODES) == 12
    assert driver.js("return new URL(location.href).searchParams.get('job')") == trees.dataset
    assert driver.js("return document.querySelector('tr.selected').dataset.operationId") == trees.dataset_op


def test_a_running_tree_refreshes_until_it_finishes(driver, server, client_app, trees):
    parent = client_app.signature("tests.spawner", kwargs={
        "count": 4, "seconds": 2.5, "_spawn_config": {"handler": "sleepers"}}).delay()
    parent.get(timeout=TIMEOUT)
    store = get_state(client_app).store

    def started():
        with store.read() as conn:
            rows = queries.children(conn, parent.id)
        return len(rows) == 4 and any(r["state"] == "started" for r in rows)

    wait_for(started, TIMEOUT, what="a started sleeper")
    driver.open(f"{server.url}/?job={parent.id}")
    assert driver.until(TREE_STATE, "the tree to load") == "running"
    states = driver.js("return [...document.querySelectorAll('li.node')].map(n => n.dataset.state)")
    # The first sleeper runs 2.5 s; the three held behind it wait that long at least.
    assert len(states) == 5 and states[0] == "succeeded", states
    assert {"started", "held"} & set(states[1:]) and "succeeded" not in states[2:], states
    row = f"tr.operation[data-operation-id='{default_operation_id(parent.id)}']"
    assert driver.until(f"return document.querySelector(\"{row}\")?.dataset.state", "the operation row") == "running"

    # No reload: the page polls while the tree runs, then stops.
    driver.until(TREE_STATE + " === 'finished'", "the page to see the tree finish", timeout=TIMEOUT)
    states = driver.js("return [...document.querySelectorAll('li.node')].map(n => n.dataset.state)")
    assert states == ["succeeded"] * 5
    driver.until(f"return document.querySelector(\"{row}\").dataset.state === 'succeeded'",
                 "the operation row to refresh", timeout=15)
    shot = base64.b64decode(driver.call("GET", driver.s("/screenshot")))
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_behind_a_token(browser, backend, trees, tmp_path, artifacts):
    """The token comes from the URL fragment (never sent to the server); without it the page asks for one."""
    with served(backend.env(), "--port", "0", "--token", "dash-token",
                log=artifacts / f"serve-dashboard-token-{backend.name}.log") as secured:
        without = dump_dom(browser, tmp_path / "profile-a", f"{secured.url}/")
        with_token = dump_dom(browser, tmp_path / "profile-b", f"{secured.url}/?job={trees.dataset}#token=dash-token")
        access_log = secured.log()
    assert elements(without, "tr", class_="operation") == []
    assert 'id="token-form" class="token-form">' in without  # no longer hidden
    assert "This server wants an API token" in without
    assert len(elements(with_token, "tr", class_="operation", data_operation_id=trees.dataset_op)) == 1
    assert len(elements(with_token, "li", class_="node")) == 12
    assert "dash-token" not in access_log  # the fragment never reaches the server
