"""Self-checks for the notebooks: two results that must agree, compared with NaN in mind.

A chapter shows a library call in plain sight, then uses a faster helper for the rest of the
night, and checks that the two agree. A bare ``assert`` stops the chapter with nothing to go
on; :func:`check_close` and :func:`check_equal` raise :class:`~datared.errors.SelfCheckError`
naming the first elements that differ, with both values, so that the reader sees which star or
pixel is at fault. NaN equals NaN here: a star whose aperture is fully masked has NaN in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datared.errors import SelfCheckError


def _fmt(value) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.10g}" if isinstance(value, float) else repr(value)


def _describe(what: str, a: np.ndarray, b: np.ndarray, bad: np.ndarray,
              labels: Sequence | None, names: tuple[str, str], show: int) -> str:
    idx = np.argwhere(bad)
    lines = [f"{what}: {len(idx)} of {bad.size} values differ"]
    for pos in idx[:show]:
        pos = tuple(int(i) for i in pos)
        label = (f"{labels[pos[0]]}" if labels is not None else
                 ", ".join(str(i) for i in pos))
        lines.append(f"  [{label}] {names[0]} = {_fmt(a[pos])}, {names[1]} = {_fmt(b[pos])}")
    if len(idx) > show:
        lines.append(f"  ... and {len(idx) - show} more")
    return "\n".join(lines)


def differing(a, b, *, rtol: float = 1e-7, atol: float = 0.0) -> np.ndarray:
    """Boolean array: True where ``a`` and ``b`` differ (NaN equals NaN; shapes broadcast)."""
    a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        a64, b64 = a.astype(float), b.astype(float)
        both_nan = np.isnan(a64) & np.isnan(b64)
        with np.errstate(invalid="ignore"):
            close = np.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=True)
        return ~(close | both_nan)
    return a != b


def check_close(a, b, *, what: str, rtol: float = 1e-7, atol: float = 0.0,
                labels: Sequence | None = None, names: tuple[str, str] = ("helper", "library"),
                show: int = 5) -> None:
    """Raise :class:`SelfCheckError` unless ``a`` and ``b`` agree within ``rtol``/``atol``.

    Parameters
    ----------
    a, b : arrays of the same shape.
    what : what is compared, for the message ("aperture sums, radius 3 arcsec").
    rtol, atol : tolerances as in ``numpy.isclose``; NaN equals NaN.
    labels : name of each element along the first axis (star ids, file names).
    names : names of the two results in the message.
    show : how many differing elements the message lists.
    """
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape:
        raise SelfCheckError(f"{what}: shapes differ, {names[0]} {a_arr.shape} against "
                             f"{names[1]} {b_arr.shape}")
    bad = differing(a_arr, b_arr, rtol=rtol, atol=atol)
    if bad.any():
        raise SelfCheckError(_describe(what, a_arr, b_arr, bad, labels, names, show)
                             + f"\n(tolerance rtol={rtol:g}, atol={atol:g})")


def check_equal(a, b, *, what: str, labels: Sequence | None = None,
                names: tuple[str, str] = ("helper", "library"), show: int = 5) -> None:
    """Raise :class:`SelfCheckError` unless ``a`` and ``b`` are equal (NaN equals NaN)."""
    check_close(a, b, what=what, rtol=0.0, atol=0.0, labels=labels, names=names, show=show)


def check_true(condition: bool, message: str) -> None:
    """Raise :class:`SelfCheckError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SelfCheckError(message)


def compare_with_setting(measured: float, setting: float, *, name: str, what: str,
                         unit: str, tolerance: float, fix: str = "") -> tuple[bool, str]:
    """Compare a quantity measured from the data with the value in the settings.

    Parameters
    ----------
    measured, setting : the measured value and the one in ``config.py`` (same unit).
    name : the setting's name, e.g. ``"pixel_scale_arcsec"``.
    what : what was measured and how, e.g. ``"pixel scale of the solved WCS"``.
    unit : the unit, for the text.
    tolerance : the largest relative difference that counts as agreement (0.02: 2 %).
    fix : what else to check when they disagree (appended to the note).

    Returns (agree, text): the text gives both values and their relative difference and,
    when they disagree, a note that names the setting and the measured value to put in it.
    A measurement that is not finite agrees with nothing and says so.
    """
    if not np.isfinite(measured) or not np.isfinite(setting) or setting == 0:
        return False, (f"{what}: not measured ({_fmt(measured)} {unit}); config.{name} = "
                       f"{_fmt(setting)} {unit} is used unchecked")
    offset = measured / setting - 1.0
    text = (f"{what}: {measured:.4g} {unit}; config.{name} = {setting:.4g} {unit} "
            f"({offset:+.1%})")
    if abs(offset) <= tolerance:
        return True, text + f", within {tolerance:.0%}"
    note = (f"Note: {what} differs from config.{name} by {offset:+.1%} (more than "
            f"{tolerance:.0%}): set {name} = {measured:.4g} in config.py or the night's "
            "settings file")
    return False, text + "\n" + note + (f"; {fix}" if fix else ".")
