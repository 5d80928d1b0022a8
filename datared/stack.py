"""Stacking: frames resampled onto one grid, matched, and combined with weights and rejection.

This module owns the machinery of the stack chapter (``notebooks/07-stack.ipynb``):

- the output grid of a target (:func:`output_grid`, around
  ``reproject.mosaicking.find_optimal_celestial_wcs``);
- a fast flux-conserving bilinear resampling (:func:`resample_frame`): the same
  interpolation as ``reproject_interp`` (``order="bilinear"``), with the exact pixel-to-pixel
  mapping evaluated on a coarse grid of nodes and interpolated by a spline (the mapping is
  smooth), and each value multiplied by the area of the output pixel in input pixels (the
  Jacobian of the mapping, :func:`pixel_area_ratio`), so that sums over output pixels keep
  the flux;
- what matches the frames before they are combined: a star-masked background
  (:func:`subtract_background`), star measurements on the frames (:func:`fill_small_gaps`,
  :func:`isolated`, :func:`aperture_fluxes`, :func:`star_fwhm`), the relative transmission
  of each frame (:func:`relative_transmission`) and the combine weights
  (:func:`combine_weights`); :func:`prepare_frame` runs these steps and the resampling on
  one frame;
- the combine: a weighted mean with outlier rejection against the expected noise of each
  value (:func:`rejection_mask`, :func:`clip_and_combine`), run in strips of rows within a
  memory budget over the resampled frames stored on disk (:func:`combine_in_strips`,
  :func:`strip_rows`), with the inverse-variance (``WEIGHT``) and coverage (``COVERAGE``)
  maps;
- the stack file (:func:`write_stack`, :func:`read_stack`) and its names
  (:func:`stack_name`, :func:`rgb_name`);
- the checks and the colour composite: apertures at empty positions
  (:func:`empty_positions`, :func:`aperture_noise`), zero points from catalogue stars
  (:func:`zero_point`), channel factors (:func:`channel_factors`) and the region that every
  channel covers (:func:`common_region`).

It reads no settings: the chapter passes them in. Images are in ADU (calibrated, flat-fielded);
pixel coordinates are 0-based (numpy order for arrays, ``x`` along columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

#: Bytes of working memory per value of the frame stack in :func:`combine_in_strips`: the
#: scaled values (4), their sorted copy for the median (4), the rejection mask (1), the
#: finite-value mask of the median (1), and slack for numpy's temporaries.
BYTES_PER_STACKED_VALUE = 16
#: Bytes per output pixel of a strip: the float64 sums of the weighted mean (3 x 8), their
#: float64 quotients (2 x 8), the values used (1), the strip's results (4 + 4 + 2), slack.
BYTES_PER_OUTPUT_PIXEL = 64
#: Bytes per pixel of the whole result: image (4), inverse variance (4), coverage (2).
BYTES_PER_RESULT_PIXEL = 10


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------

def stack_name(target: str, band: str) -> str:
    """File name of a stack in ``work_dir/STACK``: ``<object>_<filter>.fits``."""
    return f"{target}_{band}.fits"


def rgb_name(target: str) -> str:
    """File name of a target's colour composite in ``work_dir/STACK``: ``<object>_rgb.png``."""
    return f"{target}_rgb.png"


# ---------------------------------------------------------------------------------------
# The output grid
# ---------------------------------------------------------------------------------------

def output_grid(frames: Sequence[tuple[tuple[int, int], WCS]], *,
                pixel_scale_arcsec: float) -> tuple[WCS, tuple[int, int]]:
    """A north-up TAN grid that covers every frame, with ``pixel_scale_arcsec`` pixels.

    Returns ``(wcs, shape)`` from ``reproject.mosaicking.find_optimal_celestial_wcs``.

    Parameters
    ----------
    frames : ``(shape, wcs)`` of each frame (shape in numpy order: rows, columns).
    pixel_scale_arcsec : pixel size of the grid, arcsec.
    """
    import astropy.units as u
    from reproject.mosaicking import find_optimal_celestial_wcs

    if not frames:
        raise ValueError("output_grid: no frames")
    wcs, shape = find_optimal_celestial_wcs(
        [(tuple(shape), wcs.celestial) for shape, wcs in frames],
        resolution=float(pixel_scale_arcsec) * u.arcsec, projection="TAN")
    wcs.pixel_shape = (int(shape[1]), int(shape[0]))
    return wcs, (int(shape[0]), int(shape[1]))


# ---------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------

def _mapping_spline(wcs_in: WCS, wcs_out: WCS, shape_out: tuple[int, int], step: int):
    """Splines over the output grid of the input pixel coordinates (x, y) and of the area of
    an output pixel in input pixels (the Jacobian determinant), from the exact mapping at
    nodes every ``step`` output pixels (one node row and column beyond each edge)."""
    from scipy.interpolate import RectBivariateSpline

    ny, nx = shape_out
    ys = np.unique(np.r_[np.arange(-step, ny + step, step), ny - 1, ny + step - 1])
    xs = np.unique(np.r_[np.arange(-step, nx + step, step), nx - 1, nx + step - 1])
    xx, yy = np.meshgrid(xs.astype(float), ys.astype(float))
    ra, dec = wcs_out.celestial.wcs_pix2world(xx, yy, 0)
    xin, yin = wcs_in.celestial.all_world2pix(ra, dec, 0, quiet=True)
    if not (np.all(np.isfinite(xin)) and np.all(np.isfinite(yin))):
        raise ValueError("resample_frame: the input WCS cannot map the output grid (is it the "
                         "same field?)")
    k = min(3, len(ys) - 1, len(xs) - 1)
    spline_x = RectBivariateSpline(ys, xs, xin, kx=k, ky=k)
    spline_y = RectBivariateSpline(ys, xs, yin, kx=k, ky=k)
    # The area changes slowly: its spline through the same nodes is exact enough.
    det = (spline_x(ys, xs, dy=1) * spline_y(ys, xs, dx=1)
           - spline_x(ys, xs, dx=1) * spline_y(ys, xs, dy=1))
    spline_area = RectBivariateSpline(ys, xs, np.abs(det), kx=k, ky=k)
    return spline_x, spline_y, spline_area


def resample_frame(data: np.ndarray, wcs_in: WCS, wcs_out: WCS, shape_out: tuple[int, int], *,
                   conserve_flux: bool = True, step: int = 16,
                   block_rows: int = 512) -> np.ndarray:
    """Bilinear resampling of an image onto another grid; NaN where the image gives no value.

    The input pixel position of every output pixel comes from a spline through the exact
    mapping (``wcs_out`` pixel -> sky -> ``wcs_in`` pixel, SIP distortion included) at nodes
    every ``step`` pixels; the value is interpolated bilinearly from the four nearest input
    pixels (as ``reproject_interp`` with ``order="bilinear"``), so a NaN input pixel (masked)
    spoils only the output pixels next to it. With ``conserve_flux`` the value is multiplied
    by the area of the output pixel in input pixels (the determinant of the mapping's
    Jacobian): sums over output pixels then keep the flux of a star; without it the result
    keeps the surface brightness (ADU per input pixel), as ``reproject_interp`` does.

    Parameters
    ----------
    data : image, ADU; NaN for pixels to leave out (masked).
    wcs_in : the image's celestial WCS (with SIP distortion if any).
    wcs_out, shape_out : the output grid (shape: rows, columns).
    conserve_flux : multiply by the pixel-area ratio (flux per output pixel).
    step : spacing of the nodes of the exact mapping, output pixels.
    block_rows : rows resampled at a time (bounds the memory of the coordinates).

    Returns a float32 image of ``shape_out``: NaN outside the input image and next to NaN
    input pixels, never zero-filled.
    """
    from scipy.ndimage import map_coordinates

    data = np.asarray(data, dtype=np.float32)
    ny_in, nx_in = data.shape
    ny, nx = shape_out
    spline_x, spline_y, spline_area = _mapping_spline(wcs_in, wcs_out, shape_out, step)
    out = np.empty(shape_out, dtype=np.float32)
    cols = np.arange(nx, dtype=float)
    for start in range(0, ny, block_rows):
        rows = np.arange(start, min(start + block_rows, ny), dtype=float)
        xin = spline_x(rows, cols)
        yin = spline_y(rows, cols)
        # As reproject_interp: an input pixel covers +-0.5 pixel around its centre, so the
        # half pixel past the outermost centres takes the edge value.
        outside = (xin < -0.5) | (xin > nx_in - 0.5) | (yin < -0.5) | (yin > ny_in - 0.5)
        values = map_coordinates(data, [np.clip(yin, 0, ny_in - 1), np.clip(xin, 0, nx_in - 1)],
                                 order=1, mode="nearest", prefilter=False)
        values[outside] = np.nan
        if conserve_flux:
            values *= spline_area(rows, cols)
        out[start:start + len(rows)] = values
    return out


def pixel_area_ratio(wcs_in: WCS, wcs_out: WCS, shape_out: tuple[int, int], *,
                     step: int = 16) -> np.ndarray:
    """Area of each output pixel in input pixels (float32 map of ``shape_out``).

    Multiply a surface-brightness-conserving resampling (``reproject_interp``,
    ``reproject_exact``) by it to conserve flux instead.
    """
    _, _, spline_area = _mapping_spline(wcs_in, wcs_out, shape_out, step)
    rows = np.arange(shape_out[0], dtype=float)
    cols = np.arange(shape_out[1], dtype=float)
    return spline_area(rows, cols).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Matching the frames: background, star fluxes, transmission, weights
# ---------------------------------------------------------------------------------------

@dataclass
class SkyLevel:
    """A frame's background: the map (ADU per pixel), its median and the noise per pixel."""

    background: np.ndarray
    median: float
    rms: float


def subtract_background(data: np.ndarray, mask: np.ndarray | None = None, *,
                        box_size: int = 64, filter_size: int = 3,
                        source_nsigma: float = 3.0,
                        dilate_pixels: int = 3) -> tuple[np.ndarray, SkyLevel]:
    """Background-subtracted image (float32, NaN at masked pixels) and the :class:`SkyLevel`.

    Two passes of ``sep.Background`` (sigma-clipped box values, median-filtered): the second
    ignores pixels more than ``source_nsigma`` noise sigma above the first map (grown by
    ``dilate_pixels``), so that the wings of stars do not lift the background.

    Parameters
    ----------
    data : calibrated image, ADU.
    mask : True for bad pixels (set to NaN in the result).
    box_size : side of the background boxes, pixels.
    filter_size : side of the median filter over the boxes, in boxes.
    source_nsigma : threshold of the source mask of the second pass, noise sigma.
    dilate_pixels : growth of the source mask, pixels.
    """
    import sep
    from scipy import ndimage

    image = np.ascontiguousarray(data, dtype=np.float32)
    bad = ~np.isfinite(image)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    filled = np.where(bad, np.float32(0.0), image)
    box = int(min(box_size, *image.shape))
    first = sep.Background(filled, mask=bad, bw=box, bh=box, fw=filter_size, fh=filter_size)
    with np.errstate(invalid="ignore"):
        sources = (filled - first.back()) > source_nsigma * first.globalrms
    sources &= ~bad
    if dilate_pixels > 0:
        sources = ndimage.binary_dilation(sources, iterations=int(dilate_pixels))
    second = sep.Background(filled, mask=bad | sources, bw=box, bh=box, fw=filter_size,
                            fh=filter_size)
    background = second.back().astype(np.float32)
    sub = image - background
    sub[bad] = np.nan
    level = SkyLevel(background, float(np.median(background[::4, ::4])),
                     float(second.globalrms))
    return sub, level


def fill_small_gaps(sub: np.ndarray) -> np.ndarray:
    """A copy of a background-subtracted image for measuring stars: NaN pixels with good
    pixels within 2 pixels take their mean (bad pixels, a hot pixel); larger NaN patches
    (a saturated core, a masked column) stay NaN.

    Bad pixels are scattered over the whole frame (a few per thousand): without this, most
    apertures of ten pixels' radius would touch one.
    """
    from datared.detection import fill_masked

    bad = ~np.isfinite(sub)
    if not bad.any():
        return np.asarray(sub, dtype=np.float32).copy()
    filled, still_bad = fill_masked(np.where(bad, np.float32(0.0), sub), bad, bright=np.inf)
    if still_bad is not None:
        filled[still_bad] = np.nan
    return filled


def aperture_fluxes(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius_px: float, *,
                    noise_adu: float | None = None, gain_e_per_adu: float | None = None,
                    max_peak_adu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sums in circles on a background-subtracted image; NaN where a circle is not complete.

    A circle that reaches past the image or touches a NaN pixel gives NaN: such a sum would
    be too low (fill isolated bad pixels first, :func:`fill_small_gaps`). Returns
    ``(flux, flux_err)`` in ADU (``flux_err`` NaN without ``noise_adu``).

    Parameters
    ----------
    image : background-subtracted image, ADU (NaN = no data).
    x, y : centres, pixels (0-based).
    radius_px : radius, pixels.
    noise_adu : background noise per pixel, ADU (for ``flux_err``).
    gain_e_per_adu : gain for the Poisson part of ``flux_err`` (None: background only).
    max_peak_adu : NaN for circles whose brightest pixel centre reaches this level (stars
        near saturation), ADU; None: no limit.
    """
    import sep

    image = np.ascontiguousarray(image, dtype=np.float32)
    bad = ~np.isfinite(image)
    filled = np.where(bad, np.float32(0.0), image)
    x = np.atleast_1d(np.asarray(x, dtype=float))
    y = np.atleast_1d(np.asarray(y, dtype=float))
    ny, nx = image.shape
    inside = ((x - radius_px >= -0.5) & (x + radius_px <= nx - 0.5)
              & (y - radius_px >= -0.5) & (y + radius_px <= ny - 0.5))
    flux = np.full(len(x), np.nan)
    err = np.full(len(x), np.nan)
    if not inside.any():
        return flux, err
    kwargs = {}
    if noise_adu is not None:
        kwargs["err"] = float(noise_adu)
        if gain_e_per_adu is not None:
            kwargs["gain"] = float(gain_e_per_adu)
    f, e, flag = sep.sum_circle(filled, x[inside], y[inside], float(radius_px), mask=bad,
                                subpix=5, **kwargs)
    ok = (flag & (sep.APER_TRUNC | sep.APER_HASMASKED)) == 0
    if max_peak_adu is not None:
        ok &= _peak_in_circle(filled, x[inside], y[inside], radius_px) < max_peak_adu
    flux[np.flatnonzero(inside)[ok]] = f[ok]
    if noise_adu is not None:
        err[np.flatnonzero(inside)[ok]] = e[ok]
    return flux, err


def isolated(x: np.ndarray, y: np.ndarray, mag: np.ndarray, *, radius_px: float,
             delta_mag: float = 3.0) -> np.ndarray:
    """True for stars with no neighbour within ``radius_px`` that is less than ``delta_mag``
    fainter (a neighbour that adds more than about 6 % of the light).

    Parameters
    ----------
    x, y : positions, pixels.
    mag : magnitudes (any zero point).
    radius_px : how near a neighbour counts, pixels.
    delta_mag : neighbours fainter by more than this are ignored, mag.
    """
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    mag = np.asarray(mag, dtype=float)
    finite = np.isfinite(x) & np.isfinite(y)
    alone = finite.copy()
    points = np.column_stack([x[finite], y[finite]])
    index = np.flatnonzero(finite)
    tree = cKDTree(points)
    for k, neighbours in enumerate(tree.query_ball_point(points, radius_px)):
        others = index[[j for j in neighbours if j != k]]
        if len(others) and np.any(mag[others] < mag[index[k]] + delta_mag):
            alone[index[k]] = False
    return alone


def star_fwhm(sub: np.ndarray, x: np.ndarray, y: np.ndarray, *, noise_adu: float,
              max_peak_adu: float | None = None, min_peak_snr: float = 20.0,
              radius_px: float = 12.0) -> tuple[float, np.ndarray]:
    """The FWHM of an image from given stars: the median width at half maximum
    (:func:`datared.detection.half_maximum_fwhm`, the definition the detection uses) of
    those whose peak is at least ``min_peak_snr`` times the noise and below ``max_peak_adu``.

    Returns ``(median FWHM, per-star FWHM)`` in pixels (NaN for stars not used).

    Parameters
    ----------
    sub : background-subtracted image, ADU (NaN = no data; stars touching NaN are skipped).
    x, y : positions of isolated stars, pixels.
    noise_adu : background noise per pixel, ADU.
    max_peak_adu : skip stars whose peak reaches this (near saturation), ADU; None: no limit.
    min_peak_snr : skip stars whose peak is below this many noise sigma.
    radius_px : pixels within this distance of a star count.
    """
    from datared.detection import half_maximum_fwhm

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    fwhm = np.full(len(x), np.nan)
    ny, nx = sub.shape
    r = int(math.ceil(radius_px))
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (ix >= r) & (ix < nx - r) & (iy >= r) & (iy < ny - r)
    keep = np.flatnonzero(inside)
    if len(keep) == 0:
        return float("nan"), fwhm
    offs = np.arange(-r, r + 1)
    cut = sub[iy[keep, None, None] + offs[None, :, None], ix[keep, None, None] + offs[None, None, :]]
    complete = np.isfinite(cut).all(axis=(1, 2))
    centre = cut[:, r - 1:r + 2, r - 1:r + 2].reshape(len(keep), -1)
    peak = np.max(np.where(np.isfinite(centre), centre, -np.inf), axis=1)
    use = complete & (peak >= min_peak_snr * noise_adu)
    if max_peak_adu is not None:
        use &= peak < max_peak_adu
    keep = keep[use]
    if len(keep):
        fwhm[keep] = half_maximum_fwhm(sub, x[keep], y[keep], radius_px=radius_px)
    good = np.isfinite(fwhm)
    return (float(np.median(fwhm[good])) if good.sum() >= 3 else float("nan")), fwhm


def _peak_in_circle(image: np.ndarray, x: np.ndarray, y: np.ndarray,
                    radius_px: float) -> np.ndarray:
    """Highest pixel whose centre lies within ``radius_px`` of each (x, y), inside images."""
    r = int(math.ceil(radius_px))
    offs = np.arange(-r, r + 1)
    ny, nx = image.shape
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    rows = np.clip(iy[:, None, None] + offs[None, :, None], 0, ny - 1)
    cols = np.clip(ix[:, None, None] + offs[None, None, :], 0, nx - 1)
    cut = image[rows, cols]
    within = ((ix[:, None, None] + offs[None, None, :] - x[:, None, None]) ** 2
              + (iy[:, None, None] + offs[None, :, None] - y[:, None, None]) ** 2) <= radius_px ** 2
    return np.max(np.where(within, cut, -np.inf), axis=(1, 2))


def relative_transmission(flux: np.ndarray, *, reference: int = 0, min_stars: int = 5,
                          iterations: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How much light each frame received relative to a reference frame, from common stars.

    Model: ``flux[i, j] = T[i] * F[j]`` (frame ``i``, star ``j``) with ``T[reference] = 1``,
    fitted robustly in magnitudes by alternating medians, so that a star missing from some
    frames (dithered off, masked) or a variable star does not bias it. Clouds, airmass and
    exposure time all enter ``T``; the photometric scale of frame ``i`` is ``1 / T[i]``.

    Parameters
    ----------
    flux : (n_frames, n_stars) aperture fluxes, ADU; NaN or <= 0 = no measurement.
    reference : index of the frame whose transmission is 1.
    min_stars : fewest stars a frame must share with the others.
    iterations : rounds of the alternating medians.

    Returns ``(T, n_stars_used, scatter)`` per frame: ``scatter`` is the robust standard
    deviation (mag) of that frame's stars about the model.
    """
    from astropy.stats import mad_std

    flux = np.asarray(flux, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = np.where(flux > 0, -2.5 * np.log10(flux), np.nan)
    good = np.isfinite(mag)
    mag = mag[:, good.sum(axis=0) >= 2]  # a star seen on one frame says nothing
    good = np.isfinite(mag)
    n_used = good.sum(axis=1)
    if np.any(n_used < min_stars):
        worst = int(np.argmin(n_used))
        raise ValueError(f"relative_transmission: frame {worst} has only {n_used[worst]} "
                         f"usable stars (need {min_stars}); use more or fainter stars")
    zp = np.zeros(flux.shape[0])
    for _ in range(iterations):
        star = np.nanmedian(mag - zp[:, None], axis=0)
        zp = np.nanmedian(mag - star[None, :], axis=1)
        zp -= zp[reference]
    residual = mag - zp[:, None] - np.nanmedian(mag - zp[:, None], axis=0)[None, :]
    scatter = np.array([mad_std(r[np.isfinite(r)]) if np.isfinite(r).sum() > 1 else np.nan
                        for r in residual])
    return 10 ** (-0.4 * zp), n_used, scatter


def combine_weights(transmission: np.ndarray, sky_rms: np.ndarray,
                    fwhm_px: np.ndarray | None = None) -> np.ndarray:
    """Combine weights of the scaled frames, largest 1.

    A frame scaled by ``1 / T`` has background noise ``sky_rms / T`` per pixel. Without
    ``fwhm_px`` the weight is its inverse variance, ``(T / sky_rms)**2``: the best weights
    for the background (and for faint extended light). With ``fwhm_px`` it is
    ``(T / (sky_rms * fwhm_px))**2``, the S/N-optimal weight for faint point sources, whose
    light is spread over an area proportional to the FWHM squared.

    Parameters
    ----------
    transmission : relative transmission of each frame (:func:`relative_transmission`).
    sky_rms : background noise per pixel of each frame before scaling, ADU.
    fwhm_px : the stars' FWHM on each frame, pixels (or None).
    """
    t = np.asarray(transmission, dtype=float)
    noise = np.asarray(sky_rms, dtype=float)
    if fwhm_px is not None:
        noise = noise * np.asarray(fwhm_px, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = (t / noise) ** 2
    if not np.all(np.isfinite(weight)) or np.any(weight <= 0):
        raise ValueError("combine_weights: every frame needs a positive transmission, noise "
                         "and FWHM")
    return weight / weight.max()


@dataclass
class PreparedFrame:
    """One frame made ready for the combine by :func:`prepare_frame`."""

    name: str
    sky_adu: float  # median background, ADU per pixel
    noise_adu: float  # background noise per pixel, ADU
    fwhm_px: float  # the stars' FWHM on the frame, pixels
    flux: np.ndarray  # (n_radii, n_stars) aperture fluxes of the catalogue stars, ADU
    flux_err: np.ndarray  # their uncertainties (background and Poisson noise), ADU
    resampled: np.ndarray  # background-subtracted frame on the output grid (NaN = no data)


def prepare_frame(frame, *, stars_sky, stars_mag: np.ndarray, wcs_out: WCS,
                  shape_out: tuple[int, int], radii_px: Sequence[float], saturation_adu: float,
                  gain_e_per_adu: float, isolation_px: float = 20.0) -> PreparedFrame:
    """Background, FWHM, star fluxes and resampled image of one frame (the chapter's loop).

    1. :func:`subtract_background` (masked pixels become NaN);
    2. the FWHM from the catalogue stars that have no neighbour within ``isolation_px``
       less than 3 mag fainter, whose peak stays below half the saturation level
       (:func:`star_fwhm`);
    3. :func:`aperture_fluxes` of every catalogue star in circles of ``radii_px`` (NaN for
       incomplete circles and stars whose peak passes half the saturation level), after
       filling isolated bad pixels (:func:`fill_small_gaps`);
    4. :func:`resample_frame` of the background-subtracted frame onto the output grid.

    Parameters
    ----------
    frame : a :class:`datared.frame.Frame` with a WCS.
    stars_sky : SkyCoord of the catalogue stars (at the epoch of the night).
    stars_mag : their magnitudes (any band: only used to judge neighbours).
    wcs_out, shape_out : the output grid.
    radii_px : aperture radii, pixels.
    saturation_adu : calibrated level at which pixels saturate, ADU (sky included).
    gain_e_per_adu : gain, electrons per ADU (the Poisson part of ``flux_err``).
    isolation_px : neighbour distance for the FWHM stars, pixels.
    """
    sub, sky = subtract_background(frame.data, frame.mask)
    filled = fill_small_gaps(sub)
    x, y = frame.wcs.world_to_pixel(stars_sky)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    max_peak = 0.5 * (float(saturation_adu) - sky.median)
    alone = isolated(x, y, stars_mag, radius_px=isolation_px)
    fwhm, _ = star_fwhm(filled, x[alone], y[alone], noise_adu=sky.rms, max_peak_adu=max_peak)
    measured = [aperture_fluxes(filled, x, y, radius, noise_adu=sky.rms,
                                gain_e_per_adu=gain_e_per_adu, max_peak_adu=max_peak)
                for radius in radii_px]
    flux = np.vstack([m[0] for m in measured])
    flux_err = np.vstack([m[1] for m in measured])
    resampled = resample_frame(sub, frame.wcs, wcs_out, shape_out)
    return PreparedFrame(frame.name, sky.median, sky.rms, fwhm, flux, flux_err, resampled)


# ---------------------------------------------------------------------------------------
# Combining
# ---------------------------------------------------------------------------------------

@dataclass
class CombineResult:
    """A stack: image (float32, NaN where no frame gives a value), inverse variance of its
    background noise (ADU**-2, 0 where uncovered), coverage (frames used per pixel) and the
    number of values each frame lost to the rejection."""

    image: np.ndarray
    inverse_variance: np.ndarray
    coverage: np.ndarray
    rejected: np.ndarray


def _lower_median(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel lower median over axis 0 ignoring NaN, and the number of finite values."""
    n_valid = np.isfinite(values).sum(axis=0)
    ordered = np.sort(values, axis=0)  # NaN sorts last
    index = np.maximum((n_valid - 1) // 2, 0)
    centre = np.take_along_axis(ordered, index[None], axis=0)[0]
    centre[n_valid == 0] = np.nan
    return centre, n_valid


def rejection_mask(values: np.ndarray, noise: np.ndarray, *, scales: np.ndarray,
                   gain_e_per_adu: float, nsigma_low: float = 4.0, nsigma_high: float = 4.0,
                   relative_error: float = 0.1, grow: int = 1) -> np.ndarray:
    """Values that lie too far from the other frames' values: True = rejected.

    The centre is the per-pixel lower median (for two frames, the lower value: cosmic rays,
    satellites and hot pixels are bright, and with two values nothing else can tell which is
    wrong). A value is rejected when it lies more than ``nsigma_high`` (above) or
    ``nsigma_low`` (below) of its expected noise from the centre: the frame's background
    noise, the Poisson noise of the centre's signal and ``relative_error`` times the signal
    (PSF and registration differences near bright stars). The expected noise, not the scatter
    of the few values of one pixel, sets the threshold: with four frames that scatter is
    itself uncertain by 40 %. Rejected values are grown by ``grow`` pixels in their frame
    (the faint edges of a cosmic ray go too).

    Parameters
    ----------
    values : (n_frames, rows, columns) scaled, background-subtracted values; NaN = no data.
    noise : background noise per pixel of each scaled frame, ADU (n_frames).
    scales : photometric scale of each frame (the Poisson term of a scaled value).
    gain_e_per_adu : gain, electrons per ADU.
    nsigma_low, nsigma_high : rejection thresholds, in expected sigma.
    relative_error : fraction of the signal added in quadrature to the expected noise.
    grow : pixels by which rejected values are grown (0: no growth).
    """
    from scipy import ndimage

    values = np.asarray(values, dtype=np.float32)
    centre, _ = _lower_median(values)
    signal = np.where(np.isfinite(centre), np.maximum(centre, np.float32(0.0)), np.float32(0.0))
    systematic = (np.float32(relative_error) * signal) ** 2
    rejected = np.zeros(values.shape, dtype=bool)
    for k in range(values.shape[0]):
        sigma = np.sqrt(np.float32(noise[k]) ** 2 + np.float32(scales[k] / gain_e_per_adu)
                        * signal + systematic)
        with np.errstate(invalid="ignore"):
            deviation = values[k] - centre
            bad = (deviation > nsigma_high * sigma) | (deviation < -nsigma_low * sigma)
        if grow > 0 and bad.any():
            bad = ndimage.binary_dilation(bad, iterations=int(grow))
        rejected[k] = bad & np.isfinite(values[k])
    return rejected


def clip_and_combine(values: np.ndarray, *, noise: np.ndarray, weights: np.ndarray,
                     scales: np.ndarray, gain_e_per_adu: float, nsigma_low: float = 4.0,
                     nsigma_high: float = 4.0, relative_error: float = 0.1, grow: int = 1,
                     clip: bool = True) -> CombineResult:
    """Weighted mean of a stack of scaled frames after rejecting outliers (all in memory).

    Parameters
    ----------
    values : (n_frames, rows, columns) scaled, background-subtracted frames on one grid,
        ADU; NaN = no data.
    noise : background noise per pixel of each scaled frame, ADU.
    weights : weight of each frame (:func:`combine_weights`).
    scales : photometric scale of each frame (for the Poisson term of the rejection).
    gain_e_per_adu : gain, electrons per ADU.
    nsigma_low, nsigma_high, relative_error, grow : see :func:`rejection_mask`.
    clip : reject outliers (False: plain weighted mean of every value).

    Returns a :class:`CombineResult`; ``inverse_variance`` is the inverse of the background
    variance of the weighted mean (``(sum w)**2 / sum(w**2 noise**2)`` over the values used),
    without the correlation between neighbouring pixels that resampling brings.
    """
    return _combine(values, noise=noise, weights=weights, scales=scales,
                    gain_e_per_adu=gain_e_per_adu, nsigma_low=nsigma_low,
                    nsigma_high=nsigma_high, relative_error=relative_error, grow=grow,
                    clip=clip, core=slice(None))


def _combine(values, *, noise, weights, scales, gain_e_per_adu, nsigma_low, nsigma_high,
             relative_error, grow, clip, core: slice) -> CombineResult:
    """:func:`clip_and_combine` of a block of rows, returning only the rows ``core`` (the
    rows around them only serve the growth of rejected values)."""
    values = np.asarray(values, dtype=np.float32)
    n = values.shape[0]
    weights = np.asarray(weights, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if len(weights) != n or len(noise) != n or len(scales) != n:
        raise ValueError("clip_and_combine: one weight, noise and scale per frame")
    if clip:
        rejected = rejection_mask(values, noise, scales=scales, nsigma_low=nsigma_low,
                                  nsigma_high=nsigma_high, relative_error=relative_error,
                                  grow=grow, gain_e_per_adu=gain_e_per_adu)
        rejected = rejected[:, core]
    else:
        rejected = np.zeros(values[:, core].shape, bool)
    values = values[:, core]
    shape = values.shape[1:]
    sum_w = np.zeros(shape, dtype=np.float64)
    sum_wv = np.zeros(shape, dtype=np.float64)
    sum_w2v = np.zeros(shape, dtype=np.float64)
    coverage = np.zeros(shape, dtype=np.int16)
    for k in range(n):
        used = np.isfinite(values[k]) & ~rejected[k]
        sum_w[used] += weights[k]
        sum_wv[used] += weights[k] * values[k][used]
        sum_w2v[used] += weights[k] ** 2 * noise[k] ** 2
        coverage += used
    with np.errstate(invalid="ignore", divide="ignore"):
        image = np.where(sum_w > 0, sum_wv / sum_w, np.nan).astype(np.float32)
        inverse_variance = np.where(sum_w2v > 0, sum_w ** 2 / sum_w2v, 0.0).astype(np.float32)
    return CombineResult(image, inverse_variance, coverage,
                         rejected.reshape(n, -1).sum(axis=1))


def strip_rows(n_frames: int, width: int, *, memory_budget: float, halo: int = 0,
               in_use: float = 0.0) -> int:
    """Rows per strip so that the combine of one strip keeps the process in ``memory_budget``.

    A row costs :data:`BYTES_PER_STACKED_VALUE` per frame and column (the stack of values
    and its working copies) plus :data:`BYTES_PER_OUTPUT_PIXEL` per column (the sums of the
    weighted mean). Raises ``MemoryError`` (with the budget to ask for) if not even one row
    fits.

    Parameters
    ----------
    n_frames : frames in the stack.
    width : columns of the output grid.
    memory_budget : bytes the whole process may use (``config.combine_memory_budget``).
    halo : extra rows read above and below each strip (the growth of rejected values).
    in_use : bytes already taken (the process itself, the result images).
    """
    per_row = int(width) * (int(n_frames) * BYTES_PER_STACKED_VALUE + BYTES_PER_OUTPUT_PIXEL)
    rows = int((memory_budget - in_use) // per_row) - 2 * int(halo)
    if rows < 1:
        need = in_use + per_row * (1 + 2 * int(halo)) * 64
        raise MemoryError(f"combine memory budget {memory_budget / 1e9:.2f} GB is too small for "
                          f"{n_frames} frames of {width} columns while the process uses "
                          f"{in_use / 1e9:.2f} GB: raise config.combine_memory_budget to at "
                          f"least {need / 1e9:.2f} GB")
    return rows


def _npy_rows(path: Path, shape: tuple[int, int]):
    """A reader of row ranges of a float32 ``.npy`` image: ``read(lo, hi, out)``.

    The rows are read with plain file reads, not a memory map: mapped pages would count in
    the process's memory until the map is closed, and the budget would not hold.
    """
    handle = open(path, "rb")  # closed by the caller through read.close
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        file_shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        file_shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if tuple(file_shape) != tuple(shape) or fortran or np.dtype(dtype) != np.float32:
        handle.close()
        raise ValueError(f"{path.name}: {dtype} image of shape {file_shape}, expected float32 "
                         f"of shape {tuple(shape)}")
    offset = handle.tell()
    width = int(shape[1])

    def read(lo: int, hi: int, out: np.ndarray) -> None:
        handle.seek(offset + lo * width * 4)
        handle.readinto(memoryview(out.reshape(-1)).cast("B"))

    read.close = handle.close
    return read


def combine_in_strips(paths: Sequence[str | Path], *, shape: tuple[int, int],
                      memory_budget: float, scales: np.ndarray, noise: np.ndarray,
                      weights: np.ndarray, gain_e_per_adu: float, nsigma_low: float = 4.0,
                      nsigma_high: float = 4.0, relative_error: float = 0.1, grow: int = 1,
                      clip: bool = True,
                      in_use: float | None = None) -> tuple[CombineResult, int]:
    """:func:`clip_and_combine` over resampled frames on disk, a strip of rows at a time.

    Each file is a float32 ``.npy`` image of ``shape`` (background-subtracted, not yet
    scaled; NaN = no data). Only one strip of every frame (plus ``grow`` rows above and
    below, so that the growth of rejected values crosses strip borders) is read into memory
    at once, with as many rows as keep the whole process within ``memory_budget``
    (:func:`strip_rows`). The result equals a combine of the whole stack at once.

    Parameters
    ----------
    paths : the resampled frames (``numpy.save`` files).
    shape : their common shape (rows, columns).
    memory_budget : bytes the whole process may use (``config.combine_memory_budget``).
    scales : photometric scale of each frame (values are multiplied by it).
    noise : background noise per pixel of each frame before scaling, ADU.
    weights, gain_e_per_adu, nsigma_low, nsigma_high, relative_error, grow, clip : see
        :func:`clip_and_combine`.
    in_use : bytes the process already uses (default: measured now).

    Returns ``(result, n_strips)``.
    """
    from datared.reduction import process_memory

    paths = [Path(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise ValueError("combine_in_strips: no frames")
    scales = np.asarray(scales, dtype=np.float64)
    noise_scaled = np.asarray(noise, dtype=np.float64) * scales
    ny, nx = shape
    halo = int(grow) if clip else 0
    in_use = float(process_memory() if in_use is None else in_use)
    results_bytes = ny * nx * BYTES_PER_RESULT_PIXEL
    rows = min(strip_rows(n, nx, memory_budget=memory_budget, halo=halo,
                          in_use=in_use + results_bytes), ny)
    readers = [_npy_rows(path, shape) for path in paths]
    image = np.full(shape, np.nan, dtype=np.float32)
    inverse_variance = np.zeros(shape, dtype=np.float32)
    coverage = np.zeros(shape, dtype=np.int16)
    rejected = np.zeros(n, dtype=np.int64)
    n_strips = 0
    try:
        for start in range(0, ny, rows):
            stop = min(start + rows, ny)
            lo, hi = max(start - halo, 0), min(stop + halo, ny)
            block = np.empty((n, hi - lo, nx), dtype=np.float32)
            for k, read in enumerate(readers):
                read(lo, hi, block[k])
                block[k] *= np.float32(scales[k])
            core = slice(start - lo, start - lo + (stop - start))
            part = _combine(block, noise=noise_scaled, weights=weights, scales=scales,
                            gain_e_per_adu=gain_e_per_adu, nsigma_low=nsigma_low,
                            nsigma_high=nsigma_high, relative_error=relative_error, grow=grow,
                            clip=clip, core=core)
            image[start:stop] = part.image
            inverse_variance[start:stop] = part.inverse_variance
            coverage[start:stop] = part.coverage
            rejected += part.rejected
            n_strips += 1
            del block, part
    finally:
        for read in readers:
            read.close()
    return CombineResult(image, inverse_variance, coverage, rejected), n_strips


# ---------------------------------------------------------------------------------------
# The stack file
# ---------------------------------------------------------------------------------------

def write_stack(path: str | Path, result: CombineResult, wcs: WCS, *,
                header: fits.Header | None = None, frames: Table | None = None) -> Path:
    """Write a stack: float32 image and WCS in the primary HDU, ``WEIGHT`` (inverse variance,
    ADU**-2) and ``COVERAGE`` (frames per pixel) extensions, and the ``FRAMES`` table.

    Parameters
    ----------
    path : output file (overwritten).
    result : the combine.
    wcs : the output grid's WCS.
    header : further cards for the primary header (``OBJECT``, ``FILTER``, ``NCOMBINE``...).
    frames : one row per combined frame (file, scale, weight...), or None.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    primary_header = fits.Header()
    if header is not None:
        primary_header.extend(header, unique=True, update=True)
    primary_header.extend(wcs.celestial.to_header(), unique=True, update=True)
    primary_header["BUNIT"] = "adu"
    hdus = [fits.PrimaryHDU(np.asarray(result.image, dtype=np.float32), header=primary_header)]
    weight_header = wcs.celestial.to_header()
    weight_header["BUNIT"] = "adu-2"
    hdus.append(fits.ImageHDU(np.asarray(result.inverse_variance, dtype=np.float32),
                              header=weight_header, name="WEIGHT"))
    hdus.append(fits.ImageHDU(np.asarray(result.coverage, dtype=np.int16),
                              header=wcs.celestial.to_header(), name="COVERAGE"))
    if frames is not None:
        hdus.append(fits.BinTableHDU(frames, name="FRAMES"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


@dataclass
class Stack:
    """A stack read back: image, header, WCS, inverse-variance and coverage maps, frames."""

    path: Path
    image: np.ndarray
    header: fits.Header
    wcs: WCS
    weight: np.ndarray
    coverage: np.ndarray
    frames: Table | None


def read_stack(path: str | Path) -> Stack:
    """Read a stack written by :func:`write_stack`."""
    path = Path(path)
    with fits.open(path, memmap=False) as hdul:
        image = np.asarray(hdul[0].data, dtype=np.float32)
        header = hdul[0].header.copy()
        weight = np.asarray(hdul["WEIGHT"].data, dtype=np.float32)
        coverage = np.asarray(hdul["COVERAGE"].data)
        frames = Table(hdul["FRAMES"].data) if "FRAMES" in hdul else None
    return Stack(path, image, header, WCS(header).celestial, weight, coverage, frames)


# ---------------------------------------------------------------------------------------
# Checks and colour
# ---------------------------------------------------------------------------------------

def empty_positions(valid: np.ndarray, avoid_xy: np.ndarray, *, radius_px: float,
                    clearance_px: float, n: int, seed: int = 0) -> np.ndarray:
    """Random aperture centres (n, 2: x, y) away from known sources, on covered pixels.

    Parameters
    ----------
    valid : True where an aperture of ``radius_px`` may be centred (covered, not masked).
    avoid_xy : (m, 2) positions of known sources, pixels.
    radius_px : aperture radius, pixels (kept inside the image).
    clearance_px : smallest distance from any source, pixels.
    n : number of positions wanted (fewer if the image has no more room).
    seed : random seed.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    ny, nx = valid.shape
    r = int(math.ceil(radius_px)) + 1
    tree = cKDTree(np.asarray(avoid_xy, dtype=float).reshape(-1, 2)) if len(avoid_xy) else None
    chosen = np.zeros((0, 2))
    for _ in range(20):
        x = rng.uniform(r, nx - 1 - r, 4 * n)
        y = rng.uniform(r, ny - 1 - r, 4 * n)
        ok = valid[np.round(y).astype(int), np.round(x).astype(int)]
        if tree is not None:
            distance, _ = tree.query(np.column_stack([x, y]))
            ok &= distance > clearance_px
        points = np.column_stack([x[ok], y[ok]])
        if len(chosen):  # apertures must not overlap each other
            d, _ = cKDTree(chosen).query(points)
            points = points[d > 2 * radius_px]
        keep = []
        for point in points:
            if all(np.hypot(*(point - q)) > 2 * radius_px for q in keep):
                keep.append(point)
            if len(chosen) + len(keep) >= n:
                break
        if keep:
            chosen = np.vstack([chosen, keep])
        if len(chosen) >= n:
            break
    return chosen[:n]


def aperture_noise(image: np.ndarray, xy: np.ndarray, radius_px: float) -> tuple[float, int]:
    """Sigma-clipped standard deviation of sums in circles at empty positions, ADU.

    The scatter of such sums is the noise a star's aperture really has, including the
    correlation between neighbouring pixels that resampling brings (which the noise per pixel
    misses). Returns ``(noise, number of complete apertures)``.
    """
    from astropy.stats import sigma_clipped_stats

    flux, _ = aperture_fluxes(image, xy[:, 0], xy[:, 1], radius_px)
    flux = flux[np.isfinite(flux)]
    if len(flux) < 3:
        return float("nan"), int(len(flux))
    # Sigma-clipped: faint stars below the catalogue's limit fall in a few apertures.
    return float(sigma_clipped_stats(flux, sigma=4.0, maxiters=3)[2]), int(len(flux))


def zero_point(flux: np.ndarray, mag: np.ndarray, exptime_s: float) -> tuple[float, float, int]:
    """Zero point ``m + 2.5 log10(flux / exptime)`` from catalogue stars: median, robust
    scatter (mag) and number of stars.

    Parameters
    ----------
    flux : aperture fluxes, ADU (NaN or <= 0 ignored).
    mag : catalogue magnitudes in the same filter.
    exptime_s : the exposure time the fluxes refer to, s.
    """
    from astropy.stats import mad_std

    flux = np.asarray(flux, dtype=float)
    mag = np.asarray(mag, dtype=float)
    ok = np.isfinite(flux) & (flux > 0) & np.isfinite(mag)
    if ok.sum() < 3:
        raise ValueError(f"zero_point: only {ok.sum()} usable stars")
    zp = mag[ok] + 2.5 * np.log10(flux[ok] / exptime_s)
    return float(np.median(zp)), float(mad_std(zp)), int(ok.sum())


def channel_factors(zero_points: dict[str, float], exptimes: dict[str, float], *,
                    white_mags: dict[str, float], reference: str) -> dict[str, float]:
    """Factors that put each filter's stack on one flux-density scale, with a chosen white.

    A star of AB magnitude ``m`` gives ``exptime * 10**(-0.4 (m - zp))`` ADU, so multiplying
    a stack by ``10**(-0.4 zp) / exptime`` turns it into ``10**(-0.4 m)``: equal values for a
    flat (AB colour 0) spectrum. Multiplying further by ``10**(0.4 (white_f - white_ref))``
    makes a star with the magnitudes ``white_mags`` (e.g. the Sun's colours) equal in every
    channel, so that it appears white. The reference filter's factor is 1.

    Parameters
    ----------
    zero_points : zero point of each filter's stack, mag.
    exptimes : exposure time each stack's fluxes refer to, s.
    white_mags : magnitudes (any offset) of the star that should look white, per filter.
    reference : the filter whose factor is 1.
    """
    def raw(band):
        return (10 ** (-0.4 * zero_points[band]) / exptimes[band]
                * 10 ** (0.4 * (white_mags[band] - white_mags[reference])))

    ref = raw(reference)
    return {band: float(raw(band) / ref) for band in zero_points}


def common_region(coverages: Sequence[np.ndarray], *,
                  min_fraction: float = 0.999) -> tuple[slice, slice]:
    """The largest centred box of rows and columns that every image covers (almost) fully.

    Rows and columns are trimmed from the edges while fewer than ``min_fraction`` of their
    pixels are covered by all images.

    Parameters
    ----------
    coverages : coverage maps (frames per pixel) of the same shape.
    min_fraction : fraction of covered pixels a kept row or column needs.
    """
    covered = np.logical_and.reduce([np.asarray(c) > 0 for c in coverages])
    r0, r1, c0, c1 = 0, covered.shape[0], 0, covered.shape[1]
    while r1 - r0 > 2 and c1 - c0 > 2:
        box = covered[r0:r1, c0:c1]
        fractions = {"top": box[-1].mean(), "bottom": box[0].mean(),
                     "left": box[:, 0].mean(), "right": box[:, -1].mean()}
        side = min(fractions, key=fractions.get)
        if fractions[side] >= min_fraction:
            break
        if side == "top":
            r1 -= 1
        elif side == "bottom":
            r0 += 1
        elif side == "left":
            c0 += 1
        else:
            c1 -= 1
    return slice(r0, r1), slice(c0, c1)
