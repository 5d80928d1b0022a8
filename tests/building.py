"""The book's build configuration for tests: _config.yml, usable from any folder, with overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def book_config(destination: Path, **execute) -> Path:
    """Write the project's _config.yml to ``destination`` and return its path.

    The local Sphinx extension's folder is made absolute (jupyter-book reads it relative to
    the configuration file), and ``execute`` overrides keys of the ``execute:`` section, e.g.
    ``execute_notebooks="force"`` for a build that runs every notebook from scratch.
    """
    data = yaml.safe_load((REPO / "_config.yml").read_text())
    sphinx = data.setdefault("sphinx", {})
    sphinx["local_extensions"] = {
        name: str((REPO / folder).resolve())
        for name, folder in (sphinx.get("local_extensions") or {}).items()
    }
    data.setdefault("execute", {}).update(execute)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(yaml.safe_dump(data, sort_keys=False))
    return destination


def execute_printed(notebook: Path, out_dir: Path, env: dict[str, str], *,
                    max_width: int, hidden: tuple[Path, ...] = ()) -> str:
    """Execute ``notebook`` with nbconvert and return everything its code cells printed.

    Fails the calling test if a cell fails, if a printed line is wider than ``max_width``
    characters, or if one of the ``hidden`` paths (this machine's folders) is printed.
    ``env`` is added to the environment (e.g. DATARED_DATA_DIR, DATARED_WORK_DIR).
    """
    import json
    import os
    import subprocess
    import sys

    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute",
                           "--output-dir", str(out_dir), str(notebook)],
                          env={**os.environ, "DATARED_TEXT_PROGRESS": "1", **env},
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = json.loads((out_dir / notebook.name).read_text())
    out = "".join("".join(output.get("text", "")) for cell in executed["cells"]
                  if cell["cell_type"] == "code" for output in cell["outputs"])
    too_long = [line for line in out.splitlines() if len(line) > max_width]
    assert not too_long, f"printed lines over {max_width} characters: {too_long}"
    assert not any(str(p) in out for p in hidden), "a machine path is printed"
    return out
