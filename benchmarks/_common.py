"""Helpers shared by the benchmarks: peak memory of a process, a step in a fresh process."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far plus that of its largest finished child
    (a worker of :func:`datared.parallel.map_frames`), bytes (``ru_maxrss`` is KiB on
    Linux). With n workers the whole loop may hold up to n such children at once."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) * 1024


def in_fresh_process(function, *args):
    """Run ``function(*args)`` in a new Python process (spawned) and return its result.

    A step that reports :func:`peak_rss_bytes` then measures its own peak, not that of the
    steps before it.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def night_frames(night, kind: str, band: str | None = None) -> list:
    """The frames of one kind ("bias", "dark", "flat", "light") of a night, optionally of
    one filter, chosen by their headers as chapter 02 chooses them."""
    import config
    from datared import reduction as red
    from datared.io import night_collection

    collection = night_collection(night, ignored_subdirs=config.ignored_data_subdirs)
    extra = {config.filter_key: band} if band else {}
    return red.frames_of_type(collection, config.imagetyp_key, config.imagetyp[kind], **extra)
