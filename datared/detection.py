"""Star detection for every chapter: background, detection, windowed centroids, FWHM.

One :func:`detect_stars` serves astrometry (a few hundred well-measured stars per frame, fast
on full-size frames) and photometry (the reference catalogue of a field). It is built on
``sep``, the library version of Source Extractor's core:

1. the background and its noise (``sep.Background``, a mesh of boxes with a median filter),
   unless the caller passes its own :class:`BackgroundModel` (chapter 04 does, from
   :func:`estimate_background`);
2. matched-filter detection with a Gaussian of the stars' width and deblending
   (``sep.extract``); frames above 4 Mpx are detected on a 2 x 2 binned copy, which finds
   the same stars at a quarter of the cost;
3. windowed centroids on the full-resolution image (``sep.winpos``, Source Extractor's
   ``XWIN``/``YWIN``) and a flux with its uncertainty in a circle (``sep.sum_circle``);
4. cuts: sources sharper than a star (cosmic rays, hot pixels: :func:`too_sharp`), two
   detections of one star, and a signal-to-noise limit.

``benchmarks/bench_detection.py`` compares this with photutils' segmentation on the same
frames (speed, and the same stars at the same positions).

The FWHM of a frame is the median width at half maximum of its bright, unsaturated,
isolated stars (:func:`half_maximum_fwhm`: the diameter of the circle with the area of the
pixels above half the peak), true to its definition whatever the profile. Bad pixels are
filled from their neighbours before detection (:func:`fill_masked`), so that a hot pixel
vanishes and a saturated star, whose core calibration masks, stays one round source.
All pixel coordinates are 0-based (numpy, and astropy's ``pixel_to_world``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from datared.errors import FrameError

#: FWHM of a Gaussian in units of its sigma.
SIGMA_TO_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Columns of the table that :func:`detect_stars` returns (``sky`` only with a WCS).
DETECTION_COLUMNS = ("id", "x", "y", "flux", "flux_err", "snr", "sigma_xy", "peak", "fwhm",
                     "ellipticity", "saturated")


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


@functools.lru_cache(maxsize=16)
def _zoom_factors(n_mesh: int, box: int, size: int):
    """Prefilter (dense, n_mesh x n_mesh) and evaluation (sparse, size x n_mesh) matrices of
    ``scipy.ndimage.zoom(..., box, order=3, mode="reflect", grid_mode=True)`` along one axis.

    zoom is linear in its input, so zooming the unit vectors gives its matrix ``W``; ``W``
    factors into the B-spline prefilter ``F`` (dense but tiny) and an evaluation matrix with
    at most 4 non-zero weights per output pixel (the cubic B-spline's support).
    """
    from scipy import sparse
    from scipy.ndimage import spline_filter1d, zoom

    eye = np.eye(n_mesh)
    full = np.stack([zoom(eye[j], box, order=3, mode="reflect", grid_mode=True)
                     for j in range(n_mesh)], axis=1)[:size]
    prefilter = spline_filter1d(eye, order=3, mode="reflect", axis=0)
    evaluation = full @ np.linalg.inv(prefilter)
    evaluation[np.abs(evaluation) < 1e-12] = 0.0
    return prefilter, sparse.csr_matrix(evaluation)


def median_filter_mesh(mesh: np.ndarray, size: int) -> np.ndarray:
    """Median filter of a background mesh as ``Background2D`` applies it, vectorised.

    The same as photutils' ``generic_filter(mesh, nanmedian, size, mode="constant",
    cval=nan)`` (outside the mesh counts as missing, not as zero) for an odd ``size``.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    if size % 2 != 1:
        raise ValueError(f"median_filter_mesh: size must be odd, got {size}")
    half = size // 2
    padded = np.pad(np.asarray(mesh, dtype=np.float64), half, constant_values=np.nan)
    windows = sliding_window_view(padded, (size, size)).reshape(*np.shape(mesh), size * size)
    # np.nanmedian loops in Python over the windows here; sorting puts the NaNs last, and
    # the median of the n finite values is the mean of the middle two (or the middle one).
    ordered = np.sort(windows, axis=-1)
    n = np.sum(np.isfinite(windows), axis=-1)
    low = np.take_along_axis(ordered, np.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    high = np.take_along_axis(ordered, (n // 2)[..., None], axis=-1)[..., 0]
    return np.where(n > 0, (low + high) / 2, np.nan)


def zoom_mesh(mesh: np.ndarray, box: int, shape: tuple[int, int]) -> np.ndarray:
    """A background mesh interpolated to full resolution, as photutils' ``Background2D`` does.

    The same bicubic spline as photutils' default interpolator (``scipy.ndimage.zoom`` with
    ``order=3``, ``mode="reflect"``, ``grid_mode=True``, cropped to ``shape`` and clipped to
    the mesh's range), evaluated separably: about 4 multiplications per pixel instead of 16,
    several times faster on a full frame (``benchmarks/bench_detection.py``); it agrees with
    photutils to rounding (tests/test_detection.py).

    Parameters
    ----------
    mesh : (ny_mesh, nx_mesh) box values, e.g. ``Background2D.background_mesh``.
    box : box size, pixels.
    shape : (ny, nx) of the image.
    """
    mesh = np.asarray(mesh, dtype=np.float64)
    if np.ptp(mesh) == 0:
        return np.full(shape, float(mesh.flat[0]))
    f_y, e_y = _zoom_factors(mesh.shape[0], int(box), int(shape[0]))
    f_x, e_x = _zoom_factors(mesh.shape[1], int(box), int(shape[1]))
    coefficients = f_y @ mesh @ f_x.T
    rows = e_y @ coefficients  # (ny, nx_mesh): interpolated along y
    result = np.asarray((e_x @ rows.T).T)
    return np.clip(result, mesh.min(), mesh.max(), out=result)


#: Methods of :func:`estimate_background`: ``"sep"`` (Source Extractor's box statistics in C,
#: the default) and ``"photutils"`` (``Background2D`` with sigma-clipped medians).
BACKGROUND_METHODS = ("sep", "photutils")

#: Variance of one box's estimate of the level, in units of rms**2 / n for n pixels of
#: Gaussian noise: the median's pi/2; Source Extractor's mode, 2.5 median - 1.5 mean, has
#: 6.25 pi/2 + 2.25 - 7.5 (the median and the mean of one sample have covariance 1).
BOX_ESTIMATOR_VARIANCE = {"photutils": math.pi / 2.0,
                          "sep": 6.25 * math.pi / 2.0 + 2.25 - 7.5}


def source_mask(data: np.ndarray, level: np.ndarray, noise: np.ndarray, *,
                nsigma: float = 2.0, min_pixels: int = 5, dilate_pixels: int = 4) -> np.ndarray:
    """Pixels of sources: groups of at least ``min_pixels`` connected pixels more than
    ``nsigma`` times ``noise`` above ``level``, grown by ``dilate_pixels``.

    Single pixels above the threshold are noise peaks: masking them would cut the top of
    the noise distribution and bias the background low.
    """
    from scipy import ndimage

    with np.errstate(invalid="ignore"):
        above = (data - level) > nsigma * noise
    labels, n_groups = ndimage.label(above)
    inside = labels[above]  # counting only the labelled pixels is much faster on a full frame
    group_size = np.bincount(inside, minlength=n_groups + 1)
    sources = np.zeros(above.shape, dtype=bool)
    sources[above] = group_size[inside] >= min_pixels
    if dilate_pixels > 0 and sources.any():
        sources = ndimage.binary_dilation(sources, iterations=int(dilate_pixels))
    return sources


def estimate_background(data: np.ndarray, *, box_size: int = 64, filter_size: int = 3,
                        mask: np.ndarray | None = None, source_nsigma: float = 2.0,
                        dilate_pixels: int = 4, method: str = "sep") -> BackgroundModel:
    """Background and noise maps of a frame, stars masked (two passes).

    The first pass estimates the background with sigma clipping only; pixels more than
    ``source_nsigma`` times the noise above it (groups of 5 or more, grown by
    ``dilate_pixels``: :func:`source_mask`) are then masked and the background is estimated
    again, so that star wings do not lift it.

    Two implementations of the same steps (boxes, a median filter of the box values,
    bicubic interpolation to every pixel):

    - ``"sep"`` (default): ``sep.Background``, Source Extractor's box statistics and spline
      in C; the level of a box is its sigma-clipped mode (2.5 median - 1.5 mean, or the
      median where the two differ much), which faint unmasked stars lift less than a median.
      Several times faster than ``"photutils"`` on a full frame (both are timed by
      ``benchmarks/bench_detection.py``); the two maps agree to a few hundredths of the
      noise per pixel (``tests/test_photometry.py``).
    - ``"photutils"``: ``photutils.background.Background2D`` with sigma-clipped medians
      (3 sigma, ``MedianBackground``, ``StdBackgroundRMS``), the mesh filtered and
      interpolated by :func:`median_filter_mesh` and :func:`zoom_mesh` (photutils' own
      results, faster).

    Parameters
    ----------
    data : calibrated image, ADU.
    box_size : side of the boxes in which the background is estimated, pixels.
    filter_size : side of the median filter applied to the grid of boxes, in boxes.
    mask : True for pixels to ignore (bad pixels).
    source_nsigma : threshold for masking sources before the second pass, in noise sigma.
    dilate_pixels : how far the source mask is grown, pixels.
    method : ``"sep"`` or ``"photutils"`` (:data:`BACKGROUND_METHODS`).

    Returns a :class:`BackgroundModel` (float32 maps for ``"sep"``) whose ``error``
    approximates the 1-sigma uncertainty of the background map itself (it enters every
    aperture coherently).
    """
    if method not in BACKGROUND_METHODS:
        raise ValueError(f"estimate_background: method must be one of {BACKGROUND_METHODS}, "
                         f"got {method!r}")
    data = np.asarray(data)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    box = int(min(box_size, *data.shape))
    if method == "sep":
        image = np.ascontiguousarray(data, dtype=np.float32)
        if bad.any():
            image = np.where(bad, np.float32(0.0), image)

        def _maps(pixel_mask):
            result = _sep_background(image, pixel_mask if pixel_mask.any() else None, box,
                                     filter_size, zeroed=True)
            return result.back(), result.rms()

        first, first_rms = _maps(bad)
        sources = source_mask(image, first, first_rms, nsigma=source_nsigma,
                              dilate_pixels=dilate_pixels)
        background, rms = _maps(bad | sources)
    else:
        first_mesh, first_rms_mesh = _photutils_mesh(data, bad, box, filter_size)
        # For the source mask the coarse grid of box values is enough (no interpolation).
        rows = np.minimum(np.arange(data.shape[0]) // box, first_mesh.shape[0] - 1)
        cols = np.minimum(np.arange(data.shape[1]) // box, first_mesh.shape[1] - 1)
        sources = source_mask(data, first_mesh[np.ix_(rows, cols)],
                              first_rms_mesh[np.ix_(rows, cols)], nsigma=source_nsigma,
                              dilate_pixels=dilate_pixels)
        try:
            mesh, rms_mesh = _photutils_mesh(data, bad | sources, box, filter_size)
        except ValueError:
            # So crowded that no box keeps 20 % of its pixels: keep the clipped first pass.
            (mesh, rms_mesh), sources = (first_mesh, first_rms_mesh), np.zeros_like(sources)
        # Background2D's own .background and .background_rms give the same maps, slower.
        background = zoom_mesh(mesh, box, data.shape)
        rms = zoom_mesh(rms_mesh, box, data.shape)
    # A box estimate from n pixels scatters by sqrt(v * rms**2 / n) (v: BOX_ESTIMATOR_VARIANCE);
    # the median filter over filter_size**2 boxes is again a median (another factor pi/2 in
    # variance); the spline interpolation between boxes smooths a little more, which we
    # neglect (conservative). tests/test_photometry.py checks this against pure-noise images.
    n_box = box * box * (1.0 - float(np.mean(bad | sources)))
    efficiency = math.pi / 2.0 / (filter_size * filter_size) if filter_size > 1 else 1.0
    factor = math.sqrt(BOX_ESTIMATOR_VARIANCE[method] / max(n_box, 1.0) * efficiency)
    error = rms * np.asarray(factor, dtype=rms.dtype)
    return BackgroundModel(background, rms, error, box, filter_size)


def _photutils_mesh(data: np.ndarray, bad: np.ndarray, box: int, filter_size: int):
    """``Background2D``'s mesh of box levels and noise, median-filtered (3-sigma clipping,
    sigma-clipped medians and standard deviations)."""
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, MedianBackground, StdBackgroundRMS

    # Background2D's mesh filter calls nanmedian once per box from Python; with an odd
    # filter size the same filter runs vectorised here (median_filter_mesh).
    own_filter = filter_size % 2 == 1 and filter_size > 1
    result = Background2D(data, box, mask=bad if bad.any() else None,
                          filter_size=(1, 1) if own_filter else (filter_size, filter_size),
                          sigma_clip=SigmaClip(sigma=3.0, maxiters=10),
                          bkg_estimator=MedianBackground(),
                          bkg_rms_estimator=StdBackgroundRMS(), exclude_percentile=80.0)
    if not own_filter:
        return result.background_mesh, result.background_rms_mesh
    return (median_filter_mesh(result.background_mesh, filter_size),
            median_filter_mesh(result.background_rms_mesh, filter_size))


def _sep_background(image: np.ndarray, bad: np.ndarray | None, box_size: int = 64,
                    filter_size: int = 3, *, zeroed: bool = False):
    """``sep.Background`` of a float32 image (bad pixels set to 0 and masked): sigma-clipped
    box values on a mesh, median-filtered: one pass of :func:`estimate_background`, and what
    :func:`detect_stars` uses when it is given no background."""
    import sep

    if bad is not None and not zeroed:  # zeroed: the caller already set them to 0
        image = np.where(bad, np.float32(0.0), image)
    box = int(min(box_size, *image.shape))
    return sep.Background(image, mask=bad, bw=box, bh=box, fw=filter_size, fh=filter_size)


# ---------------------------------------------------------------------------------------
# Detection
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


def too_sharp(peak: np.ndarray, flux: np.ndarray, fwhm_pix: float, noise: np.ndarray | float,
              *, factor: float = 3.0, nsigma: float = 5.0) -> np.ndarray:
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


def gaussian_kernel(fwhm_px: float) -> np.ndarray:
    """A normalised 2D Gaussian of the stars' FWHM, ``2 * ceil(1.5 FWHM) + 1`` pixels wide."""
    half = int(math.ceil(1.5 * fwhm_px))
    offs = np.arange(-half, half + 1)
    sigma = fwhm_px / SIGMA_TO_FWHM
    kernel = np.exp(-0.5 * (offs[:, None] ** 2 + offs[None, :] ** 2) / sigma**2)
    return (kernel / kernel.sum()).astype(np.float32)


def _bin2(image: np.ndarray) -> np.ndarray:
    """Mean of 2 x 2 pixel blocks (an odd last row or column is dropped)."""
    ny, nx = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    a = image[:ny, :nx]
    return np.ascontiguousarray(0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2]
                                        + a[1::2, 1::2]), dtype=np.float32)


@dataclass
class _DetectionImage:
    """The image that ``sep.extract`` searches: the frame, or a 2 x 2 binned copy of a large
    one (same stars, a quarter of the pixels), with its mask and noise."""

    image: np.ndarray
    bad: np.ndarray | None
    err: float | np.ndarray
    factor: int

    @classmethod
    def of(cls, sub: np.ndarray, bad: np.ndarray | None, err: float | np.ndarray):
        if sub.size <= 4e6:
            return cls(sub, bad, err, 1)
        binned_bad = None
        if bad is not None:
            ny, nx = (bad.shape[0] // 2) * 2, (bad.shape[1] // 2) * 2
            binned_bad = np.ascontiguousarray(
                bad[:ny, :nx].reshape(ny // 2, 2, nx // 2, 2).any(axis=(1, 3)))
        binned_err = err / 2.0 if np.ndim(err) == 0 else _bin2(np.asarray(err)) / 2.0
        return cls(_bin2(sub), binned_bad, binned_err, 2)

    def central(self, size: int = 1024) -> tuple[_DetectionImage, tuple[int, int]]:
        """The central ``size`` x ``size`` full-resolution pixels, and their origin (x, y)."""
        half = size // (2 * self.factor)
        ny, nx = self.image.shape
        y0, x0 = max(0, ny // 2 - half), max(0, nx // 2 - half)
        cut = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
        err = self.err if np.ndim(self.err) == 0 else np.ascontiguousarray(self.err[cut])
        bad = None if self.bad is None else np.ascontiguousarray(self.bad[cut])
        return (_DetectionImage(np.ascontiguousarray(self.image[cut]), bad, err, self.factor),
                (x0 * self.factor, y0 * self.factor))


def _extract(det: _DetectionImage, nsigma: float, fwhm_px: float, min_pixels: int,
             deblend: bool, limit: int | None, origin: tuple[int, int] = (0, 0)):
    """``sep.extract`` on a detection image; positions on the full-resolution grid."""
    import sep

    f = det.factor
    kernel = gaussian_kernel(max(fwhm_px / f, 1.0))
    # The smoothed image's noise is the pixel noise times sqrt(sum(kernel**2)) (the kernel
    # sums to 1): a threshold in those units makes nsigma the significance of the matched
    # filter, whatever the kernel's width.
    err = det.err * float(np.sqrt(np.sum(kernel.astype(np.float64) ** 2)))
    sep.set_extract_pixstack(max(300_000, det.image.size // 4))
    sep.set_sub_object_limit(4096)
    try:
        objects = sep.extract(det.image, nsigma, err=err, mask=det.bad,
                              minarea=max(1, min_pixels // (f * f)), filter_kernel=kernel,
                              filter_type="conv", deblend_nthresh=32 if deblend else 1,
                              deblend_cont=0.005, clean=True)
    except Exception as err:  # sep raises plain Exceptions: buffer or deblending overflow
        raise FrameError(f"star detection failed ({err}): the frame holds far more sources "
                         "than stars (noise, a trail, clouds lit by the Moon?); check it by "
                         "eye, or raise nsigma") from None
    if limit is not None and len(objects) > limit:
        objects = objects[np.argsort(objects["flux"])[::-1][:limit]]
    x = objects["x"] * f + 0.5 * (f - 1) + origin[0]
    y = objects["y"] * f + 0.5 * (f - 1) + origin[1]
    a = np.asarray(objects["a"], float)
    b = np.asarray(objects["b"], float)
    ellipticity = np.where(a > 0, 1.0 - b / np.where(a > 0, a, 1.0), np.nan)
    return np.asarray(x, float), np.asarray(y, float), ellipticity


def _peaks(sub: np.ndarray, x: np.ndarray, y: np.ndarray, half: int = 1) -> np.ndarray:
    """Highest pixel within ``half`` pixels of each (rounded) position."""
    ny, nx = sub.shape
    offs = np.arange(-half, half + 1)
    iy = np.clip(np.round(y).astype(int)[:, None, None] + offs[None, :, None], 0, ny - 1)
    ix = np.clip(np.round(x).astype(int)[:, None, None] + offs[None, None, :], 0, nx - 1)
    values = sub[iy, ix]
    return np.nanmax(values.reshape(len(x), -1), axis=1) if len(x) else np.zeros(0)


def _usable(flag: np.ndarray) -> np.ndarray:
    """True where a sep measurement is valid: a window that touches a masked pixel
    (``APER_HASMASKED``) or the image edge (``APER_TRUNC``) still gives a good value."""
    import sep

    return (np.asarray(flag) & ~(sep.APER_HASMASKED | sep.APER_TRUNC)) == 0


def half_maximum_fwhm(sub: np.ndarray, x: np.ndarray, y: np.ndarray, *,
                      radius_px: float) -> np.ndarray:
    """Per star, the FWHM as the diameter of a circle with the area of its pixels above half
    its peak (the definition of the FWHM, whatever the profile: Gaussian, Moffat, donut).

    Parameters
    ----------
    sub : background-subtracted image (masked pixels filled), ADU.
    x, y : star positions, pixels.
    radius_px : only pixels within this distance of a star count (keeps neighbours out).
    """
    half = int(math.ceil(radius_px))
    offs = np.arange(-half, half + 1)
    ny, nx = sub.shape
    ix = np.round(x).astype(int)
    iy = np.round(y).astype(int)
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    result = np.full(len(x), np.nan)
    if not inside.any():
        return result
    cut = sub[iy[inside, None, None] + offs[None, :, None], ix[inside, None, None] + offs[None, None, :]]
    dx = offs[None, None, :] - (x[inside] - ix[inside])[:, None, None]
    dy = offs[None, :, None] - (y[inside] - iy[inside])[:, None, None]
    within = dx**2 + dy**2 <= radius_px**2
    peak = cut[:, half - 1:half + 2, half - 1:half + 2].reshape(len(cut), -1).max(axis=1)
    # Each pixel counts by how far its value lies above or below half the peak, within a band
    # of +-10 % of the peak: a pixel right at half maximum counts half. Counting whole pixels
    # would make the FWHM jump in steps of several percent.
    level = (cut - 0.5 * peak[:, None, None]) / (0.2 * peak[:, None, None])
    area = np.sum(np.clip(level + 0.5, 0.0, 1.0) * within, axis=(1, 2))
    fwhm = 2.0 * np.sqrt(area / math.pi)
    result[inside] = np.where(peak > 0, fwhm, np.nan)
    return result


def fill_masked(image: np.ndarray, bad: np.ndarray, *,
                bright: float) -> tuple[np.ndarray, np.ndarray | None]:
    """A copy of ``image`` with its bad pixels filled from their neighbours, and the pixels
    that detection must still ignore.

    A bad pixel with good pixels within 2 pixels gets their mean (a hot pixel disappears, a
    star across a bad column stays whole). The inside of a larger masked patch gets the
    highest value around it if that is above ``bright`` (the saturated core of a star, which
    so stays one round blob for detection and centroids); otherwise (a masked region of
    sky) the median around it, and it stays masked.

    Parameters
    ----------
    image : background-subtracted image, ADU.
    bad : True for the pixels to fill.
    bright : level above which the surroundings of a patch mark a saturated star, ADU.

    Returns the filled image and the mask of what detection must still ignore (or None).
    """
    from scipy import ndimage

    out = np.array(image, dtype=np.float32, copy=True)
    iy, ix = np.nonzero(bad)
    if len(iy) <= 0.02 * bad.size:
        # Few bad pixels (hot pixels, saturated cores): sum their 5 x 5 neighbourhoods
        # directly, edges repeated as a "nearest" filter does.
        ny, nx = bad.shape
        total = np.zeros(len(iy))
        count = np.zeros(len(iy))
        for dy in range(-2, 3):
            rows = np.clip(iy + dy, 0, ny - 1)
            for dx in range(-2, 3):
                cols = np.clip(ix + dx, 0, nx - 1)
                use = ~bad[rows, cols]
                total += np.where(use, out[rows, cols], 0.0)
                count += use
        near = count > 0
        out[iy[near], ix[near]] = total[near] / count[near]
        rest = np.zeros(bad.shape, dtype=bool)
        rest[iy[~near], ix[~near]] = True
    else:  # a large masked area: two 5 x 5 box filters over the frame
        good = (~bad).astype(np.float32)
        total = ndimage.uniform_filter(np.where(bad, np.float32(0.0), out), 5, mode="nearest")
        count = ndimage.uniform_filter(good, 5, mode="nearest")
        near = bad & (count > 1e-3)
        out[near] = total[near] / count[near]
        rest = bad & ~near
    still_bad = None
    if rest.any():
        labels, _ = ndimage.label(rest)
        for number, box in enumerate(ndimage.find_objects(labels), start=1):
            grown = tuple(slice(max(0, s.start - 3), s.stop + 3) for s in box)
            region = out[grown]
            patch = labels[grown] == number
            around = region[~rest[grown]]
            if len(around) == 0:
                region[patch] = 0.0
            elif around.max() > bright:
                region[patch] = around.max()
            else:
                region[patch] = np.median(around)
                if still_bad is None:
                    still_bad = np.zeros(out.shape, dtype=bool)
                still_bad[grown] |= patch
    return out, still_bad


def estimate_fwhm(sub: np.ndarray, x: np.ndarray, y: np.ndarray, peak: np.ndarray, *,
                  saturation_adu: float | None, rms: float, n_max: int = 50) -> float:
    """The frame's FWHM (pixels): the median :func:`half_maximum_fwhm` of bright, unsaturated,
    isolated stars that are not sharper than a star (cosmic rays, hot pixels).

    Parameters
    ----------
    sub : background-subtracted image (masked pixels filled), ADU.
    x, y, peak : detected sources, brightest first (pixels, ADU above the sky).
    saturation_adu : peak level above the sky at which a star counts as saturated, or None.
    rms : sky noise per pixel, ADU.
    n_max : how many stars to use at most.
    """
    import sep

    guess = 3.5
    flux, _, _ = sep.sum_circle(sub, x, y, 2.0 * guess, subpix=5)
    use = (peak > 20.0 * rms) & ~too_sharp(peak, flux, guess, rms)
    if saturation_adu is not None:
        use &= peak < 0.5 * saturation_adu
    if len(x) > 1:
        from scipy.spatial import cKDTree

        distance, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
        use &= distance[:, 1] > 15.0
    idx = np.flatnonzero(use)[:n_max]
    if len(idx) < 3:
        return float("nan")
    fwhm = half_maximum_fwhm(sub, x[idx], y[idx], radius_px=12.0)
    fwhm = fwhm[np.isfinite(fwhm) & (fwhm > 0.5)]
    return float(np.median(fwhm)) if len(fwhm) >= 3 else float("nan")


def detect_stars(data: np.ndarray, *, mask: np.ndarray | None = None,
                 background: BackgroundModel | None = None, fwhm_px: float | None = None,
                 nsigma: float = 3.0, min_pixels: int = 5, deblend: bool = True,
                 max_stars: int | None = None, min_snr: float = 0.0,
                 saturation_adu: float | None = None, gain_e_per_adu: float = 1.0,
                 aperture_fwhm: float = 1.5, reject_sharp: bool = True, wcs=None) -> Table:
    """Find the stars of a frame and measure windowed centroids, fluxes and sizes.

    Parameters
    ----------
    data : calibrated image, ADU.
    mask : True where pixels are bad.
    background : the frame's background; None estimates one with ``sep.Background``
        (subtracted in place; the noise is its global RMS).
    fwhm_px : the stars' FWHM, pixels; None measures it (:func:`estimate_fwhm`).
    nsigma : detection threshold of the matched-filtered image, in noise sigma.
    min_pixels : minimum number of connected pixels above the threshold.
    deblend : split touching sources.
    max_stars : keep at most this many stars (the brightest), or all.
    min_snr : keep stars whose flux S/N is at least this.
    saturation_adu : peak level above the sky at which a star counts as saturated, ADU.
    gain_e_per_adu : detector gain (the Poisson part of the flux error).
    aperture_fwhm : radius of the flux circle, in FWHM.
    reject_sharp : drop sources sharper than a star (:func:`too_sharp`).
    wcs : the frame's WCS; adds the column ``sky`` (SkyCoord of each centroid).

    Returns a table sorted from bright to faint with :data:`DETECTION_COLUMNS`: ``x``, ``y``
    (windowed centroid, 0-based pixels), ``flux`` and ``flux_err`` (ADU in a circle of
    ``aperture_fwhm`` FWHM), ``snr``, ``sigma_xy`` (expected position error per axis,
    pixels), ``peak`` (highest pixel above the sky, ADU), ``fwhm`` (:func:`half_maximum_fwhm`,
    pixels), ``ellipticity`` (1 - b/a of the isophote) and ``saturated``. The
    metadata hold ``fwhm_px`` (the frame's FWHM, pixels; NaN if no star was found),
    ``fwhm_measured`` (True when it was measured here, False when given or, with too few
    good stars, a typical 3.5 px) and ``sky_rms`` (median noise per pixel, ADU).
    """
    import sep

    image = np.ascontiguousarray(data, dtype=np.float32)
    bad = ~np.isfinite(image)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    bad = bad if bad.any() else None
    if background is None:  # the fast path: sep's mesh, subtracted in place, scalar noise
        bkg = _sep_background(image, bad)
        sub = image.copy()
        bkg.subfrom(sub)
        rms = float(bkg.globalrms)
        err = rms
    else:
        sub = image - np.asarray(background.background, dtype=np.float32)
        err = np.ascontiguousarray(background.rms, dtype=np.float32)
        rms = float(np.median(err[::4, ::4]))
    extract_bad = None
    if bad is not None:  # from here on the filled image stands in for the mask
        sub, extract_bad = fill_masked(sub, bad, bright=20.0 * rms)
    columns = {name: np.zeros(0) for name in DETECTION_COLUMNS}
    columns["id"] = np.zeros(0, int)
    columns["saturated"] = np.zeros(0, bool)
    empty = Table(columns)
    empty.meta.update(fwhm_px=float("nan"), sky_rms=rms)
    if not np.isfinite(rms) or rms <= 0:
        return empty
    limit = None if max_stars is None else 3 * max_stars + 100
    det = _DetectionImage.of(sub, extract_bad, err)
    if fwhm_px is None:  # bright stars of the central 1024 x 1024 pixels are enough
        centre, origin = det.central()
        x, y, _ = _extract(centre, max(nsigma, 10.0), 3.5, min_pixels, False, 300, origin)
        if len(x) < 3:
            x, y, _ = _extract(det, max(nsigma, 10.0), 3.5, min_pixels, False, 300)
        x, y = _winpos(sub, x, y, 3.5)
        fwhm_px = estimate_fwhm(sub, x, y, _peaks(sub, x, y), rms=rms,
                                saturation_adu=saturation_adu)
        measured = np.isfinite(fwhm_px)
        if not measured:
            if len(x) == 0:
                return empty
            fwhm_px = 3.5  # too few good stars to measure: a typical seeing (meta says so)
    else:
        measured = False
    x, y, ellipticity = _extract(det, nsigma, fwhm_px, min_pixels, deblend, limit)
    if len(x) == 0:
        empty.meta["fwhm_px"] = float(fwhm_px)
        return empty
    radius = aperture_fwhm * fwhm_px
    if reject_sharp:  # judged where the source was found, before the centroid moves
        flux0, _, _ = sep.sum_circle(sub, x, y, radius, subpix=5)
        sharp = too_sharp(_peaks(sub, x, y, half=det.factor), flux0, fwhm_px, rms)
        x, y, ellipticity = x[~sharp], y[~sharp], ellipticity[~sharp]
    x, y = _winpos(sub, x, y, fwhm_px)
    flux, flux_err, _ = sep.sum_circle(sub, x, y, radius, err=err, gain=gain_e_per_adu, subpix=5)
    peak = _peaks(sub, x, y)
    keep = np.isfinite(x) & np.isfinite(y) & (flux > 0)
    x, y, flux, flux_err, peak, ellipticity = (a[keep] for a in
                                               (x, y, flux, flux_err, peak, ellipticity))
    order = np.argsort(flux)[::-1]
    x, y, flux, flux_err, peak, ellipticity = (a[order] for a in
                                               (x, y, flux, flux_err, peak, ellipticity))
    if len(x) > 1:  # two detections of one star converge to one centroid: keep the brighter
        from scipy.spatial import cKDTree

        pairs = cKDTree(np.column_stack([x, y])).query_pairs(max(1.0, 0.5 * fwhm_px),
                                                            output_type="ndarray")
        single = np.ones(len(x), bool)
        if len(pairs):
            single[pairs.max(axis=1)] = False
        x, y, flux, flux_err, peak, ellipticity = (a[single] for a in
                                                   (x, y, flux, flux_err, peak, ellipticity))
    snr = flux / np.where(flux_err > 0, flux_err, np.inf)
    good = snr >= min_snr
    x, y, flux, flux_err, peak, ellipticity, snr = (a[good] for a in
                                                    (x, y, flux, flux_err, peak, ellipticity, snr))
    if max_stars is not None:
        x, y, flux, flux_err, peak, ellipticity, snr = (
            a[:max_stars] for a in (x, y, flux, flux_err, peak, ellipticity, snr))
    sigma = fwhm_px / SIGMA_TO_FWHM
    # Position error per axis of a centroid: about sigma_psf * sqrt(2) / SNR (plus a small
    # floor for pixelisation and PSF asymmetries).
    sigma_xy = np.hypot(math.sqrt(2.0) * sigma / np.clip(snr, 1e-3, None), 0.01)
    saturated = (np.zeros(len(x), bool) if saturation_adu is None else peak >= saturation_adu)
    fwhm = half_maximum_fwhm(sub, x, y, radius_px=2.0 * fwhm_px + 2.0)
    table = Table({"id": np.arange(1, len(x) + 1), "x": x, "y": y, "flux": flux,
                   "flux_err": flux_err, "snr": snr, "sigma_xy": sigma_xy, "peak": peak,
                   "fwhm": fwhm, "ellipticity": ellipticity, "saturated": saturated})
    if wcs is not None:
        table["sky"] = wcs.pixel_to_world(x, y)
    table.meta.update(fwhm_px=float(fwhm_px), fwhm_measured=bool(measured), sky_rms=rms)
    return table


def _winpos(sub, x, y, fwhm_px):
    """Windowed centroids (``sep.winpos``); the detection position where they fail."""
    import sep

    if len(x) == 0:
        return x, y
    sig = np.full(len(x), fwhm_px / SIGMA_TO_FWHM)
    xw, yw, flag = sep.winpos(sub, x, y, sig, subpix=5)
    moved = np.hypot(xw - x, yw - y)
    ok = _usable(flag) & np.isfinite(xw) & np.isfinite(yw) & (moved < fwhm_px)
    return np.where(ok, xw, x), np.where(ok, yw, y)
