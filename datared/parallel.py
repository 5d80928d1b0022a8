"""Per-frame loops over the machine's cores, with the same results as one loop.

Chapters 02-04 do the same work on every frame, each frame on its own. :func:`map_frames`
runs such a loop in a pool of worker processes (the standard library's
:mod:`multiprocessing`, started with ``forkserver``: workers do not inherit the notebook's
threads) and hands the results back **in the order of the input**, so that tables, skip
logs and files are the same whatever the number of workers:

- ``function(item, shared)`` must be a module-level function (it is pickled by name);
  ``shared`` (master frames, a reference catalogue, settings) is sent once to each worker,
  not with every item;
- errors listed in ``catch`` (what a bad frame raises) come back as the outcome's ``error``
  for the caller to skip and log; those in ``stop`` (a missing master frame) and any other
  exception (a bug) stop the loop, raised again in the calling process;
- with one worker, or one item, the loop runs in the calling process (no pool).

Each worker holds one frame at a time, so the memory a loop needs grows with the number of
workers (``config.workers``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from datared.errors import FRAME_ERRORS, MissingInputError
from datared.progress import progress

#: Modules the worker processes import before the first frame arrives.
PRELOAD = ("numpy", "astropy.io.fits", "astropy.wcs", "datared.frame", "datared.detection",
           "datared.photometry", "datared.reduction", "datared.solve")


class Outcome(NamedTuple):
    """One item of :func:`map_frames`: the item, the function's value, or the error that
    the function raised (one of ``catch``; then ``value`` is None)."""

    item: Any
    value: Any
    error: BaseException | None


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this container in cores (Linux cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``), or None where there is none. A container (Binder, CI) often sees
    every core of its host but may use only a few."""
    from pathlib import Path

    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else float(quota) / float(period)
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: the affinity mask (where the system has one), capped
    by the container's CPU quota (:func:`cgroup_cpu_limit`, rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def resolve_workers(workers: int | None) -> int:
    """The number of worker processes for a ``workers`` setting: None or 0 means every
    available core; a negative number leaves that many cores free (at least one worker)."""
    if workers is None or workers == 0:
        return available_cores()
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise ValueError(f"workers must be a whole number (0 or None: all cores), got "
                         f"{workers!r}; check config.workers")
    if workers < 0:
        return max(1, available_cores() + workers)
    return workers


_SHARED: Any = None


def _install(shared: Any, filters: list) -> None:
    """Pool initializer: keep ``shared`` for the worker's calls and use the caller's warning
    filters (a warning that the notebook silences stays silent in its workers)."""
    global _SHARED
    _SHARED = shared
    warnings.filters[:] = filters


def _run(task: tuple):
    function, item, catch, stop = task
    try:
        return True, function(item, _SHARED)
    except stop:
        raise
    except catch as err:
        return False, err


def map_frames(function: Callable[[Any, Any], Any], items: Iterable, *, shared: Any = None,
               workers: int | None = None, desc: str = "frames", unit: str = "frame",
               catch: tuple[type[BaseException], ...] = FRAME_ERRORS,
               stop: tuple[type[BaseException], ...] = (MissingInputError,),
               show_progress: bool = True) -> Iterator[Outcome]:
    """Call ``function(item, shared)`` for every item, in parallel; yield :class:`Outcome`
    in the order of ``items``.

    Parameters
    ----------
    function : module-level function of (item, shared).
    items : the frames (paths, or tuples of what one call needs).
    shared : what every call needs (sent once per worker).
    workers : number of processes (:func:`resolve_workers`: None or 0 for all cores).
    desc, unit : the progress bar's label and unit.
    catch : exceptions that mean "skip this item" (:data:`datared.errors.FRAME_ERRORS`).
    stop : exceptions that stop the loop although ``catch`` holds them: by default a missing
        input of an earlier chapter (a master frame), which no frame could get past.
    show_progress : draw a progress bar (:func:`datared.progress.progress`).
    """
    items: Sequence = list(items)
    n_workers = min(resolve_workers(workers), len(items))
    catch, stop = tuple(catch), tuple(stop)
    bar = progress(total=len(items), desc=desc, unit=unit, disable=not show_progress)
    try:
        if n_workers <= 1:
            for item in items:
                try:
                    outcome = Outcome(item, function(item, shared), None)
                except stop:
                    raise
                except catch as err:
                    outcome = Outcome(item, None, err)
                bar.update(1)
                yield outcome
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOAD))
        with context.Pool(n_workers, initializer=_install,
                          initargs=(shared, list(warnings.filters))) as pool:
            tasks = ((function, item, catch, stop) for item in items)
            for item, (ok, value) in zip(items, pool.imap(_run, tasks, chunksize=1),
                                         strict=True):
                bar.update(1)
                yield Outcome(item, value, None) if ok else Outcome(item, None, value)
    finally:
        bar.close()
