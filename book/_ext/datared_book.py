"""Sphinx extension of the datared book, loaded by ``sphinx.local_extensions`` in _config.yml.

It owns what _config.yml cannot say by itself:

1. **The repository address is one setting** (``repository.url``). When it is empty, the book
   shows no repository button and no launch (Binder) button, since they would lead nowhere;
   when it is set, both appear.
2. **A note on every chapter page** (every page made from a notebook): the notebook runs
   inside a clone of the repository, because its first cells import ``config``.
3. **Execution caching in run order** (``execute_notebooks: cache`` only). jupyter-cache
   re-executes a notebook whose code changed, but the chapters form a chain: chapter 03
   reads what 02 wrote. So when a chapter's code changes, that chapter and every later one
   run again; when ``config.py``, the ``datared/`` package or a ``DATARED_*`` variable
   changes, or the work folder is missing, every chapter runs again. A prose-only edit
   (markdown cells, ``book/*.md``) runs nothing.
4. **Encrypted kernel connections**: the kernels that the build starts get CurveZMQ keys, so
   ipykernel does not warn "Kernel is running over TCP without encryption" in every build.
5. **No script error at page load**: sphinx-thebe adds its inline settings script twice under
   Sphinx 7, and the second ``const THEBE_JS_URL`` is a script error on every page. Its
   scripts serve only the "live code" button, so they are left out while that is off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: The page that says how to get a clone and run the notebooks.
INSTALLATION_PAGE = "book/installation"

#: Where the run-order state lives, inside the jupyter-cache folder (``make clean`` removes it).
STATE_FILE = "datared-run-order.json"


# --- 1. the repository address --------------------------------------------------------------


def repository_url(config) -> str:
    """The repository address of _config.yml's ``repository.url`` ('' when unset)."""
    return (config.html_theme_options.get("repository_url") or "").strip()


def _apply_repository_setting(app: Sphinx, config) -> None:
    """Show the repository and launch buttons only when a repository address is set."""
    options = config.html_theme_options
    if repository_url(config):
        # jupyter-book passes its default (false) on; the address alone decides here.
        options["use_repository_button"] = True
        return
    options.pop("repository_url", None)
    options["use_repository_button"] = False
    options["use_edit_page_button"] = False
    options["use_issues_button"] = False
    launch = dict(options.get("launch_buttons") or {})
    for key in ("binderhub_url", "jupyterhub_url", "colab_url", "jupyterlite_url"):
        launch[key] = ""
    launch["thebe"] = False
    options["launch_buttons"] = launch


# --- 2. the note on chapter pages -----------------------------------------------------------


def _is_notebook(app: Sphinx, docname: str) -> bool:
    return Path(app.env.doc2path(docname)).suffix == ".ipynb"


def _doc_link(target: str, text: str) -> addnodes.pending_xref:
    ref = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget=target,
                                refexplicit=True, refwarn=True)
    ref += nodes.inline(text, text)
    return ref


def _add_clone_note(app: Sphinx, doctree: nodes.document) -> None:
    """Say on a notebook's page that the notebook runs only inside a clone of the repository."""
    docname = app.env.docname
    if not _is_notebook(app, docname):
        return
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is None:
        return
    source = Path(app.env.doc2path(docname)).relative_to(app.srcdir).as_posix()
    para = nodes.paragraph()
    para += nodes.Text("This page is the notebook ")
    para += nodes.literal(source, source)
    para += nodes.Text(". The notebook runs inside a clone of the book's repository: its first "
                       "cells import ")
    para += nodes.literal("config", "config")
    para += nodes.Text(", the settings file at the top of the repository, and the helper "
                       "package ")
    para += nodes.literal("datared", "datared")
    para += nodes.Text(", so the .ipynb file from the download button does not run on its own. ")
    if repository_url(app.config):
        para += nodes.Text("To run it without installing anything, start it on Binder with the "
                           "launch button (the rocket icon) at the top of the page. ")
    if INSTALLATION_PAGE in app.env.found_docs:
        para += nodes.Text("To run it on your computer, see the page ")
        para += _doc_link("/" + INSTALLATION_PAGE, "Installation")
        para += nodes.Text(".")
    else:
        para += nodes.Text("To run it on your computer, see the installation page.")
    note = nodes.note("", para, classes=["datared-clone-note"])
    title_index = next((i for i, child in enumerate(section.children)
                        if isinstance(child, nodes.title)), -1)
    section.insert(title_index + 1, note)


# --- 3. execution caching in run order ------------------------------------------------------


def _cache_folder(app: Sphinx) -> Path:
    """The jupyter-cache folder myst-nb uses (its default: ``_build/.jupyter_cache``)."""
    path = app.config.nb_execution_cache_path
    return Path(path).resolve() if path else Path(app.outdir).parent.joinpath(".jupyter_cache")


def _load_config_module(srcdir: Path):
    """The book's ``config.py`` (the settings the notebooks import), or None."""
    import importlib.util

    path = srcdir / "config.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_datared_book_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs_key(srcdir: Path, settings) -> str:
    """Hash of what every chapter depends on besides its own code.

    ``config.py``, the ``datared/`` package, the ``DATARED_*`` (and ``XDG_CACHE_HOME``)
    variables, the data and work folders that config.py (``settings``) resolves, and the
    contents of the settings file that ``DATARED_CONFIG`` names.
    """
    digest = hashlib.sha256()
    files = [srcdir / "config.py", *sorted((srcdir / "datared").rglob("*.py"))]
    for path in files:
        if path.exists():
            digest.update(path.relative_to(srcdir).as_posix().encode())
            digest.update(path.read_bytes())
    names = sorted(n for n in os.environ if n.startswith("DATARED_") or n == "XDG_CACHE_HOME")
    digest.update(json.dumps({n: os.environ[n] for n in names}).encode())
    if settings is not None:
        digest.update(f"{settings.data_dir}\n{settings.work_dir}".encode())
        # The settings file named by DATARED_CONFIG: its contents, not only its name.
        settings_file = getattr(settings, "settings_file", None)
        if settings_file is not None and Path(settings_file).is_file():
            digest.update(Path(settings_file).read_bytes())
    return digest.hexdigest()


def _code_hash(cache, path: Path) -> str:
    """jupyter-cache's own hash of a notebook (code cells and kernelspec only)."""
    import nbformat

    return cache.create_hashed_notebook(nbformat.read(path, as_version=4))[1]


def _chapters_to_rerun(app: Sphinx, env, added, changed, removed) -> list[str]:
    """``env-get-outdated``: re-read (and re-execute) the chapters whose inputs changed."""
    if app.config.nb_execution_mode != "cache":
        return []
    from jupyter_cache import get_cache

    srcdir = Path(app.srcdir)
    folder = _cache_folder(app)
    cache = get_cache(folder)
    chapters = sorted(d for d in env.found_docs if _is_notebook(app, d))
    hashes = {d: _code_hash(cache, Path(env.doc2path(d))) for d in chapters}
    settings = _load_config_module(srcdir)
    key = inputs_key(srcdir, settings)
    work_missing = settings is not None and not Path(settings.work_dir).is_dir()
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = None

    if state is None or state.get("inputs") != key or work_missing:
        why = ("no record of an earlier build" if state is None
               else "the work folder is missing" if work_missing
               else "config.py, datared/ or a DATARED_* variable changed")
        rerun = chapters
    else:
        known = state.get("chapters", {})
        first = next((i for i, d in enumerate(chapters) if known.get(d) != hashes[d]), None)
        rerun = [] if first is None else chapters[first:]
        why = "" if first is None else f"the code of {chapters[first]} changed"
    for docname in rerun:
        _forget(cache, Path(env.doc2path(docname)))
    if rerun:
        logger.info(f"[datared] executing {', '.join(rerun)} again: {why}")
    app._datared_run_order = {"inputs": key, "chapters": hashes}
    return rerun


def _forget(cache, path: Path) -> None:
    """Remove the cached execution of the notebook at ``path`` (if any)."""
    import nbformat

    try:
        record = cache.match_cache_notebook(nbformat.read(path, as_version=4))
    except KeyError:
        return
    cache.remove_cache(record.pk)


def _record_run_order(app: Sphinx, exception) -> None:
    """After a build without an exception, remember what the cached executions were run from."""
    state = getattr(app, "_datared_run_order", None)
    if exception is not None or state is None:
        return
    folder = _cache_folder(app)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


# --- 4. kernel transport encryption ---------------------------------------------------------


def _encrypt_kernel_connections() -> None:
    """Provision CurveZMQ keys for the kernels this build starts.

    jupyter_client's ``KernelManager.transport_encryption = "auto"`` does it for a kernel
    whose kernelspec declares support (ipykernel's does). myst-nb and jupyter-cache start
    kernels through nbclient without reading any Jupyter configuration, so the setting
    cannot come from a config file: this sets its default for the build process.
    """
    import zmq
    from jupyter_client.manager import KernelManager

    trait = KernelManager.class_traits().get("transport_encryption")
    if trait is not None and zmq.has("curve"):
        trait.default_value = "auto"


# --- 5. scripts: one copy of each, and no thebe when it is off ----------------------------


def _is_thebe_script(script) -> bool:
    filename = str(getattr(script, "filename", script) or "")
    body = str(getattr(script, "attributes", {}).get("body", ""))
    return filename.endswith("sphinx-thebe.js") or "THEBE_JS_URL" in body


def _tidy_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Keep the first of identical script entries of a page; drop thebe's when it is off.

    Inline scripts come once with the file name ``None`` and once with ``''``: both mean none.
    sphinx-thebe's scripts serve the "live code" launch button only (``launch_buttons.thebe``).
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    launch = app.config.html_theme_options.get("launch_buttons") or {}
    thebe_on = bool(launch.get("thebe")) or bool(app.config.thebe_config.get("always_load"))
    seen: set = set()
    kept: list = []
    for script in scripts:
        attributes = getattr(script, "attributes", {})
        key = (getattr(script, "filename", script) or "", tuple(sorted(attributes.items())))
        if key in seen or (not thebe_on and _is_thebe_script(script)):
            continue
        seen.add(key)
        kept.append(script)
    scripts[:] = kept  # in place: handlers after this one add to the same list


def setup(app: Sphinx) -> dict:
    _encrypt_kernel_connections()
    # The notebooks' progress bars print one line of text on the built pages (a widget bar
    # would need a widget manager from the network); see datared/progress.py. The kernels
    # that the build starts inherit this variable. Set before inputs_key reads DATARED_*.
    os.environ.setdefault("DATARED_TEXT_PROGRESS", "1")
    app.connect("config-inited", _apply_repository_setting)
    app.connect("doctree-read", _add_clone_note)
    app.connect("env-get-outdated", _chapters_to_rerun)
    app.connect("build-finished", _record_run_order)
    app.connect("html-page-context", _tidy_scripts, priority=100)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
