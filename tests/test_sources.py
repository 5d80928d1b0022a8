"""Clean sources: notebooks without outputs, neutral kernelspec, house skeleton, small files."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def toc_files() -> list[str]:
    """Files named in _toc.yml (root and chapters), without suffix."""
    text = (REPO / "_toc.yml").read_text()
    return re.findall(r"(?:root|file):\s*(\S+)", text)


def test_toc_entries_exist():
    for entry in toc_files():
        candidates = [REPO / f"{entry}{suffix}" for suffix in (".md", ".ipynb")]
        assert any(p.exists() for p in candidates), f"_toc.yml names {entry}, which does not exist"


def test_every_notebook_is_in_the_toc_in_run_order():
    names = [e for e in toc_files() if e.startswith("notebooks/")]
    assert names == sorted(names), "notebooks must appear in the toc in run (file-name) order"
    assert {f"notebooks/{p.stem}" for p in NOTEBOOKS} == set(names)
    for path in NOTEBOOKS:
        assert re.match(r"^\d\d-[a-z0-9-]+$", path.stem), f"{path.name}: name as NN-name.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3", f"{path.name}: kernelspec must be python3"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} cell {i}: strip outputs before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {i}: execution_count set"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_skeleton(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), f"{path.name}: title cell"
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown").lower()
    for needed in ("learning goals", "prerequisites", "summary"):
        assert needed in text, f"{path.name}: no '{needed}' section"
    titles = [line for c in cells if c["cell_type"] == "markdown"
              for line in "".join(c["source"]).splitlines() if re.match(r"^# ", line)]
    assert len(titles) == 1, f"{path.name}: exactly one '# ' title, found {titles}"
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code" and "".join(cell["source"]).strip():
            assert i > 0 and cells[i - 1]["cell_type"] == "markdown", (
                f"{path.name} cell {i}: put a markdown cell before every code cell")


def test_no_large_files_tracked():
    import shutil

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot list the tracked files")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    large = [f for f in files if f and (REPO / f).is_file() and (REPO / f).stat().st_size > 1_000_000]
    assert not large, f"files over 1 MB are tracked: {large}; generate or download them instead"


def test_config_import_has_no_side_effects(tmp_path, monkeypatch):
    import importlib
    import sys

    monkeypatch.setenv("DATARED_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("DATARED_DATA_DIR", str(tmp_path / "data"))
    sys.modules.pop("config", None)
    config = importlib.import_module("config")
    try:
        assert config.work_dir == tmp_path / "work"
        assert config.data_dir == tmp_path / "data"
        assert not (tmp_path / "work").exists(), "importing config must not create folders"
        config.make_work_dirs()
        assert (tmp_path / "work" / "LIGHT_PRERED").is_dir()
    finally:
        sys.modules.pop("config", None)


def test_an_unwritable_work_folder_is_named_with_the_setting(tmp_path, monkeypatch):
    """A work folder that cannot be created stops at once, naming the setting to change.

    (The folder's parent is a file: this fails for root too, unlike file permissions.)
    """
    import importlib
    import sys

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("DATARED_WORK_DIR", str(tmp_path / "a-file" / "work"))
    sys.modules.pop("config", None)
    config = importlib.import_module("config")
    try:
        with pytest.raises(PermissionError, match="cannot be written.*DATARED_WORK_DIR"):
            config.make_work_dirs()
    finally:
        sys.modules.pop("config", None)
