"""environment.yml (conda, Binder) must agree with pyproject.toml (pip, make)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: pip names that conda-forge spells differently (none so far; add pairs here).
PIP_TO_CONDA: dict[str, str] = {}


def _split(requirement: str) -> tuple[str, str]:
    """Split 'name>=1,<2' into ('name', '>=1,<2') with a normalised name."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    return name, match.group(2).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"]) + list(data["project"]["optional-dependencies"]["dev"])
    return dict(_split(r) for r in reqs)


def environment_requirements() -> dict[str, str]:
    """Parse environment.yml's dependency list (conda and pip parts) without a YAML library."""
    lines = (REPO / "environment.yml").read_text().splitlines()
    reqs: dict[str, str] = {}
    in_deps = False
    for line in lines:
        stripped = line.split("#", 1)[0].rstrip()
        if stripped.startswith("dependencies:"):
            in_deps = True
            continue
        if not in_deps or not stripped.strip():
            continue
        item = stripped.strip()
        if not item.startswith("- ") or item == "- pip:":
            continue
        name, spec = _split(item[2:])
        reqs[name] = spec
    return reqs


def test_parser_sees_both_parts():
    env = environment_requirements()
    assert "astropy" in env and "uwastro465isos" in env


def test_environment_yml_matches_pyproject():
    pip_reqs = pyproject_requirements()
    env = environment_requirements()
    env.pop("python", None)
    env.pop("pip", None)
    expected = {PIP_TO_CONDA.get(name, name): spec for name, spec in pip_reqs.items()}
    missing = sorted(set(expected) - set(env))
    extra = sorted(set(env) - set(expected))
    differ = sorted(n for n in set(expected) & set(env) if expected[n] != env[n])
    assert not missing, f"environment.yml lacks {missing}: add them with pyproject.toml's versions"
    assert not extra, f"environment.yml has {extra} that pyproject.toml does not: add or remove"
    assert not differ, "versions differ: " + ", ".join(
        f"{n}: pyproject {expected[n]!r} vs environment.yml {env[n]!r}" for n in differ)


def test_python_versions_agree():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    env = environment_requirements()
    assert data["project"]["requires-python"] == env["python"]
