"""A report opened in headless Chromium: no console errors, every chart drawn at a non-zero size,
not one network request, the summary table sorts; a screenshot is kept in ``test-artifacts/``.

Chromium is driven over the DevTools protocol on a websocket (``websockets``), no webdriver. The
world (``tests.test_report.build_world``) is taken through backtest, paper and live on the
parametrised store (SQLite, PostgreSQL), with a second strategy waiting for approval and a
halt/resume in its ledger.

Also a script: ``python -m tests.test_report_browser --html FILE --screenshot OUT.png`` renders a
screenshot of any report (``docs/report.png`` comes from the demo store this way).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars")


def chromium_path() -> str | None:
    """The Chromium binary (Debian's ``chromium`` package), if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One page of a headless Chromium, spoken to over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def drain(self, seconds: float = 0.3) -> None:
        """Collect events that arrive within ``seconds`` of quiet."""
        while True:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=seconds)))
            except TimeoutError:
                return

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, *, height: int | None = None) -> None:
        """A PNG of the page: the whole length, or its top ``height`` CSS pixels."""
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], height or size["height"]),
                "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    # what the page did
    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails"))[:500])
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif e.get("method") == "Network.loadingFailed":
                out.append(f"network: {p.get('errorText')}")
        return out


@contextmanager
def open_page(url: str, *, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """Start a fresh headless Chromium (own profile, no network features), open ``url`` with the
    Network, Runtime, Log and Page domains recording from before the first request."""
    from websockets.sync.client import connect

    binary = chromium_path()
    assert binary is not None, "chromium is not installed"
    profile = Path(tempfile.mkdtemp(prefix="qmtl-chromium-"))
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        target = next(t for t in targets if t.get("type") == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            page = Page(ws)
            for domain in ("Network", "Runtime", "Log", "Page"):
                page.send(f"{domain}.enable")
            page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
            page.events.clear()  # about:blank is not the page under test
            page.send("Page.navigate", url=url)
            page.wait_for("Page.loadEventFired")
            page.drain()
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


CHART_SIZES = """
Array.from(document.querySelectorAll("figure.chart svg, svg.spark")).map(function (e) {
  var r = e.getBoundingClientRect();
  var f = e.closest("figure");
  return {kind: f ? f.dataset.chart : "spark", width: r.width, height: r.height,
          strategy: (e.closest("article, tr") || {}).id || ""};
})
"""


# --- the test ------------------------------------------------------------------------------------------
@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (make test installs it: "
                                                    "apt-get install -y chromium chromium-driver)")
def test_report_in_headless_chromium(store_url: str, tmp_path: Path) -> None:
    from qmtl_core.report._collect import collect
    from qmtl_core.report._render import write_html
    from tests._service import Clock, make_service
    from tests.test_report import POLICY, T0, build_world

    worlds = tmp_path / "worlds"
    worlds.mkdir()
    (worlds / "rep.yaml").write_text(POLICY)
    svc = make_service(store_url, worlds, tmp_path / "home", Clock(T0)).as_actor("cron")
    try:
        build_world(svc)
        report = collect(svc, "rep")
    finally:
        svc.close()
    a = next(s for s in report.strategies if s.strategy_id == "a")
    assert list(a.runs) == ["backtest", "paper", "live"] and a.stage == "live"
    out = write_html(report, tmp_path / "report.html")
    url = out.resolve().as_uri()
    with open_page(url) as page:
        assert page.errors() == []
        requests = page.requests()
        assert requests == [url], f"the page fetched something besides itself: {requests}"
        # c fails (backtest only): collapsed by default; a (live) and b (awaiting approval) are open
        opened = page.evaluate('Array.from(document.querySelectorAll("article.strategy")).map('
                               'function (a) { return [a.id, a.querySelector("details").open]; })')
        assert sorted(opened) == [["s-a", True], ["s-b", True], ["s-c", False]], opened
        page.evaluate('document.querySelectorAll("article.strategy details").forEach(function (d) { d.open = true; })')
        sizes = page.evaluate(CHART_SIZES)
        tearsheets = [s for s in sizes if s["kind"] == "tearsheet"]
        assert len(tearsheets) == 3 and len([s for s in sizes if s["kind"] == "spark"]) == 3
        assert all(s["width"] > 100 and s["height"] > 50 for s in tearsheets), sizes
        assert all(s["width"] > 0 and s["height"] > 0 for s in sizes), sizes
        # the later stages zoomed, with the return distributions: a (paper, live) and b (paper) have one,
        # c (backtest only) none; b's approval view has its own copy
        stages = sorted((s["strategy"], s["kind"]) for s in sizes if s["kind"] in ("stages", "approval-stages"))
        assert stages == [("", "approval-stages"), ("s-a", "stages"), ("s-b", "stages")], stages
        assert all(s["width"] > 300 and s["height"] > 100 for s in sizes if "stages" in s["kind"]), sizes
        # every stage's colour is drawn in a's chart; the text is text (no glyph paths, no fonts)
        svg = page.evaluate('document.querySelector("#s-a figure.chart svg").outerHTML')
        assert all(colour in svg for colour in ("#4c72b0", "#dd8452", "#2ca02c")) and "<text" in svg
        # sorting: the first click on the ranking column sorts largest first, the second smallest first
        column = ('Array.from(document.querySelectorAll("table.summary tbody tr"))'
                  '.map(function (r) { return parseFloat(r.cells[3].dataset.v); })')
        page.evaluate('document.querySelector("table.summary th:nth-child(4)").click()')
        values = page.evaluate(column)
        assert values == sorted(values, reverse=True) and len(set(values)) == 3
        page.evaluate('document.querySelector("table.summary th:nth-child(4)").click()')
        assert page.evaluate(column) == sorted(values)
        page.drain()
        assert page.errors() == [] and page.requests() == [url]
        ARTIFACTS.mkdir(exist_ok=True)
        backend = "postgresql" if store_url.startswith("postgresql") else "sqlite"
        shot = ARTIFACTS / f"report-{backend}.png"
        page.screenshot(shot)
        assert shot.stat().st_size > 10_000
        # the approval view opens each pending request, in the order an approver needs it
        (pending,) = report.pending
        view = page.evaluate(APPROVAL % pending["request_id"])
        assert view["open"] and view["width"] > 300 and view["height"] > 200, view
        assert view["order"] == sorted(view["order"]) and -1 not in view["order"], view
        assert "✗ the required approvals are in" in view["text"] and "✓ the world is not halted" in view["text"]
        assert pending["evidence_hash"] in view["text"] and "Bailey & López de Prado" in view["text"]
        assert "-0.0%" not in view["text"] and view["stages"] == ["metric", "backtest", "paper"]
        assert view["chart"] is not None and view["chart"][0] > 300 and view["chart"][1] > 100, view["chart"]
        page.evaluate('document.body.innerHTML = document.querySelector("details.approval").outerHTML')
        approval_shot = ARTIFACTS / f"approval-{backend}.png"
        page.screenshot(approval_shot)
        assert approval_shot.stat().st_size > 10_000 and page.errors() == []


#: The pending request's approval view: open, drawn, its sections' positions in the text, its stages.
APPROVAL = """(function () {
  var d = document.getElementById("approve-%s"); var r = d.getBoundingClientRect(); var t = d.innerText;
  var heads = ["Live-gate checklist", "Stages side by side", "Small sample", "Risk evidence", "Evidence "];
  var c = d.querySelector('figure[data-chart="approval-stages"] svg');
  return {open: d.open, width: r.width, height: r.height, text: t,
          chart: c ? [c.getBoundingClientRect().width, c.getBoundingClientRect().height] : null,
          order: heads.map(function (h) { return t.indexOf(h); }),
          stages: Array.from(d.querySelectorAll("table.side-by-side th")).map(function (h) { return h.innerText; })};
})()"""


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot a qmtl report in headless Chromium.")
    parser.add_argument("--html", required=True, type=Path)
    parser.add_argument("--screenshot", required=True, type=Path)
    parser.add_argument("--height", type=int, default=None, help="only the top HEIGHT pixels")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    url = args.html.resolve().as_uri()
    with open_page(url, width=args.width) as page:
        errors, requests = page.errors(), page.requests()
        page.screenshot(args.screenshot, height=args.height)
    print(f"{args.screenshot}: console errors {len(errors)}, requests {requests}")
    if errors or requests != [url]:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main()
