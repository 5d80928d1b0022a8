"""Forced aperture photometry: one job, measuring given sky positions on calibrated frames.

This module owns the aperture measurement and what it needs: exact aperture weights and fast
sums of many stars and radii at once (:func:`aperture_photometry_fast`), the CCD noise
equation (:func:`ccd_variance`), the calibrated saturation level (:func:`saturation_level`),
crowding (:func:`contamination`), the expected scintillation noise
(:func:`scintillation_sigma`, which the simulator uses too), the quality of a frame from the
detection's stars and FWHM and the choice of the reference frame (:func:`frame_quality`,
:func:`choose_reference`), the reference catalogue of a field
(:func:`reference_catalog`), the measurement of one frame (:func:`measure_frame`), the
catalogue files (:func:`write_catalog`), their column names (:func:`radius_tag`,
:func:`column_name`) and flags (:data:`FLAG_BITS`). It does not own the frame model
(:mod:`datared.frame`), the background and the detection of stars
(:mod:`datared.detection`) nor the master frames (:mod:`datared.reduction`); it reads no
settings: the chapter passes them in.

The chapter ``notebooks/04-photometry.ipynb`` shows each step on one frame with the plain
library calls; the functions here run the same steps on every frame of the night.

Units: images are calibrated frames in ADU (bias, dark and flat removed, so "ADU" means
flat-fielded ADU); positions are 0-based pixel coordinates (``x`` along columns); aperture
radii are given in arcsec and converted with the frame's own WCS.

The reference catalogue keeps the columns of :func:`datared.detection.detect_stars`
(``id``, ``x``, ``y``, ``sky``, ``flux``, ``flux_err``, ``snr``, ``sigma_xy``, ``peak``,
``fwhm``, ``ellipticity``) and adds ``contamination`` and ``crowded``.

Column names of a per-frame catalogue, for every aperture radius ``r`` (arcsec) tagged
by :func:`radius_tag` (3.0 arcsec -> ``3p0``):

``sum_<tag>``
    background-subtracted flux inside the aperture, ADU (NaN when no pixel of the
    aperture could be used).
``sum_err_<tag>``
    its 1-sigma uncertainty from the CCD noise equation (source, sky, dark current and
    read noise, converted with the gain and the flat field) plus the uncertainty of the
    background estimate, ADU.
``max_<tag>``
    the highest pixel value (background included) whose centre lies inside the aperture.
``back_sum_<tag>``
    the background (from the ``Background2D`` map) summed over the aperture, ADU.
``flags_<tag>``
    the flags of that aperture as a sum of bits (:data:`FLAG_BITS`); 0 means clean.

The boolean columns ``saturated``, ``edge``, ``off_frame``, ``bad_pixels``, ``crowded``
and the bit sum ``flags`` describe the largest aperture (the most conservative choice).
Other columns: ``id`` (reference catalogue), ``x``, ``y`` (position on this frame, pixels),
``sky`` (background at the star, ADU per pixel). The table metadata hold the frame's
header values with NINA's names (``DATE-OBS``, ``EXPTIME``, ``AIRMASS``, ``FILTER``,
``OBJECT``, ``PIERSIDE``, ...: :func:`datared.frame.header_meta`), the radii
(``APRADII``, arcsec), the noise parameters (``EGAIN``, ``RDNOISE``), the frame's ``FWHM``
(arcsec, as :func:`datared.detection.detect_stars` measures it) and the expected relative
scintillation noise ``SCINT``, which ``sum_err`` does not include.

Masked pixels inside an aperture are filled from their mirror image through the star's
centre when possible (:func:`aperture_photometry_fast`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table

from datared.detection import (
    SIGMA_TO_FWHM,
    BackgroundModel,
    detect_stars,
    estimate_background,
)
from datared.errors import FrameError
from datared.frame import NINA_KEYS, Frame, HeaderKeys, header_meta

if TYPE_CHECKING:
    from datared.reduction import CalibrationTerms

#: Bit of each flag in the integer column ``flags`` (0 means a clean measurement).
FLAG_BITS = {
    "saturated": 1,  # a pixel inside the aperture reached saturation_adu in raw ADU
    "edge": 2,  # the aperture is partly outside the image
    "off_frame": 4,  # the star's position is outside the image: no measurement
    "bad_pixels": 8,  # masked or non-finite pixels in the aperture that could not be filled
    "crowded": 16,  # a neighbour adds more than max_contamination of the flux (reference)
}


# ---------------------------------------------------------------------------------------
# Column names
# ---------------------------------------------------------------------------------------

def radius_tag(radius_arcsec: float) -> str:
    """Tag of an aperture radius used in column names: 3 -> '3p0', 2.25 -> '2p25'.

    Parameters
    ----------
    radius_arcsec : aperture radius, arcsec (positive).
    """
    radius = float(radius_arcsec)
    if not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"aperture radius {radius_arcsec!r}: give a positive number of arcsec")
    text = f"{round(radius, 3):g}"
    if "e" in text:
        raise ValueError(f"aperture radius {radius_arcsec!r} arcsec: give it as a plain number "
                         "between 0.001 and 99999 arcsec")
    if "." not in text:
        text += ".0"
    return text.replace(".", "p")


def column_name(kind: str, radius_arcsec: float) -> str:
    """Column name for one aperture radius, e.g. ``column_name("sum_err", 3) == "sum_err_3p0"``.

    Parameters
    ----------
    kind : one of "sum", "sum_err", "max", "back_sum", "flags".
    radius_arcsec : aperture radius, arcsec.
    """
    if kind not in ("sum", "sum_err", "max", "back_sum", "flags"):
        raise ValueError(f"unknown column kind {kind!r}: use sum, sum_err, max, back_sum or flags")
    return f"{kind}_{radius_tag(radius_arcsec)}"


# ---------------------------------------------------------------------------------------
# Crowding
# ---------------------------------------------------------------------------------------

def contamination(x: np.ndarray, y: np.ndarray, flux: np.ndarray, *, radius_pix: float,
                  fwhm_pix: float) -> np.ndarray:
    """Fraction of each star's aperture flux that its neighbours add (Gaussian PSF model).

    For a Gaussian star at distance d, the fraction of its light inside a circle of
    radius R is a non-central chi-square probability; each neighbour's share is weighted
    by its flux relative to the star's flux inside the same aperture.

    Parameters
    ----------
    x, y : star positions, pixels.
    flux : star fluxes (any unit, the same for all stars).
    radius_pix : aperture radius, pixels.
    fwhm_pix : stellar FWHM, pixels.
    """
    from scipy.spatial import cKDTree
    from scipy.stats import chi2, ncx2

    x, y, flux = (np.asarray(a, dtype=float) for a in (x, y, flux))
    sigma = fwhm_pix / SIGMA_TO_FWHM
    own_fraction = chi2.cdf((radius_pix / sigma) ** 2, df=2)
    result = np.zeros(len(x))
    if len(x) < 2:
        return result
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(radius_pix + 5.0 * sigma, output_type="ndarray")
    if len(pairs) == 0:
        return result
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    distance = np.hypot(x[i] - x[j], y[i] - y[j])
    fraction = ncx2.cdf((radius_pix / sigma) ** 2, df=2, nc=(distance / sigma) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(flux[i] > 0, fraction * np.clip(flux[j], 0, None)
                         / (own_fraction * flux[i]), np.inf)
    np.add.at(result, i, share)
    return result


# ---------------------------------------------------------------------------------------
# Forced aperture photometry
# ---------------------------------------------------------------------------------------

def _cutout(array, iy, ix):
    """Stack of cut-outs ``array[iy[n, :, None], ix[n, None, :]]`` or a scalar unchanged."""
    if np.ndim(array) == 0:
        return float(array)
    return np.asarray(array)[iy[:, :, None], ix[:, None, :]]


def aperture_weights(x: np.ndarray, y: np.ndarray, radii_pix: Sequence[float], *,
                     size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact pixel-overlap weights of circles (the same numbers as photutils' 'exact').

    Returns ``(weights, x0, y0)``: weights of shape (n_stars, n_radii, size, size) on the
    grid whose lower-left pixel is (x0, y0) for each star.

    Parameters
    ----------
    x, y : aperture centres, pixels (0-based).
    radii_pix : aperture radii, pixels.
    size : side of the cut-out grid, pixels (at least ceil(2 * max radius) + 2).
    """
    from photutils.geometry import circular_overlap_grid

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    r_max = max(radii_pix)
    x0 = np.floor(x - r_max + 0.5).astype(int)
    y0 = np.floor(y - r_max + 0.5).astype(int)
    weights = np.zeros((len(x), len(radii_pix), size, size))
    for n in range(len(x)):
        if not (np.isfinite(x[n]) and np.isfinite(y[n])):
            continue
        xmin, ymin = x0[n] - 0.5 - x[n], y0[n] - 0.5 - y[n]
        for k, radius in enumerate(radii_pix):
            weights[n, k] = circular_overlap_grid(xmin, xmin + size, ymin, ymin + size,
                                                  size, size, float(radius), 1, 1)
    return weights, x0, y0


def aperture_photometry_fast(data: np.ndarray, x: np.ndarray, y: np.ndarray,
                             radii_pix: Sequence[float], *, background: np.ndarray | float,
                             variance: Callable[..., np.ndarray] | None = None,
                             background_error: np.ndarray | float = 0.0,
                             saturation: np.ndarray | float = np.inf,
                             mask: np.ndarray | None = None,
                             fill_masked: bool = False) -> dict[str, np.ndarray]:
    """Aperture sums for many stars and radii at once from one stack of cut-outs.

    Pixels outside the image, masked or non-finite count as zero (as in photutils), unless
    ``fill_masked``: then a masked pixel takes the background plus the background-subtracted
    value at the point-symmetric position through the star's centre (stars are round), and
    only pixels that cannot be filled this way count as zero and set ``bad_pixels``.
    Returns arrays of shape (n_stars, n_radii): ``sum`` (data minus background),
    ``back_sum``, ``data_sum`` (data), ``sum_err``, ``max`` (data, pixel centres inside),
    ``area`` (pixels actually used), ``saturated``, ``edge``, ``bad_pixels`` (per aperture);
    and per star ``off_frame``. An aperture without a single usable pixel (fully masked)
    has NaN sums and peak, as in photutils' ``ApertureStats``; off-frame stars have NaN
    everywhere.

    Parameters
    ----------
    data : image, ADU.
    x, y : aperture centres, pixels (0-based).
    radii_pix : aperture radii, pixels.
    background : background map or level, ADU per pixel (0 for a background-subtracted
        image).
    variance : per-pixel variance of ``data`` (ADU**2), as a function
        ``variance(data_cut, background_cut, iy, ix)`` or None (then ``sum_err`` is NaN).
    background_error : uncertainty of the background estimate per pixel, ADU (added
        coherently over the aperture).
    saturation : per-pixel level at which a pixel is saturated, ADU (map or scalar); tested
        on all pixels inside the image, masked or not.
    mask : True for pixels to ignore.
    fill_masked : fill masked pixels from their mirror image through the star's centre.
    """
    data = np.asarray(data)
    ny, nx = data.shape
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    radii = [float(r) for r in radii_pix]
    size = int(math.ceil(2.0 * max(radii))) + 2
    finite_xy = np.isfinite(x) & np.isfinite(y)
    xs, ys = np.where(finite_xy, x, -1e6), np.where(finite_xy, y, -1e6)
    weights, x0, y0 = aperture_weights(xs, ys, radii, size=size)
    grid = np.arange(size)
    iy, ix = y0[:, None] + grid, x0[:, None] + grid
    inside_y, inside_x = (iy >= 0) & (iy < ny), (ix >= 0) & (ix < nx)
    iy, ix = np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)
    inside = inside_y[:, :, None] & inside_x[:, None, :]

    cut = _cutout(data, iy, ix).astype(np.float64)
    usable = inside & np.isfinite(cut)
    covered = weights > 0  # (star, radius, y, x): pixel touches the aperture
    # Saturation is tested before masking: the calibration may have masked saturated pixels.
    with np.errstate(invalid="ignore"):
        hot = usable & (cut >= _cutout(saturation, iy, ix))
    saturated = (covered & hot[:, None]).any(axis=(2, 3))
    if mask is not None:
        usable &= ~_cutout(np.asarray(mask, dtype=bool), iy, ix)
    back_cut = np.broadcast_to(_cutout(background, iy, ix), cut.shape)
    if fill_masked:
        lost = inside & ~usable & covered.any(axis=1)
        if lost.any():
            n_idx, i_idx, j_idx = np.nonzero(lost)
            value, ok = _mirror_values(data, background, mask, x[n_idx], y[n_idx],
                                       ix[n_idx, j_idx], iy[n_idx, i_idx])
            cut[n_idx[ok], i_idx[ok], j_idx[ok]] = back_cut[n_idx[ok], i_idx[ok],
                                                            j_idx[ok]] + value[ok]
            usable[n_idx[ok], i_idx[ok], j_idx[ok]] = True
    cut = np.where(usable, cut, 0.0)
    back = np.where(usable, back_cut, 0.0)
    used = weights * usable[:, None]
    data_sum = np.einsum("nkij,nij->nk", used, cut)
    back_sum = np.einsum("nkij,nij->nk", used, back)
    area = used.sum(axis=(2, 3))

    if variance is not None:
        var = np.where(usable, variance(cut, back, iy, ix), 0.0)
        var_sum = np.einsum("nkij,nij->nk", used, var)
        back_err = np.einsum("nkij,nij->nk", used,
                             np.broadcast_to(_cutout(background_error, iy, ix), cut.shape))
        sum_err = np.sqrt(var_sum + back_err ** 2)
    else:
        sum_err = np.full(data_sum.shape, np.nan)

    # Peak pixel with the 'center' rule of photutils: pixel centre inside the circle.
    dx = (ix - x[:, None])[:, None, :]
    dy = (iy - y[:, None])[:, :, None]
    dist2 = dx ** 2 + dy ** 2
    peak = np.full(data_sum.shape, np.nan)
    for k, radius in enumerate(radii):
        centre_in = (dist2 < radius ** 2) & usable
        has = centre_in.any(axis=(1, 2))
        peak[has, k] = np.max(np.where(centre_in, cut, -np.inf), axis=(1, 2))[has]

    off_frame = ~finite_xy | (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    edge = (covered & ~inside[:, None]).any(axis=(2, 3)) & ~off_frame[:, None]
    bad_pixels = (covered & (inside & ~usable)[:, None]).any(axis=(2, 3)) & ~off_frame[:, None]
    saturated &= ~off_frame[:, None]
    result = {"data_sum": data_sum, "back_sum": back_sum, "sum": data_sum - back_sum,
              "sum_err": sum_err, "max": peak, "area": area}
    empty = area <= 0  # no usable pixel: no measurement (photutils gives NaN too)
    for key in ("data_sum", "back_sum", "sum", "sum_err"):
        result[key][empty] = np.nan
    for key in ("data_sum", "back_sum", "sum", "sum_err", "max", "area"):
        result[key][off_frame] = np.nan
    result.update(saturated=saturated, edge=edge, off_frame=off_frame, bad_pixels=bad_pixels)
    return result


def _mirror_values(data, background, mask, x, y, px, py):
    """Background-subtracted value at the mirror image (2x - px, 2y - py) of each pixel.

    Bilinear interpolation of the four pixels around the mirror point; ``ok`` is False where
    one of them is outside the image, masked or not finite.
    """
    ny, nx = data.shape
    xm, ym = 2.0 * x - px, 2.0 * y - py
    x0, y0 = np.floor(xm).astype(int), np.floor(ym).astype(int)
    fx, fy = xm - x0, ym - y0
    value = np.zeros(len(xm))
    ok = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < nx) & (y0 + 1 < ny)
    for dy, dx, weight in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                           (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yy, xx = np.clip(y0 + dy, 0, ny - 1), np.clip(x0 + dx, 0, nx - 1)
        pixel = data[yy, xx].astype(np.float64)
        level = background if np.ndim(background) == 0 else np.asarray(background)[yy, xx]
        ok &= np.isfinite(pixel)
        if mask is not None:
            ok &= ~np.asarray(mask)[yy, xx]
        value += weight * np.where(np.isfinite(pixel), pixel - level, 0.0)
    return value, ok


def ccd_variance(gain_e_per_adu: float, read_noise_e: float, *,
                 flat: np.ndarray | float = 1.0, dark_adu: np.ndarray | float = 0.0):
    """Per-pixel variance (CCD noise equation) of a calibrated frame, as a function for
    :func:`aperture_photometry_fast`.

    A calibrated pixel is ``(raw - bias - dark) / flat``. Its raw electrons are
    ``gain * flat * value`` (source and sky), ``gain * dark_adu`` (dark current) plus read
    noise, so ``var = (g F S + g D + RN**2) / (g F)**2`` with S = source + sky (ADU).
    The source part uses the data above the background (negative values count as zero);
    the sky part uses the smooth background map, which is less noisy than the pixels.

    Parameters
    ----------
    gain_e_per_adu : gain, electrons per ADU.
    read_noise_e : read noise, electrons per pixel.
    flat : the flat field used to calibrate the frame (map or scalar, median 1).
    dark_adu : dark counts subtracted from the frame, ADU per pixel (map or scalar).
    """
    g = float(gain_e_per_adu)
    rn2 = float(read_noise_e) ** 2

    def variance(cut, back, iy, ix):
        f = _cutout(flat, iy, ix)
        d = _cutout(dark_adu, iy, ix)
        signal = np.clip(cut - back, 0.0, None) + np.clip(back, 0.0, None)
        return (g * f * signal + g * np.clip(d, 0.0, None) + rn2) / (g * f) ** 2

    return variance


def saturation_level(saturation_adu: float, *, bias_adu: np.ndarray | float = 0.0,
                     dark_adu: np.ndarray | float = 0.0,
                     flat: np.ndarray | float = 1.0) -> np.ndarray | float:
    """Value a calibrated pixel has when its raw value reaches ``saturation_adu``.

    Saturation happens in the raw frame; after calibration the same raw level maps to
    ``(saturation_adu - bias - dark) / flat``, which differs from pixel to pixel.

    Parameters
    ----------
    saturation_adu : raw level at which the camera saturates or turns non-linear, ADU.
    bias_adu : bias level subtracted during calibration, ADU (map or scalar).
    dark_adu : dark counts subtracted during calibration, ADU (map or scalar).
    flat : flat field used during calibration (map or scalar).
    """
    bias = np.asarray(bias_adu, dtype=np.float64)
    dark = np.asarray(dark_adu, dtype=np.float64)
    flat_arr = np.asarray(flat, dtype=np.float64)
    level = (float(saturation_adu) - bias - dark) / flat_arr
    return float(level) if np.ndim(level) == 0 else level


def forced_photometry(data: np.ndarray, x: np.ndarray, y: np.ndarray,
                      radii_arcsec: Sequence[float], *, pixel_scale_arcsec: float,
                      background: BackgroundModel, gain_e_per_adu: float,
                      read_noise_e: float, flat: np.ndarray | float = 1.0,
                      dark_adu: np.ndarray | float = 0.0, bias_adu: np.ndarray | float = 0.0,
                      saturation_adu: float = np.inf, mask: np.ndarray | None = None,
                      crowded: np.ndarray | None = None, fill_masked: bool = True) -> Table:
    """Forced aperture photometry of one calibrated frame at given pixel positions.

    Returns one row per position (same order) with ``x``, ``y``, ``sky`` (background per
    pixel, ADU), the columns ``sum_``, ``sum_err_``, ``max_``, ``back_sum_`` per radius
    (see the module docstring), the boolean flags and their bit sum ``flags``.

    Parameters
    ----------
    data : calibrated image, ADU.
    x, y : positions, pixels (0-based).
    radii_arcsec : aperture radii, arcsec.
    pixel_scale_arcsec : pixel scale of this frame, arcsec per pixel.
    background : the frame's :class:`~datared.detection.BackgroundModel`
        (:func:`~datared.detection.estimate_background`).
    gain_e_per_adu : gain, electrons per ADU.
    read_noise_e : read noise, electrons.
    flat, dark_adu, bias_adu : calibration frames used for this frame (maps or scalars, ADU).
    saturation_adu : raw saturation level, ADU.
    mask : True for bad pixels.
    crowded : per-star crowding flag from the reference catalogue.
    fill_masked : fill masked pixels inside apertures from their mirror image through the
        star's centre (see :func:`aperture_photometry_fast`); ``bad_pixels`` then flags only
        apertures with pixels that could not be filled.
    """
    radii_arcsec = [float(r) for r in radii_arcsec]
    tags = [radius_tag(r) for r in radii_arcsec]
    if len(set(tags)) != len(tags):
        raise ValueError(f"aperture radii {radii_arcsec} arcsec: give each radius once")
    radii_pix = [r / float(pixel_scale_arcsec) for r in radii_arcsec]
    result = aperture_photometry_fast(
        data, x, y, radii_pix, background=background.background,
        variance=ccd_variance(gain_e_per_adu, read_noise_e, flat=flat, dark_adu=dark_adu),
        background_error=background.error,
        saturation=saturation_level(saturation_adu, bias_adu=bias_adu, dark_adu=dark_adu,
                                    flat=flat), mask=mask,
        fill_masked=fill_masked)
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    table = Table()
    table["x"] = x
    table["y"] = y
    sky = np.full(len(x), np.nan)
    ok = ~result["off_frame"]
    if ok.any():
        iy = np.clip(np.round(y[ok]).astype(int), 0, data.shape[0] - 1)
        ix = np.clip(np.round(x[ok]).astype(int), 0, data.shape[1] - 1)
        sky[ok] = background.background[iy, ix]
    table["sky"] = sky
    for k, tag in enumerate(tags):
        table[f"sum_{tag}"] = result["sum"][:, k]
        table[f"sum_err_{tag}"] = result["sum_err"][:, k]
        table[f"max_{tag}"] = result["max"][:, k]
        table[f"back_sum_{tag}"] = result["back_sum"][:, k]
    crowded = (np.zeros(len(x), bool) if crowded is None else np.asarray(crowded, dtype=bool))
    per_radius = {"saturated": result["saturated"], "edge": result["edge"],
                  "off_frame": np.repeat(result["off_frame"][:, None], len(tags), axis=1),
                  "bad_pixels": result["bad_pixels"],
                  "crowded": np.repeat(crowded[:, None], len(tags), axis=1)}
    bits = np.zeros((len(x), len(tags)), dtype=np.int16)
    for name, bit in FLAG_BITS.items():
        bits |= np.where(per_radius[name], bit, 0).astype(np.int16)
    largest = int(np.argmax(radii_arcsec))
    for name in FLAG_BITS:
        table[name] = per_radius[name][:, largest]
    table["flags"] = bits[:, largest]
    for k, tag in enumerate(tags):
        table[f"flags_{tag}"] = bits[:, k]
    table.meta["APRADII"] = ",".join(f"{r:g}" for r in radii_arcsec)
    table.meta["APTAGS"] = ",".join(tags)
    table.meta["PIXSCALE"] = float(pixel_scale_arcsec)
    table.meta["EGAIN"] = float(gain_e_per_adu)
    table.meta["RDNOISE"] = float(read_noise_e)
    table.meta["SATURATE"] = float(saturation_adu) if np.isfinite(saturation_adu) else -1.0
    table.meta["BKGMED"] = background.median
    table.meta["BKGRMS"] = background.rms_median
    table.meta["FLAGBITS"] = " ".join(f"{bit}={name}" for name, bit in FLAG_BITS.items())
    return table


# ---------------------------------------------------------------------------------------
# Sky positions and scintillation
# ---------------------------------------------------------------------------------------

def scintillation_sigma(airmass: float, exptime_s: float, *, aperture_mm: float,
                        height_m: float = 0.0) -> float:
    """Young's (1967) scintillation noise, relative flux sigma (common estimate, +-50 %).

    The simulator (``datared.sim``) uses this function for the scintillation of its stars.

    Parameters
    ----------
    airmass : airmass of the observation.
    exptime_s : exposure time, s.
    aperture_mm : telescope aperture diameter, mm.
    height_m : observatory height above sea level, m.
    """
    diameter_cm = aperture_mm / 10.0
    return float(0.09 * diameter_cm ** (-2.0 / 3.0) * airmass ** 1.75
                 * math.exp(-height_m / 8000.0) / math.sqrt(2.0 * exptime_s))


def world_to_frame(wcs, sky) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (0-based x, y) of sky positions on a frame (SIP distortion included).

    Parameters
    ----------
    wcs : the frame's WCS.
    sky : SkyCoord positions.
    """
    x, y = wcs.world_to_pixel(sky)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def match_to_catalog(sky, reference_sky, *, max_sep_arcsec: float = 1.0):
    """Nearest reference position of each position: ``(index, matched, separation)``.

    Returns three arrays, one value per position of ``sky``: ``index`` of the nearest
    reference position, ``matched`` (True if it is closer than ``max_sep_arcsec``) and
    ``separation`` (the distance to it, arcsec).

    Parameters
    ----------
    sky : SkyCoord positions to match.
    reference_sky : SkyCoord positions of the reference catalogue.
    max_sep_arcsec : largest separation that counts as a match, arcsec.
    """
    import astropy.units as u

    index, separation, _ = sky.match_to_catalog_sky(reference_sky)
    return index, separation.to_value(u.arcsec) < max_sep_arcsec, separation.to_value(u.arcsec)


# ---------------------------------------------------------------------------------------
# The reference frame, its catalogue, and one frame from file to catalogue
# ---------------------------------------------------------------------------------------

def frame_quality(frame: Frame, *, saturation_adu: float | None = None, nsigma: float = 3.0,
                  min_snr: float = 10.0) -> dict:
    """Depth and sharpness of a frame from :func:`datared.detection.detect_stars`, to choose
    the reference frame.

    Returns ``n_sources`` (stars detected with a flux S/N of at least ``min_snr``),
    ``fwhm_pix`` (the frame's FWHM as the detection measures it, ``meta["fwhm_px"]``: the
    width at half maximum of bright, unsaturated, isolated stars), ``ellipticity``
    (:func:`median_ellipticity`: high for trailed frames), ``sky_adu`` (sigma-clipped
    median of every 3rd unmasked pixel: enough to rank frames, and much faster than a
    background map) and ``sky_rms_adu`` (the detection's noise per pixel, ``meta["sky_rms"]``).

    Parameters
    ----------
    frame : a frame from :func:`datared.frame.read_frame` (its mask is used).
    saturation_adu : calibrated pixel level at which the camera saturates, ADU (sky
        included); stars that come near it are not used for the FWHM. None: no limit.
    nsigma : detection threshold, significance of the matched filter (see
        :func:`datared.detection.detect_stars`).
    min_snr : a star counts if the S/N of its detection flux is at least this.
    """
    from astropy.stats import sigma_clipped_stats

    bad = ~np.isfinite(frame.data) | frame.bad_pixels()
    _, sky, _ = sigma_clipped_stats(frame.data[::3, ::3], mask=bad[::3, ::3], sigma=3.0)
    stars = detect_stars(frame.data, mask=frame.mask, nsigma=nsigma, min_snr=min_snr,
                         saturation_adu=None if saturation_adu is None
                         else float(saturation_adu) - float(sky))
    return {"n_sources": len(stars), "fwhm_pix": float(stars.meta["fwhm_px"]),
            "ellipticity": median_ellipticity(stars),
            "sky_adu": float(sky), "sky_rms_adu": float(stars.meta["sky_rms"])}


def median_ellipticity(stars: Table, *, min_snr: float = 20.0) -> float:
    """Median ellipticity (1 - b/a) of the bright, unsaturated stars of a detection.

    Round stars give about 0.05-0.1 (noise and pixels); a trailed or badly guided frame
    gives 0.3 and more. NaN when fewer than 3 stars qualify.

    Parameters
    ----------
    stars : a table of :func:`datared.detection.detect_stars`.
    min_snr : stars with a lower S/N are left out (their shapes are noise).
    """
    if len(stars) == 0:
        return float("nan")
    good = np.asarray(stars["snr"], dtype=float) >= min_snr
    if "saturated" in stars.colnames:
        good &= ~np.asarray(stars["saturated"], dtype=bool)
    values = np.asarray(stars["ellipticity"], dtype=float)[good]
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size >= 3 else float("nan")


def choose_reference(quality: Table, *, depth_fraction: float = 0.9,
                     max_ellipticity: float | None = None) -> int:
    """Row of the reference frame: the sharpest among the frames nearly as deep as the deepest.

    Parameters
    ----------
    quality : table with columns ``n_sources`` and ``fwhm_pix`` (one row per frame), and
        ``ellipticity`` when ``max_ellipticity`` is given.
    depth_fraction : a frame is a candidate if it has at least this fraction of the largest
        number of detected sources.
    max_ellipticity : frames whose stars are more elongated than this (trailed, or with
        strong coma) are never chosen; None: no limit.
    """
    n_sources = np.asarray(quality["n_sources"], dtype=float)
    if max_ellipticity is not None:
        # Not chosen: a trailed frame counts as having no sources.
        elongated = ~(np.asarray(quality["ellipticity"], dtype=float) <= max_ellipticity)
        n_sources = np.where(elongated, 0.0, n_sources)
    if len(n_sources) == 0 or n_sources.max() <= 0:
        raise ValueError("no frame has detected sources (or all are trailed): check the "
                         "frames and the detection threshold before choosing a reference "
                         "frame")
    fwhm = np.asarray(quality["fwhm_pix"], dtype=float)
    candidates = np.flatnonzero(n_sources >= depth_fraction * n_sources.max())
    finite = candidates[np.isfinite(fwhm[candidates])]
    if len(finite) == 0:
        return int(candidates[np.argmax(n_sources[candidates])])
    return int(finite[np.argmin(fwhm[finite])])


def reference_catalog(frame: Frame, *, fwhm_pix: float, max_radius_arcsec: float,
                      gain_e_per_adu: float, keys: HeaderKeys = NINA_KEYS,
                      nsigma: float = 3.0, n_pixels: int = 5, min_snr: float = 10.0,
                      max_contamination: float = 0.01, box_size: int = 64,
                      filter_size: int = 3) -> Table:
    """Reference catalogue of one frame: the stars of :func:`datared.detection.detect_stars`
    on the photometric background, plus crowding and the frame's header values.

    The background is :func:`datared.detection.estimate_background` (the map that the
    forced photometry subtracts too). The table has the detection's columns (``id``, ``x``,
    ``y``, ``sky``, ``flux``, ``flux_err``, ``snr``, ``sigma_xy``, ``peak``, ``fwhm``,
    ``ellipticity``; brightest first) and adds ``contamination`` (fraction of a star's flux
    in the largest aperture that comes from detected neighbours, Gaussian PSF of
    ``fwhm_pix``) and ``crowded`` (above ``max_contamination``). Saturation is judged on
    every frame in raw ADU by :func:`measure_frame`, not here. Raises
    :class:`~datared.errors.FrameError` if the frame has no WCS or no star passes the cuts.

    Parameters
    ----------
    frame : the reference frame (with a WCS).
    fwhm_pix : stellar FWHM on this frame, pixels.
    max_radius_arcsec : largest aperture radius used later, arcsec.
    gain_e_per_adu : gain, electrons per ADU.
    keys : the night's header keywords (``HeaderKeys.from_settings(config)``); the
        metadata use NINA's names whatever the camera wrote.
    nsigma : detection threshold, significance of the matched filter (see
        :func:`datared.detection.detect_stars`).
    n_pixels : minimum number of connected pixels above the threshold.
    min_snr : flux cut: minimum S/N of the detection's flux.
    max_contamination : contamination above which a star is flagged crowded (fraction).
    box_size, filter_size : ``Background2D`` box (pixels) and filter (boxes).
    """
    if frame.wcs is None:
        raise FrameError(f"{frame.name}: the reference frame needs a WCS; choose a frame "
                         "that notebooks/03-astrometry.ipynb solved")
    background = estimate_background(frame.data, box_size=box_size, filter_size=filter_size,
                                     mask=frame.mask)
    table = detect_stars(frame.data, mask=frame.mask, background=background, fwhm_px=fwhm_pix,
                         nsigma=nsigma, min_pixels=n_pixels, min_snr=min_snr,
                         gain_e_per_adu=gain_e_per_adu, wcs=frame.wcs)
    if len(table) == 0:
        raise FrameError(f"{frame.name}: no star with S/N >= {min_snr:g} above {nsigma:g} "
                         "sigma; choose another reference frame or lower the thresholds")
    # Saturation is not judged here (no raw level passed): the column would only mislead.
    table.remove_column("saturated")
    sky_rms = float(table.meta.pop("sky_rms", background.rms_median))
    # The FWHM is recorded as FWHMPIX below; "fwhm_measured" would only become a HIERARCH
    # card (with a VerifyWarning) in the FITS file.
    table.meta.pop("fwhm_px", None)
    table.meta.pop("fwhm_measured", None)
    radius_pix = max_radius_arcsec / frame.pixel_scale_arcsec
    table["contamination"] = contamination(table["x"], table["y"], table["flux"],
                                           radius_pix=radius_pix, fwhm_pix=fwhm_pix)
    table["crowded"] = table["contamination"] > max_contamination
    table.meta.update(header_meta(frame.header, keys))
    table.meta.update({"FRAME": frame.name, "FWHMPIX": float(fwhm_pix),
                       "PIXSCALE": frame.pixel_scale_arcsec, "NSIGMA": float(nsigma),
                       "MINSNR": float(min_snr), "MAXCONT": float(max_contamination),
                       "BKGBOX": int(box_size), "BKGFILT": int(filter_size),
                       "SKYRMS": sky_rms})
    return table


def measure_frame(frame: Frame, reference: Table, radii_arcsec: Sequence[float], *,
                  calibration: CalibrationTerms, gain_e_per_adu: float, read_noise_e: float,
                  saturation_adu: float, keys: HeaderKeys = NINA_KEYS, box_size: int = 64,
                  filter_size: int = 3, measure_fwhm: bool = False,
                  aperture_mm: float | None = None,
                  height_m: float = 0.0) -> Table:
    """Forced photometry of one frame at the reference catalogue's sky positions.

    Raises :class:`~datared.errors.FrameError` (with the reason) if the frame has no WCS or
    none of the reference positions falls on it; the caller logs and skips such frames.

    Parameters
    ----------
    frame : frame from :func:`datared.frame.read_frame`.
    reference : reference catalogue (:func:`reference_catalog`) with ``id``, ``sky`` and
        ``crowded``.
    radii_arcsec : aperture radii, arcsec.
    calibration : the frame's :class:`datared.reduction.CalibrationTerms`
        (:func:`datared.reduction.load_calibration_terms`).
    gain_e_per_adu, read_noise_e : detector gain (e/ADU) and read noise (e).
    saturation_adu : raw saturation level, ADU.
    keys : the night's header keywords; the metadata use NINA's names.
    box_size, filter_size : ``Background2D`` box (pixels) and filter (boxes).
    measure_fwhm : store the frame's FWHM (arcsec) in the metadata as ``FWHM``: the FWHM
        that :func:`datared.detection.detect_stars` measures on this frame (the same
        definition as :func:`frame_quality`; -1 if no star could be measured), with the
        median ellipticity of its bright stars (``ELLIP``, :func:`median_ellipticity`) and
        the number of stars it detected (``NSTARS``). ``SKY`` (median background, ADU per
        pixel) is always stored.
    aperture_mm, height_m : telescope aperture (mm) and site height (m) for the expected
        scintillation noise in the metadata (``SCINT``, relative flux sigma); None: skip.
    """
    if frame.wcs is None:
        raise FrameError(f"{frame.name}: no WCS in the header (chapter 03-astrometry did "
                         "not solve it); rerun that chapter or leave the frame out")
    x, y = world_to_frame(frame.wcs, reference["sky"])
    ny, nx = frame.data.shape
    on_frame = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    if not on_frame.any():
        raise FrameError(f"{frame.name}: none of the reference positions falls on this "
                         "frame (another field, or a wrong WCS); check its OBJECT and WCS")
    background = estimate_background(frame.data, box_size=box_size, filter_size=filter_size,
                                     mask=frame.mask)
    crowded = reference["crowded"] if "crowded" in reference.colnames else None
    table = forced_photometry(frame.data, x, y, radii_arcsec,
                              pixel_scale_arcsec=frame.pixel_scale_arcsec,
                              background=background, gain_e_per_adu=gain_e_per_adu,
                              read_noise_e=read_noise_e, flat=calibration.flat,
                              dark_adu=calibration.dark, bias_adu=calibration.bias,
                              saturation_adu=saturation_adu, mask=frame.mask, crowded=crowded)
    table.add_column(np.asarray(reference["id"]), name="id", index=0)
    meta = header_meta(frame.header, keys)
    meta.update(table.meta)
    meta["FRAME"] = frame.name
    meta["NONFRAME"] = int(on_frame.sum())
    meta["CALIB"] = calibration.note[:68]
    if measure_fwhm:
        # The detection wants the saturation above the sky: the frame's median calibrated
        # saturation level minus its median background.
        level = saturation_level(saturation_adu, bias_adu=calibration.bias,
                                 dark_adu=calibration.dark, flat=calibration.flat)
        stars = detect_stars(frame.data, mask=frame.mask, background=background,
                             saturation_adu=float(np.median(level)) - background.median)
        fwhm = float(stars.meta["fwhm_px"])
        meta["FWHM"] = fwhm * frame.pixel_scale_arcsec if np.isfinite(fwhm) else -1.0
        meta["ELLIP"] = median_ellipticity(stars)
        meta["NSTARS"] = len(stars)
    meta["SKY"] = float(background.median)
    if aperture_mm is not None and "AIRMASS" in meta and "EXPTIME" in meta:
        meta["SCINT"] = scintillation_sigma(float(meta["AIRMASS"]), float(meta["EXPTIME"]),
                                            aperture_mm=aperture_mm, height_m=height_m)
    table.meta = meta
    return table


def quality_of_file(path: str | Path, shared: dict) -> dict:
    """:func:`frame_quality` of the frame in ``path``, for :func:`datared.parallel.map_frames`.

    ``shared`` holds the keyword arguments of :func:`frame_quality` (``saturation_adu``,
    ``min_snr``, ...). Returns its dictionary with the frame's ``fwhm_arcsec`` added.
    """
    from datared.frame import read_frame

    frame = read_frame(path)
    quality = frame_quality(frame, **shared)
    quality["fwhm_arcsec"] = quality["fwhm_pix"] * frame.pixel_scale_arcsec
    return quality


def measure_file(task: tuple, shared: dict) -> Path:
    """One frame of chapter 04's loop, for :func:`datared.parallel.map_frames`: read the frame,
    :func:`measure_frame` it, label its catalogue and write it; returns the catalogue's path.

    Parameters
    ----------
    task : (frame path, catalogue path, calibration key): the key (filter, exposure time)
        selects the frame's master frames.
    shared : ``reference`` (the target's reference catalogue), ``target`` (its name),
        ``work_dir`` (where chapter 02 wrote the masters) and ``options`` (the other keyword
        arguments of :func:`measure_frame`, with ``radii_arcsec`` and ``keys``). The
        :class:`~datared.reduction.CalibrationTerms` of each key are read once per process
        and kept in ``shared["calibrations"]``; a missing master raises
        :class:`~datared.errors.MissingInputError`, which
        :func:`datared.parallel.map_frames` lets stop the loop.

    The catalogue's metadata name the reference catalogue (``REFCAT``) and the target as the
    settings spell it (``OBJECT``; the header's spelling, if different, in ``HDROBJ``).
    """
    from datared.frame import read_frame
    from datared.reduction import load_calibration_terms

    path, output, key = task
    target = shared["target"]
    terms = shared.setdefault("calibrations", {})
    if key not in terms:
        terms[key] = load_calibration_terms(shared["work_dir"], *key,
                                            keys=shared["options"]["keys"])
    frame = read_frame(path)
    table = measure_frame(frame, shared["reference"], calibration=terms[key],
                          **shared["options"])
    table.meta["REFCAT"] = reference_catalog_name(target)
    if table.meta.get("OBJECT") != target:  # the header spells it otherwise
        table.meta["HDROBJ"] = str(table.meta.get("OBJECT", ""))
        table.meta["OBJECT"] = target  # later chapters find it by this name
    return write_catalog(table, output)


def write_catalog(table, path: str | Path) -> Path:
    """Write a catalogue as FITS (overwriting: reruns are safe); returns the path.

    Parameters
    ----------
    table : astropy Table or QTable (SkyCoord columns are kept).
    path : output file in the work folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.write(path, overwrite=True)
    return path


#: Chapter 04's file name of a target's reference catalogue: ``ref_catalog_<target>.fits``.
REFERENCE_PREFIX = "ref_catalog_"


def reference_catalog_name(target: str) -> str:
    """File name of the reference catalogue of ``target`` in the photometry folder."""
    return f"{REFERENCE_PREFIX}{target}.fits"


def frame_catalog_paths(phot_dir: str | Path, *, chapter: str = "04-photometry") -> list[Path]:
    """The per-frame catalogues that the photometry chapter wrote in its last run.

    Read from the folder's manifest (:func:`datared.io.read_manifest`), so that a catalogue
    left over from an earlier run is never used; the reference catalogues are left out.
    """
    from datared.io import read_manifest

    return [path for path in read_manifest(phot_dir, chapter=chapter)
            if not path.name.startswith(REFERENCE_PREFIX)]


# ---------------------------------------------------------------------------------------
# Frame quality over the night: which frames to trust
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QualityLimits:
    """Limits beyond which a frame is flagged as bad quality (the book's ``config``).

    Ratios compare a frame with the median of the frames of the same target and filter, so
    the limits do not depend on the telescope or the site.
    """

    #: FWHM over the median FWHM: defocused, or shaken by wind.
    max_fwhm_ratio: float = 1.8
    #: Median ellipticity (1 - b/a) of the bright stars: trailed or badly guided.
    max_ellipticity: float = 0.3
    #: Flux of the bright stars relative to the clearest frames: clouds, dew, a closed dome.
    min_transparency: float = 0.3
    #: Sky level over the median sky: twilight, moon, clouds lit from below.
    max_sky_ratio: float = 5.0
    #: Fewest reference stars measured cleanly on the frame.
    min_clean_stars: int = 3


def relative_transparency(flux: np.ndarray, *, clear_percentile: float = 90.0) -> np.ndarray:
    """Per frame, the flux of the stars relative to the clearest frames.

    Each star's flux is divided by its median over the frames; a frame's value is the
    median of these ratios over its stars; the values are divided by their
    ``clear_percentile`` percentile (the clearest frames, not one lucky frame), so a clear
    frame has about 1 and a frame behind clouds that let half the light through about 0.5.
    Extinction is included: the value falls with the airmass as well.

    Parameters
    ----------
    flux : (n_frames, n_stars) fluxes per second of the same stars (NaN: not measured).
    clear_percentile : percentile of the frames' values taken as clear.
    """
    flux = np.asarray(flux, dtype=float)
    flux = np.where(flux > 0, flux, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN stars or frames
        ratio = flux / np.nanmedian(flux, axis=0)
        per_frame = np.nanmedian(ratio, axis=1)
        clear = np.nanpercentile(per_frame, clear_percentile) if np.isfinite(per_frame).any() \
            else np.nan
    return per_frame / clear


def frame_quality_table(paths: Sequence[str | Path], *, radius_arcsec: float,
                        limits: QualityLimits = QualityLimits(),
                        min_snr: float = 50.0) -> Table:
    """The quality of every measured frame, from the catalogues of :func:`measure_frame`.

    One row per catalogue: ``catalog`` (file name), ``frame``, ``object``, ``filter``,
    ``date_obs``, ``airmass``, ``fwhm_arcsec``, ``ellipticity``, ``sky_adu`` (``FWHM``,
    ``ELLIP``, ``SKY`` of the metadata), ``clean_stars`` (bright stars measured without a
    flag), ``transparency`` (:func:`relative_transparency` of the bright stars, per target
    and filter), the ratios ``fwhm_ratio`` and ``sky_ratio`` to the median of the frames of
    the same target and filter, ``good`` and ``quality`` ("ok" or the reasons, separated by
    "; ").

    Parameters
    ----------
    paths : per-frame catalogues (:func:`frame_catalog_paths`).
    radius_arcsec : aperture whose fluxes and flags are used.
    limits : the limits of a good frame.
    min_snr : a star is bright if its median S/N over the frames is at least this.
    """
    tag = radius_tag(radius_arcsec)
    tables = [Table.read(path) for path in paths]
    rows = []
    for path, table in zip(paths, tables, strict=True):
        meta = table.meta
        fwhm = float(meta.get("FWHM", np.nan))
        rows.append({"catalog": Path(path).name, "frame": str(meta.get("FRAME", "")),
                     "object": str(meta.get("OBJECT", "")),
                     "filter": str(meta.get("FILTER", "")),
                     "date_obs": str(meta.get("DATE-OBS", "")),
                     "airmass": float(meta.get("AIRMASS", np.nan)),
                     "fwhm_arcsec": fwhm if fwhm > 0 else np.nan,
                     "ellipticity": float(meta.get("ELLIP", np.nan)),
                     "sky_adu": float(meta.get("SKY", np.nan))})
    names = ("catalog", "frame", "object", "filter", "date_obs", "airmass", "fwhm_arcsec",
             "ellipticity", "sky_adu")
    quality = Table(rows=rows or None, names=names,
                    dtype=(str, str, str, str, str, float, float, float, float))
    n = len(quality)
    for name in ("transparency", "fwhm_ratio", "sky_ratio"):
        quality[name] = np.full(n, np.nan)
    quality["clean_stars"] = np.zeros(n, dtype=int)
    for key in sorted(set(zip(quality["object"], quality["filter"], strict=True))):
        rows_of = np.flatnonzero((quality["object"] == key[0]) & (quality["filter"] == key[1]))
        group = [tables[i] for i in rows_of]
        n_stars = min(len(t) for t in group)  # same reference catalogue: same rows
        exptime = np.array([float(t.meta.get("EXPTIME", 1.0)) or 1.0 for t in group])
        flux = np.array([np.asarray(t[f"sum_{tag}"], dtype=float)[:n_stars] for t in group])
        err = np.array([np.asarray(t[f"sum_err_{tag}"], dtype=float)[:n_stars] for t in group])
        clean = np.array([np.asarray(t[f"flags_{tag}"])[:n_stars] == 0 for t in group])
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bright = np.nanmedian(np.where(clean, flux / err, np.nan), axis=0) >= min_snr
        usable = clean & bright[None, :] & np.isfinite(flux)
        quality["clean_stars"][rows_of] = usable.sum(axis=1)
        quality["transparency"][rows_of] = relative_transparency(
            np.where(usable, flux / exptime[:, None], np.nan))
        for column, ratio in (("fwhm_arcsec", "fwhm_ratio"), ("sky_adu", "sky_ratio")):
            values = np.asarray(quality[column][rows_of], dtype=float)
            if np.isfinite(values).any():
                quality[ratio][rows_of] = values / np.nanmedian(values)
    reasons = []
    for row in quality:
        why = []
        if row["clean_stars"] < limits.min_clean_stars:
            why.append(f"only {row['clean_stars']} bright stars measured cleanly")
        if row["transparency"] < limits.min_transparency:
            why.append(f"transparency {row['transparency']:.2f} (clouds?)")
        if row["fwhm_ratio"] > limits.max_fwhm_ratio:
            why.append(f"FWHM {row['fwhm_ratio']:.1f} x the median (defocused or shaken?)")
        if not np.isfinite(row["fwhm_arcsec"]):
            why.append("no FWHM could be measured")
        if row["ellipticity"] > limits.max_ellipticity:
            why.append(f"stars elongated (ellipticity {row['ellipticity']:.2f}: trailed?)")
        if row["sky_ratio"] > limits.max_sky_ratio:
            why.append(f"sky {row['sky_ratio']:.1f} x the median (twilight, moon?)")
        reasons.append("; ".join(why) or "ok")
    quality["quality"] = reasons
    quality["good"] = np.array([r == "ok" for r in reasons], dtype=bool)
    quality.meta.update({"radius_arcsec": float(radius_arcsec), "min_snr": float(min_snr),
                         "limits": dict(vars(limits))})
    for name, fmt in (("airmass", ".3f"), ("fwhm_arcsec", ".2f"), ("ellipticity", ".2f"),
                      ("sky_adu", ".1f"), ("transparency", ".3f"), ("fwhm_ratio", ".2f"),
                      ("sky_ratio", ".2f")):
        quality[name].format = fmt
    return quality


def mark_quality(quality: Table, phot_dir: str | Path) -> None:
    """Write each frame's verdict into its catalogue's metadata (``QUALITY``: "ok" or why).

    Later chapters read it there, so that they exclude (or down-weight) the same frames.
    """
    from astropy.io import fits

    for row in quality:
        fits.setval(Path(phot_dir) / row["catalog"], "QUALITY", ext=1,
                    value=str(row["quality"])[:68])


#: File in the photometry folder with chapter 04's verdict on every frame.
FRAME_QUALITY_FILE = "frame_quality.ecsv"


def bad_quality_frames(phot_dir: str | Path) -> dict[str, str]:
    """The frames that chapter 04 found of bad quality: frame file name -> reason.

    Read from ``frame_quality.ecsv`` in ``phot_dir`` (:func:`frame_quality_table`, written
    by chapter 04, section 7.4); the keys are the frames' file names (its ``frame`` column,
    the ``FRAME`` of each catalogue's metadata), the values its ``quality`` text. An empty
    dict if the file does not exist (chapter 04 has not judged the frames). Later chapters
    use it to leave out the same frames.
    """
    path = Path(phot_dir) / FRAME_QUALITY_FILE
    if not path.exists():
        return {}
    try:
        verdicts = Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError) as err:
        raise FrameError(f"{path}: cannot be read ({err}); rerun notebooks/04-photometry.ipynb"
                         ) from err
    missing = [c for c in ("frame", "good", "quality") if c not in verdicts.colnames]
    if missing:
        raise FrameError(f"{path}: no column {missing[0]}; rerun notebooks/04-photometry.ipynb")
    return {str(row["frame"]): str(row["quality"]) for row in verdicts if not row["good"]}
