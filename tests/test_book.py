"""The book: builds with execution, fails on a failing cell, renders every chapter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _notebook(path: Path, code: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter"), nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


def _failing_notebook(path: Path) -> None:
    _notebook(path, "raise RuntimeError('deliberate failure')")


def _mini_book(root: Path, code: str) -> subprocess.CompletedProcess:
    """Build a one-chapter book with the project's _config.yml and the given cell."""
    root.mkdir()
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "intro.md").write_text("# Intro\n\nA page.\n")
    _notebook(root / "chapter.ipynb", code)
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapter\n")
    return subprocess.run([str(BIN / "jupyter-book"), "build", str(root), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True)


def test_failing_cell_fails_the_book_build(tmp_path):
    """A deliberately failing cell makes the build fail; the same book with a good cell builds."""
    good = _mini_book(tmp_path / "good", "print(6 * 7)")
    assert good.returncode == 0, "the mini book should build:\n" + (good.stdout + good.stderr)[-3000:]
    assert "42" in (tmp_path / "good" / "_build" / "html" / "chapter.html").read_text()
    bad = _mini_book(tmp_path / "bad", "raise RuntimeError('deliberate failure')")
    assert bad.returncode != 0, "a failing cell did not fail the book build"
    assert "deliberate failure" in bad.stdout + bad.stderr


def test_failing_cell_fails_headless_execution(tmp_path):
    """The README's headless command (nbconvert --execute) stops with an error too."""
    def execute(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
                               "--output-dir", str(tmp_path / "out"), str(path)],
                              capture_output=True, text=True)

    _notebook(tmp_path / "good.ipynb", "print(6 * 7)")
    good = execute(tmp_path / "good.ipynb")
    assert good.returncode == 0, good.stderr[-2000:]
    _failing_notebook(tmp_path / "broken.ipynb")
    bad = execute(tmp_path / "broken.ipynb")
    assert bad.returncode != 0
    assert "deliberate failure" in bad.stderr


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(errors="replace"))
    return parser


def _toc_pages() -> list[str]:
    return re.findall(r"(?:root|file):\s*(\S+)", (REPO / "_toc.yml").read_text())


@pytest.mark.book
def test_book_builds_with_every_chapter_executed(book_run):
    assert book_run.returncode == 0, "book build failed:\n" + book_run.log[-4000:]
    if book_run.html_dir is None:
        pytest.skip("DATARED_TEST_WORK_DIR reuses a work folder; no build to check")
    html = book_run.html_dir
    assert (html / "index.html").exists()
    for page in _toc_pages():
        out = html / f"{page}.html"
        assert out.exists(), f"{page} is in _toc.yml but {out} was not built"
        if page.startswith("notebooks/"):
            parsed = _parse(out)
            figures = [s for s in parsed.images if "_images/" in s or s.startswith("data:image")]
            assert figures, f"{page}: no executed figure in the rendered page"
            text = out.read_text(errors="replace")
            assert "cell_output" in text, f"{page}: no executed outputs in the rendered page"
            assert "Traceback" not in text, f"{page}: a traceback is shown in the rendered page"


@pytest.mark.book
def test_rendered_site_has_no_broken_internal_links(book_run):
    if book_run.html_dir is None or book_run.returncode != 0:
        pytest.skip("no fresh build to check")
    html = book_run.html_dir
    broken = []
    for page in html.rglob("*.html"):
        parsed = _parse(page)
        for ref in parsed.links + parsed.images:
            url = urlparse(ref)
            if url.scheme or ref.startswith(("#", "mailto:", "data:")) or not url.path:
                continue
            target = (page.parent / unquote(url.path)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(html)} -> {ref}")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:20])


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.book
def test_pages_render_in_headless_chromium(book_run, tmp_path):
    """Load every chapter in a real browser; its DOM must show the figures."""
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (CI installs Debian's chromium); skipping the browser check")
    if book_run.html_dir is None or book_run.returncode != 0:
        pytest.skip("no fresh build to check")
    for page in _toc_pages():
        path = book_run.html_dir / f"{page}.html"
        proc = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{page}: chromium failed: {proc.stderr[-2000:]}"
        dom = proc.stdout
        assert "<h1" in dom, f"{page}: no heading in the rendered DOM"
        if page.startswith("notebooks/"):
            assert "<img" in dom, f"{page}: no figure in the rendered DOM"
    # index.html only redirects to the root page; photograph the root page itself.
    root_page = book_run.html_dir / f"{_toc_pages()[0]}.html"
    shot = tmp_path / "root.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1280,900", root_page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, f"no screenshot of {root_page}"
    os.makedirs(REPO / ".cache", exist_ok=True)
    shutil.copy(shot, REPO / ".cache" / "root-page.png")
    index = (book_run.html_dir / "index.html").read_text()
    assert _toc_pages()[0] in index, "index.html does not lead to the root page"
