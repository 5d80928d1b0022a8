"""Book I/O: finding the frames of a night, checking a chapter's prerequisites, logging skips.

Nothing here reads the book's settings: the notebooks pass the data folder, the sub-folders
to ignore and the chapter names in.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from astropy.table import Table

from datared.errors import MissingInputError

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")

#: Sub-folders of a sample night that hold no raw frames (the book's default setting).
DEFAULT_IGNORED_SUBDIRS = ("truth", "catalogs")


def find_fits(data_dir: str | Path,
              ignored_subdirs: Iterable[str] = DEFAULT_IGNORED_SUBDIRS) -> list[Path]:
    """Return all FITS files below ``data_dir`` (sorted), skipping ``ignored_subdirs``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MissingInputError(
            f"{data_dir}: the data folder does not exist. Set data_dir in config.py (or the "
            "DATARED_DATA_DIR environment variable) to a folder of FITS frames, or run "
            "notebooks/01-data.ipynb to generate the sample night."
        )
    ignored = set(ignored_subdirs)
    files = []
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        if rel.parts and rel.parts[0] in ignored:
            continue
        if path.is_file() and path.name.lower().endswith(FITS_SUFFIXES):
            files.append(path)
    return files


def night_collection(data_dir: str | Path, keywords: Iterable[str] | None = None, *,
                     ignored_subdirs: Iterable[str] = DEFAULT_IGNORED_SUBDIRS):
    """An ``ImageFileCollection`` of every raw frame below ``data_dir`` (all sub-folders).

    Parameters
    ----------
    data_dir : folder of the night (read only).
    keywords : header keywords to put in the summary table (default: all).
    ignored_subdirs : top-level sub-folders that hold no raw frames
        (``config.ignored_data_subdirs``).
    """
    from ccdproc import ImageFileCollection

    data_dir = Path(data_dir)
    files = find_fits(data_dir, ignored_subdirs)
    if not files:
        raise MissingInputError(
            f"{data_dir}: no FITS files found. Point data_dir in config.py at a night of frames "
            "or run notebooks/01-data.ipynb to generate the sample night."
        )
    rel = [f.relative_to(data_dir).as_posix() for f in files]
    with warnings.catch_warnings():
        # Acquisition software often writes non-standard header cards; astropy fixes them.
        from astropy.io.fits.verify import VerifyWarning

        warnings.simplefilter("ignore", VerifyWarning)
        collection = ImageFileCollection(location=str(data_dir), filenames=rel,
                                         keywords=list(keywords) if keywords is not None else "*")
    _restore_subfolders(collection, rel)
    return collection


def _restore_subfolders(collection, rel_paths: list[str]) -> None:
    """Put each frame's path relative to the night back into the summary's ``file`` column.

    ``ImageFileCollection`` keeps only the base name of each file, so ``files_filtered`` and
    ``files_filtered(include_path=True)`` would name files that do not exist when the frames
    sit in sub-folders. The summary lists the readable files in the order given (unreadable
    ones are left out), so walking both lists in step restores the sub-folder of each row.
    """
    summary = collection.summary
    if summary is None or len(summary) == 0:
        return
    restored = []
    pending = iter(rel_paths)
    for name in summary["file"]:
        for rel in pending:
            if Path(rel).name == name:
                restored.append(rel)
                break
        else:
            raise RuntimeError(f"{collection.location}: cannot find {name} among the frames")
    summary.replace_column("file", restored)


def unreadable_files(collection) -> list[Path]:
    """Files of a night collection whose header could not be read (absent from its summary)."""
    listed = set() if collection.summary is None else set(collection.summary["file"])
    return [Path(collection.location) / rel for rel in collection.files if rel not in listed]


def require(path: str | Path, chapter: str) -> Path:
    """Return ``path`` if it exists, else raise an error naming the chapter that makes it."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise MissingInputError(
            f"{path} is missing. It is written by notebooks/{chapter}.ipynb: run that chapter "
            "first (with the same config.py and DATARED_WORK_DIR)."
        )
    return path


@dataclass
class SkipLog:
    """Collects the frames a loop skipped and why, for a summary table at the end."""

    step: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Line width (characters) of the printed notes, to fit the code column of the pages.
    width: int = 100

    def skip(self, file: str | Path, reason: str, quiet: bool = False) -> None:
        """Record that ``file`` was skipped because of ``reason`` and say so.

        A reason that starts with the file's name (as the messages of
        :class:`~datared.errors.FrameError` do) is stored without it: the log names the file.
        """
        name = Path(file).name
        reason = reason.removeprefix(f"{name}: ")
        self.skipped.append((name, reason))
        if not quiet:
            print(textwrap.fill(f"Skipped {name}: {reason}", width=self.width,
                                subsequent_indent="    ", break_long_words=False,
                                break_on_hyphens=False))

    def __len__(self) -> int:
        return len(self.skipped)

    def table(self) -> Table:
        """The skipped frames as a table with columns ``file`` and ``reason``."""
        return Table(rows=self.skipped or None, names=("file", "reason"),
                     dtype=(str, str))


# ---------------------------------------------------------------------------------------
# What a chapter wrote in its last run (so later chapters never read stale files)
# ---------------------------------------------------------------------------------------

#: Name of the list of outputs a chapter keeps in each of its output folders.
MANIFEST_NAME = "manifest.ecsv"


def output_name(path: str | Path) -> str:
    """File name of a chapter's output for the input ``path``: its stem plus ``.fits``.

    Compressed and other FITS suffixes are dropped (``a.fits.gz`` -> ``a.fits``,
    ``b.fit`` -> ``b.fits``), so every later chapter finds the file by one name.
    """
    name = Path(path).name
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + ".fits"
    return name + ".fits"


def write_manifest(folder: str | Path, outputs: Iterable[str | Path], *, chapter: str,
                   sources: Iterable[str | Path] | None = None,
                   pattern: str = "*.fits") -> list[Path]:
    """Record the files a chapter wrote into ``folder`` in this run; remove stale ones.

    Writes ``folder/manifest.ecsv`` (columns ``file`` and ``source``, the chapter in its
    metadata) and deletes every file of ``folder`` that matches ``pattern`` but is not among
    ``outputs``: the output of a frame that an earlier run wrote but this run did not (the
    frame was removed from the night, or is now skipped) can then never reach a later
    chapter.

    Parameters
    ----------
    folder : the chapter's output folder (inside the work folder).
    outputs : files written in this run (paths or names inside ``folder``).
    chapter : the chapter's notebook name, e.g. ``"03-astrometry"``.
    sources : for each output, the input it was made from (same order), or None.
    pattern : which files of ``folder`` count as outputs of the chapter.

    Returns
    -------
    The stale files removed (so the notebook can list them).
    """
    folder = Path(folder)
    names = [Path(p).name for p in outputs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{folder}: outputs written twice in one run: {', '.join(twice)} "
                         "(two inputs with the same file name in different sub-folders: "
                         "rename one of them)")
    source_names = ([""] * len(names) if sources is None
                    else [str(Path(s).name) for s in sources])
    if len(source_names) != len(names):
        raise ValueError("write_manifest: sources and outputs differ in length")
    keep = set(names) | {MANIFEST_NAME}
    removed = [p for p in sorted(folder.glob(pattern)) if p.is_file() and p.name not in keep]
    for path in removed:
        path.unlink()
    table = Table({"file": names, "source": source_names}, dtype=(str, str))
    table.meta["chapter"] = chapter
    table.write(folder / MANIFEST_NAME, format="ascii.ecsv", overwrite=True)
    return removed


def read_manifest(folder: str | Path, *, chapter: str) -> list[Path]:
    """The files that ``chapter`` wrote into ``folder`` in its last run, in recorded order.

    Raises
    ------
    MissingInputError
        If the folder has no manifest (the chapter has not run, or ran before manifests
        existed) or a listed file is gone; the message says to rerun the chapter.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    rerun = (f"run notebooks/{chapter}.ipynb again (with the same config.py and "
             "DATARED_WORK_DIR)")
    if not path.exists():
        raise MissingInputError(f"{path} is missing: the list of outputs of {chapter}; {rerun}.")
    table = Table.read(path, format="ascii.ecsv")
    files = [folder / str(name) for name in table["file"]]
    missing = [p.name for p in files if not p.exists()]
    if missing:
        raise MissingInputError(
            f"{folder}: {len(missing)} file(s) listed in {MANIFEST_NAME} are gone "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); {rerun}.")
    return files
