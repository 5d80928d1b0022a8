"""Background, detection on a reference frame and fast forced aperture photometry.

The chapter ``notebooks/04-photometry.ipynb`` shows each step on one frame; the functions
here run the same steps on every frame of the night.

Units: images are calibrated frames in ADU (bias, dark and flat removed, so "ADU" means
flat-fielded ADU); positions are 0-based pixel coordinates (``x`` along columns); aperture
radii are given in arcsec and converted with the frame's own WCS.

Column names of a per-frame catalogue, for every aperture radius ``r`` (arcsec) tagged
by :func:`radius_tag` (3.0 arcsec -> ``3p0``):

``sum_<tag>``
    background-subtracted flux inside the aperture, ADU.
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
header values (``DATE-OBS``, ``EXPTIME``, ``AIRMASS``, ``FILTER``, ``OBJECT``,
``PIERSIDE``, ...), the radii (``APRADII``, arcsec), the noise parameters (``EGAIN``,
``RDNOISE``), the median ``FWHM`` (arcsec) and the expected relative scintillation
noise ``SCINT``, which ``sum_err`` does not include.

Masked pixels inside an aperture are filled from their mirror image through the star's
centre when possible (:func:`aperture_photometry_fast`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import QTable, Table

#: Bit of each flag in the integer column ``flags`` (0 means a clean measurement).
FLAG_BITS = {
    "saturated": 1,  # a pixel inside the aperture reached saturation_adu in raw ADU
    "edge": 2,  # the aperture is partly outside the image
    "off_frame": 4,  # the star's position is outside the image: no measurement
    "bad_pixels": 8,  # masked or non-finite pixels in the aperture that could not be filled
    "crowded": 16,  # a neighbour adds more than max_contamination of the flux (reference)
}

#: Header keywords copied from a frame into its catalogue's metadata (when present).
HEADER_KEYS = ("DATE-OBS", "EXPTIME", "AIRMASS", "FILTER", "OBJECT", "PIERSIDE", "GAIN",
               "OFFSET", "XBINNING", "YBINNING", "RA", "DEC", "CCD-TEMP", "IMAGETYP",
               "MJD-OBS", "JD")

GAUSSIAN_SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


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
# Background
# ---------------------------------------------------------------------------------------

@dataclass
class BackgroundModel:
    """A frame's background map, its noise map and the uncertainty of the map itself (ADU)."""

    background: np.ndarray
    rms: np.ndarray
    error: np.ndarray
    box_size: int
    filter_size: int

    @property
    def median(self) -> float:
        """Median background level, ADU per pixel (every 4th pixel: the map is smooth)."""
        return float(np.median(self.background[::4, ::4]))

    @property
    def rms_median(self) -> float:
        """Median pixel-to-pixel noise of the background, ADU (every 4th pixel)."""
        return float(np.median(self.rms[::4, ::4]))


def estimate_background(data: np.ndarray, box_size: int = 64, filter_size: int = 3,
                        mask: np.ndarray | None = None, source_nsigma: float = 2.0,
                        dilate_pixels: int = 4) -> BackgroundModel:
    """Background and noise maps with photutils ``Background2D``, stars masked (two passes).

    The first pass estimates the background with sigma clipping only; pixels more than
    ``source_nsigma`` times the noise above it (grown by ``dilate_pixels``) are then
    masked and the background is estimated again, so that star wings do not lift it.

    Parameters
    ----------
    data : calibrated image, ADU.
    box_size : side of the boxes in which the background is estimated, pixels.
    filter_size : side of the median filter applied to the grid of boxes, in boxes.
    mask : True for pixels to ignore (bad pixels).
    source_nsigma : threshold for masking sources before the second pass, in noise sigma.
    dilate_pixels : how far the source mask is grown, pixels.

    Returns a :class:`BackgroundModel` whose ``error`` approximates the 1-sigma
    uncertainty of the background map itself (it enters every aperture coherently).
    """
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground, StdBackgroundRMS
    from scipy import ndimage

    data = np.asarray(data)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    box = int(min(box_size, *data.shape))

    def _run(pixel_mask):
        return Background2D(data, box, mask=pixel_mask, filter_size=(filter_size, filter_size),
                            sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
                            bkg_estimator=MedianBackground(), bkg_rms_estimator=StdBackgroundRMS(),
                            exclude_percentile=80.0)

    first = _run(bad if bad.any() else None)
    # For the source mask the coarse grid of box values is enough (no interpolation).
    rows = np.minimum(np.arange(data.shape[0]) // box, first.background_mesh.shape[0] - 1)
    cols = np.minimum(np.arange(data.shape[1]) // box, first.background_mesh.shape[1] - 1)
    coarse = first.background_mesh[np.ix_(rows, cols)]
    coarse_rms = first.background_rms_mesh[np.ix_(rows, cols)]
    with np.errstate(invalid="ignore"):
        above = (data - coarse) > source_nsigma * coarse_rms
    # Only groups of >= 5 connected pixels count as sources: masking single noise peaks
    # would cut the top of the noise distribution and bias the background low.
    labels, n_groups = ndimage.label(above)
    group_size = np.bincount(labels.ravel(), minlength=n_groups + 1)
    group_size[0] = 0
    sources = group_size[labels] >= 5
    if dilate_pixels > 0:
        sources = ndimage.binary_dilation(sources, iterations=int(dilate_pixels))
    try:
        second = _run(bad | sources)
    except ValueError:
        # So crowded that no box keeps 20 % of its pixels: keep the sigma-clipped first pass.
        second, sources = first, np.zeros_like(sources)
    background = np.asarray(second.background, dtype=np.float64)
    rms = np.asarray(second.background_rms, dtype=np.float64)
    # A box median of n pixels scatters by sqrt(pi/2) * rms / sqrt(n); the median filter over
    # filter_size**2 boxes is again a median (another factor pi/2 in variance); the spline
    # interpolation between boxes smooths a little more, which we neglect (conservative).
    # tests/test_photometry.py checks this against pure-noise images.
    n_box = box * box * (1.0 - float(np.mean(bad | sources)))
    efficiency = math.pi / 2.0 / (filter_size * filter_size) if filter_size > 1 else 1.0
    error = rms * math.sqrt(math.pi / 2.0 / max(n_box, 1.0) * efficiency)
    return BackgroundModel(background, rms, error, box, filter_size)


# ---------------------------------------------------------------------------------------
# Detection on the reference frame
# ---------------------------------------------------------------------------------------

def convolve_for_detection(data_sub: np.ndarray, fwhm_pix: float,
                           mask: np.ndarray | None = None) -> np.ndarray:
    """Background-subtracted image smoothed with a Gaussian of the seeing FWHM (matched filter).

    Parameters
    ----------
    data_sub : background-subtracted image, ADU.
    fwhm_pix : expected stellar FWHM, pixels.
    mask : True for pixels to ignore (set to zero before smoothing).
    """
    from photutils.segmentation import make_2dgaussian_kernel
    from scipy import ndimage

    size = 2 * int(math.ceil(1.5 * fwhm_pix)) + 1
    kernel = make_2dgaussian_kernel(fwhm_pix, size=size).array
    image = np.where(np.isfinite(data_sub), data_sub, 0.0)
    if mask is not None:
        image = np.where(mask, 0.0, image)
    # The Gaussian kernel is the product of a column and a row profile: two 1D passes give
    # the same result as the 2D convolution, several times faster.
    rows = ndimage.convolve1d(image, kernel.sum(axis=0), axis=1, mode="constant", cval=0.0)
    return ndimage.convolve1d(rows, kernel.sum(axis=1), axis=0, mode="constant", cval=0.0)


def contamination(x: np.ndarray, y: np.ndarray, flux: np.ndarray, radius_pix: float,
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
    sigma = fwhm_pix / GAUSSIAN_SIGMA_TO_FWHM
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


def too_sharp(peak: np.ndarray, flux: np.ndarray, fwhm_pix: float, noise: np.ndarray | float,
              factor: float = 3.0, nsigma: float = 5.0) -> np.ndarray:
    """True for sources whose brightest pixel is too high for a star of their flux (cosmic rays).

    A star of flux F and FWHM f puts about ``0.88 F / f**2`` (Gaussian) into its brightest
    pixel; a cosmic ray puts most of its charge in one or a few pixels. A source is too
    sharp when its peak exceeds ``factor`` times that plus ``nsigma`` times the noise.

    Parameters
    ----------
    peak : brightest background-subtracted pixel of each source, ADU.
    flux : flux of each source, ADU.
    fwhm_pix : stellar FWHM on the frame, pixels.
    noise : background noise per pixel at each source, ADU.
    factor : tolerance on the peak of a star (seeing varies, the Gaussian is approximate).
    nsigma : tolerance for noise, in units of ``noise``.
    """
    star_peak = 4.0 * math.log(2.0) / math.pi / float(fwhm_pix) ** 2 * np.asarray(flux, float)
    return np.asarray(peak, float) > factor * np.clip(star_peak, 0, None) + nsigma * np.asarray(noise)


def detect_stars(data: np.ndarray, background: BackgroundModel, fwhm_pix: float, *,
                 wcs=None, mask: np.ndarray | None = None, nsigma: float = 3.0,
                 n_pixels: int = 5, deblend: bool = True, gain_e_per_adu: float = 1.0,
                 min_snr: float = 10.0, reject_sharp: bool = True) -> QTable:
    """Detect stars and measure windowed centroids (photutils segmentation), brightest first.

    Steps (as in the chapter): subtract the background, smooth with a Gaussian of the
    seeing FWHM, keep connected groups of at least ``n_pixels`` pixels above ``nsigma``
    times the background noise, split blends (``deblend_sources``), measure each
    source with ``SourceCatalog`` and keep those with segment S/N >= ``min_snr`` that are
    not sharper than a star (:func:`too_sharp`: cosmic rays).

    Parameters
    ----------
    data : calibrated image, ADU.
    background : the frame's :class:`BackgroundModel`.
    fwhm_pix : expected stellar FWHM, pixels.
    wcs : the frame's WCS; gives the column ``sky_centroid_win`` (SkyCoord).
    mask : True for pixels to ignore.
    nsigma : detection threshold per pixel, in units of the background noise.
    n_pixels : minimum number of connected pixels of a source.
    deblend : split touching sources.
    gain_e_per_adu : gain, electrons per ADU (for the Poisson part of the flux error).
    min_snr : flux cut: minimum segment flux over its uncertainty.
    reject_sharp : drop sources sharper than a star (cosmic rays, hot pixels).
    """
    from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources
    from photutils.utils import calc_total_error

    data_sub = np.asarray(data, dtype=np.float64) - background.background
    bad = ~np.isfinite(data_sub)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    convolved = convolve_for_detection(data_sub, fwhm_pix, bad)
    segments = detect_sources(convolved, threshold=nsigma * background.rms, n_pixels=n_pixels,
                              mask=bad)
    columns = ["label", "x_centroid_win", "y_centroid_win", "segment_flux", "segment_flux_err",
               "max_value", "fwhm", "ellipticity", "area"]
    if segments is None:
        table = QTable(names=["id"] + columns[1:], dtype=[int] + [float] * (len(columns) - 1))
        table["snr"] = np.zeros(0)
        return table
    if deblend:
        segments = deblend_sources(convolved, segments, n_pixels=n_pixels, n_levels=32,
                                   contrast=0.001, progress_bar=False)
    error = calc_total_error(np.where(bad, 0.0, data_sub), bkg_error=background.rms,
                             effective_gain=gain_e_per_adu)
    catalog = SourceCatalog(np.where(bad, 0.0, data_sub), segments, convolved_data=convolved,
                            error=error, mask=bad, wcs=wcs)
    if wcs is not None:
        columns.insert(3, "sky_centroid_win")
    table = catalog.to_table(columns=columns)
    table.meta.clear()  # photutils' settings (dicts, tuples) do not fit in a FITS header
    table.rename_column("label", "segment_label")
    for name in ("fwhm", "area"):
        table[name] = np.asarray(getattr(table[name], "value", table[name]), dtype=float)
    table["snr"] = np.asarray(table["segment_flux"] / table["segment_flux_err"], dtype=float)
    x = np.asarray(table["x_centroid_win"], dtype=float)
    y = np.asarray(table["y_centroid_win"], dtype=float)
    good = np.isfinite(x) & np.isfinite(y) & (table["snr"] >= min_snr)
    if reject_sharp:
        iy = np.clip(np.round(np.nan_to_num(y)).astype(int), 0, data_sub.shape[0] - 1)
        ix = np.clip(np.round(np.nan_to_num(x)).astype(int), 0, data_sub.shape[1] - 1)
        good &= ~too_sharp(np.asarray(table["max_value"], dtype=float),
                           np.asarray(table["segment_flux"], dtype=float), fwhm_pix,
                           background.rms[iy, ix])
    table = table[good]
    table.sort("segment_flux", reverse=True)
    table.add_column(np.arange(1, len(table) + 1), name="id", index=0)
    return table


# ---------------------------------------------------------------------------------------
# Forced aperture photometry
# ---------------------------------------------------------------------------------------

def _cutout(array, iy, ix):
    """Stack of cut-outs ``array[iy[n, :, None], ix[n, None, :]]`` or a scalar unchanged."""
    if np.ndim(array) == 0:
        return float(array)
    return np.asarray(array)[iy[:, :, None], ix[:, None, :]]


def aperture_weights(x: np.ndarray, y: np.ndarray, radii_pix: Sequence[float],
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
                             radii_pix: Sequence[float], background: np.ndarray | float = 0.0,
                             *, variance: np.ndarray | None = None,
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
    and per star ``off_frame``.

    Parameters
    ----------
    data : image, ADU.
    x, y : aperture centres, pixels (0-based).
    radii_pix : aperture radii, pixels.
    background : background map or level, ADU per pixel.
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
    weights, x0, y0 = aperture_weights(xs, ys, radii, size)
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


def ccd_variance(gain_e_per_adu: float, read_noise_e: float, flat: np.ndarray | float = 1.0,
                 dark_adu: np.ndarray | float = 0.0):
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


def saturation_level(saturation_adu: float, bias_adu: np.ndarray | float = 0.0,
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
                      radii_arcsec: Sequence[float], pixel_scale_arcsec: float,
                      background: BackgroundModel, *, gain_e_per_adu: float,
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
    background : the frame's :class:`BackgroundModel`.
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
        data, x, y, radii_pix, background.background,
        variance=ccd_variance(gain_e_per_adu, read_noise_e, flat, dark_adu),
        background_error=background.error,
        saturation=saturation_level(saturation_adu, bias_adu, dark_adu, flat), mask=mask,
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
# Star sizes (optional): circular Gaussian fits
# ---------------------------------------------------------------------------------------

def fit_gaussian_fwhm(data_sub: np.ndarray, x: np.ndarray, y: np.ndarray,
                      box_size: int = 15) -> np.ndarray:
    """FWHM of each star from a circular 2D Gaussian fit to a cut-out, pixels (NaN if it fails).

    Parameters
    ----------
    data_sub : background-subtracted image, ADU.
    x, y : star positions, pixels (0-based).
    box_size : side of the cut-out, pixels.
    """
    from scipy.optimize import least_squares

    data_sub = np.asarray(data_sub, dtype=np.float64)
    ny, nx = data_sub.shape
    half = box_size // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    fwhm = np.full(len(np.atleast_1d(x)), np.nan)
    for n, (xc, yc) in enumerate(zip(np.atleast_1d(x), np.atleast_1d(y), strict=True)):
        if not (np.isfinite(xc) and np.isfinite(yc)):
            continue
        ix, iy = int(round(xc)), int(round(yc))
        if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
            continue
        cut = data_sub[iy - half:iy + half + 1, ix - half:ix + half + 1]
        if not np.all(np.isfinite(cut)) or cut.max() <= 0:
            continue
        gx, gy = xx + ix, yy + iy

        def residual(p, cut=cut, gx=gx, gy=gy):
            amp, x0, y0, sigma, offset = p
            model = amp * np.exp(-((gx - x0) ** 2 + (gy - y0) ** 2) / (2 * sigma ** 2))
            return (model + offset - cut).ravel()

        start = [cut.max(), xc, yc, 1.5, 0.0]
        lower = [0.0, xc - 3, yc - 3, 0.3, -np.inf]
        upper = [np.inf, xc + 3, yc + 3, box_size, np.inf]
        try:
            fit = least_squares(residual, start, bounds=(lower, upper), x_scale="jac")
        except ValueError:
            continue
        if fit.success and 0.3 < fit.x[3] < box_size / 2:
            fwhm[n] = GAUSSIAN_SIGMA_TO_FWHM * fit.x[3]
    return fwhm


def psf_stars(table, saturation: float, n_max: int = 25, edge_pix: float = 10.0,
              shape: tuple[int, int] | None = None, min_separation_pix: float = 15.0) -> np.ndarray:
    """Indices of bright, unsaturated, isolated stars of a detection table (for FWHM fits).

    Parameters
    ----------
    table : output of :func:`detect_stars` (brightest first).
    saturation : peak (background-subtracted) value above which a star is skipped, ADU.
    n_max : at most this many stars.
    edge_pix : minimum distance from the image edges, pixels.
    shape : image shape (ny, nx) for the edge test.
    min_separation_pix : minimum distance to any other detected source, pixels.
    """
    from scipy.spatial import cKDTree

    x = np.asarray(table["x_centroid_win"], dtype=float)
    y = np.asarray(table["y_centroid_win"], dtype=float)
    peak = np.asarray(getattr(table["max_value"], "value", table["max_value"]), dtype=float)
    keep = peak < 0.8 * saturation
    if shape is not None:
        keep &= ((x > edge_pix) & (y > edge_pix) & (x < shape[1] - edge_pix)
                 & (y < shape[0] - edge_pix))
    if len(x) > 1:
        distance, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
        keep &= distance[:, 1] > min_separation_pix
    return np.flatnonzero(keep)[:n_max]


# ---------------------------------------------------------------------------------------
# Frames on disk
# ---------------------------------------------------------------------------------------

@dataclass
class Frame:
    """A calibrated frame read from disk: image, header, celestial WCS (or None) and mask."""

    path: Path
    data: np.ndarray
    header: object
    wcs: object
    mask: np.ndarray | None

    @property
    def pixel_scale_arcsec(self) -> float:
        """Pixel scale from the WCS, arcsec per pixel (geometric mean of both axes)."""
        from astropy.wcs.utils import proj_plane_pixel_scales

        scales = proj_plane_pixel_scales(self.wcs.celestial) * 3600.0
        return float(np.sqrt(scales[0] * scales[1]))


def read_frame(path: str | Path) -> Frame:
    """Read a calibrated frame with its WCS (None if the header has none) and MASK extension.

    Parameters
    ----------
    path : FITS file (image in the primary HDU, optional ``MASK`` extension).
    """
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyWarning
    from astropy.wcs import WCS, FITSFixedWarning

    path = Path(path)
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        header = hdul[0].header.copy()
        mask = None
        if "MASK" in hdul:
            mask = np.asarray(hdul["MASK"].data).astype(bool)
    if data.ndim != 2:
        raise ValueError(f"{path}: expected a 2D image in the primary HDU, found shape "
                         f"{data.shape}; write calibrated frames as single images")
    with warnings.catch_warnings():
        # Acquisition software writes non-standard cards (e.g. DATE-OBS without time zone);
        # astropy repairs them and says so with these two warning classes.
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", VerifyWarning)
        wcs = WCS(header)
    if not wcs.has_celestial:
        wcs = None
    return Frame(path, data, header, wcs, mask)


def has_celestial_wcs(header) -> bool:
    """True if a FITS header holds a celestial WCS (e.g. written by the astrometry chapter).

    Parameters
    ----------
    header : FITS header.
    """
    from astropy.io.fits.verify import VerifyWarning
    from astropy.wcs import WCS, FITSFixedWarning

    if "CTYPE1" not in header or "CTYPE2" not in header:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", VerifyWarning)
        return bool(WCS(header).has_celestial)


def night_header_keys() -> dict[str, str]:
    """Catalogue-metadata name (NINA's spelling) -> header keyword of this night (config.py)."""
    import config

    return {"DATE-OBS": config.date_key, "EXPTIME": config.exptime_key,
            "AIRMASS": config.airmass_key, "FILTER": config.filter_key,
            "OBJECT": config.object_key, "PIERSIDE": config.pierside_key,
            "XBINNING": config.xbinning_key, "YBINNING": config.ybinning_key,
            "RA": config.ra_key, "DEC": config.dec_key, "IMAGETYP": config.imagetyp_key}


def header_meta(header, keys: Sequence[str] = HEADER_KEYS,
                aliases: dict[str, str] | None = None) -> dict:
    """The frame header values worth keeping in a catalogue's metadata (keys present only).

    The metadata always uses NINA's names (``DATE-OBS``, ``EXPTIME``, ...), whatever the
    camera software wrote, so later chapters read every night's catalogues the same way.

    Parameters
    ----------
    header : FITS header of the frame.
    keys : metadata names to fill.
    aliases : metadata name -> header keyword where they differ (default: from config.py).
    """
    aliases = night_header_keys() if aliases is None else aliases
    meta = {}
    for key in keys:
        source = aliases.get(key, key)
        if source in header:
            meta[key] = header[source]
    return meta


def scintillation_sigma(aperture_mm: float, airmass: float, exptime_s: float,
                        height_m: float = 0.0) -> float:
    """Young's (1967) scintillation noise, relative flux sigma (common estimate, +-50 %).

    Parameters
    ----------
    aperture_mm : telescope aperture diameter, mm.
    airmass : airmass of the observation.
    exptime_s : exposure time, s.
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


def match_to_catalog(sky, reference_sky, max_sep_arcsec: float = 1.0):
    """Index of the nearest reference position and whether it is within ``max_sep_arcsec``.

    Parameters
    ----------
    sky : SkyCoord positions to match.
    reference_sky : SkyCoord positions of the reference catalogue.
    max_sep_arcsec : largest separation that counts as a match, arcsec.
    """
    import astropy.units as u

    index, separation, _ = sky.match_to_catalog_sky(reference_sky)
    return index, separation.to_value(u.arcsec) < max_sep_arcsec, separation.to_value(u.arcsec)


def synthetic_star_field(shape: tuple[int, int] = (256, 256), n_stars: int = 50,
                         fwhm_pix: float = 3.5, sky_adu: float = 200.0,
                         gain_e_per_adu: float = 1.0, read_noise_e: float = 5.0,
                         flux_range_adu: tuple[float, float] = (2e3, 2e5), margin: float = 8.0,
                         seed: int = 0, noise: bool = True) -> tuple[np.ndarray, Table]:
    """A noisy image of Gaussian stars on a flat sky, for unit tests and benchmarks.

    Returns ``(image, stars)`` with ``stars`` columns ``x``, ``y`` (pixels) and ``flux`` (ADU).

    Parameters
    ----------
    shape : image shape (ny, nx), pixels.
    n_stars : number of stars.
    fwhm_pix : Gaussian FWHM, pixels.
    sky_adu : sky level, ADU per pixel.
    gain_e_per_adu : gain for the Poisson noise, electrons per ADU.
    read_noise_e : read noise, electrons.
    flux_range_adu : range of total star fluxes (log-uniform), ADU.
    margin : minimum distance of a star from the edges, pixels.
    seed : random seed.
    noise : add Poisson and read noise.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = rng.uniform(margin, nx - 1 - margin, n_stars)
    y = rng.uniform(margin, ny - 1 - margin, n_stars)
    flux = np.exp(rng.uniform(*np.log(flux_range_adu), n_stars))
    sigma = fwhm_pix / GAUSSIAN_SIGMA_TO_FWHM
    image = np.full(shape, float(sky_adu))
    half = int(math.ceil(5 * sigma))
    for xc, yc, f in zip(x, y, flux, strict=True):
        x0, x1 = max(int(xc) - half, 0), min(int(xc) + half + 2, nx)
        y0, y1 = max(int(yc) - half, 0), min(int(yc) + half + 2, ny)
        # Pixel-integrated Gaussian (error functions), so fluxes are exact.
        from scipy.special import erf

        ex = np.arange(x0, x1 + 1) - 0.5 - xc
        ey = np.arange(y0, y1 + 1) - 0.5 - yc
        px = np.diff(0.5 * erf(ex / (math.sqrt(2) * sigma)))
        py = np.diff(0.5 * erf(ey / (math.sqrt(2) * sigma)))
        image[y0:y1, x0:x1] += f * np.outer(py, px)
    if noise:
        electrons = rng.poisson(np.clip(image, 0, None) * gain_e_per_adu).astype(float)
        electrons += rng.normal(0.0, read_noise_e, shape)
        image = electrons / gain_e_per_adu
    return image.astype(np.float32), Table({"x": x, "y": y, "flux": flux})


# ---------------------------------------------------------------------------------------
# The calibration frames behind the noise model, and one frame from file to catalogue
# ---------------------------------------------------------------------------------------

@dataclass
class CalibrationTerms:
    """What the calibration removed from a frame, for the noise equation and saturation (ADU)."""

    bias: np.ndarray | float
    dark: np.ndarray | float
    flat: np.ndarray | float
    note: str = ""


def _master_dark_exptime(path: Path, exptime_key: str) -> float:
    """Exposure time of a master dark, from its header or its file name (masterdark_<t>s)."""
    from astropy.io import fits

    header = fits.getheader(path)
    if exptime_key in header:
        return float(header[exptime_key])
    stem = path.stem
    if stem.startswith("masterdark_") and stem.endswith("s"):
        return float(stem[len("masterdark_"):-1])
    raise ValueError(f"{path}: no {exptime_key} keyword and no exposure time in the file name; "
                     "rerun notebooks/02-pre-reduction.ipynb to rewrite the master darks")


def load_calibration_terms(work_dir: str | Path, filter_name: str, exptime: float,
                           exptime_key: str = "EXPTIME") -> CalibrationTerms:
    """Master bias, dark signal for ``exptime`` and master flat of ``filter_name`` from work_dir.

    The dark is chosen and scaled as chapter 02 did (:func:`datared.reduction.choose_dark`).
    A missing master bias or flat raises an error naming chapter 02; no master dark means
    no dark signal (zero).

    Parameters
    ----------
    work_dir : work folder with ``masterbias.fits``, ``masterdark*.fits``,
        ``masterflat_<filter>.fits``.
    filter_name : filter of the frame.
    exptime : exposure time of the frame, s.
    exptime_key : header keyword of the exposure time, s.
    """
    from astropy.io import fits

    from datared.io import require
    from datared.reduction import choose_dark

    work_dir = Path(work_dir)
    bias = fits.getdata(require(work_dir / "masterbias.fits", chapter="02-pre-reduction"))
    flat = fits.getdata(require(work_dir / f"masterflat_{filter_name}.fits",
                                chapter="02-pre-reduction"))
    darks = {_master_dark_exptime(p, exptime_key): p for p in sorted(work_dir.glob("masterdark*.fits"))}
    dark_exptime, scale = choose_dark(darks, float(exptime))
    if dark_exptime is None:
        dark, note = 0.0, "no master dark: dark signal taken as zero"
    else:
        factor = float(exptime) / dark_exptime if scale else 1.0
        dark = fits.getdata(darks[dark_exptime]).astype(np.float64) * factor
        note = f"{darks[dark_exptime].name} x {factor:g}"
    return CalibrationTerms(bias.astype(np.float64), dark, flat.astype(np.float64), note)


def frame_quality(frame: Frame, fwhm_guess_pix: float, saturation: float = np.inf,
                  nsigma: float = 5.0, n_fit: int = 20) -> dict:
    """Depth and sharpness of a frame, to choose the reference frame.

    Returns ``n_sources`` (groups of >= 5 pixels above ``nsigma`` times the noise in the
    smoothed image), ``fwhm_pix`` (median Gaussian FWHM of up to ``n_fit`` bright isolated
    stars), ``sky_adu`` and ``sky_rms_adu``.

    Parameters
    ----------
    frame : a frame from :func:`read_frame`.
    fwhm_guess_pix : expected FWHM for the smoothing kernel, pixels.
    saturation : calibrated level above which a star's peak is not used, ADU.
    nsigma : detection threshold, in units of the background noise.
    n_fit : number of stars fitted for the FWHM.
    """
    from astropy.stats import sigma_clipped_stats
    from photutils.segmentation import detect_sources
    from scipy import ndimage

    bad = ~np.isfinite(frame.data) if frame.mask is None else (frame.mask | ~np.isfinite(frame.data))
    # A global sigma-clipped level from every 3rd pixel is enough to rank frames, and much
    # faster than a background map.
    _, sky, sky_rms = sigma_clipped_stats(frame.data[::3, ::3], mask=bad[::3, ::3], sigma=3.0)
    data_sub = frame.data - sky
    convolved = convolve_for_detection(data_sub, fwhm_guess_pix, bad)
    segments = detect_sources(convolved, threshold=nsigma * sky_rms, n_pixels=5, mask=bad)
    result = {"n_sources": 0, "fwhm_pix": np.nan, "sky_adu": float(sky),
              "sky_rms_adu": float(sky_rms)}
    if segments is None:
        return result
    labels = segments.labels
    clean = np.where(bad, 0.0, data_sub)
    flux = np.asarray(ndimage.sum_labels(clean, segments.data, labels))
    peak = np.asarray(ndimage.maximum(clean, segments.data, labels))
    centre = np.array(ndimage.center_of_mass(np.clip(clean, 0, None), segments.data, labels))
    stars = Table({"x_centroid_win": centre[:, 1], "y_centroid_win": centre[:, 0],
                   "max_value": peak, "segment_flux": flux})
    stars.sort("segment_flux", reverse=True)
    chosen = psf_stars(stars, saturation, n_max=n_fit, shape=frame.data.shape,
                       min_separation_pix=4 * fwhm_guess_pix)
    box = 2 * int(math.ceil(2 * fwhm_guess_pix)) + 1
    fwhm = fit_gaussian_fwhm(clean, stars["x_centroid_win"][chosen],
                             stars["y_centroid_win"][chosen], box_size=box)
    result["n_sources"] = len(labels)
    result["fwhm_pix"] = float(np.nanmedian(fwhm)) if np.isfinite(fwhm).any() else np.nan
    return result


def choose_reference(quality: Table, depth_fraction: float = 0.9) -> int:
    """Row of the reference frame: the sharpest among the frames nearly as deep as the deepest.

    Parameters
    ----------
    quality : table with columns ``n_sources`` and ``fwhm_pix`` (one row per frame).
    depth_fraction : a frame is a candidate if it has at least this fraction of the largest
        number of detected sources.
    """
    n_sources = np.asarray(quality["n_sources"], dtype=float)
    if len(n_sources) == 0 or n_sources.max() <= 0:
        raise ValueError("no frame has detected sources: check the frames and the detection "
                         "threshold before choosing a reference frame")
    fwhm = np.asarray(quality["fwhm_pix"], dtype=float)
    candidates = np.flatnonzero(n_sources >= depth_fraction * n_sources.max())
    finite = candidates[np.isfinite(fwhm[candidates])]
    if len(finite) == 0:
        return int(candidates[np.argmax(n_sources[candidates])])
    return int(finite[np.argmin(fwhm[finite])])


def measure_frame(frame: Frame, reference: QTable, radii_arcsec: Sequence[float], *,
                  calibration: CalibrationTerms, gain_e_per_adu: float, read_noise_e: float,
                  saturation_adu: float, box_size: int = 64, filter_size: int = 3,
                  header_keys: Sequence[str] = HEADER_KEYS, fwhm_stars: int = 0,
                  aperture_mm: float | None = None, height_m: float = 0.0) -> Table:
    """Forced photometry of one frame at the reference catalogue's sky positions.

    Raises ``ValueError`` (with the reason) if the frame has no WCS or none of the
    reference positions falls on it; the caller logs and skips such frames.

    Parameters
    ----------
    frame : frame from :func:`read_frame`.
    reference : reference catalogue with ``id``, ``sky_centroid_win`` and ``crowded``.
    radii_arcsec : aperture radii, arcsec.
    calibration : the frame's :class:`CalibrationTerms`.
    gain_e_per_adu, read_noise_e : detector gain (e/ADU) and read noise (e).
    saturation_adu : raw saturation level, ADU.
    box_size, filter_size : ``Background2D`` box (pixels) and filter (boxes).
    header_keys : header keywords copied into the table metadata.
    fwhm_stars : fit a Gaussian to this many bright unflagged stars and store the median
        FWHM (arcsec) in the metadata as ``FWHM`` (0: skip).
    aperture_mm, height_m : telescope aperture (mm) and site height (m) for the expected
        scintillation noise in the metadata (``SCINT``, relative flux sigma); None: skip.
    """
    if frame.wcs is None:
        raise ValueError(f"{frame.path.name}: no WCS in the header (chapter 03-astrometry did "
                         "not solve it); rerun that chapter or leave the frame out")
    x, y = world_to_frame(frame.wcs, reference["sky_centroid_win"])
    ny, nx = frame.data.shape
    on_frame = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    if not on_frame.any():
        raise ValueError(f"{frame.path.name}: none of the reference positions falls on this "
                         "frame (another field, or a wrong WCS); check its OBJECT and WCS")
    background = estimate_background(frame.data, box_size=box_size, filter_size=filter_size,
                                     mask=frame.mask)
    crowded = reference["crowded"] if "crowded" in reference.colnames else None
    table = forced_photometry(frame.data, x, y, radii_arcsec, frame.pixel_scale_arcsec,
                              background, gain_e_per_adu=gain_e_per_adu,
                              read_noise_e=read_noise_e, flat=calibration.flat,
                              dark_adu=calibration.dark, bias_adu=calibration.bias,
                              saturation_adu=saturation_adu, mask=frame.mask, crowded=crowded)
    table.add_column(np.asarray(reference["id"]), name="id", index=0)
    meta = header_meta(frame.header, header_keys)
    meta.update(table.meta)
    meta["FRAME"] = frame.path.name
    meta["NONFRAME"] = int(on_frame.sum())
    meta["CALIB"] = calibration.note[:68]
    if fwhm_stars > 0:
        candidates = np.flatnonzero(table["flags"] == 0)
        brightest = candidates[np.argsort(-np.nan_to_num(
            np.asarray(table[f"sum_{radius_tag(max(radii_arcsec))}"])[candidates], nan=-np.inf))]
        chosen = brightest[:fwhm_stars]
        box = 2 * int(math.ceil(max(radii_arcsec) / frame.pixel_scale_arcsec)) + 1
        fwhm = fit_gaussian_fwhm(frame.data - background.background, x[chosen], y[chosen],
                                 box_size=box)
        meta["FWHM"] = (float(np.nanmedian(fwhm) * frame.pixel_scale_arcsec)
                        if np.isfinite(fwhm).any() else -1.0)
    if aperture_mm is not None and "AIRMASS" in meta and "EXPTIME" in meta:
        meta["SCINT"] = scintillation_sigma(aperture_mm, float(meta["AIRMASS"]),
                                            float(meta["EXPTIME"]), height_m)
    table.meta = meta
    return table


def reference_catalog(frame: Frame, fwhm_pix: float, max_radius_arcsec: float, *,
                      gain_e_per_adu: float, nsigma: float = 3.0, n_pixels: int = 5,
                      min_snr: float = 10.0, max_contamination: float = 0.01,
                      box_size: int = 64, filter_size: int = 3,
                      header_keys: Sequence[str] = HEADER_KEYS) -> QTable:
    """Reference catalogue of one frame: :func:`detect_stars` plus crowding and metadata.

    Adds ``contamination`` (fraction of a star's flux in the largest aperture that comes
    from detected neighbours, Gaussian PSF of ``fwhm_pix``) and ``crowded`` (above
    ``max_contamination``).

    Parameters
    ----------
    frame : the reference frame (with a WCS).
    fwhm_pix : stellar FWHM on this frame, pixels.
    max_radius_arcsec : largest aperture radius used later, arcsec.
    gain_e_per_adu : gain, electrons per ADU.
    nsigma, n_pixels, min_snr : detection threshold (noise sigma), minimum source size
        (pixels) and flux cut (segment S/N), see :func:`detect_stars`.
    max_contamination : contamination above which a star is flagged crowded (fraction).
    box_size, filter_size : ``Background2D`` box (pixels) and filter (boxes).
    header_keys : header keywords copied into the metadata.
    """
    if frame.wcs is None:
        raise ValueError(f"{frame.path.name}: the reference frame needs a WCS; choose a frame "
                         "that notebooks/03-astrometry.ipynb solved")
    background = estimate_background(frame.data, box_size=box_size, filter_size=filter_size,
                                     mask=frame.mask)
    table = detect_stars(frame.data, background, fwhm_pix, wcs=frame.wcs, mask=frame.mask,
                         nsigma=nsigma, n_pixels=n_pixels, gain_e_per_adu=gain_e_per_adu,
                         min_snr=min_snr)
    radius_pix = max_radius_arcsec / frame.pixel_scale_arcsec
    table["contamination"] = contamination(table["x_centroid_win"], table["y_centroid_win"],
                                           table["segment_flux"], radius_pix, fwhm_pix)
    table["crowded"] = table["contamination"] > max_contamination
    table.meta.update(header_meta(frame.header, header_keys))
    table.meta.update({"FRAME": frame.path.name, "FWHMPIX": float(fwhm_pix),
                       "PIXSCALE": frame.pixel_scale_arcsec, "NSIGMA": float(nsigma),
                       "MINSNR": float(min_snr), "MAXCONT": float(max_contamination),
                       "BKGBOX": int(box_size), "BKGFILT": int(filter_size)})
    return table


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
