"""The book: builds with execution, fails on a failing cell, caches executions in run order,
shows repository buttons only for a real address, and reads well in a browser with no network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

import config
from tests import browser
from tests.building import book_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCREENSHOTS = REPO / ".cache" / "screenshots"


def _notebook(path: Path, code: str, prose: str = "A chapter.") -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# A chapter\n\n{prose}"),
                nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


def _failing_notebook(path: Path) -> None:
    _notebook(path, "raise RuntimeError('deliberate failure')")


def _build(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "jupyter-book"), "build", str(root), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True)


def _mini_book(root: Path, code: str, **execute) -> subprocess.CompletedProcess:
    """Build a one-chapter book with the project's _config.yml and the given cell."""
    root.mkdir()
    book_config(root / "_config.yml", **execute)
    (root / "intro.md").write_text("# Intro\n\nA page.\n")
    _notebook(root / "chapter.ipynb", code)
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapter\n")
    return _build(root)


def test_failing_cell_fails_the_book_build(tmp_path):
    """A deliberately failing cell makes the build fail; the same book with a good cell builds."""
    good = _mini_book(tmp_path / "good", "print(6 * 7)")
    assert good.returncode == 0, "the mini book should build:\n" + (good.stdout + good.stderr)[-3000:]
    page = (tmp_path / "good" / "_build" / "html" / "chapter.html").read_text()
    assert "42" in page
    # With _config.yml's empty repository address: no button may lead to a guessed repository.
    for button in ("launch-buttons", "mybinder", "source-repository-button"):
        assert button not in page, f"{button} shown although repository.url is empty"
    assert "runs inside a clone" in page, "the chapter page does not say the notebook needs a clone"
    assert "without encryption" not in good.stdout + good.stderr, "ipykernel's TCP warning is back"
    bad = _mini_book(tmp_path / "bad", "raise RuntimeError('deliberate failure')")
    assert bad.returncode != 0, "a failing cell did not fail the book build"
    assert "deliberate failure" in bad.stdout + bad.stderr


def test_repository_address_turns_on_repository_and_binder_buttons(tmp_path):
    """repository.url is the one setting: set, it brings the repository and Binder buttons."""
    import yaml

    root = tmp_path / "book"
    root.mkdir()
    cfg = book_config(root / "_config.yml")
    data = yaml.safe_load(cfg.read_text())
    data["repository"]["url"] = "https://github.com/example-course/datared"
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    (root / "intro.md").write_text("# Intro\n\nA page.\n")
    _notebook(root / "chapter.ipynb", "print(6 * 7)")
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: chapter\n")
    proc = _build(root)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    page = (root / "_build" / "html" / "chapter.html").read_text()
    assert "source-repository-button" in page and "github.com/example-course/datared" in page
    assert "mybinder.org/v2/gh/example-course/datared/main" in page, "no Binder launch link"
    assert "start it on Binder" in page


def _executed(log: str) -> list[str]:
    """Notebooks (file names) that a build log says were executed."""
    return sorted(set(re.findall(r"([\w-]+)\.ipynb: Executing notebook", log)))


def test_cached_build_reruns_a_changed_chapter_and_the_later_ones(tmp_path):
    """`make book`'s cache: prose edits run nothing; a code change runs that chapter and later ones."""
    root = tmp_path / "book"
    (root / "notebooks").mkdir(parents=True)
    book_config(root / "_config.yml")  # execute_notebooks: cache, as `make book`
    (root / "intro.md").write_text("# Intro\n\nA page.\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n"
                                   "  - file: notebooks/01-one\n  - file: notebooks/02-two\n")
    one, two = root / "notebooks" / "01-one.ipynb", root / "notebooks" / "02-two.ipynb"
    _notebook(one, "print(1)")
    _notebook(two, "print(2)")

    def build() -> str:
        proc = _build(root)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        return log

    assert _executed(build()) == ["01-one", "02-two"], "the first build must execute both"
    _notebook(one, "print(1)", prose="A chapter with a corrected typo.")
    (root / "intro.md").write_text("# Intro\n\nA page, corrected.\n")
    assert _executed(build()) == [], "a prose-only edit re-executed a notebook"
    _notebook(one, "print(11)")
    assert _executed(build()) == ["01-one", "02-two"], "a code change in 01 must re-run 01 and 02"
    _notebook(two, "print(22)")
    assert _executed(build()) == ["02-two"], "a code change in 02 must re-run 02 only"
    assert "11" in (root / "_build" / "html" / "notebooks" / "01-one.html").read_text()


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



@pytest.mark.book
def test_test_build_executes_every_notebook_with_force(book_run):
    """`make book` may reuse cached executions; the test build (and so CI) runs everything."""
    if book_run.html_dir is None:
        pytest.skip("DATARED_TEST_WORK_DIR reuses a work folder; no build to check")
    assert "execute_notebooks: force" in book_run.config_path.read_text()
    assert "execution_mode='force'" in book_run.log, "the test build did not run with force"
    chapters = [Path(p).name for p in _toc_pages() if p.startswith("notebooks/")]
    assert _executed(book_run.log) == chapters, "the test build did not execute every chapter"
    assert "Using cached notebook" not in book_run.log


@pytest.mark.book
def test_build_log_has_no_kernel_transport_warning(book_run):
    if book_run.html_dir is None:
        pytest.skip("DATARED_TEST_WORK_DIR reuses a work folder; no build to check")
    assert "without encryption" not in book_run.log, "ipykernel warns about unencrypted TCP"


class _Assets(HTMLParser):
    """Script and stylesheet addresses of a page (what a browser fetches at page load)."""

    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.sources.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") in (
                "stylesheet", "preload", "modulepreload", "prefetch", "preconnect"):
            self.sources.append(attrs["href"])


@pytest.mark.book
def test_built_pages_fetch_no_script_or_style_from_the_network(book_run):
    """Offline site: MathJax ships in _static; no require.js or widget manager from a CDN."""
    if book_run.html_dir is None or book_run.returncode != 0:
        pytest.skip("no fresh build to check")
    html = book_run.html_dir
    assert (html / "_static" / "mathjax" / "tex-chtml.js").exists(), "MathJax is not in the site"
    remote = []
    for page in sorted(html.rglob("*.html")):
        parser = _Assets()
        parser.feed(page.read_text(errors="replace"))
        remote += [f"{page.relative_to(html)}: {src}" for src in parser.sources
                   if urlparse(src).scheme or src.startswith("//")]
    assert not remote, "pages load from the network:\n" + "\n".join(remote)


# --- the reader's checks: every page in headless Chromium with the network blocked ----------


@pytest.fixture(scope="module")
def rendered(book_run, tmp_path_factory) -> dict[str, browser.PageReport]:
    """Every page of the toc as Chromium shows it, with no network; screenshots in .cache."""
    executable = browser.chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (CI installs Debian's chromium); skipping the browser check")
    if book_run.html_dir is None or book_run.returncode != 0:
        pytest.skip("no fresh build to check")
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    return browser.read_pages(executable, book_run.html_dir.resolve(), _toc_pages(),
                              tmp_path_factory.mktemp("chromium-profile"), SCREENSHOTS)


def _chapters(rendered) -> dict[str, browser.PageReport]:
    return {page: report for page, report in rendered.items() if page.startswith("notebooks/")}


def _report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


def _short(text: str, limit: int = 160) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " [...]"


@pytest.mark.book
def test_pages_render_in_headless_chromium(rendered):
    """Every page has a heading; every chapter shows figures, and every figure loads."""
    problems = []
    for page, report in rendered.items():
        if not report.content["has_heading"]:
            problems.append(f"{page}: no heading")
        images = report.content["images"]
        if page.startswith("notebooks/") and not images:
            problems.append(f"{page}: no figure")
        problems += [f"{page}: figure not loaded: {img['src']}" for img in images if not img["loaded"]]
        if report.screenshot is None or report.screenshot.stat().st_size < 10_000:
            problems.append(f"{page}: no screenshot of the first screen")
    assert not problems, _report(problems, "rendering problems")


@pytest.mark.book
def test_site_works_with_no_network(rendered):
    """No request leaves the machine, every local file loads, no script fails, no widget output.

    A widget output (e.g. a tqdm.auto bar run under ipywidgets) needs a widget manager that
    is not in the offline site, so it shows nothing: chapters print text progress instead.
    """
    problems = []
    for page, report in rendered.items():
        problems += [f"{page}: requests {url}" for url in report.external_requests]
        problems += [f"{page}, section {section!r}: widget output (shows nothing offline)"
                     for section in report.content["widgets"]]
        problems += [f"{page}: file not found: {url}" for url in report.failed_files]
        problems += [f"{page}: script error: {_short(err)}" for err in report.script_errors]
    assert not problems, _report(problems, "offline problems")


#: Raw LaTeX in the prose: math delimiters, $...$ or a backslash command outside code.
RAW_LATEX = re.compile(r"\\[()\[\]]|\$\$|(?<![\w$])\$[^\s$][^$\n]*?(?<=\S)\$(?![\w$])"
                       r"|\\(?:begin|end)\{|\\[A-Za-z]{2,}")


@pytest.mark.book
def test_equations_render_as_maths(rendered):
    """Every equation is typeset by MathJax; no LaTeX source is left in the page text."""
    problems = []
    for page, report in rendered.items():
        content = report.content
        problems += [f"{page}: equation not typeset: {_short(tex)}"
                     for tex in content["unrendered_maths"]]
        for line in content["prose"].splitlines():
            if RAW_LATEX.search(line):
                problems.append(f"{page}: raw LaTeX in the text: {_short(line)}")
    assert not problems, _report(problems, "maths problems")
    typeset = {page: r.content["maths"] for page, r in rendered.items() if r.content["maths"]}
    assert typeset, "no page has an equation: the check above would pass without looking"


def _machine_paths(book_run) -> list[str]:
    """Absolute paths of the machine that built the book (longest first)."""
    paths = {str(book_run.work_dir), str(config.data_dir), str(config.cache_dir), str(REPO),
             str(Path.home()), "/root/", "/tmp/"}
    paths |= {str(Path(p).resolve()) for p in list(paths)}
    return sorted((p for p in paths if len(p) > 1), key=len, reverse=True)


@pytest.mark.book
def test_chapter_pages_print_no_machine_path(rendered, book_run):
    """Paths are printed relative to the data or work folder, never as this machine's paths."""
    needles = _machine_paths(book_run)
    problems = []
    for page, report in _chapters(rendered).items():
        for n, line in enumerate(report.content["text"].splitlines(), start=1):
            found = next((p for p in needles if p in line), None)
            if found:
                problems.append(f"{page}: text line {n} shows {found!r}: {_short(line)}")
    assert not problems, _report(problems, "machine paths on chapter pages")


#: Traceback and warning text as Python, astropy and the warnings module print them.
TRACEBACK_OR_WARNING = re.compile(r"Traceback|Warning:|WARNING:")


@pytest.mark.book
def test_chapter_outputs_show_no_traceback_or_warning(rendered):
    problems = []
    for page, report in _chapters(rendered).items():
        for output in report.content["outputs"]:
            for line in output["text"].splitlines():
                if TRACEBACK_OR_WARNING.search(line):
                    problems.append(f"{page}, section {output['section']!r}: {_short(line)}")
    assert not problems, _report(problems, "tracebacks or warnings in chapter outputs")


def _wide_lines(rendered, kind: str) -> list[str]:
    problems = []
    for page, report in _chapters(rendered).items():
        for wide in report.content["wide_lines"]:
            if wide["kind"] == kind:
                problems.append(
                    f"{page}, section {wide['section']!r}, cell {wide['cell']}, {kind} line "
                    f"{wide['line']} ({wide['length']} > {wide['columns']} columns): "
                    f"{_short(wide['text'])}")
    return problems


@pytest.mark.book
def test_chapter_output_lines_fit_the_column(rendered):
    """Printed output is not cut at the column edge (a 1280 px wide window, see tests/browser.py)."""
    problems = _wide_lines(rendered, "output")
    for page, report in _chapters(rendered).items():
        problems += [f"{page}, section {out['section']!r}: HTML output {out['width']} px wide in a "
                     f"{out['column']} px column: {_short(out['text'])}"
                     for out in report.content["wide_html"]]
    assert not problems, _report(problems, "outputs wider than the column")


@pytest.mark.book
def test_chapter_code_lines_fit_the_column(rendered):
    """Code cells are not cut at the column edge either (same window)."""
    problems = _wide_lines(rendered, "code")
    assert not problems, _report(problems, "code lines wider than the column")
