"""Astrometric calibration: detected stars + a reference catalogue -> a TAN-SIP WCS per frame.

Two backends share the same inputs and outputs:

``"python"`` (pip only)
    detect stars and measure windowed centroids, project the catalogue onto the tangent plane
    around the header pointing, match star patterns with astroalign (normal and mirrored
    parity), then fit TAN-SIP with :func:`astropy.wcs.utils.fit_wcs_from_points`, rejecting
    outliers and re-matching all stars between iterations.
``"astrometry.net"``
    astrometry.net's ``solve-field`` in two passes (a solve with a low-order tweak, then a
    refinement with SIP order 3 on all stars), with an index built from the reference
    catalogue by :func:`build_index` so that it runs offline.

All pixel coordinates in this module are 0-based (numpy and astropy's ``pixel_to_world``).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from datared.io import header_pointing

#: FWHM of a Gaussian in units of its sigma.
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Header keywords that belong to a WCS (removed before a new WCS is written).
_WCS_KEY_PREFIXES = (
    "CTYPE", "CRPIX", "CRVAL", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_", "CROTA",
    "A_", "B_", "AP_", "BP_", "PV1_", "PV2_", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX",
    "WCSAXES", "WCSNAME", "MJDREF", "IMAGEW", "IMAGEH", "LONPOLE",
)


class AstrometryError(RuntimeError):
    """A frame could not be solved; the message says why."""


# ---------------------------------------------------------------------------------------
# Star detection and centroids
# ---------------------------------------------------------------------------------------
#
# Astrometry needs a few hundred well-measured stars, not every star of the frame, and a
# full-size frame has 15 Mpx: so the detection never filters the full-resolution image as a
# whole. The sky is estimated in boxes from an evenly spread subset of their pixels (a
# coarse mesh, interpolated where needed), the stars are found as the peaks of a binned and
# smoothed copy of the image, and the centroids, fluxes and peaks are measured at full
# resolution in small cut-outs around the brightest candidates only.

@dataclass
class _Mesh:
    """Sky background on a coarse mesh of boxes, bilinear between the box centres
    (constant beyond the outermost centres)."""

    values: np.ndarray  # (boxes along y, boxes along x) sky level, ADU
    box_y: float  # box height, pixels
    box_x: float  # box width, pixels
    rms: float  # robust sky noise per pixel, ADU

    @staticmethod
    def _axis(coord, box: float, n: int):
        """Lower and upper mesh index and weight of the upper one along one axis."""
        pos = np.clip((np.asarray(coord, float) + 0.5) / box - 0.5, 0.0, n - 1.0)
        lo = np.minimum(np.floor(pos).astype(int), max(n - 2, 0))
        hi = np.minimum(lo + 1, n - 1)
        return lo, hi, pos - lo

    def at(self, y, x) -> np.ndarray:
        """Background (ADU) at pixel positions ``y``, ``x`` (0-based, broadcastable)."""
        ny, nx = self.values.shape
        i0, i1, wy = self._axis(y, self.box_y, ny)
        j0, j1, wx = self._axis(x, self.box_x, nx)
        v = self.values
        return ((1 - wy) * ((1 - wx) * v[i0, j0] + wx * v[i0, j1])
                + wy * ((1 - wx) * v[i1, j0] + wx * v[i1, j1]))

    def grid(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Background (ADU, float32) on the grid ``rows`` x ``cols`` of pixel coordinates."""
        ny, nx = self.values.shape
        j0, j1, wx = self._axis(cols, self.box_x, nx)
        v = self.values.astype(np.float32)
        wx = wx.astype(np.float32)
        along_x = v[:, j0] * (1 - wx) + v[:, j1] * wx  # (boxes along y, len(cols))
        i0, i1, wy = self._axis(rows, self.box_y, ny)
        wy = wy.astype(np.float32)[:, None]
        return along_x[i0] * (1 - wy) + along_x[i1] * wy


def _clipped_stats(samples: np.ndarray, sigma: float = 3.0,
                   max_iter: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped median and standard deviation of each row of ``samples`` (NaN: no data).

    Each row is sorted once; the values kept by a clip are then a contiguous run of the
    sorted row, whose ends are found by bisection, whose median is read off directly and
    whose mean and variance come from cumulative sums: each clipping iteration costs a few
    operations per row, not per value.
    Returns the median, the standard deviation and the number of values kept, per row.
    """
    s = np.sort(samples, axis=1)  # NaN sort last
    n_rows, width = s.shape
    rows = np.arange(n_rows)
    n = np.isfinite(s).sum(axis=1)
    ref = s[rows, n // 2 * (n > 0)]  # a rough centre: keeps the cumulative sums accurate
    d = np.nan_to_num(s - ref[:, None]).astype(float)
    c1 = np.zeros((n_rows, width + 1))
    c2 = np.zeros((n_rows, width + 1))
    np.cumsum(d, axis=1, out=c1[:, 1:])
    np.cumsum(d * d, axis=1, out=c2[:, 1:])
    lo, hi = np.zeros(n_rows, int), n
    for _ in range(max_iter):
        count = np.maximum(hi - lo, 1)
        median = 0.5 * (s[rows, lo + (count - 1) // 2] + s[rows, lo + count // 2])
        mean = (c1[rows, hi] - c1[rows, lo]) / count
        std = np.sqrt(np.clip((c2[rows, hi] - c2[rows, lo]) / count - mean**2, 0, None))
        new_lo = _count_sorted(s, n, median - sigma * std, inclusive=False)
        new_hi = _count_sorted(s, n, median + sigma * std, inclusive=True)
        if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
    return median, std, hi - lo


def _count_sorted(s: np.ndarray, n: np.ndarray, bound: np.ndarray,
                  inclusive: bool) -> np.ndarray:
    """Number of values below ``bound`` (or equal to it, if ``inclusive``) in each row of
    ``s``, whose first ``n`` values are sorted: a bisection of all rows at once."""
    rows = np.arange(len(s))
    lo, hi = np.zeros(len(s), int), np.asarray(n).copy()
    while np.any(lo < hi):
        active = lo < hi
        mid = (lo + hi) // 2
        value = s[rows, np.minimum(mid, s.shape[1] - 1)]
        with np.errstate(invalid="ignore"):
            below = active & ((value <= bound) if inclusive else (value < bound))
        lo = np.where(below, mid + 1, lo)
        hi = np.where(active & ~below, mid, hi)
    return lo


def _background_mesh(data: np.ndarray, mask: np.ndarray | None = None, box_px: int = 64,
                     step: int = 2) -> _Mesh:
    """Sky level and noise in boxes of about ``box_px`` pixels (like photutils' Background2D
    with a sigma-clipped median and a 3 x 3 median filter of the mesh).

    Each box is sampled on every ``step``-th row and column (the same number of pixels in
    each box, spread over all of it): about a thousand pixels per box measure the median
    to 4 % of the noise, and the image is read once, sparsely. Boxes with less than half of
    their pixels usable (bad, not finite or clipped) get the median of the other boxes.
    """
    ny, nx = data.shape
    box = int(min(box_px, max(8, min(ny, nx) // 4)))
    nby, nbx = max(1, round(ny / box)), max(1, round(nx / box))
    by, bx = ny / nby, nx / nbx
    my, mx = max(1, int(by // step)), max(1, int(bx // step))
    rows = (np.arange(nby)[:, None] * by + (np.arange(my) + 0.5) * by / my).astype(int).ravel()
    cols = (np.arange(nbx)[:, None] * bx + (np.arange(mx) + 0.5) * bx / mx).astype(int).ravel()
    samples = np.asarray(data[rows][:, cols], np.float32)
    unusable = ~np.isfinite(samples)
    if mask is not None:
        unusable |= np.asarray(mask, bool)[rows][:, cols]
    samples[unusable] = np.nan
    samples = samples.reshape(nby, my, nbx, mx).transpose(0, 2, 1, 3).reshape(nby * nbx, -1)
    level, noise, kept = _clipped_stats(samples)
    ok = kept >= 0.5 * samples.shape[1]
    if not ok.any():
        return _Mesh(np.zeros((nby, nbx)), by, bx, float("nan"))
    level = np.where(ok, level, np.median(level[ok])).reshape(nby, nbx)
    noise = np.where(ok, noise, np.median(noise[ok])).reshape(nby, nbx)
    from scipy.ndimage import median_filter

    level = median_filter(level, size=3, mode="nearest")
    noise = median_filter(noise, size=3, mode="nearest")
    return _Mesh(level, by, bx, float(np.median(noise)))


def background(data: np.ndarray, mask: np.ndarray | None = None,
               box_px: int = 64) -> tuple[np.ndarray, float]:
    """Smooth sky background and the robust sky noise of an image.

    Parameters
    ----------
    data : image, ADU.
    mask : True where pixels are bad (ignored).
    box_px : size of the background boxes, pixels.

    Returns the background image (ADU, float32) and the noise per pixel (ADU): a
    sigma-clipped median in each box (from every second pixel of it), median-filtered over
    3 x 3 boxes and interpolated bilinearly between the box centres.
    """
    data = np.asarray(data)
    mesh = _background_mesh(data, mask, box_px)
    ny, nx = data.shape
    return mesh.grid(np.arange(ny), np.arange(nx)), mesh.rms


class _Cutouts:
    """Square cut-outs of an image around star positions, sky subtracted, bad pixels 0."""

    def __init__(self, data: np.ndarray, mask: np.ndarray | None = None,
                 mesh: _Mesh | None = None):
        self.data = data
        self.mask = mask
        self.mesh = mesh

    def __call__(self, x: np.ndarray, y: np.ndarray,
                 half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cut-outs of (2 half + 1)^2 pixels centred on the pixels nearest to (x, y).

        Returns the cut-outs (n, 2 half + 1, 2 half + 1), their centre pixels x0, y0 and
        True where the cut-out lies inside the image (the others are moved inside and
        should be ignored).
        """
        ny, nx = self.data.shape
        inside = (x >= half) & (x < nx - half - 1) & (y >= half) & (y < ny - half - 1)
        x0 = np.clip(np.round(np.nan_to_num(x)).astype(int), half, nx - half - 1)
        y0 = np.clip(np.round(np.nan_to_num(y)).astype(int), half, ny - half - 1)
        offs = np.arange(-half, half + 1)
        rr = (y0[:, None] + offs)[:, :, None]
        cc = (x0[:, None] + offs)[:, None, :]
        cut = self.data[rr, cc].astype(float)
        if self.mesh is not None:
            cut -= self.mesh.at(rr, cc)
        bad = ~np.isfinite(cut)
        if self.mask is not None:
            bad |= self.mask[rr, cc]
        cut[bad] = 0.0
        return cut, x0, y0, inside


def _centroid_cutouts(cut: np.ndarray, cx: np.ndarray, cy: np.ndarray, sigma_px: float,
                      n_iter: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids in cut-outs (n, 2h+1, 2h+1) from first guesses ``cx``,
    ``cy`` (offsets from the cut-out centres, pixels).

    The window is separable, exp(-dx^2 / 2 s^2) exp(-dy^2 / 2 s^2), so each iteration needs
    the window on two short axes and two weighted sums of each cut-out. Returns the
    offsets and True where the centroid converged well inside its cut-out.
    """
    half = (cut.shape[1] - 1) // 2
    offs = np.arange(-half, half + 1, dtype=float)
    cx = np.asarray(cx, float).copy()
    cy = np.asarray(cy, float).copy()
    good = np.ones(len(cut), bool)
    for _ in range(n_iter):
        ex = offs[None, :] - cx[:, None]
        ey = offs[None, :] - cy[:, None]
        gx = np.exp(-0.5 * ex**2 / sigma_px**2)
        gy = np.exp(-0.5 * ey**2 / sigma_px**2)
        along_x = np.einsum("nij,nj->ni", cut, gx)  # window-weighted sum of each row
        along_y = np.einsum("nij,ni->nj", cut, gy)  # ... and of each column
        norm = (along_x * gy).sum(axis=1)
        good &= norm > 0
        norm = np.where(norm > 0, norm, 1.0)
        step_x = 2.0 * (along_y * gx * ex).sum(axis=1) / norm
        step_y = 2.0 * (along_x * gy * ey).sum(axis=1) / norm
        cx += np.clip(step_x, -1.0, 1.0)
        cy += np.clip(step_y, -1.0, 1.0)
        if np.all(np.abs(step_x) < 1e-4) and np.all(np.abs(step_y) < 1e-4):
            break
    good &= (np.abs(cx) < half - 2) & (np.abs(cy) < half - 2)
    return cx, cy, good


def windowed_centroids(image: np.ndarray, x: np.ndarray, y: np.ndarray, sigma_px: float,
                       n_iter: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-windowed centroids (like SExtractor's XWIN_IMAGE), all stars at once.

    Parameters
    ----------
    image : background-subtracted image, ADU.
    x, y : first-guess positions, pixels (0-based).
    sigma_px : sigma of the Gaussian window, pixels (the star's FWHM / 2.355 works well).
    n_iter : iterations of the window update.

    Returns refined x, y (pixels) and a boolean array, True where the centroid converged
    inside its cut-out.
    """
    half = max(3, int(math.ceil(4.0 * sigma_px)))
    x = np.asarray(x, float).copy()
    y = np.asarray(y, float).copy()
    cut, x0, y0, ok = _Cutouts(np.asarray(image))(x, y, half)
    cx, cy, good = _centroid_cutouts(cut[ok], x[ok] - x0[ok], y[ok] - y0[ok], sigma_px, n_iter)
    x[ok] = x0[ok] + cx
    y[ok] = y0[ok] + cy
    ok[np.flatnonzero(ok)[~good]] = False
    return x, y, ok


def _find_peaks(data: np.ndarray, mask: np.ndarray | None, mesh: _Mesh, bin_factor: int,
                smooth_px: float, nsigma: float, max_peaks: int,
                origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Star candidates: local maxima of a binned, smoothed, sky-subtracted copy of the image.

    Parameters
    ----------
    data : image (or a part of it), ADU; mask : True where pixels are bad.
    mesh : the sky background of the whole image.
    bin_factor : bin the image by this factor in x and y (mean of f x f pixels).
    smooth_px : sigma of the Gaussian smoothing, full-resolution pixels (the stars' own
        width makes it a matched filter).
    nsigma : lowest accepted peak, in units of the noise of the smoothed image (from the
        sky noise per pixel, for white noise).
    max_peaks : keep the highest peaks only.
    origin : position (row, column) of ``data[0, 0]`` in the whole image.

    Returns x, y (pixels of the whole image, to a fraction of a bin from a parabola through
    the peak and its neighbours) and the significance of each peak, highest first.
    """
    from scipy.ndimage import gaussian_filter

    f = bin_factor
    nby, nbx = data.shape[0] // f, data.shape[1] // f
    binned = np.zeros((nby, nbx), np.float32)
    for i in range(f):
        for j in range(f):
            binned += data[i:nby * f:f, j:nbx * f:f]
    binned /= f * f
    centres_y = origin[0] + np.arange(nby) * f + (f - 1) / 2.0
    centres_x = origin[1] + np.arange(nbx) * f + (f - 1) / 2.0
    binned -= mesh.grid(centres_y, centres_x)
    binned[~np.isfinite(binned)] = 0.0
    if mask is not None:
        bad = np.zeros((nby, nbx), bool)
        for i in range(f):
            for j in range(f):
                bad |= mask[i:nby * f:f, j:nbx * f:f]
        binned[bad] = 0.0
    sigma_bins = smooth_px / f
    smooth = gaussian_filter(binned, sigma_bins, truncate=3.0)
    # Noise of the smoothed image: the noise of a bin times the norm of the kernel (the
    # same truncated, normalised Gaussian as gaussian_filter's, in each axis).
    taps = np.arange(-int(3.0 * sigma_bins + 0.5), int(3.0 * sigma_bins + 0.5) + 1)
    kernel = np.exp(-0.5 * (taps / sigma_bins) ** 2)
    kernel /= kernel.sum()
    noise = mesh.rms / f * float(np.sum(kernel**2))
    # Local maxima above the threshold, away from the edge of the binned image.
    idx = np.flatnonzero(smooth > nsigma * noise)
    iy, ix = np.divmod(idx, nbx)
    idx = idx[(iy > 0) & (iy < nby - 1) & (ix > 0) & (ix < nbx - 1)]
    flat = smooth.ravel()
    value = flat[idx]
    for step in (-nbx - 1, -nbx, -nbx + 1, -1, 1, nbx - 1, nbx, nbx + 1):
        keep = value >= flat[idx + step]
        idx, value = idx[keep], value[keep]
    order = np.argsort(value)[::-1][:max_peaks]
    idx, value = idx[order], value[order]
    iy, ix = np.divmod(idx, nbx)

    def vertex(left, right):
        curv = left - 2.0 * value + right
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.where(curv < 0, 0.5 * (left - right) / curv, 0.0)
        return np.clip(shift, -0.5, 0.5)

    x = origin[1] + (ix + vertex(flat[idx - 1], flat[idx + 1])) * f + (f - 1) / 2.0
    y = origin[0] + (iy + vertex(flat[idx - nbx], flat[idx + nbx])) * f + (f - 1) / 2.0
    return x, y, value / noise


def _measure_stars(cutouts: _Cutouts, x: np.ndarray, y: np.ndarray,
                   sigma: float) -> tuple[np.ndarray, ...]:
    """Windowed centroids, fluxes and peaks of the stars near (x, y), at full resolution.

    Returns x, y (pixels), the flux in a circle of radius 3 ``sigma`` (ADU), the area of
    that circle (pixels), the peak (brightest pixel of the 3 x 3 around the centre, ADU
    above the sky) and True where the centroid converged inside the image.
    """
    half = max(3, int(math.ceil(4.0 * sigma)))
    x = np.asarray(x, float).copy()
    y = np.asarray(y, float).copy()
    # Two rounds: first guesses from the binned image can be a pixel off, so the second
    # round measures in cut-outs centred on the first centroids.
    for _ in range(2):
        cut, x0, y0, ok = cutouts(x, y, half)
        cx, cy, good = _centroid_cutouts(cut, x - x0, y - y0, sigma)
        x, y = x0 + cx, y0 + cy
        ok &= good
    fh = max(2, int(math.ceil(3.0 * sigma)))
    cut, _, _, inside = cutouts(x, y, fh)
    offs = np.arange(-fh, fh + 1)
    circle = (offs[None, :] ** 2 + offs[:, None] ** 2) <= fh**2
    flux = (cut * circle).sum(axis=(1, 2))
    peak = cut[:, fh - 1:fh + 2, fh - 1:fh + 2].max(axis=(1, 2))
    return x, y, flux, int(circle.sum()), peak, ok & inside


def _first_fwhm(data: np.ndarray, mask: np.ndarray | None, mesh: _Mesh, cutouts: _Cutouts,
                bin_factor: int, nsigma: float, saturation_adu: float | None,
                guess: float = 3.5) -> float | None:
    """FWHM (pixels) of the stars, from a first detection with a typical FWHM (``guess``).

    The central 1024 x 1024 pixels hold enough stars and keep large frames fast (the whole
    image is searched if they hold none). Returns ``guess`` if fewer than 5 bright
    unsaturated stars are found and None if no star at all.
    """
    ny, nx = data.shape
    y0, x0 = max(0, ny // 2 - 512), max(0, nx // 2 - 512)
    crop = (slice(y0, y0 + 1024), slice(x0, x0 + 1024))
    sigma = guess / SIGMA_TO_FWHM
    x, y, _ = _find_peaks(data[crop], None if mask is None else mask[crop], mesh, bin_factor,
                          sigma, nsigma, 150, origin=(y0, x0))
    if len(x) == 0:
        x, y, _ = _find_peaks(data, mask, mesh, bin_factor, sigma, nsigma, 150)
    if len(x) == 0:
        return None
    x, y, flux, _, peak, ok = _measure_stars(cutouts, x, y, sigma)
    use = ok & (peak > 20 * mesh.rms) & (peak < 3.0 * _centre_fraction(guess) * flux)
    if saturation_adu is not None:
        use &= peak < 0.5 * saturation_adu
    if use.sum() < 5:
        return guess
    order = np.argsort(peak[use])[::-1][:50]
    return _measure_fwhm(cutouts, x[use][order], y[use][order], guess)


def _measure_fwhm(cutouts: _Cutouts, x: np.ndarray, y: np.ndarray, guess: float) -> float:
    """Median FWHM (pixels) from the windowed second moments of bright, unsaturated stars."""
    sigma = guess / SIGMA_TO_FWHM
    for _ in range(3):
        x, y, _, _, _, ok = _measure_stars(cutouts, x, y, sigma)
        if ok.sum() < 3:
            return guess
        half = max(3, int(math.ceil(4.0 * sigma)))
        cut, x0, y0, _ = cutouts(x[ok], y[ok], half)
        offs = np.arange(-half, half + 1)
        dx = offs[None, None, :] - (x[ok] - x0)[:, None, None]
        dy = offs[None, :, None] - (y[ok] - y0)[:, None, None]
        wc = np.exp(-0.5 * (dx**2 + dy**2) / sigma**2) * cut
        norm = wc.sum(axis=(1, 2))
        # The windowed second moment of a Gaussian of sigma s through a window of sigma
        # sw is s^2 sw^2 / (s^2 + sw^2): invert it for s.
        m2 = 0.5 * (wc * (dx**2 + dy**2)).sum(axis=(1, 2)) / np.where(norm > 0, norm, 1)
        m2 = np.median(m2[norm > 0])
        if not 0 < m2 < sigma**2:
            return guess
        new_sigma = math.sqrt(m2 * sigma**2 / (sigma**2 - m2))
        if abs(new_sigma - sigma) < 0.01:
            sigma = new_sigma
            break
        sigma = float(np.clip(new_sigma, 0.5, 10.0))
    return sigma * SIGMA_TO_FWHM


def detect_stars(data: np.ndarray, mask: np.ndarray | None = None,
                 fwhm_px: float | None = None, nsigma: float = 3.0, max_stars: int = 800,
                 saturation_adu: float | None = None, gain_e_per_adu: float = 1.0) -> Table:
    """Find stars and measure accurate centroids and their uncertainties.

    Parameters
    ----------
    data : calibrated image, ADU.
    mask : True where pixels are bad.
    fwhm_px : star FWHM, pixels; None measures it from the brightest stars.
    nsigma : detection threshold: significance of a peak in the image smoothed with the
        stars' own width, as in DAOStarFinder (faint detections get large position errors
        and hence small weights; noise peaks find no catalogue partner).
    max_stars : keep at most this many stars (the brightest).
    saturation_adu : peak level (above the sky) at which a star counts as saturated, ADU.
    gain_e_per_adu : detector gain, electrons per ADU (for the signal-to-noise ratio).

    Returns a table sorted from bright to faint with ``x``, ``y`` (0-based pixels),
    ``flux`` (ADU in a window of radius 1.3 FWHM), ``snr``, ``sigma_xy`` (expected position
    error per axis, pixels), ``peak`` (ADU above the sky) and ``saturated``; the measured
    FWHM (pixels) is in ``meta["fwhm_px"]`` and the sky noise (ADU) in ``meta["sky_rms"]``.

    The steps: the sky background and noise on a coarse mesh (:func:`background`); the
    FWHM from the brightest stars of the central 1024 x 1024 pixels (found with a typical
    FWHM); the peaks of a copy of the image binned 2 x 2 (frames above 4 Mpx) and smoothed
    with a Gaussian of the stars' width; then, in small full-resolution cut-outs around
    the highest peaks only, Gaussian-windowed centroids (:func:`windowed_centroids`),
    fluxes and peaks. Sharp peaks (cosmic rays, hot pixels: the brightest pixel holds far
    more of the flux than a star's would) and double detections of one star are dropped.
    The full-size image is never filtered or copied as a whole.
    """
    data = np.asarray(data)
    if data.dtype != np.float32 and data.dtype != np.float64:
        data = data.astype(np.float32)
    mask = None if mask is None else np.asarray(mask, bool)
    mesh = _background_mesh(data, mask)
    rms = mesh.rms
    names = ("x", "y", "flux", "snr", "sigma_xy", "peak", "saturated")
    empty = Table(names=names, dtype=(float, float, float, float, float, float, bool))
    empty.meta.update(fwhm_px=float("nan"), sky_rms=rms)
    if not np.isfinite(rms) or rms <= 0:
        return empty
    cutouts = _Cutouts(data, mask, mesh)

    bin_factor = 2 if data.size > 4e6 else 1
    if fwhm_px is None:
        fwhm_px = _first_fwhm(data, mask, mesh, cutouts, bin_factor, max(nsigma, 5.0),
                              saturation_adu)
        if fwhm_px is None:
            return empty
    # Candidates, highest first, from the image smoothed with the stars' own width.
    sigma = fwhm_px / SIGMA_TO_FWHM
    x, y, _ = _find_peaks(data, mask, mesh, bin_factor, sigma, nsigma, 2 * max_stars + 50)
    if len(x) == 0:
        return empty
    x, y, flux, npix, peak, ok = _measure_stars(cutouts, x, y, sigma)
    # A cosmic ray or hot pixel puts most of its flux into one pixel; a star of this FWHM
    # puts _centre_fraction of it there (far less, even with noise).
    ok &= (flux > 0) & (peak < 3.0 * _centre_fraction(fwhm_px) * flux)
    x, y, flux, peak = x[ok], y[ok], flux[ok], peak[ok]
    # Two peaks of one star converge to the same centroid: keep the brighter one.
    order = np.argsort(flux)[::-1]
    x, y, flux, peak = x[order], y[order], flux[order], peak[order]
    if len(x) > 1:
        from scipy.spatial import cKDTree

        pairs = cKDTree(np.column_stack([x, y])).query_pairs(max(1.0, 0.5 * fwhm_px),
                                                            output_type="ndarray")
        single = np.ones(len(x), bool)
        single[pairs.max(axis=1)] = False  # the fainter of each pair
        x, y, flux, peak = x[single], y[single], flux[single], peak[single]
    x, y, flux, peak = x[:max_stars], y[:max_stars], flux[:max_stars], peak[:max_stars]
    noise = np.sqrt(np.clip(flux, 0, None) / gain_e_per_adu + npix * rms**2)
    snr = flux / noise
    saturated = np.zeros(len(x), bool)
    if saturation_adu is not None:
        saturated = peak >= saturation_adu
    # Position error per axis of a centroid: about sigma_psf * sqrt(2) / SNR (plus a small
    # floor for pixelisation and PSF asymmetries).
    sigma_xy = np.hypot(math.sqrt(2.0) * sigma / np.clip(snr, 1e-3, None), 0.01)
    table = Table({"x": x, "y": y, "flux": flux, "snr": snr, "sigma_xy": sigma_xy,
                   "peak": peak, "saturated": saturated})
    table.meta.update(fwhm_px=float(fwhm_px), sky_rms=rms)
    return table


def _centre_fraction(fwhm_px: float) -> float:
    """Fraction of a Gaussian star's flux in the pixel at its centre."""
    return math.erf(0.5 / (math.sqrt(2.0) * fwhm_px / SIGMA_TO_FWHM)) ** 2


# ---------------------------------------------------------------------------------------
# Reference catalogue on the tangent plane
# ---------------------------------------------------------------------------------------

def hint_wcs(ra_deg: float, dec_deg: float, scale_arcsec: float, shape: tuple[int, int],
             mirrored: bool = False) -> WCS:
    """A TAN WCS from the pointing and the pixel scale alone (north up, east left).

    Parameters
    ----------
    ra_deg, dec_deg : pointing of the frame centre, degrees.
    scale_arcsec : pixel scale, arcsec per pixel.
    shape : image shape (ny, nx).
    mirrored : True flips the east-west axis (the other parity).
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra_deg, dec_deg]
    wcs.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    scale = scale_arcsec / 3600.0
    wcs.wcs.cd = [[scale if mirrored else -scale, 0.0], [0.0, scale]]
    wcs.pixel_shape = (shape[1], shape[0])
    return wcs


def catalog_at_epoch(catalog: Table, epoch_jyear: float | None) -> SkyCoord:
    """Catalogue positions moved by their proper motions to ``epoch_jyear``.

    Parameters
    ----------
    catalog : table with ``ra``, ``dec`` (degrees) and optionally ``pmra`` (mas/yr,
        including cos(dec)), ``pmdec`` (mas/yr) and ``ref_epoch`` (Julian year).
    epoch_jyear : epoch of the observation, Julian year; None keeps the catalogue epoch.
    """
    ra = np.asarray(catalog["ra"], float)
    dec = np.asarray(catalog["dec"], float)
    names = catalog.colnames
    if epoch_jyear is not None and "pmra" in names and "pmdec" in names:
        ref = np.asarray(catalog["ref_epoch"], float) if "ref_epoch" in names else 2016.0
        dt = epoch_jyear - ref
        pmra = np.nan_to_num(np.asarray(catalog["pmra"], float))
        pmdec = np.nan_to_num(np.asarray(catalog["pmdec"], float))
        dec = dec + pmdec * dt / 3.6e6
        ra = ra + pmra * dt / 3.6e6 / np.cos(np.radians(dec))
    return SkyCoord(ra * u.deg, dec * u.deg)


def frame_epoch(header: fits.Header, date_key: str = "DATE-OBS") -> float | None:
    """Julian year of the observation from the header, or None if the date is missing."""
    from astropy.time import Time

    value = header.get(date_key)
    if not value:
        return None
    try:
        return float(Time(value, format="isot", scale="utc").jyear)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# Pattern matching and the TAN-SIP fit
# ---------------------------------------------------------------------------------------

def match_patterns(det_xy: np.ndarray, ref_xy: np.ndarray,
                   max_points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Match two point lists by their triangle patterns (astroalign).

    Parameters
    ----------
    det_xy : (n, 2) detected positions, pixels, brightest first.
    ref_xy : (m, 2) reference positions on the same pixel scale, brightest first.
    max_points : at most this many points of each list are used.

    Returns index arrays (into ``det_xy`` and ``ref_xy``) of the matched pairs; raises
    :class:`AstrometryError` if no consistent match exists.
    """
    import astroalign

    det_xy = np.asarray(det_xy, float)[:max_points]
    ref_xy = np.asarray(ref_xy, float)[:max_points]
    if len(det_xy) < 4 or len(ref_xy) < 4:
        raise AstrometryError(f"too few stars to match patterns ({len(det_xy)} detected, "
                              f"{len(ref_xy)} in the catalogue)")
    try:
        _, (src, dst) = astroalign.find_transform(det_xy, ref_xy, max_control_points=max_points)
    except (astroalign.MaxIterError, ValueError, IndexError) as err:
        raise AstrometryError(f"no star pattern matched the catalogue ({err})") from None
    det_idx = _index_of(det_xy, src)
    ref_idx = _index_of(ref_xy, dst)
    return det_idx, ref_idx


def _index_of(points: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Row index in ``points`` of each row of ``chosen`` (exact copies)."""
    from scipy.spatial import cKDTree

    _, idx = cKDTree(points).query(chosen)
    return np.asarray(idx, int)


def initial_wcs(xy: np.ndarray, sky: SkyCoord, shape: tuple[int, int]) -> WCS:
    """A first TAN WCS (no distortion) from a few matched stars.

    Parameters
    ----------
    xy : (n, 2) pixel positions, 0-based.
    sky : the matching sky positions.
    shape : image shape (ny, nx).

    Uses :func:`astropy.wcs.utils.fit_wcs_from_points`, which evaluates its linear fit with
    pixel origin 0 (whatever its docstring says); tests/test_astrometry.py checks this.
    """
    from astropy.wcs.utils import fit_wcs_from_points

    xy = np.asarray(xy, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = fit_wcs_from_points((xy[:, 0], xy[:, 1]), sky, proj_point="center",
                                  projection="TAN")
    wcs.pixel_shape = (shape[1], shape[0])
    return wcs


def _tangent_plane(crval: tuple[float, float]) -> WCS:
    """A TAN projection about ``crval`` whose pixel coordinates are the standard coordinates
    (xi, eta) in degrees (FITS origin 1)."""
    proj = WCS(naxis=2)
    proj.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    proj.wcs.crval = list(crval)
    proj.wcs.crpix = [0.0, 0.0]
    proj.wcs.cd = [[1.0, 0.0], [0.0, 1.0]]
    proj.wcs.set()
    return proj


def fit_tan_sip(xy: np.ndarray, sky: SkyCoord, sip_degree: int | None,
                shape: tuple[int, int], weights: np.ndarray | None = None) -> WCS:
    """Weighted least-squares fit of a TAN-SIP WCS to matched pixel and sky positions.

    Parameters
    ----------
    xy : (n, 2) pixel positions, 0-based.
    sky : the matching sky positions.
    sip_degree : SIP polynomial degree (None or 0 for a pure TAN projection).
    shape : image shape (ny, nx); CRPIX is put at the image centre.
    weights : weight of each star, e.g. 1 / position error**2 (default: all equal).

    The sky positions are projected onto the tangent plane at CRVAL, where the TAN-SIP model
    is a polynomial in the pixel offsets from CRPIX, linear in its coefficients: one
    weighted linear least-squares solve, repeated while CRVAL moves onto CRPIX. The inverse
    polynomials (AP, BP) are fitted too, so that other programs can go from sky to pixel.
    (:func:`astropy.wcs.utils.fit_wcs_from_points` takes no weights, and bright stars
    measure positions ten times better than faint ones.)
    """
    from astropy.wcs import Sip

    xy = np.asarray(xy, float)
    ny, nx = shape
    degree = int(sip_degree or 0)
    order = max(degree, 1)
    crpix = np.array([(nx + 1) / 2.0, (ny + 1) / 2.0])
    du = xy[:, 0] + 1.0 - crpix[0]
    dv = xy[:, 1] + 1.0 - crpix[1]
    norm = max(nx, ny) / 2.0  # keeps the design matrix well conditioned
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1) if p + q <= order]
    design = np.column_stack([(du / norm) ** p * (dv / norm) ** q for p, q in terms])
    w = np.ones(len(xy)) if weights is None else np.asarray(weights, float)
    sw = np.sqrt(w / w.max())
    if len(xy) < len(terms) + 1:
        raise AstrometryError(f"{len(xy)} stars cannot constrain a SIP degree {degree} fit")
    # Start CRVAL at the mean sky position; each pass moves it to where CRPIX points.
    mean = sky.cartesian.mean()
    center = SkyCoord(mean, representation_type="cartesian").spherical
    crval = (float(center.lon.deg), float(center.lat.deg))
    for _ in range(6):
        proj = _tangent_plane(crval)
        xi, eta = proj.wcs_world2pix(sky.ra.deg, sky.dec.deg, 1)
        cx, *_ = np.linalg.lstsq(design * sw[:, None], xi * sw, rcond=None)
        cy, *_ = np.linalg.lstsq(design * sw[:, None], eta * sw, rcond=None)
        offset = math.hypot(cx[0], cy[0])
        ra_c, dec_c = proj.wcs_pix2world([cx[0]], [cy[0]], 1)
        crval = (float(ra_c[0]), float(dec_c[0]))
        if offset < 1e-10:  # degrees: 0.4 micro-arcsec
            break
    coef = {term: (a, b) for term, a, b in zip(terms, cx, cy, strict=True)}
    cd = np.array([[coef[(1, 0)][0], coef[(0, 1)][0]], [coef[(1, 0)][1], coef[(0, 1)][1]]]) / norm
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if degree else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = list(crpix)
    wcs.wcs.cd = cd
    wcs.wcs.radesys = "ICRS"
    wcs.pixel_shape = (nx, ny)
    if degree:
        cd_inv = np.linalg.inv(cd)
        a = np.zeros((degree + 1, degree + 1))
        b = np.zeros((degree + 1, degree + 1))
        for (p, q), vec in coef.items():
            if p + q >= 2:
                a[p, q], b[p, q] = cd_inv @ (np.asarray(vec) / norm ** (p + q))
        wcs.sip = Sip(a, b, None, None, crpix)
        _fit_inverse_sip(wcs, shape, degree)
    wcs.wcs.set()
    return wcs


def _fit_inverse_sip(wcs: WCS, shape: tuple[int, int], degree: int) -> None:
    """Fill AP_p_q, BP_p_q of ``wcs`` by least squares on a pixel grid (in place)."""
    from astropy.wcs import Sip

    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 30), np.linspace(0, ny - 1, 30))
    px, py = gx.ravel() + 1.0, gy.ravel() + 1.0  # FITS pixels
    crpix = wcs.wcs.crpix
    u_ = px - crpix[0]
    v_ = py - crpix[1]
    a, b = wcs.sip.a, wcs.sip.b
    fu = sum(a[p, q] * u_**p * v_**q for p in range(degree + 1) for q in range(degree + 1))
    fv = sum(b[p, q] * u_**p * v_**q for p in range(degree + 1) for q in range(degree + 1))
    uu, vv = u_ + fu, v_ + fv  # focal-plane coordinates
    # AP/BP map focal-plane (U, V) back to pixel offsets: u = U + AP(U, V).
    order = degree + 1
    terms = [(p, q) for p in range(order + 1) for q in range(order + 1) if p + q <= order]
    scale = max(nx, ny)
    design = np.column_stack([(uu / scale) ** p * (vv / scale) ** q for p, q in terms])
    cu, *_ = np.linalg.lstsq(design, u_ - uu, rcond=None)
    cv, *_ = np.linalg.lstsq(design, v_ - vv, rcond=None)
    ap = np.zeros((order + 1, order + 1))
    bp = np.zeros((order + 1, order + 1))
    for (p, q), c1, c2 in zip(terms, cu, cv, strict=True):
        ap[p, q] = c1 / scale ** (p + q)
        bp[p, q] = c2 / scale ** (p + q)
    wcs.sip = Sip(a, b, ap, bp, crpix)


def sip_degree_for(n_stars: int, wanted: int) -> int:
    """Highest SIP degree <= ``wanted`` that at least 3 stars per free parameter support."""
    for degree in range(wanted, 1, -1):
        n_terms = sum(1 for p in range(degree + 1) for q in range(degree + 1) if 2 <= p + q <= degree)
        if n_stars >= 3 * (6 + 2 * n_terms):
            return degree
    return 0


# ---------------------------------------------------------------------------------------
# The pure-Python solver
# ---------------------------------------------------------------------------------------

@dataclass
class Solution:
    """Result of solving one frame (success or failure)."""

    file: str
    backend: str
    success: bool = False
    reason: str = ""
    wcs: WCS | None = None
    n_detected: int = 0
    n_matched: int = 0
    rms_px: float = float("nan")
    rms_arcsec: float = float("nan")
    sip_degree: int = 0
    seconds: float = float("nan")
    matched: Table | None = field(default=None, repr=False)

    def row(self) -> dict:
        """The summary-table row of this frame."""
        return {"frame": self.file, "n_detected": self.n_detected, "n_matched": self.n_matched,
                "rms_px": self.rms_px, "rms_arcsec": self.rms_arcsec,
                "sip_degree": self.sip_degree, "backend": self.backend,
                "success": self.success, "reason": self.reason, "seconds": self.seconds}


def _near(sky: SkyCoord, wcs: WCS, shape: tuple[int, int], margin_px: float) -> np.ndarray:
    """Indices of catalogue stars within the frame's circumscribed circle grown by
    ``margin_px`` (keeps distortion polynomials away from far-off stars)."""
    ny, nx = shape
    center = wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)
    radius_px = 0.5 * math.hypot(nx, ny) + margin_px
    radius = radius_px * pixel_scale_of(wcs) * u.arcsec
    return np.flatnonzero(sky.separation(center) < radius)


def _ranked_catalog(sky: SkyCoord, mag: np.ndarray, wcs: WCS, shape: tuple[int, int],
                    margin_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Catalogue stars projected with ``wcs`` that fall inside the frame grown by
    ``margin_px``: pixel positions and catalogue indices, brightest first."""
    near = _near(sky, wcs, shape, 1.5 * margin_px)
    if len(near) == 0:
        return np.zeros((0, 2)), near
    x, y = wcs.world_to_pixel(sky[near])
    ny, nx = shape
    inside = ((x > -margin_px) & (x < nx - 1 + margin_px) & (y > -margin_px)
              & (y < ny - 1 + margin_px) & np.isfinite(x) & np.isfinite(y))
    order = np.argsort(mag[near][inside], kind="stable")
    idx = near[inside][order]
    return np.column_stack([x[inside][order], y[inside][order]]), idx


def _match_all(det_xy: np.ndarray, sky: SkyCoord, mag: np.ndarray, wcs: WCS,
               shape: tuple[int, int], radius_px: float | np.ndarray,
               blend_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour matches of every detection to an isolated catalogue star.

    ``radius_px`` is the largest accepted distance (pixels), one value or one per detection.
    """
    from scipy.spatial import cKDTree

    radius_px = np.broadcast_to(np.asarray(radius_px, float), (len(det_xy),))
    max_radius = float(radius_px.max()) if len(det_xy) else 1.0
    cat_xy, cat_idx = _ranked_catalog(sky, mag, wcs, shape, margin_px=2 * max_radius)
    if len(cat_xy) == 0 or len(det_xy) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    tree = cKDTree(cat_xy)
    # A catalogue star with a neighbour less than 2.5 mag fainter within blend_px makes a
    # blended image whose centroid lies between the two: leave those out.
    isolated = np.ones(len(cat_xy), bool)
    for i, j in tree.query_pairs(blend_px):
        mi, mj = mag[cat_idx[i]], mag[cat_idx[j]]
        if mj < mi + 2.5:
            isolated[i] = False
        if mi < mj + 2.5:
            isolated[j] = False
    dist, nearest = tree.query(det_xy, k=1, distance_upper_bound=max_radius)
    found = np.isfinite(dist) & (dist <= radius_px)
    det_i = np.flatnonzero(found)
    cat_i = nearest[found]
    keep = isolated[cat_i]
    det_i, cat_i = det_i[keep], cat_i[keep]
    # One detection per catalogue star: drop catalogue stars claimed twice.
    uniq, counts = np.unique(cat_i, return_counts=True)
    single = np.isin(cat_i, uniq[counts == 1])
    return det_i[single], cat_idx[cat_i[single]]


def refine_wcs(wcs: WCS, stars: Table, sky: SkyCoord, mag: np.ndarray,
               shape: tuple[int, int], sip_degree: int = 3, fwhm_px: float = 3.5,
               n_iter: int = 8, clip_sigma: float = 4.0,
               min_snr: float = 5.0) -> tuple[WCS, Table]:
    """Re-match all stars and re-fit TAN-SIP with outlier rejection, starting from ``wcs``.

    Parameters
    ----------
    wcs : a first WCS good to a few pixels.
    stars : detections (``x``, ``y``, ``sigma_xy``, ``saturated``) from :func:`detect_stars`.
    sky, mag : reference catalogue positions and magnitudes.
    shape : image shape (ny, nx).
    sip_degree : wanted SIP degree (lowered when too few stars are matched).
    fwhm_px : star FWHM, pixels (sets the first matching radius and the blend radius).
    n_iter : match-fit iterations.
    clip_sigma : stars whose residual exceeds this many times their expected error (scaled
        by the typical normalised residual) are rejected.
    min_snr : detections with a lower signal-to-noise ratio are not used.

    Returns the WCS and a table of the stars used: ``x``, ``y`` (pixels), ``ra``, ``dec``
    (degrees), ``dx``, ``dy`` (measured minus fitted position, pixels), ``sigma_xy``.
    """
    use = ~np.asarray(stars["saturated"], bool) & (np.asarray(stars["snr"]) >= min_snr)
    det_xy = np.column_stack([stars["x"], stars["y"]])[use]
    sigma = np.asarray(stars["sigma_xy"], float)[use]
    radius = np.full(len(det_xy), max(3.0, 1.5 * fwhm_px))
    blend = 1.5 * fwhm_px
    degree = 0
    previous = None
    for it in range(n_iter):
        det_i, cat_i = _match_all(det_xy, sky, mag, wcs, shape, radius, blend)
        if len(det_i) < 5:
            raise AstrometryError(f"only {len(det_i)} stars matched the catalogue after "
                                  "the pattern match")
        degree = sip_degree_for(len(det_i), sip_degree) if it > 0 else 0
        for _ in range(5):
            wcs = fit_tan_sip(det_xy[det_i], sky[cat_i], degree, shape,
                              weights=1.0 / sigma[det_i] ** 2)
            px, py = wcs.world_to_pixel(sky[cat_i])
            dr = np.hypot(px - det_xy[det_i, 0], py - det_xy[det_i, 1])
            z = dr / sigma[det_i]
            # For Gaussian errors z follows a Rayleigh law with median 1.177.
            scale = max(float(np.median(z)) / 1.177, 1.0)
            good = z <= clip_sigma * scale
            if good.all() or good.sum() < 5:
                break
            det_i, cat_i = det_i[good], cat_i[good]
            degree = min(degree, sip_degree_for(len(det_i), sip_degree))
        # Once the solution is good, each star must lie within 5 times its expected error
        # (times the typical normalised residual) of its catalogue position.
        radius = np.minimum(radius, np.maximum(0.3, 5.0 * scale * sigma))
        current = (tuple(det_i), tuple(cat_i), degree)
        if current == previous:
            break
        previous = current
    px, py = wcs.world_to_pixel(sky[cat_i])
    matched = Table({"x": det_xy[det_i, 0], "y": det_xy[det_i, 1],
                     "ra": sky[cat_i].ra.deg, "dec": sky[cat_i].dec.deg,
                     "dx": det_xy[det_i, 0] - px, "dy": det_xy[det_i, 1] - py,
                     "sigma_xy": sigma[det_i]})
    matched.meta["sip_degree"] = degree
    return wcs, matched


def solve_python(data: np.ndarray, header: fits.Header, catalog: Table, *,
                 scale_arcsec: float, mask: np.ndarray | None = None, file: str = "",
                 ra_key: str = "RA", dec_key: str = "DEC", date_key: str = "DATE-OBS",
                 search_radius_arcmin: float = 12.0, sip_degree: int = 3,
                 saturation_adu: float | None = None, gain_e_per_adu: float = 1.0,
                 mag_column: str = "phot_g_mean_mag", min_stars: int = 6,
                 max_seconds: float = 30.0) -> Solution:
    """Solve one frame with the pure-Python backend (never raises for a bad frame).

    Parameters
    ----------
    data : calibrated image, ADU.
    header : its FITS header (pointing ``ra_key``/``dec_key`` in degrees, ``date_key``).
    catalog : reference stars (``ra``, ``dec`` in degrees, ``mag_column``; proper motions
        ``pmra``/``pmdec`` in mas/yr and ``ref_epoch`` are used when present).
    scale_arcsec : nominal pixel scale, arcsec per pixel.
    mask : True where pixels are bad.
    file : frame name for messages and the summary.
    search_radius_arcmin : largest pointing error searched, arcmin.
    sip_degree : wanted SIP degree.
    saturation_adu : peak level above the sky at which a star counts as saturated, ADU.
    gain_e_per_adu : detector gain, electrons per ADU.
    mag_column : catalogue column used to rank stars by brightness.
    min_stars : fewest stars (signal-to-noise ratio above 10) worth a pattern match.
    max_seconds : time budget of the pattern search, seconds.
    """
    start = time.perf_counter()
    result = Solution(file=file, backend="python")
    try:
        _solve_python(result, np.asarray(data), header, catalog, scale_arcsec, mask,
                      ra_key, dec_key, date_key, search_radius_arcmin, sip_degree,
                      saturation_adu, gain_e_per_adu, mag_column, min_stars, max_seconds)
    except AstrometryError as err:
        result.success = False
        result.reason = str(err)
        result.wcs = None
    result.seconds = time.perf_counter() - start
    return result


def _solve_python(result: Solution, data: np.ndarray, header: fits.Header, catalog: Table,
                  scale_arcsec: float, mask: np.ndarray | None, ra_key: str, dec_key: str,
                  date_key: str, search_radius_arcmin: float, sip_degree: int,
                  saturation_adu: float | None, gain_e_per_adu: float, mag_column: str,
                  min_stars: int, max_seconds: float) -> None:
    """The steps of :func:`solve_python`, filling ``result``; raises AstrometryError."""
    shape = data.shape
    try:
        ra0, dec0 = header_pointing(header, ra_key, dec_key)
    except (KeyError, ValueError) as err:
        raise AstrometryError(f"no usable pointing in the header: {err}; add it or use the "
                              "astrometry.net backend (blind)") from None
    stars = detect_stars(data, mask=mask, saturation_adu=saturation_adu,
                         gain_e_per_adu=gain_e_per_adu)
    bright = stars[stars["snr"] >= 10]
    result.n_detected = len(bright)
    if len(bright) < min_stars:
        raise AstrometryError(f"only {len(bright)} stars detected with S/N >= 10 (need "
                              f"{min_stars}): clouds, a closed dome or a blank frame?")
    fwhm = stars.meta["fwhm_px"]
    sky = catalog_at_epoch(catalog, frame_epoch(header, date_key))
    mag = np.asarray(catalog[mag_column], float)
    mag = np.where(np.isfinite(mag), mag, 99.0)
    # Only the stars that can fall on the frame, whatever the pointing error.
    hint = hint_wcs(ra0, dec0, scale_arcsec, shape)
    near = _near(sky, hint, shape, 1.2 * search_radius_arcmin * 60.0 / scale_arcsec)
    if len(near) < min_stars:
        raise AstrometryError(f"only {len(near)} catalogue stars within "
                              f"{search_radius_arcmin:g}' of the pointing: wrong catalogue "
                              "or wrong RA/DEC in the header?")
    sky, mag = sky[near], mag[near]
    det_xy = np.column_stack([bright["x"], bright["y"]])
    wcs0 = pattern_match_wcs(det_xy, sky, mag, ra0, dec0, scale_arcsec, shape,
                             search_radius_arcmin, fwhm, max_seconds)
    wcs, matched = refine_wcs(wcs0, stars, sky, mag, shape, sip_degree=sip_degree,
                              fwhm_px=fwhm)
    result.wcs = wcs
    result.matched = matched
    result.n_matched = len(matched)
    result.sip_degree = int(matched.meta["sip_degree"])
    dr2 = np.asarray(matched["dx"]) ** 2 + np.asarray(matched["dy"]) ** 2
    result.rms_px = float(np.sqrt(np.mean(dr2)))
    result.rms_arcsec = result.rms_px * pixel_scale_of(wcs)
    if result.n_matched < min_stars:
        raise AstrometryError(f"only {result.n_matched} stars matched (need {min_stars})")
    result.success = True


def pattern_match_wcs(det_xy: np.ndarray, sky: SkyCoord, mag: np.ndarray, ra0: float,
                      dec0: float, scale_arcsec: float, shape: tuple[int, int],
                      search_radius_arcmin: float, fwhm_px: float,
                      max_seconds: float = 30.0) -> WCS:
    """First linear WCS from a pattern match, trying both parities and growing the search.

    Parameters
    ----------
    det_xy : (n, 2) detected star positions, pixels (0-based), brightest first.
    sky, mag : reference catalogue positions and magnitudes.
    ra0, dec0 : pointing from the header, degrees.
    scale_arcsec : nominal pixel scale, arcsec per pixel.
    shape : image shape (ny, nx).
    search_radius_arcmin : largest pointing error searched, arcmin.
    fwhm_px : star FWHM, pixels.
    max_seconds : time budget, seconds.

    Both point lists hold about the same density of stars (the catalogue list covers a
    larger area), so that the brightest stars of the image and of the catalogue are mostly
    the same stars. Small areas around the pointing are tried first; then the search
    circle is covered by overlapping tiles, nearest first, so that each astroalign call
    stays small (its cost grows fast with the number of points, above all when it fails).
    """
    start = time.perf_counter()
    ny, nx = shape
    size = max(nx, ny)
    search_px = search_radius_arcmin * 60.0 / scale_arcsec
    attempts = [(0.0, 0.0, 0.15 * size, 20), (0.0, 0.0, 0.15 * size, 35),
                (0.0, 0.0, 0.4 * size, 25)]
    k = int(math.ceil(search_px / size))
    tiles = sorted(((i, j) for i in range(-k, k + 1) for j in range(-k, k + 1)),
                   key=lambda t: math.hypot(*t))
    attempts += [(i * size, j * size, 0.55 * size, 20) for i, j in tiles
                 if (i, j) != (0, 0) and math.hypot(i, j) * size <= search_px + 0.5 * size]
    last_error = "no star pattern matched the catalogue"
    hint = hint_wcs(ra0, dec0, scale_arcsec, shape)
    for dx, dy, margin, n_det in attempts:
        if time.perf_counter() - start > max_seconds:
            last_error += f" (gave up after {max_seconds:g} s)"
            break
        det = det_xy[:n_det]
        grow = ((nx + 2 * margin) * (ny + 2 * margin)) / (nx * ny)
        n_ref = max(int(len(det) * grow * 1.3), len(det))
        centre = hint.pixel_to_world((nx - 1) / 2.0 + dx, (ny - 1) / 2.0 + dy)
        for mirrored in (False, True):
            wcs = hint_wcs(centre.ra.deg, centre.dec.deg, scale_arcsec, shape,
                           mirrored=mirrored)
            ref_xy, ref_idx = _ranked_catalog(sky, mag, wcs, shape, margin)
            try:
                det_i, ref_i = match_patterns(det, ref_xy[:n_ref], max_points=n_ref)
            except AstrometryError as err:
                last_error = str(err)
                continue
            if len(det_i) < 5:
                last_error = f"only {len(det_i)} stars in the pattern match"
                continue
            linear = initial_wcs(det[det_i], sky[ref_idx[ref_i]], shape)
            scale = pixel_scale_of(linear)
            if abs(scale / scale_arcsec - 1) > 0.05:
                last_error = f"the pattern match gave a pixel scale of {scale:.3f}\"/px"
                continue
            # Confirm with all the bright stars: a real match lines up most of them.
            det_all, _ = _match_all(det_xy, sky, mag, linear, shape, max(3.0, fwhm_px), 0.0)
            if len(det_all) < max(5, 0.3 * min(len(det_xy), 50)):
                last_error = f"the pattern match lined up only {len(det_all)} stars"
                continue
            return linear
    raise AstrometryError(last_error)


def pixel_scale_of(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS at its reference point, arcsec per pixel."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.sqrt(np.prod(proj_plane_pixel_scales(wcs.celestial))) * 3600.0)


# ---------------------------------------------------------------------------------------
# astrometry.net backend
# ---------------------------------------------------------------------------------------

def solve_field_available() -> bool:
    """True if astrometry.net's ``solve-field`` and ``build-astrometry-index`` are installed."""
    return shutil.which("solve-field") is not None and \
        shutil.which("build-astrometry-index") is not None


def build_index(catalog: Table, out_dir: str | Path, field_arcmin: float, *,
                mag_column: str = "phot_g_mean_mag", epoch_jyear: float | None = None,
                name: str = "sample") -> Path:
    """Build astrometry.net index files from a reference catalogue and a config for them.

    Parameters
    ----------
    catalog : reference stars (``ra``, ``dec`` in degrees, ``mag_column``).
    out_dir : folder for the index files and ``backend.cfg`` (created).
    field_arcmin : the field's width, arcmin (sets the quad sizes of the index scales).
    mag_column : brightness column (brightest stars are used first).
    epoch_jyear : move stars by their proper motions to this epoch first (Julian year).
    name : prefix of the file names.

    Returns the path of ``backend.cfg`` for ``solve-field --backend-config``. Existing files
    are rebuilt (safe to rerun).
    """
    if not solve_field_available():
        raise AstrometryError("build-astrometry-index is not installed: on Debian/Ubuntu "
                              "`sudo apt-get install astrometry.net`, or use the 'python' backend")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sky = catalog_at_epoch(catalog, epoch_jyear)
    mag = np.asarray(catalog[mag_column], float)
    good = np.isfinite(mag)
    table = Table({"RA": sky.ra.deg[good], "DEC": sky.dec.deg[good], "MAG": mag[good]})
    cat_path = out_dir / f"{name}-catalog.fits"
    table.write(cat_path, overwrite=True)
    # Index scales: preset P covers quads of about 2 * sqrt(2)**P arcmin; use the scales
    # whose quads fit in the field (from a fifth of it to the whole field).
    presets = [p for p in range(0, 20) if field_arcmin / 5 <= 2.0 * math.sqrt(2) ** p <= field_arcmin]
    presets = presets or [0]
    index_files = []
    for i, preset in enumerate(presets):
        out = out_dir / f"{name}-index-{preset:02d}.fits"
        cmd = ["build-astrometry-index", "-i", str(cat_path), "-o", str(out), "-P", str(preset),
               "-S", "MAG", "-A", "RA", "-D", "DEC", "-E", "-M", "-j", "0.1",
               "-I", str(9000 + i)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AstrometryError(f"build-astrometry-index failed for {out.name}:\n"
                                  + proc.stderr[-2000:])
        index_files.append(out)
    cfg = out_dir / "backend.cfg"
    lines = ["# astrometry.net engine config written by datared.astrometry.build_index",
             "inparallel", "cpulimit 60"]
    lines += [f"index {p.resolve()}" for p in index_files]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def solve_field(path: str | Path, backend_config: str | Path, *, scale_arcsec: float,
                ra_key: str = "RA", dec_key: str = "DEC", radius_deg: float = 0.5,
                sip_degree: int = 3, timeout_s: float = 120.0) -> Solution:
    """Solve one frame with astrometry.net's ``solve-field`` in two passes.

    Pass 1 solves with scale and position hints and a SIP order 2 tweak; pass 2 verifies that
    solution on all detected stars and refines it with SIP order ``sip_degree`` and the
    reference point at the image centre (the original course's recipe). The order of pass 2
    is lowered, as in the python backend, when pass 1 matched too few stars for it.

    Parameters
    ----------
    path : calibrated FITS frame.
    backend_config : ``backend.cfg`` listing the index files (see :func:`build_index`).
    scale_arcsec : nominal pixel scale, arcsec per pixel (searched within +-10 %).
    ra_key, dec_key : header keywords of the pointing, degrees (used as a hint if present).
    radius_deg : search radius around the pointing, degrees.
    sip_degree : SIP order of the refinement pass.
    timeout_s : give up on a pass after this many seconds.
    """
    path = Path(path)
    start = time.perf_counter()
    result = Solution(file=path.name, backend="astrometry.net")
    if shutil.which("solve-field") is None:
        result.reason = "solve-field is not installed (apt-get install astrometry.net)"
        return result
    header = fits.getheader(path)
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    common = ["solve-field", "--no-plots", "--overwrite", "--backend-config", str(backend_config),
              "--scale-units", "arcsecperpix", "--scale-low", f"{0.9 * scale_arcsec:.4f}",
              "--scale-high", f"{1.1 * scale_arcsec:.4f}", "--crpix-center",
              "--new-fits", "none", "--index-xyls", "none", "--rdls", "none",
              "--match", "none", "--solved", "none", "--cpulimit", str(int(timeout_s))]
    try:
        ra0, dec0 = header_pointing(header, ra_key, dec_key)
        common += ["--ra", str(ra0), "--dec", str(dec0), "--radius", str(radius_deg)]
    except (KeyError, ValueError):
        pass  # no usable pointing: solve-field searches the whole index (blind)
    with tempfile.TemporaryDirectory(prefix="datared-solve-") as tmp:
        tmp = Path(tmp)
        first = tmp / "pass1"
        cmd1 = common + ["--dir", str(tmp), "--out", first.name, "--tweak-order", "2",
                         "--objs", "100", "--corr", str(tmp / "pass1.corr"), str(path)]
        ok, message = _run_solve_field(cmd1, timeout_s)
        wcs_file = tmp / "pass1.wcs"
        if not ok or not wcs_file.exists():
            result.reason = f"solve-field found no solution (pass 1): {message}"
            result.seconds = time.perf_counter() - start
            return result
        # The refinement (pass 2, all stars) asks for SIP order `sip_degree`; if it matched
        # too few stars for that many polynomial terms (order 3 on 20 stars overfits), it is
        # run again with the order those stars support.
        degree = max(1, sip_degree)
        second = tmp / "pass2"
        while True:
            cmd2 = common + ["--dir", str(tmp), "--out", second.name, "--verify", str(wcs_file),
                             "--tweak-order", str(degree), "--objs", "1000",
                             "--corr", str(tmp / "pass2.corr"), str(path)]
            ok, message = _run_solve_field(cmd2, timeout_s)
            corr2 = tmp / "pass2.corr"
            n_second = len(_read_corr(corr2)) if ok and corr2.exists() else 0
            supported = max(1, sip_degree_for(n_second, degree))
            if not ok or supported >= degree:
                break
            degree = supported
        final = tmp / "pass2.wcs" if (tmp / "pass2.wcs").exists() else wcs_file
        degree = degree if final.name == "pass2.wcs" else 2
        degree = degree if degree >= 2 else 0  # order 1 is a plain TAN projection
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(fits.getheader(final))
        wcs.pixel_shape = (shape[1], shape[0])
        corr = tmp / ("pass2.corr" if final.name == "pass2.wcs" else "pass1.corr")
        if corr.exists():
            matched = _corr_table(corr, wcs)
            result.matched = matched
            result.n_matched = len(matched)
            dr2 = np.asarray(matched["dx"]) ** 2 + np.asarray(matched["dy"]) ** 2
            result.rms_px = float(np.sqrt(np.mean(dr2))) if len(dr2) else float("nan")
            result.rms_arcsec = result.rms_px * pixel_scale_of(wcs)
    result.wcs = wcs
    result.sip_degree = degree
    result.success = True
    result.seconds = time.perf_counter() - start
    return result


def _run_solve_field(cmd: list[str], timeout_s: float) -> tuple[bool, str]:
    """Run solve-field; return (finished without error, last lines of its output)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 30)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s"
    tail = " ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode == 0, tail


def _read_corr(path: Path) -> Table:
    """A solve-field correspondence table (its unit strings are not FITS units: ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        return Table.read(path)


def _corr_table(corr: Path, wcs: WCS) -> Table:
    """Matched stars of a solve-field ``.corr`` file with residuals under ``wcs``, pixels."""
    data = _read_corr(corr)
    x = np.asarray(data["field_x"], float) - 1.0
    y = np.asarray(data["field_y"], float) - 1.0
    sky = SkyCoord(np.asarray(data["index_ra"]) * u.deg, np.asarray(data["index_dec"]) * u.deg)
    px, py = wcs.world_to_pixel(sky)
    return Table({"x": x, "y": y, "ra": sky.ra.deg, "dec": sky.dec.deg,
                  "dx": x - px, "dy": y - py})


def summary_table(solutions: list[Solution]) -> Table:
    """One row per frame: frame, stars detected and matched, RMS residual (pixels and
    arcsec), SIP degree, backend, success, reason of a failure and solve time (s)."""
    names = ("frame", "n_detected", "n_matched", "rms_px", "rms_arcsec", "sip_degree",
             "backend", "success", "reason", "seconds")
    dtypes = (str, int, int, float, float, int, str, bool, str, float)
    table = Table(rows=[tuple(s.row()[n] for n in names) for s in solutions] or None,
                  names=names, dtype=dtypes)
    table["rms_px"].unit = u.pix
    table["rms_arcsec"].unit = u.arcsec
    table["seconds"].unit = u.s
    for name in ("rms_px", "rms_arcsec", "seconds"):
        table[name].format = ".3f"
    return table


# ---------------------------------------------------------------------------------------
# Writing results, checking against a known WCS, plotting residuals
# ---------------------------------------------------------------------------------------

def header_without_wcs(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without any WCS keywords."""
    clean = header.copy()
    for key in list(clean.keys()):
        if key.startswith(_WCS_KEY_PREFIXES) and key not in ("RA", "DEC"):
            del clean[key]
    return clean


def write_solved(src: str | Path, dst: str | Path, solution: Solution) -> Path:
    """Copy the frame ``src`` to ``dst`` with the solution's WCS in the primary header.

    Parameters
    ----------
    src : calibrated frame (float32 image in the primary HDU, optional extensions).
    dst : output file (overwritten: reruns are safe).
    solution : a successful :class:`Solution`.
    """
    if not solution.success or solution.wcs is None:
        raise AstrometryError(f"{Path(src).name}: no WCS to write ({solution.reason})")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with fits.open(src) as hdul:
        header = header_without_wcs(hdul[0].header)
        header.extend(solution.wcs.to_header(relax=True), update=True)
        header["ASTRBACK"] = (solution.backend, "astrometry backend (datared)")
        header["ASTRNSTR"] = (solution.n_matched, "stars matched in the astrometric fit")
        header["ASTRRMS"] = (round(solution.rms_px, 4), "[pix] rms residual of the fit")
        primary = fits.PrimaryHDU(np.asarray(hdul[0].data, dtype=np.float32), header=header)
        extra = [hdu.copy() for hdu in hdul[1:]]
    fits.HDUList([primary, *extra]).writeto(dst, overwrite=True)
    return dst


def grid_errors(fitted: WCS, truth: WCS, shape: tuple[int, int], n: int = 20) -> np.ndarray:
    """Position error (pixels) of ``fitted`` against ``truth`` on an n x n pixel grid."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    sky = fitted.pixel_to_world(gx.ravel(), gy.ravel())
    tx, ty = truth.world_to_pixel(sky)
    return np.hypot(tx - gx.ravel(), ty - gy.ravel())


def plot_residuals(ax, matched: Table, shape: tuple[int, int], title: str = "",
                   arrow_px: float | None = None):
    """Residual vectors of the matched stars across the field, coloured by size.

    Parameters
    ----------
    ax : matplotlib axes.
    matched : table with ``x``, ``y``, ``dx``, ``dy`` (pixels), as in ``Solution.matched``.
    shape : image shape (ny, nx), pixels.
    title : axes title.
    arrow_px : length of the scale arrow, pixels (default: about the 90th percentile).

    The vectors are magnified so that the scale arrow is a tenth of the frame width.
    """
    dx = np.asarray(matched["dx"], float)
    dy = np.asarray(matched["dy"], float)
    size = np.hypot(dx, dy)
    if arrow_px is None:
        top = float(np.percentile(size, 90)) if len(size) else 0.1
        arrow_px = float(f"{max(top, 0.01):.1g}")
    ny, nx = shape
    scale = arrow_px / (0.1 * nx)  # data units per arrow length unit
    q = ax.quiver(matched["x"], matched["y"], dx, dy, size, cmap="viridis", angles="xy",
                  scale_units="xy", scale=scale, width=0.004)
    ax.quiverkey(q, 0.8, 1.03, arrow_px, f"{arrow_px:g} px", labelpos="E", coordinates="axes")
    ax.set_xlim(0, nx)
    ax.set_ylim(0, ny)
    ax.set_aspect("equal")
    ax.set_xlabel("x (pixel)")
    ax.set_ylabel("y (pixel)")
    if title:
        ax.set_title(title, loc="left", fontsize="medium")
    cbar = ax.figure.colorbar(q, ax=ax, shrink=0.8)
    cbar.set_label("residual (pixel)")
    return q
