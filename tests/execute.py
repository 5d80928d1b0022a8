"""Execute chapters into a work folder without building the website (for development).

    .venv/bin/python -m tests.execute --work .cache/dev-work 01 02 03 04
    DATARED_SAMPLE_SEED=7 .venv/bin/python -m tests.execute --work .cache/dev-work-7 01 02 03 04

Each chapter runs in a fresh kernel from the repository root with ``DATARED_WORK_DIR`` set,
as the book build runs it; the executed notebook is written next to the work folder
(``<work>.executed/``) so its outputs can be read. Afterwards the chapter tests can use the
folder: ``DATARED_TEST_WORK_DIR=.cache/dev-work .venv/bin/python -m pytest tests/...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def chapter_path(label: str) -> Path:
    """The notebook whose name starts with ``label`` (e.g. "03" or "03-astrometry")."""
    matches = sorted((REPO / "notebooks").glob(f"{label}*.ipynb"))
    if len(matches) != 1:
        raise SystemExit(f"no single notebook in notebooks/ starts with {label!r}: {matches}")
    return matches[0]


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="work folder (DATARED_WORK_DIR)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("chapters", nargs="+", help="chapter numbers or name prefixes")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    os.environ["DATARED_WORK_DIR"] = str(work)
    os.environ.setdefault("DATARED_TEXT_PROGRESS", "1")
    executed = work.with_name(work.name + ".executed")
    executed.mkdir(parents=True, exist_ok=True)
    for label in args.chapters:
        path = chapter_path(label)
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        try:
            client.execute()
            status = "ok"
        except CellExecutionError as error:
            status = "FAILED\n" + str(error)[-3000:]
        nbformat.write(notebook, executed / path.name)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, {status}", flush=True)
        if status != "ok":
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
