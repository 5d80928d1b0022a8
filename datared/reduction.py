"""Pre-reduction: from raw frames to master frames and calibrated science frames.

This module owns everything between a raw frame and a calibrated one: reading raw frames
(:func:`read_raw`, with overscan and trim), memory-budgeted combines of staged frames, the
master bias, darks and flats and their files in the work folder, the bad-pixel mask, the
choice and scaling of a master dark for an exposure time, and the calibration of science
frames (written with :func:`datared.frame.write_frame`, read back elsewhere with
:func:`datared.frame.read_frame`). It also reads the masters back for later chapters
(:func:`load_calibration_terms`).

The chapter ``notebooks/02-pre-reduction.ipynb`` shows each step with the plain library
call first; the helpers here repeat it for the whole night, identically to the plain
``ccdproc`` recipe. Header keywords come in as a :class:`~datared.frame.HeaderKeys`; a
frame whose header lacks one raises :class:`~datared.errors.FrameError` naming the file.
Nothing here reads the book's settings.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.stats import mad_std
from astropy.table import Table
from astropy.wcs import FITSFixedWarning

from datared.errors import FRAME_ERRORS, FrameError, MissingInputError
from datared.frame import (
    NINA_KEYS,
    HeaderKeys,
    hdu_data,
    image_type_values,
    number_value,
    text_value,
    write_frame,
)
from datared.io import SkipLog, output_name, require
from datared.progress import progress as progress_bar

#: Bits of the bad-pixel mask written to ``badpixels.fits``.
BAD_HOT = 1  # dark current far above the typical pixel (from the master dark)
BAD_LOW_RESPONSE = 2  # dead or weak pixel (flat response far below its neighbours)
BAD_HIGH_RESPONSE = 4  # over-responsive pixel (flat response far above its neighbours)
BAD_PIXEL_BITS = {BAD_HOT: "hot", BAD_LOW_RESPONSE: "low response", BAD_HIGH_RESPONSE: "high response"}


# ---------------------------------------------------------------------------------------
# Reading frames
# ---------------------------------------------------------------------------------------

def _read_primary(path: Path) -> tuple[np.ndarray, fits.Header]:
    """Return the first image array and its header (primary header merged in)."""
    with warnings.catch_warnings():
        # Acquisition software writes non-standard cards that astropy repairs on read.
        warnings.simplefilter("ignore", VerifyWarning)
        # hdu_data says it better for a truncated file
        warnings.filterwarnings("ignore", message="File may have been truncated")
        with fits.open(path, memmap=False) as hdul:
            for index, hdu in enumerate(hdul):
                data = hdu_data(hdul, index, path) if hdu.is_image else None
                if data is not None:
                    header = hdu.header.copy()
                    if hdu is not hdul[0]:
                        header.extend(hdul[0].header, unique=True)
                    return np.asarray(data), header
    raise ValueError(f"{path}: no image data in any HDU. Remove the file from the night folder.")


def overscan_and_trim(ccd: CCDData, *, overscan_section: str | None = None,
                      trim_section: str | None = None) -> CCDData:
    """Subtract the overscan (median per row or column) and trim, when the sections are set.

    Parameters
    ----------
    ccd : frame in ADU.
    overscan_section : FITS section of the overscan region, or None to skip.
    trim_section : FITS section of the light-sensitive region to keep, or None to skip.
    """
    import ccdproc

    if overscan_section:
        ccd = ccdproc.subtract_overscan(ccd, fits_section=overscan_section, median=True,
                                        overscan_axis=None)
    if trim_section:
        ccd = ccdproc.trim_image(ccd, fits_section=trim_section)
    return ccd


def read_raw(path: str | Path, *, overscan_section: str | None = None,
             trim_section: str | None = None) -> CCDData:
    """Read a raw frame as float32 ``CCDData`` in ADU (overscan-subtracted and trimmed if set).

    Calibrated frames are read with :func:`datared.frame.read_frame` instead.

    Parameters
    ----------
    path : FITS file (read only).
    overscan_section, trim_section : FITS sections or None (see :func:`overscan_and_trim`).
    """
    path = Path(path)
    try:
        data, header = _read_primary(path)
    except OSError as err:
        raise OSError(f"{path}: cannot be read as FITS ({err}). Replace or remove the file.") from err
    for key in ("BZERO", "BSCALE", "BUNIT"):
        header.remove(key, ignore_missing=True)
    ccd = CCDData(data.astype(np.float32), unit="adu", meta=header)
    if overscan_section or trim_section:
        ccd = overscan_and_trim(ccd, overscan_section=overscan_section,
                                trim_section=trim_section)
        ccd.data = ccd.data.astype(np.float32, copy=False)
    return ccd


def frames_of_type(collection, imagetyp_key: str, imagetyp_value: str | Sequence[str],
                   **keyword_values) -> list[Path]:
    """Absolute paths of the frames of one image type (and other header values) in a collection.

    Parameters
    ----------
    collection : ``ccdproc.ImageFileCollection`` from ``datared.io.night_collection``.
    imagetyp_key : header keyword of the image type (``config.imagetyp_key``).
    imagetyp_value : its value for the wanted frames (``config.imagetyp["flat"]``), or a
        list of values (``["FLAT", "Flat Field"]``); any of them matches.
    keyword_values : further keyword=value filters (e.g. ``FILTER="r"``); values match
        case-insensitively as in ``ImageFileCollection.files_filtered``.
    """
    if collection.summary is None or len(collection.summary) == 0:
        return []
    if imagetyp_key.lower() not in {name.lower() for name in collection.summary.colnames}:
        return []
    found: set[Path] = set()
    for value in image_type_values(imagetyp_value):
        filters = {imagetyp_key: value.strip(), **keyword_values}
        found.update(Path(p) for p in collection.files_filtered(include_path=True, **filters))
    return sorted(found)


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------

def central_box(shape: tuple[int, int], *, fraction: float = 0.8) -> tuple[slice, slice]:
    """Slices of the central ``fraction`` (per axis) of an image of ``shape`` (rows, columns)."""
    ny, nx = shape
    my, mx = int(round(ny * (1 - fraction) / 2)), int(round(nx * (1 - fraction) / 2))
    return slice(my, ny - my), slice(mx, nx - mx)


def robust_level_noise(data: np.ndarray, *, step: int = 1) -> tuple[float, float]:
    """Median and robust standard deviation (MAD-based) of an image, in its units.

    Parameters
    ----------
    data : image.
    step : use every ``step``-th pixel along each axis (faster on full frames).
    """
    sample = np.asarray(data[::step, ::step], dtype=np.float64)
    return float(np.median(sample)), float(mad_std(sample))


def frame_statistics(paths: Iterable[str | Path], *, keys: HeaderKeys = NINA_KEYS,
                     overscan_section: str | None = None, trim_section: str | None = None,
                     step: int = 2, progress: bool = True) -> Table:
    """Level and noise of each frame: file, exposure time (s), median (ADU), robust std (ADU).

    A frame without an exposure-time keyword gets NaN there; one that cannot be read, or
    whose exposure time is not a number, is left out with a printed reason.

    Parameters
    ----------
    paths : raw frames.
    keys : the night's header keywords (``exptime`` is used).
    overscan_section, trim_section : see :func:`read_raw`.
    step : pixel sampling step for the statistics.
    progress : show a progress bar.
    """
    rows = []
    for path in progress_bar(list(paths), desc="statistics", unit="frame", disable=not progress):
        try:
            ccd = read_raw(path, overscan_section=overscan_section, trim_section=trim_section)
            exptime = (number_value(ccd.header, keys, "exptime", file=path)
                       if keys.exptime in ccd.header else np.nan)
        except FRAME_ERRORS as err:
            print(f"Skipped {Path(path).name}: {err}")
            continue
        level, noise = robust_level_noise(ccd.data, step=step)
        rows.append((Path(path).name, exptime, level, noise))
    table = Table(rows=rows or None, names=("file", "exptime_s", "median_adu", "std_adu"),
                  dtype=(str, float, float, float))
    for name in ("median_adu", "std_adu"):
        table[name].format = ".2f"
    return table


def read_noise_from_pair(first: np.ndarray, second: np.ndarray) -> float:
    """Read noise (ADU) of one frame from the difference of two bias frames: std(a-b)/sqrt(2)."""
    diff = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    return float(mad_std(diff) / np.sqrt(2.0))


# ---------------------------------------------------------------------------------------
# Memory-budgeted combine
# ---------------------------------------------------------------------------------------

def process_memory() -> int:
    """Resident memory of this Python process now, bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def combine_mem_limit(shape: tuple[int, int], *, memory_budget: float, dtype=np.float32,
                      in_use: float | None = None, safety: float = 0.8) -> float:
    """The ``mem_limit`` (bytes) to give ``ccdproc.combine`` so that the process stays in budget.

    ``mem_limit`` only bounds ccdproc's stack of tiles. The memory the process already uses
    (a notebook holding other masters, figures...), the combined result (data, uncertainty,
    mask) and the frames read while tiling come on top: they are subtracted, and a safety
    factor covers the temporary copies made by the clipping.

    Parameters
    ----------
    shape : image shape (rows, columns).
    memory_budget : bytes the whole process may use during the combine.
    dtype : working dtype of the combine.
    in_use : bytes the process already uses (default: measured now).
    safety : fraction of the remaining memory handed to ccdproc.
    """
    pixels = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    # result data + uncertainty + mask, the template frame as read and as converted, and one
    # more frame read while tiling.
    fixed = pixels * (2 * itemsize + 1 + 3 * 4)
    in_use = process_memory() if in_use is None else in_use
    limit = safety * (memory_budget - fixed - in_use)
    if limit < pixels * itemsize:  # less than one frame's worth of tiles: hopelessly slow
        raise MemoryError(
            f"combine memory budget {memory_budget / 1e9:.2f} GB is too small for {shape} "
            f"frames while the process already uses {in_use / 1e9:.2f} GB: raise "
            f"config.combine_memory_budget to at least "
            f"{(fixed + in_use + 10 * pixels * itemsize) / 1e9:.2f} GB."
        )
    return float(limit)


#: Engines of :func:`combine_files`: the book's own vectorised combine (default) and
#: ``ccdproc.combine``; they give the same result (tests/test_reduction.py).
COMBINE_ENGINES = ("datared", "ccdproc")

#: astropy's ``mad_std``: the median absolute deviation times this is the standard deviation
#: of a normal distribution.
MAD_TO_STD = 1.482602218505602


def clipped_combine(stack: np.ndarray, *, method: str = "average", sigma_low: float = 5.0,
                    sigma_high: float = 5.0) -> np.ndarray:
    """Per-pixel combine of a stack of frames (axis 0) after one pass of outlier rejection.

    The rejection of ``ccdproc.combine(..., sigma_clip=True, sigma_clip_func=median,
    sigma_clip_dev_func=mad_std)``: a value further than ``sigma_low``/``sigma_high`` times
    the pixel's MAD standard deviation below/above the pixel's median is left out; the rest
    are averaged (``method="average"``, summed in float64) or their median is taken. NaN
    values count as missing. Partitioning the stack gives the medians' order statistics
    without sorting; ``benchmarks/bench_night.py`` times it against ``ccdproc.combine``.
    """
    if method not in ("average", "median"):
        raise ValueError(f"method must be 'average' or 'median', got {method!r}")
    stack = np.asarray(stack, dtype=np.float32)
    if np.isfinite(stack).all():
        # Every pixel has all the frames: the two middle order statistics by partitioning
        # (the mean of the two, in float32 as numpy's median of float32 data).
        middle = [(len(stack) - 1) // 2, len(stack) // 2]
        part = np.partition(stack, middle, axis=0)
        centre = (part[middle[0]] + part[middle[1]]) / np.float32(2.0)
        part = np.partition(np.abs(stack - centre), middle, axis=0)
        spread = (part[middle[0]] + part[middle[1]]) / np.float32(2.0) * np.float32(MAD_TO_STD)
        del part
    else:  # missing values: sort (NaNs go last) and take the middle of the finite ones
        ordered = np.sort(stack, axis=0)
        n = np.sum(np.isfinite(ordered), axis=0)

        def median_of_sorted(values, count):
            low = np.take_along_axis(values, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
            high = np.take_along_axis(values, np.maximum(count // 2, 0)[None], axis=0)[0]
            return np.where(count > 0, (low + high) / np.float32(2.0), np.float32(np.nan))

        centre = median_of_sorted(ordered, n)
        deviation = np.sort(np.abs(ordered - centre[None]), axis=0)
        spread = median_of_sorted(deviation, n) * np.float32(MAD_TO_STD)
        del ordered, deviation
    with np.errstate(invalid="ignore"):
        keep = ((stack >= centre - np.float32(sigma_low) * spread)
                & (stack <= centre + np.float32(sigma_high) * spread))
    if method == "median":
        kept = np.where(keep, stack, np.float32(np.nan))
        return np.nanmedian(kept, axis=0).astype(np.float32)
    total = np.sum(np.where(keep, stack, np.float32(0.0)), axis=0, dtype=np.float64)
    count = np.count_nonzero(keep, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan).astype(np.float32)


def combine_files(paths: Iterable[str | Path], *, memory_budget: float,
                  method: str = "average", sigma_low: float = 5.0, sigma_high: float = 5.0,
                  dtype=np.float32, engine: str = "datared") -> CCDData:
    """Sigma-clipped combine of FITS files, in strips that fit a memory budget.

    Pixels further than ``sigma_low``/``sigma_high`` robust standard deviations (MAD) from the
    per-pixel median of the stack are rejected before averaging.

    Parameters
    ----------
    paths : float32 FITS files in ADU (e.g. staged by :func:`stage_frames`).
    memory_budget : bytes allowed for the combine (``config.combine_memory_budget``).
    method : "average" or "median".
    sigma_low, sigma_high : clipping thresholds in robust standard deviations.
    dtype : working dtype of the combine.
    engine : ``"datared"`` (:func:`clipped_combine` on strips read from the files) or
        ``"ccdproc"`` (``ccdproc.combine`` with its own tiling, the same result, slower).
    """
    if engine not in COMBINE_ENGINES:
        raise ValueError(f"combine_files: engine must be one of {COMBINE_ENGINES}, got "
                         f"{engine!r}")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("combine_files: no frames to combine.")
    header = fits.getheader(paths[0])
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    mem_limit = combine_mem_limit(shape, memory_budget=memory_budget, dtype=dtype)
    if engine == "ccdproc":
        combined = _ccdproc_combine(paths, method, sigma_low, sigma_high, dtype, mem_limit)
    else:
        # The stack of a strip, its sorted copy, the deviations and the masks: about five
        # copies of the strip's stack.
        rows = max(1, int(mem_limit // (5 * len(paths) * shape[1] * 4)))
        data = np.empty(shape, dtype=np.float32)
        hdus = [fits.open(path) for path in paths]
        try:
            for start in range(0, shape[0], rows):
                strip = slice(start, min(start + rows, shape[0]))
                # .section reads only these rows from the file (scaled integers too)
                stack = np.stack([np.asarray(h[0].section[strip], dtype=np.float32)
                                  for h in hdus])
                data[strip] = clipped_combine(stack, method=method, sigma_low=sigma_low,
                                              sigma_high=sigma_high)
        finally:
            for h in hdus:
                h.close()
        combined = CCDData(data, unit="adu", meta=header)
    combined.data = combined.data.astype(np.float32, copy=False)
    combined.meta["NCOMBINE"] = len(paths)
    return combined


def _ccdproc_combine(paths, method, sigma_low, sigma_high, dtype, mem_limit) -> CCDData:
    """``ccdproc.combine`` of files with combine_files' rejection, its log and warnings quiet."""
    import ccdproc

    ccdproc_log = logging.getLogger("astropy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        # ccdproc reads each staged file with CCDData.read, which builds a WCS from the raw
        # header and warns that it derived MJD-OBS from DATE-OBS: harmless, frames have no WCS.
        warnings.simplefilter("ignore", FITSFixedWarning)
        level = ccdproc_log.level
        ccdproc_log.setLevel(logging.WARNING)  # silence "splitting each image into N chunks"
        try:
            return ccdproc.combine(
                paths,
                method=method,
                mem_limit=mem_limit,
                sigma_clip=True,
                sigma_clip_low_thresh=sigma_low,
                sigma_clip_high_thresh=sigma_high,
                sigma_clip_func="median",
                sigma_clip_dev_func="mad_std",
                dtype=dtype,
                unit="adu",
            )
        finally:
            ccdproc_log.setLevel(level)


def stage_frames(paths: Iterable[str | Path], process: Callable[[CCDData], CCDData], *,
                 scratch_dir: str | Path, skip_log: SkipLog,
                 check: Callable[[CCDData], str | None] | None = None,
                 overscan_section: str | None = None, trim_section: str | None = None,
                 desc: str = "staging") -> list[Path]:
    """Read, process and write frames as float32 files in ``scratch_dir``; return their paths.

    Writing processed frames to disk lets :func:`combine_files` read them strip by strip, so
    memory does not grow with the number of frames. A frame that cannot be read, or that
    ``check`` rejects (it returns a reason), is skipped and recorded in ``skip_log``.

    Parameters
    ----------
    paths : raw frames (read only).
    process : function from a raw frame (ADU) to the processed frame to combine; a
        :data:`~datared.errors.FRAME_ERRORS` error it raises skips the frame.
    scratch_dir : folder for the staged frames (inside the work folder).
    skip_log : where skipped frames and reasons are recorded.
    check : optional function returning a reason to skip a raw frame, or None.
    overscan_section, trim_section : see :func:`read_raw`.
    desc : progress-bar label.
    """
    scratch_dir = Path(scratch_dir)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    for path in progress_bar(list(paths), desc=desc, unit="frame"):
        path = Path(path)
        try:
            ccd = read_raw(path, overscan_section=overscan_section, trim_section=trim_section)
            reason = check(ccd) if check is not None else None
            if reason:
                skip_log.skip(path, reason)
                continue
            ccd = process(ccd)
        except FRAME_ERRORS as err:
            skip_log.skip(path, f"cannot be used ({err})")
            continue
        out = scratch_dir / path.name
        header = ccd.header.copy()
        header["BUNIT"] = "adu"
        fits.writeto(out, np.asarray(ccd.data, dtype=np.float32), header, overwrite=True)
        staged.append(out)
    return staged


def remove_scratch(scratch_dir: str | Path) -> None:
    """Delete a scratch folder made by :func:`stage_frames` (no error if absent)."""
    shutil.rmtree(scratch_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Darks and flats
# ---------------------------------------------------------------------------------------

def exptime_label(exptime: float) -> str:
    """Exposure time as used in file names: 300.0 -> '300', 0.5 -> '0.5'."""
    return f"{float(exptime):g}"


def master_dark_name(exptime: float, *, n_exptimes: int) -> str:
    """File name of a master dark: ``masterdark.fits`` if the night has one dark exposure time,
    else ``masterdark_<exptime>s.fits``.

    Parameters
    ----------
    exptime : exposure time of the master dark, s.
    n_exptimes : number of distinct dark exposure times in the night.
    """
    return "masterdark.fits" if n_exptimes == 1 else f"masterdark_{exptime_label(exptime)}s.fits"


def exposure_time_of(path: str | Path, *, keys: HeaderKeys = NINA_KEYS) -> float:
    """Exposure time (s) in a frame's header; FrameError naming the file if missing or bad.

    Parameters
    ----------
    path : FITS frame (its primary header is read).
    keys : the night's header keywords (``exptime`` is used).
    """
    return number_value(fits.getheader(path), keys, "exptime", file=path)


def group_by_exptime(paths: Iterable[str | Path], *, keys: HeaderKeys = NINA_KEYS,
                     decimals: int = 3) -> dict[float, list[Path]]:
    """Frames grouped by exposure time (s, rounded to ``decimals``), longest first.

    Raises :class:`~datared.errors.FrameError` naming the file when a frame has no usable
    exposure time.

    Parameters
    ----------
    paths : FITS frames.
    keys : the night's header keywords (``exptime`` is used).
    decimals : exposure times equal to this many decimals (s) form one group.
    """
    groups: dict[float, list[Path]] = {}
    for path in paths:
        exptime = round(exposure_time_of(path, keys=keys), decimals)
        groups.setdefault(exptime, []).append(Path(path))
    return dict(sorted(groups.items(), reverse=True))


def choose_dark(dark_exptimes: Iterable[float], exptime: float, *,
                tolerance: float = 1e-3) -> tuple[float | None, bool]:
    """Which master dark to use for a frame of ``exptime`` seconds, and whether to scale it.

    A master dark of the same exposure time is used as it is (it also matches any
    non-linear dark signal, e.g. amplifier glow). Otherwise the longest master dark is
    scaled by the ratio of exposure times: dark current grows linearly with time and the
    longest dark has the best signal-to-noise (scaling it down also scales its noise down).

    Parameters
    ----------
    dark_exptimes : exposure times of the available master darks, s.
    exptime : exposure time of the frame to calibrate, s.
    tolerance : largest difference counted as the same exposure time, s.

    Returns
    -------
    (dark exposure time or None if there is no dark, True if the dark must be scaled)
    """
    available = sorted(float(t) for t in dark_exptimes)
    if not available:
        return None, False
    for dark_exptime in available:
        if abs(dark_exptime - exptime) <= tolerance:
            return dark_exptime, False
    return available[-1], True


def flat_level_problem(ccd: CCDData, *, saturation_adu: float, max_fraction: float = 0.8,
                       min_level_adu: float = 1000.0, step: int = 4) -> str | None:
    """Why a raw flat is unusable (too bright for the linear range, or too faint), or None.

    Parameters
    ----------
    ccd : raw flat, ADU.
    saturation_adu : saturation / non-linearity level of the camera, ADU.
    max_fraction : highest accepted median level as a fraction of ``saturation_adu``.
    min_level_adu : lowest accepted median level, ADU (fainter flats add noise, not signal).
    step : pixel sampling step for the median.
    """
    level = float(np.median(ccd.data[::step, ::step]))
    if level > max_fraction * saturation_adu:
        return (f"median level {level:.0f} ADU is above {max_fraction:.0%} of saturation "
                f"({saturation_adu:.0f} ADU): the camera is not linear there")
    if level < min_level_adu:
        return f"median level {level:.0f} ADU is below {min_level_adu:.0f} ADU: too faint"
    return None


def normalise_by_median(ccd: CCDData, *, step: int = 1) -> CCDData:
    """Divide a frame by its median (so that a master flat has median 1)."""
    median = float(np.median(ccd.data[::step, ::step]))
    if not np.isfinite(median) or median <= 0:
        raise ValueError(f"median {median} is not positive: cannot normalise the flat")
    ccd.data = (ccd.data / np.float32(median)).astype(np.float32, copy=False)
    ccd.header["FLATMED"] = (median, "median before normalisation, ADU")
    return ccd


def normalise_master_flat(master_flat: CCDData, *, step: int = 1) -> CCDData:
    """Divide a combined flat by its own median again (median exactly 1)."""
    median = float(np.median(master_flat.data[::step, ::step]))
    master_flat.data = (master_flat.data / np.float32(median)).astype(np.float32)
    return master_flat


# ---------------------------------------------------------------------------------------
# Bad pixels
# ---------------------------------------------------------------------------------------

def large_scale(image: np.ndarray, *, box: int = 32) -> np.ndarray:
    """Smooth large-scale version of ``image``: median of ``box``x``box`` blocks, interpolated back.

    Parameters
    ----------
    image : 2-D image.
    box : block size, pixels.
    """
    from scipy.ndimage import zoom

    ny, nx = image.shape
    by, bx = ny // box, nx // box
    if by == 0 or bx == 0:
        return np.full(image.shape, float(np.median(image)))
    blocks = np.asarray(image[: by * box, : bx * box], dtype=np.float64).reshape(by, box, bx, box)
    medians = np.median(blocks, axis=(1, 3))
    return zoom(medians, (ny / by, nx / bx), order=1, mode="nearest", grid_mode=True)


def hot_pixels(dark_rate: np.ndarray, *, nsigma: float = 10.0) -> np.ndarray:
    """Pixels whose dark current (ADU/s) is ``nsigma`` robust deviations above the median.

    Parameters
    ----------
    dark_rate : master dark divided by its exposure time, ADU/s.
    nsigma : threshold in robust standard deviations.
    """
    median, noise = robust_level_noise(dark_rate)
    return dark_rate > median + nsigma * max(noise, np.finfo(np.float32).tiny)


def flat_response_outliers(master_flat: np.ndarray, *, low: float = 0.8, high: float = 1.2,
                           box: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose flat response is below ``low`` or above ``high`` times their neighbourhood.

    Parameters
    ----------
    master_flat : normalised master flat (dimensionless).
    low, high : accepted range of response relative to the large-scale flat.
    box : block size of the large-scale flat, pixels.
    """
    relative = master_flat / large_scale(master_flat, box=box)
    return relative < low, relative > high


def bad_pixel_mask(shape: tuple[int, int], *, dark_rate: np.ndarray | None = None,
                   master_flats: Iterable[np.ndarray] = (), hot_nsigma: float = 10.0,
                   low: float = 0.8, high: float = 1.2) -> np.ndarray:
    """Bad-pixel mask (uint8 bit flags: 1 hot, 2 low response, 4 high response).

    Parameters
    ----------
    shape : image shape (rows, columns).
    dark_rate : master dark current, ADU/s, or None if the night has no darks.
    master_flats : normalised master flats (any filter).
    hot_nsigma : hot-pixel threshold (see :func:`hot_pixels`).
    low, high : flat-response range (see :func:`flat_response_outliers`).
    """
    mask = np.zeros(shape, dtype=np.uint8)
    if dark_rate is not None:
        mask[hot_pixels(dark_rate, nsigma=hot_nsigma)] |= BAD_HOT
    for flat in master_flats:
        weak, strong = flat_response_outliers(flat, low=low, high=high)
        mask[weak] |= BAD_LOW_RESPONSE
        mask[strong] |= BAD_HIGH_RESPONSE
    return mask


def count_bad_pixels(mask: np.ndarray) -> Table:
    """Number of pixels flagged for each reason in a bit-flag mask."""
    rows = [(name, int(np.count_nonzero(mask & bit))) for bit, name in BAD_PIXEL_BITS.items()]
    rows.append(("any", int(np.count_nonzero(mask))))
    return Table(rows=rows, names=("reason", "pixels"))


# ---------------------------------------------------------------------------------------
# Uncertainty and cosmic rays
# ---------------------------------------------------------------------------------------

def noise_equation_adu(signal_adu: np.ndarray, *, gain_e_per_adu: float,
                       read_noise_e: float) -> np.ndarray:
    """Per-pixel uncertainty (ADU) of a bias-subtracted frame from the CCD noise equation.

    sigma = sqrt(gain * S + RN**2) / gain, with S the signal (sky, stars and dark current)
    in ADU; negative signals count as zero.

    Parameters
    ----------
    signal_adu : bias-subtracted signal, ADU.
    gain_e_per_adu : gain, electrons per ADU.
    read_noise_e : read noise, electrons.
    """
    electrons = np.clip(np.asarray(signal_adu, dtype=np.float32), 0, None) * np.float32(gain_e_per_adu)
    return (np.sqrt(electrons + np.float32(read_noise_e) ** 2) / np.float32(gain_e_per_adu)).astype(np.float32)


def clean_cosmic_rays(ccd: CCDData, *, gain_e_per_adu: float, read_noise_e: float,
                      saturation_adu: float, sigclip: float = 5.0) -> CCDData:
    """L.A.Cosmic (astroscrappy through ccdproc) on a calibrated frame; data stay in ADU.

    Cosmic-ray pixels are replaced by an estimate from their neighbours and added to the mask.

    Parameters
    ----------
    ccd : calibrated frame, ADU.
    gain_e_per_adu : gain, electrons per ADU.
    read_noise_e : read noise, electrons.
    saturation_adu : saturation level, ADU (L.A.Cosmic takes it in electrons).
    sigclip : detection threshold of L.A.Cosmic, in standard deviations.
    """
    import ccdproc

    cleaned = ccdproc.cosmicray_lacosmic(
        ccd, sigclip=sigclip, gain=gain_e_per_adu * u.electron / u.adu,
        readnoise=read_noise_e * u.electron, satlevel=saturation_adu * gain_e_per_adu,
        gain_apply=False,
    )
    cleaned.data = np.asarray(cleaned.data, dtype=np.float32)
    # ccdproc multiplies the unit by the gain's unit even when gain_apply=False; the data
    # are still in ADU.
    cleaned.unit = u.adu
    return cleaned


# ---------------------------------------------------------------------------------------
# Calibrating science frames
# ---------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """Master frames (float32 arrays in memory, read once) used to calibrate science frames.

    Attributes
    ----------
    bias : master bias, ADU.
    darks : bias-subtracted master darks keyed by exposure time (s), ADU.
    flats : median-normalised master flats keyed by filter name.
    bad_pixels : uint8 bad-pixel mask (0 = good), or None.
    """

    bias: np.ndarray
    darks: dict[float, np.ndarray] = field(default_factory=dict)
    flats: dict[str, np.ndarray] = field(default_factory=dict)
    bad_pixels: np.ndarray | None = None
    _offsets: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    def offset(self, exptime: float) -> np.ndarray:
        """Bias plus dark signal (ADU) for ``exptime`` seconds, computed once per exposure time."""
        key = round(float(exptime), 3)
        if key not in self._offsets:
            dark_exptime, scale = choose_dark(self.darks, key)
            if dark_exptime is None:
                offset = self.bias
            elif scale:
                offset = self.bias + self.darks[dark_exptime] * np.float32(key / dark_exptime)
            else:
                offset = self.bias + self.darks[dark_exptime]
            self._offsets[key] = np.asarray(offset, dtype=np.float32)
        return self._offsets[key]

    def dark_note(self, exptime: float) -> str:
        """How the dark is handled for ``exptime`` seconds, for headers and summaries."""
        dark_exptime, scale = choose_dark(self.darks, exptime)
        if dark_exptime is None:
            return "no dark subtracted (no dark frames)"
        name = master_dark_name(dark_exptime, n_exptimes=len(self.darks))
        if scale:
            return f"dark {name} scaled {exptime_label(dark_exptime)} s -> {exptime_label(exptime)} s"
        return f"dark {name} ({exptime_label(dark_exptime)} s, same exposure)"


def calibrate_frame(path: str | Path, calibration: Calibration, *,
                    keys: HeaderKeys = NINA_KEYS, saturation_adu: float | None = None,
                    overscan_section: str | None = None, trim_section: str | None = None,
                    gain_e_per_adu: float | None = None, read_noise_e: float | None = None,
                    with_uncertainty: bool = False, missing_flat: str = "skip") -> CCDData:
    """Calibrate one raw science frame: bias, dark (matched or scaled) and flat of its filter.

    The result is float32 ADU with the raw header, HISTORY cards of each step, and a mask of
    bad pixels plus pixels at or above ``saturation_adu`` in the raw frame. A frame that
    cannot be calibrated (no filter or exposure time in its header, no master flat for its
    filter, another size) raises :class:`~datared.errors.FrameError` naming the file.

    Parameters
    ----------
    path : raw LIGHT frame (read only).
    calibration : master frames.
    keys : the night's header keywords (``filter`` and ``exptime`` are used).
    saturation_adu : raw level above which pixels are masked as saturated, or None.
    overscan_section, trim_section : see :func:`read_raw`.
    gain_e_per_adu, read_noise_e : needed only with ``with_uncertainty`` (electrons/ADU, e-).
    with_uncertainty : attach a per-pixel uncertainty from the CCD noise equation.
    missing_flat : a frame whose filter has no master flat: "skip" raises
        :class:`~datared.errors.FrameError`; "unflattened" calibrates it without a flat
        (bias and dark only) and flags it, ``FLATFLD = F`` in its header
        (``config.missing_flat``). Calibrated frames with a flat have ``FLATFLD = T``.
    """
    path = Path(path)
    if with_uncertainty and (gain_e_per_adu is None or read_noise_e is None):
        raise ValueError("with_uncertainty needs gain_e_per_adu and read_noise_e")
    if missing_flat not in ("skip", "unflattened"):
        raise ValueError(f"missing_flat = {missing_flat!r} in config.py: use \"skip\" or "
                         "\"unflattened\"")
    raw = read_raw(path, overscan_section=overscan_section, trim_section=trim_section)
    header = raw.header
    band = text_value(header, keys, "filter", file=path)
    if band not in calibration.flats and missing_flat == "skip":
        raise FrameError(f"{path.name}: no master flat for filter {band!r}: take flats in that "
                         "filter, or set missing_flat = \"unflattened\" in config.py to "
                         "calibrate such frames without a flat (flagged)")
    exptime = number_value(header, keys, "exptime", file=path)
    flat = calibration.flats.get(band)  # None: no flat in this filter, "unflattened"
    master_shape = np.shape(flat if flat is not None else calibration.bias)
    if raw.data.shape != master_shape:
        raise FrameError(f"{path.name}: shape {raw.data.shape} differs from the master frames' "
                         f"{master_shape} (binning or sub-frame changed?); calibrate it with "
                         "calibration frames of the same binning and size")
    mask = (calibration.bad_pixels > 0 if calibration.bad_pixels is not None
            else np.zeros(master_shape, dtype=bool))
    if saturation_adu is not None:
        mask |= raw.data >= saturation_adu
    # The brightest raw pixel and how many share its value: many pixels at exactly the same
    # highest level are a hard limit (the converter's or the full well), which
    # check_saturation_level compares with the setting.
    peak = float(np.nanmax(raw.data)) if np.isfinite(raw.data).any() else float("nan")
    header["RAWPEAK"] = (peak, "[adu] highest raw pixel (datared)")
    header["RAWNPEAK"] = (int(np.count_nonzero(raw.data == peak)),
                          "raw pixels at RAWPEAK (datared)")
    uncertainty = None
    if with_uncertainty:
        signal = raw.data - calibration.bias
        sigma = noise_equation_adu(signal, gain_e_per_adu=gain_e_per_adu,
                                   read_noise_e=read_noise_e)
        if flat is not None:
            sigma = sigma / flat
        uncertainty = StdDevUncertainty(sigma.astype(np.float32), unit="adu")
    # raw.data is a float32 array of our own (read_raw made it): calibrate it in place.
    data = raw.data
    np.subtract(data, calibration.offset(exptime), out=data)
    if flat is not None:
        np.divide(data, flat, out=data)
    header["BUNIT"] = "adu"
    header["FLATFLD"] = (flat is not None, "flat-fielded by datared")
    header["HISTORY"] = "datared 02-pre-reduction: bias subtracted (masterbias.fits)"
    header["HISTORY"] = "datared 02-pre-reduction: " + calibration.dark_note(exptime)
    header["HISTORY"] = (f"datared 02-pre-reduction: flat-fielded (masterflat_{band}.fits)"
                         if flat is not None else
                         f"datared 02-pre-reduction: NOT flat-fielded: no master flat for "
                         f"filter {band} (missing_flat = 'unflattened')")
    header["HISTORY"] = "datared 02-pre-reduction: bad and saturated pixels in MASK extension"
    return CCDData(data, unit="adu", meta=header, mask=mask, uncertainty=uncertainty)


def write_master(ccd: CCDData | np.ndarray, path: str | Path, *,
                 header: fits.Header | Mapping | None = None,
                 history: Iterable[str] = ()) -> Path:
    """Write a master frame as a float32 (or uint8 for masks) primary image with HISTORY cards.

    Parameters
    ----------
    ccd : master frame (its uncertainty and mask are not written) or an array.
    path : output file in the work folder (overwritten).
    header : header to use (default: the CCDData's).
    history : HISTORY lines to add.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ccd.data if isinstance(ccd, CCDData) else np.asarray(ccd)
    if header is None:
        header = ccd.meta if isinstance(ccd, CCDData) else fits.Header()
    header = header.copy() if isinstance(header, fits.Header) else fits.Header(dict(header))
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    if data.dtype != np.uint8:
        data = np.asarray(data, dtype=np.float32)
        header["BUNIT"] = header.get("BUNIT", "adu")
    for line in history:
        header["HISTORY"] = line
    fits.PrimaryHDU(data, header).writeto(path, overwrite=True)
    return path


def read_master(path: str | Path) -> CCDData:
    """Read a master frame written by :func:`write_master` as float32 ``CCDData``."""
    data, header = _read_primary(Path(path))
    unit = header.get("BUNIT", "adu") or "adu"
    return CCDData(data.astype(np.float32), unit=unit, meta=header)


def summary_table(frames_in: Mapping[str, int], *, frames_done: Mapping[str, int],
                  skip_logs: Mapping[str, SkipLog]) -> Table:
    """Per step: frames in, frames used or calibrated, frames skipped, and the reasons.

    Parameters
    ----------
    frames_in : number of raw frames per step (e.g. ``{"bias": 21, ...}``).
    frames_done : number of frames used or calibrated per step.
    skip_logs : skip log per step.
    """
    rows = []
    for step, n_in in frames_in.items():
        log = skip_logs.get(step)
        reasons = sorted({reason for _, reason in log.skipped}) if log else []
        rows.append((step, int(n_in), int(frames_done.get(step, 0)), len(log) if log else 0,
                     "; ".join(reasons)))
    return Table(rows=rows or None, names=("step", "frames in", "used/calibrated", "skipped",
                                           "why skipped"),
                 dtype=(str, int, int, int, str))


# ---------------------------------------------------------------------------------------
# Building the masters and calibrating a night (each step used by the chapter)
# ---------------------------------------------------------------------------------------

def build_master_bias(paths: Iterable[str | Path], *, scratch_dir: str | Path,
                      memory_budget: float, overscan_section: str | None = None,
                      trim_section: str | None = None) -> tuple[CCDData, SkipLog]:
    """Sigma-clipped average of the bias frames (ADU) and the log of skipped frames.

    The same combine as ``ccdproc.combine(frames, method="average", sigma_clip=True,
    sigma_clip_low_thresh=5, sigma_clip_high_thresh=5, sigma_clip_func=median,
    sigma_clip_dev_func=mad_std)``, with the frames staged on disk (see :func:`combine_files`).

    Parameters
    ----------
    paths : raw bias frames.
    scratch_dir : temporary folder for staged frames (removed afterwards).
    memory_budget : bytes allowed for the combine.
    overscan_section, trim_section : see :func:`read_raw`.
    """
    log = SkipLog("bias")
    try:
        staged = stage_frames(paths, lambda ccd: ccd, scratch_dir=scratch_dir, skip_log=log,
                              overscan_section=overscan_section, trim_section=trim_section,
                              desc="bias")
        if not staged:
            raise ValueError("no usable bias frames: the night needs BIAS frames "
                             "(see the skipped frames above)")
        return combine_files(staged, memory_budget=memory_budget), log
    finally:
        remove_scratch(scratch_dir)


def stand_in_bias(dark_paths: Iterable[str | Path], light_paths: Iterable[str | Path], *,
                  scratch_dir: str | Path, memory_budget: float, keys: HeaderKeys = NINA_KEYS,
                  overscan_section: str | None = None,
                  trim_section: str | None = None) -> tuple[CCDData, str]:
    """What stands in for the master bias on a night without bias frames, and how it was made.

    In order of preference:

    1. An overscan section is set: the overscan already removed the bias level of each
       frame and row, so the stand-in is zero (a fixed bias pattern in the image area, if
       the camera has one, stays in the frames).
    2. Dark frames: a dark holds the bias plus the dark current. With darks of two or more
       exposure times, the bias of each pixel is the intercept of a straight line through
       their master darks against exposure time. With one exposure time, that master dark
       is the stand-in: frames of the same exposure are then corrected exactly (bias and dark
       current at once), flats and frames of other exposures keep the difference in dark
       current (small against a flat's signal).
    3. Neither: a constant pedestal, the lowest 0.1st percentile of the science frames (at
       most 10 are read). It includes part of the darkest sky, a constant that the photometry's
       background subtraction removes; the fixed bias pattern and the dark current stay.

    Parameters
    ----------
    dark_paths, light_paths : raw dark and science frames.
    scratch_dir, memory_budget : as for :func:`build_master_darks`.
    keys, overscan_section, trim_section : as for :func:`build_master_darks`.

    Returns the stand-in master bias (float32 ADU, ``NCOMBINE = 0``, ``BIASSRC`` saying
    which) and a sentence for the chapter. Raises :class:`MissingInputError` when no dark or
    science frame can be read to measure it.
    """
    dark_paths, light_paths = list(dark_paths), list(light_paths)
    shape = None
    for path in [*light_paths, *dark_paths]:
        try:
            shape = read_raw(path, overscan_section=overscan_section,
                             trim_section=trim_section).data.shape
            break
        except FRAME_ERRORS:
            continue
    if shape is None:
        raise MissingInputError("no bias frames, and no dark or science frame can be read to "
                                "stand in for them: check config.data_dir and config.imagetyp")
    bias = None
    if overscan_section:
        bias = np.zeros(shape, np.float32)
        source = "overscan"
        note = ("No bias frames: the overscan (config.overscan_section) removes the bias level "
                "of every frame and row, so the stand-in master bias is zero; a fixed bias "
                "pattern in the image area, if the camera has one, stays in the frames.")
    elif dark_paths:
        raw_darks, _ = build_master_darks(dark_paths, np.zeros(shape, np.float32),
                                          scratch_dir=scratch_dir, memory_budget=memory_budget,
                                          keys=keys, overscan_section=overscan_section,
                                          trim_section=trim_section)
        times = sorted(raw_darks)
        if len(times) >= 2:
            t = np.asarray(times, float)
            mean_t = t.mean()
            mean_dark = np.mean([raw_darks[x].data for x in times], axis=0, dtype=np.float64)
            slope = sum((ti - mean_t) * (raw_darks[x].data - mean_dark)
                        for ti, x in zip(t, times, strict=True)) / np.sum((t - mean_t) ** 2)
            bias = (mean_dark - slope * mean_t).astype(np.float32)
            source = "darks-intercept"
            note = ("No bias frames: the bias of each pixel is the intercept of its master darks "
                    f"({', '.join(f'{x:g}' for x in times)} s) against exposure time.")
        elif times:
            bias = np.asarray(raw_darks[times[0]].data, np.float32)
            source = f"dark-{times[0]:g}s"
            note = (f"No bias frames: the master dark of {times[0]:g} s (bias plus its dark "
                    f"current) stands in for the bias. Frames of {times[0]:g} s are corrected "
                    "exactly; flats and other exposure times keep the difference in dark "
                    "current, small against a flat's signal.")
    if bias is None:
        levels = []
        for path in light_paths[:10]:
            try:
                data = read_raw(path, overscan_section=overscan_section,
                                trim_section=trim_section).data
            except FRAME_ERRORS:
                continue
            levels.append(float(np.nanpercentile(data[::2, ::2], 0.1)))
        if not levels:
            raise MissingInputError("no bias or dark frames, and no science frame can be read "
                                    "to measure a pedestal: check config.data_dir")
        pedestal = min(levels)
        bias = np.full(shape, pedestal, np.float32)
        source = "pedestal"
        note = (f"Warning: no bias, dark or overscan. A constant pedestal of {pedestal:.1f} ADU "
                "(the lowest 0.1st percentile of the science frames) stands in for the bias. "
                "It includes part of the sky, a constant that the background subtraction "
                "removes, but the fixed bias pattern and the dark current stay in the frames, "
                "and the flats are normalised slightly wrong: take bias frames.")
    master = CCDData(bias, unit="adu", meta=fits.Header())
    master.header["NCOMBINE"] = (0, "no bias frame combined: a stand-in (datared)")
    master.header["BIASSRC"] = (source, "what stands in for the master bias (datared)")
    return master, note


def build_master_darks(paths: Iterable[str | Path], master_bias: np.ndarray, *,
                       scratch_dir: str | Path, memory_budget: float,
                       keys: HeaderKeys = NINA_KEYS, overscan_section: str | None = None,
                       trim_section: str | None = None) -> tuple[dict[float, CCDData], SkipLog]:
    """Bias-subtracted, sigma-clipped master darks, one per exposure time (s, longest first).

    Parameters
    ----------
    paths : raw dark frames.
    master_bias : master bias, ADU.
    scratch_dir : temporary folder for staged frames (removed afterwards).
    memory_budget : bytes allowed for each combine.
    keys : the night's header keywords (``exptime`` is used).
    overscan_section, trim_section : see :func:`read_raw`.
    """
    import ccdproc

    log = SkipLog("dark")
    readable = []
    for path in paths:
        try:
            exposure_time_of(path, keys=keys)
            readable.append(path)
        except FRAME_ERRORS as err:
            log.skip(path, f"no usable exposure time ({err})")

    masters: dict[float, CCDData] = {}
    bias = CCDData(np.asarray(master_bias, dtype=np.float32), unit="adu")
    for exptime, group in group_by_exptime(readable, keys=keys).items():
        scratch = Path(scratch_dir) / f"dark_{exptime_label(exptime)}s"
        try:
            staged = stage_frames(group, lambda ccd: ccdproc.subtract_bias(ccd, bias),
                                  scratch_dir=scratch, skip_log=log,
                                  overscan_section=overscan_section,
                                  trim_section=trim_section,
                                  desc=f"darks {exptime_label(exptime)} s")
            if staged:
                master = combine_files(staged, memory_budget=memory_budget)
                master.header[keys.exptime] = exptime
                masters[exptime] = master
        finally:
            remove_scratch(scratch)
    return masters, log


def build_master_flat(paths: Iterable[str | Path], calibration: Calibration, *,
                      scratch_dir: str | Path, memory_budget: float, saturation_adu: float,
                      keys: HeaderKeys = NINA_KEYS, overscan_section: str | None = None,
                      trim_section: str | None = None) -> tuple[CCDData | None, SkipLog]:
    """Master flat of one filter: bias- and dark-subtracted flats, each divided by its median,
    sigma-clipped average, normalised to median 1. None if no flat is usable.

    Parameters
    ----------
    paths : raw flat frames of one filter.
    calibration : master bias and darks (its ``offset`` gives bias + dark for a time).
    scratch_dir : temporary folder for staged frames (removed afterwards).
    memory_budget : bytes allowed for the combine.
    saturation_adu : saturation level used to reject over-exposed flats, ADU.
    keys : the night's header keywords (``exptime`` is used).
    overscan_section, trim_section : see :func:`read_raw`.
    """
    log = SkipLog("flat")

    def process(ccd: CCDData) -> CCDData:
        # A flat without a usable exposure time raises FrameError: stage_frames skips it
        # and its skip log names the file.
        offset = calibration.offset(number_value(ccd.header, keys, "exptime"))
        ccd.data = ccd.data - offset
        return normalise_by_median(ccd)

    try:
        staged = stage_frames(paths, process, scratch_dir=scratch_dir, skip_log=log,
                              check=lambda ccd: flat_level_problem(
                                  ccd, saturation_adu=saturation_adu),
                              overscan_section=overscan_section, trim_section=trim_section,
                              desc="flats")
        if not staged:
            return None, log
        master = normalise_master_flat(combine_files(staged, memory_budget=memory_budget))
    finally:
        remove_scratch(scratch_dir)
    return master, log


def calibrate_lights(paths: Iterable[str | Path], calibration: Calibration, out_dir: str | Path,
                     *, keys: HeaderKeys = NINA_KEYS,
                     saturation_adu: float | None = None, overscan_section: str | None = None,
                     trim_section: str | None = None, gain_e_per_adu: float | None = None,
                     read_noise_e: float | None = None, with_uncertainty: bool = False,
                     cosmic_rays: bool = False, workers: int | None = 1,
                     missing_flat: str = "skip") -> tuple[Table, SkipLog]:
    """Calibrate every science frame into ``out_dir/<raw file name>``; skip and log bad ones.

    Parameters
    ----------
    paths : raw LIGHT frames (read only).
    calibration : master frames.
    out_dir : output folder (``work_dir/LIGHT_PRERED``), frames written with
        :func:`datared.frame.write_frame`.
    keys : the night's header keywords (``filter`` and ``exptime`` are used).
    saturation_adu : raw level masked as saturated, ADU.
    overscan_section, trim_section : see :func:`read_raw`.
    gain_e_per_adu, read_noise_e : gain (e-/ADU) and read noise (e-) for uncertainties and
        cosmic-ray cleaning.
    with_uncertainty : write an UNCERT extension (CCD noise equation).
    cosmic_rays : clean cosmic rays with L.A.Cosmic (and mask them).
    workers : processes sharing the frames (:func:`datared.parallel.map_frames`; None or 0:
        every core). The files and the table are the same for any number.
    missing_flat : "skip" or "unflattened", for frames of a filter without a master flat
        (see :func:`calibrate_frame`); the table's ``flat_fielded`` column says which.

    Returns
    -------
    (table of calibrated frames with the steps applied, skip log). Its ``file`` column is the
    output's name (:func:`datared.io.output_name`: ``.fits``, whatever the raw suffix), ``raw``
    the raw frame's name. Record the outputs with :func:`datared.io.write_manifest`.
    """
    from datared.parallel import map_frames

    # Settings problems stop here, before the loop would skip every frame for them.
    if (with_uncertainty or cosmic_rays) and (gain_e_per_adu is None or read_noise_e is None):
        raise ValueError("with_uncertainty and cosmic_rays need gain_e_per_adu and read_noise_e")
    if missing_flat not in ("skip", "unflattened"):
        raise ValueError(f"missing_flat = {missing_flat!r} in config.py: use \"skip\" or "
                         "\"unflattened\"")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = SkipLog("light")
    rows = []
    shared = {"calibration": calibration, "out_dir": out_dir, "keys": keys,
              "saturation_adu": saturation_adu, "overscan_section": overscan_section,
              "trim_section": trim_section, "gain_e_per_adu": gain_e_per_adu,
              "read_noise_e": read_noise_e, "with_uncertainty": with_uncertainty,
              "cosmic_rays": cosmic_rays, "missing_flat": missing_flat}
    for outcome in map_frames(_calibrate_light, [Path(p) for p in paths], shared=shared,
                              workers=workers, desc="calibrating", unit="frame"):
        if outcome.error is not None:
            log.skip(outcome.item, str(outcome.error))
            (out_dir / output_name(outcome.item)).unlink(missing_ok=True)
            continue
        rows.append(outcome.value)
    table = Table(rows=rows or None,
                  names=("file", "raw", "filter", "exptime_s", "dark", "masked_pixels",
                         "cosmic_pixels", "raw_peak_adu", "raw_at_peak", "flat_fielded"),
                  dtype=(str, str, str, float, str, int, int, float, int, bool))
    return table, log


def check_saturation_level(peaks, at_peak, saturation_adu: float | None, *,
                           min_pixels: int = 4) -> tuple[bool, str]:
    """Compare the level where the raw frames clip with ``config.saturation_adu``.

    A frame whose brightest value is shared by at least ``min_pixels`` pixels has hit a hard
    limit (the analogue-to-digital converter's largest value or the full well): a star's core
    does not give several pixels of exactly the same highest value by chance. If that level
    is below the setting, pixels at it are not masked as saturated and their stars' fluxes
    are wrong; the note says which value to set.

    Parameters
    ----------
    peaks, at_peak : per frame, the highest raw value (ADU) and how many pixels have it
        (columns ``raw_peak_adu``, ``raw_at_peak`` of :func:`calibrate_lights`).
    saturation_adu : ``config.saturation_adu`` (None: nothing is masked).

    Returns (agree, text).
    """
    peaks = np.asarray(peaks, float)
    at_peak = np.asarray(at_peak, int)
    if len(peaks) == 0 or not np.isfinite(peaks).any():
        return True, "no calibrated frame: the saturation level is not checked"
    clipped = at_peak >= min_pixels
    setting = "None" if saturation_adu is None else f"{saturation_adu:.0f} ADU"
    if not clipped.any():
        return True, (f"no frame reaches a hard limit (brightest raw pixel "
                      f"{np.nanmax(peaks):.0f} ADU, never {min_pixels} pixels at the same "
                      f"highest value): config.saturation_adu = {setting} is not tested")
    level = float(np.median(peaks[clipped]))
    where = f"{clipped.sum()} of {len(peaks)} frames clip at {level:.0f} ADU"
    if saturation_adu is None or level < saturation_adu:
        return False, (f"Note: {where} (at least {min_pixels} pixels at exactly that value), "
                       f"and config.saturation_adu = {setting} does not mask them: stars "
                       f"there have wrong fluxes. Set saturation_adu below {level:.0f}, where "
                       f"the camera is still linear (e.g. {0.9 * level:.0f}), and rerun.")
    return True, (f"{where}; config.saturation_adu = {setting} is below it, so those pixels "
                  "and the ones above the setting are masked as saturated")


def _calibrate_light(path: Path, shared: dict) -> tuple:
    """One science frame of :func:`calibrate_lights`: calibrate, clean, write; its table row."""
    calibration, keys = shared["calibration"], shared["keys"]
    gain, read_noise = shared["gain_e_per_adu"], shared["read_noise_e"]
    ccd = calibrate_frame(path, calibration, keys=keys, saturation_adu=shared["saturation_adu"],
                          overscan_section=shared["overscan_section"],
                          trim_section=shared["trim_section"], gain_e_per_adu=gain,
                          read_noise_e=read_noise, with_uncertainty=shared["with_uncertainty"],
                          missing_flat=shared.get("missing_flat", "skip"))
    band = text_value(ccd.header, keys, "filter", file=path)
    exptime = number_value(ccd.header, keys, "exptime", file=path)
    n_cosmic = 0
    if shared["cosmic_rays"]:
        before = ccd.mask.copy()
        ccd = clean_cosmic_rays(ccd, gain_e_per_adu=gain, read_noise_e=read_noise,
                                saturation_adu=shared["saturation_adu"] or np.inf)
        n_cosmic = int(np.count_nonzero(ccd.mask & ~before))
        ccd.header["HISTORY"] = (f"datared 02-pre-reduction: {n_cosmic} cosmic-ray "
                                 "pixels cleaned (L.A.Cosmic) and masked")
    write_frame(ccd, shared["out_dir"] / output_name(path))
    return (output_name(path), path.name, band, exptime, calibration.dark_note(exptime),
            int(np.count_nonzero(ccd.mask)), n_cosmic, float(ccd.header["RAWPEAK"]),
            int(ccd.header["RAWNPEAK"]), bool(ccd.header["FLATFLD"]))


def write_master_darks(master_darks: Mapping[float, CCDData], work_dir: str | Path, *,
                       keys: HeaderKeys = NINA_KEYS) -> list[Path]:
    """Write master darks with :func:`master_dark_name` names; remove stale ones first.

    Parameters
    ----------
    master_darks : bias-subtracted master darks keyed by exposure time, s.
    work_dir : output folder.
    keys : the night's header keywords (the exposure time is written to ``keys.exptime``).
    """
    work_dir = Path(work_dir)
    for old in work_dir.glob("masterdark*.fits"):
        old.unlink()
    paths = []
    for exptime, master in master_darks.items():
        header = master.header.copy()
        header[keys.exptime] = exptime
        name = master_dark_name(exptime, n_exptimes=len(master_darks))
        paths.append(write_master(master, work_dir / name, header=header,
                                  history=[f"datared: bias-subtracted master dark, {exptime:g} s, "
                                           f"{master.header.get('NCOMBINE', '?')} frames"]))
    return paths


# ---------------------------------------------------------------------------------------
# Reading the masters back (for the noise model of later chapters)
# ---------------------------------------------------------------------------------------

@dataclass
class CalibrationTerms:
    """What the calibration removed from a frame, for the noise equation and saturation (ADU)."""

    bias: np.ndarray | float
    dark: np.ndarray | float
    flat: np.ndarray | float
    note: str = ""


def _master_dark_exptime(path: Path, keys: HeaderKeys) -> float:
    """Exposure time of a master dark, from its header or its file name (masterdark_<t>s)."""
    # Only the header is needed here: the dark that is chosen is read with read_master.
    header = fits.getheader(path)
    if keys.exptime in header:
        return number_value(header, keys, "exptime", file=path)
    stem = path.stem
    if stem.startswith("masterdark_") and stem.endswith("s"):
        try:
            return float(stem[len("masterdark_"):-1])
        except ValueError:
            pass
    raise FrameError(f"{path}: no {keys.exptime} keyword and no exposure time in the file name; "
                     "rerun notebooks/02-pre-reduction.ipynb to rewrite the master darks")


def load_calibration_terms(work_dir: str | Path, filter_name: str, exptime: float, *,
                           keys: HeaderKeys = NINA_KEYS) -> CalibrationTerms:
    """Master bias, dark signal for ``exptime`` and master flat of ``filter_name`` from work_dir.

    The masters are read with :func:`read_master`; the dark is chosen and scaled as chapter
    02 did (:func:`choose_dark`). A missing master bias or flat raises
    :class:`~datared.errors.MissingInputError` naming chapter 02; no master dark means no
    dark signal (zero).

    Parameters
    ----------
    work_dir : work folder with ``masterbias.fits``, ``masterdark*.fits``,
        ``masterflat_<filter>.fits``.
    filter_name : filter of the frame.
    exptime : exposure time of the frame, s.
    keys : the night's header keywords (``exptime`` is read from the master darks).
    """
    work_dir = Path(work_dir)
    bias = read_master(require(work_dir / "masterbias.fits", chapter="02-pre-reduction")).data
    flat = read_master(require(work_dir / f"masterflat_{filter_name}.fits",
                               chapter="02-pre-reduction")).data
    darks = {_master_dark_exptime(p, keys): p for p in sorted(work_dir.glob("masterdark*.fits"))}
    dark_exptime, scale = choose_dark(darks, float(exptime))
    if dark_exptime is None:
        dark, note = 0.0, "no master dark: dark signal taken as zero"
    else:
        factor = float(exptime) / dark_exptime if scale else 1.0
        dark = read_master(darks[dark_exptime]).data.astype(np.float64) * factor
        note = f"{darks[dark_exptime].name} x {factor:g}"
    return CalibrationTerms(bias.astype(np.float64), dark, flat.astype(np.float64), note)
