"""The project's own exceptions, and the errors that make one frame unusable.

Per-frame loops in the chapters catch :data:`FRAME_ERRORS` and nothing broader: a bad file
(``OSError``), a value that astropy or numpy cannot use (``ValueError``), a unit problem, or
one of the errors below, which the helpers raise with the file, the problem and the fix in the
message. A ``TypeError``, ``IndexError`` or ``KeyError`` from our own code is a bug and must
stop the chapter with its traceback instead of turning into a "skipped frame".
"""

from __future__ import annotations

from astropy import units as u


class DataredError(Exception):
    """Base class of the errors that datared raises on purpose (with a message for people)."""


class MissingInputError(DataredError, FileNotFoundError):
    """An input that an earlier chapter (or the data) should have provided is missing."""


class FrameError(DataredError, ValueError):
    """One frame cannot be used: a missing or unreadable header keyword, a wrong size..."""


class SelfCheckError(DataredError, AssertionError):
    """A notebook's self-check failed: the fast helper and the plain library call disagree."""


class AstrometryError(DataredError, RuntimeError):
    """A frame could not be solved; the message says why."""


#: What one bad frame may raise; per-frame loops catch exactly these.
FRAME_ERRORS = (OSError, ValueError, u.UnitsError, DataredError)
