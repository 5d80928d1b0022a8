"""Progress bars for long loops: widget bars in JupyterLab, one line of text on the book's pages.

``tqdm.auto`` draws an ipywidgets bar in a notebook. A static web page can only show such a
bar with a widget manager loaded from the internet, and without one the bar disappears. When
the environment variable ``DATARED_TEXT_PROGRESS`` is set (to anything but ``""``, ``0``,
``false``, ``no`` or ``off``), as the book build and the tests do, :func:`progress` returns a
plain-text bar instead: it writes nothing while the loop runs and one line on standard output
when the loop ends, with the count, the elapsed time and the rate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

#: Environment variable that switches every progress bar of the book to text.
TEXT_PROGRESS_ENV = "DATARED_TEXT_PROGRESS"

#: Width of a text bar, characters (narrower than the code column of the book's pages).
TEXT_NCOLS = 80


def text_progress_wanted() -> bool:
    """True if ``DATARED_TEXT_PROGRESS`` asks for text bars."""
    value = os.environ.get(TEXT_PROGRESS_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


class FinalLineTqdm(std_tqdm):
    """A text tqdm bar that is drawn once, when it closes: one clean line per loop."""

    _closing = False

    def display(self, msg=None, pos=None):
        """Draw the bar only while closing (the final state)."""
        if not self._closing:
            return True
        return super().display(msg=msg, pos=pos)

    def close(self):
        """Draw the final line and close the bar."""
        self._closing = True
        super().close()


def progress(iterable: Iterable | None = None, **kwargs):
    """A progress bar over ``iterable``: text if ``DATARED_TEXT_PROGRESS`` is set, else tqdm.auto.

    Parameters
    ----------
    iterable : the loop's iterable (as for ``tqdm``).
    **kwargs : passed to tqdm (``desc``, ``unit``, ``total``, ``disable``...). For a text bar
        the defaults are standard output, ``ncols`` = :data:`TEXT_NCOLS` and ASCII characters.
    """
    if text_progress_wanted():
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("ncols", TEXT_NCOLS)
        kwargs.setdefault("ascii", True)
        return FinalLineTqdm(iterable, **kwargs)
    return auto_tqdm(iterable, **kwargs)
