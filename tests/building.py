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
