"""Read the built site as a reader does: headless Chromium with the network blocked.

A small client of the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (the standard
library is enough: no web driver, no port). :func:`read_pages` opens each page after its
scripts ran (MathJax included), takes a screenshot of its first screen, and returns what the
reader checks in ``tests/test_book.py`` need: requests that left the machine, files that
failed to load, script errors, widget outputs (they need a widget manager from the network),
maths left as LaTeX, the page text, output and code lines
wider than their column, HTML outputs wider than the column, and figures that did not load.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The window of a laptop reader; the screenshots and the column widths are measured in it.
WINDOW = (1280, 900)

#: Flags for a quiet, reproducible headless Chromium that cannot reach any network.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={WINDOW[0]},{WINDOW[1]}",
]


def chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevTools:
    """Chromium driven over the DevTools pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def pipes_as_fd_3_and_4():  # runs in the child, before exec
            commands, replies = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(commands, 3)
            os.dup2(replies, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"],
            preexec_fn=pipes_as_fd_3_and_4, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._out = os.fdopen(to_browser_w, "wb", buffering=0)
        self._in = from_browser_r
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        os.close(self._in)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict:
        """Wait for an event of ``session`` (also one that arrived already)."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def evaluate(self, expression: str, session: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


#: Waits until MathJax (if the page loads it) has typeset the page.
WAIT_FOR_MATHJAX = """
(window.MathJax && MathJax.startup && MathJax.startup.promise)
  ? MathJax.startup.promise.then(() => true) : Promise.resolve(false)
"""

#: Collects, from the rendered page, what the reader checks look at.
READ_PAGE = r"""
(() => {
  const main = document.querySelector('main') || document.body;
  const where = (el) => {
    const section = el.closest('section');
    const heading = section && section.querySelector('h1, h2, h3, h4');
    return heading ? heading.textContent.replace(/[#¶]/g, '').trim() : '';
  };
  // Prose text: the article without code, outputs, rendered maths and scripts.
  const prose = main.cloneNode(true);
  prose.querySelectorAll('pre, code, script, style, mjx-container, mjx-assistive-mml, '
                         + '.cell_output, .MathJax').forEach(el => el.remove());
  const maths = [...main.querySelectorAll('.math')];
  const unrendered = maths.filter(el => !el.querySelector('mjx-container'))
                          .map(el => el.textContent.trim().slice(0, 120));
  // Monospace capacity of a <pre>: how many characters fit in its visible width.
  const columns = (pre) => {
    const probe = document.createElement('span');
    probe.textContent = 'x'.repeat(200);
    probe.style.cssText = 'position:absolute;visibility:hidden;white-space:pre';
    pre.appendChild(probe);
    const perChar = probe.getBoundingClientRect().width / 200;
    probe.remove();
    const style = getComputedStyle(pre);
    const inner = pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return Math.floor(inner / perChar + 1e-6);
  };
  const wide = [];
  main.querySelectorAll('div.cell').forEach((cell, index) => {
    cell.querySelectorAll('div.cell_input pre, div.cell_output pre').forEach(pre => {
      const kind = pre.closest('div.cell_output') ? 'output' : 'code';
      const fit = columns(pre);
      pre.textContent.split('\n').forEach((raw, n) => {
        const line = raw.trimEnd();  // trailing blanks (e.g. of 80-character FITS cards) are invisible
        if (line.length > fit) {
          wide.push({kind, cell: index + 1, line: n + 1, length: line.length, columns: fit,
                     text: line, section: where(cell)});
        }
      });
    });
  });
  const wideHtml = [];
  main.querySelectorAll('div.cell_output div.output.text_html').forEach(out => {
    if (out.scrollWidth > out.clientWidth + 1) {
      wideHtml.push({width: out.scrollWidth, column: out.clientWidth, section: where(out),
                     text: out.innerText.split('\n')[0].slice(0, 120)});
    }
  });
  return {
    title: document.title,
    has_heading: !!main.querySelector('h1'),
    text: main.innerText,
    prose: prose.innerText,
    outputs: [...main.querySelectorAll('div.cell_output')].map(el => ({
      text: el.innerText, section: where(el)})),
    maths: maths.length,
    unrendered_maths: unrendered,
    mathjax_loaded: !!window.MathJax,
    wide_lines: wide,
    wide_html: wideHtml,
    widgets: [...main.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
      .map(el => where(el)),
    images: [...main.querySelectorAll('img')].map(img => ({
      src: img.getAttribute('src'), loaded: img.complete && img.naturalWidth > 0})),
  };
})()
"""


@dataclass
class PageReport:
    """What a reader meets on one page (see READ_PAGE for the fields of ``content``)."""

    page: str
    content: dict
    external_requests: list[str] = field(default_factory=list)
    failed_files: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None


def _session_events(events: list[dict], session: str) -> list[dict]:
    return [e for e in events if e.get("sessionId") == session]


def read_pages(executable: str, html_dir: Path, pages: list[str], profile: Path,
               screenshots: Path) -> dict[str, PageReport]:
    """Open each ``page`` (a path without .html below ``html_dir``) and report on it."""
    screenshots.mkdir(parents=True, exist_ok=True)
    browser = DevTools(executable, profile)
    reports: dict[str, PageReport] = {}
    try:
        for page in pages:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget",
                                   {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Network", "Runtime"):
                browser.send(f"{domain}.enable", {}, session)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1,
                          "mobile": False}, session)
            start = len(browser.events)
            browser.send("Page.navigate", {"url": (html_dir / f"{page}.html").as_uri()}, session)
            browser.wait_for("Page.loadEventFired", session)
            browser.evaluate(WAIT_FOR_MATHJAX, session)
            browser.evaluate("new Promise(r => setTimeout(r, 300))", session)  # fonts, layout
            report = PageReport(page, browser.evaluate(READ_PAGE, session))
            shot = browser.send("Page.captureScreenshot", {"format": "png"}, session)
            report.screenshot = screenshots / (page.replace("/", "__") + ".png")
            report.screenshot.write_bytes(base64.b64decode(shot["data"]))
            events = _session_events(browser.events[start:], session)
            urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                    for e in events if e.get("method") == "Network.requestWillBeSent"}
            report.external_requests = sorted(
                {u for u in urls.values() if not u.startswith(("file:", "data:", "blob:", "about:"))})
            report.failed_files = sorted(
                {urls.get(e["params"]["requestId"], "?") for e in events
                 if e.get("method") == "Network.loadingFailed"
                 and urls.get(e["params"]["requestId"], "").startswith("file:")})
            report.script_errors = [
                e["params"]["exceptionDetails"].get("exception", {}).get("description")
                or e["params"]["exceptionDetails"].get("text", "")
                for e in events if e.get("method") == "Runtime.exceptionThrown"]
            reports[page] = report
            browser.send("Target.closeTarget", {"targetId": target})
    finally:
        browser.close()
    return reports
