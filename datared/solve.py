"""The pure-Python astrometric solver: detected stars + a reference catalogue -> a TAN-SIP WCS.

The steps, each shown in chapter 03 on one frame: detect stars (:func:`datared.detection.
detect_stars`), move the catalogue to the frame's epoch, match star patterns around the
header pointing in both parities (:func:`pattern_match_wcs`), then re-match every star and fit
TAN-SIP with weights and outlier rejection (:func:`refine_wcs`). :func:`solve_python` runs
them on a frame and never raises for a bad frame: it returns a :class:`Solution` that says
why it failed. The astrometry.net backend (:mod:`datared.astrometry_net`) returns the same
:class:`Solution`; :func:`solve_frame` is the one entry point for both, and
:func:`summary_table` and :func:`write_solved` serve both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from datared.detection import detect_stars
from datared.errors import FRAME_ERRORS, AstrometryError, FrameError
from datared.frame import (
    NINA_KEYS,
    Frame,
    HeaderKeys,
    frame_epoch,
    header_pointing,
    header_without_wcs,
    pixel_scale_of,
    read_frame,
    write_frame,
)
from datared.wcsfit import (
    catalog_at_epoch,
    fit_tan_sip,
    hint_wcs,
    initial_wcs,
    match_patterns,
    sip_degree_for,
)


@dataclass(frozen=True)
class SolverSettings:
    """What the pure-Python solver needs to know about the night (built once per chapter).

    Attributes
    ----------
    scale_arcsec : nominal pixel scale, arcsec per pixel (``config.pixel_scale_arcsec``).
    keys : the night's header keywords (pointing and date).
    search_radius_arcmin : largest pointing error searched, arcmin.
    sip_degree : wanted SIP degree (lowered when too few stars are matched).
    gain_e_per_adu : detector gain, electrons per ADU.
    mag_column : catalogue column used to rank stars by brightness.
    min_stars : fewest stars (signal-to-noise ratio above 10) worth a pattern match.
    max_stars : the brightest stars detected and used at most.
    nsigma : detection threshold (matched filter), noise sigma.
    max_seconds : time budget of the pattern search, seconds.
    """

    scale_arcsec: float
    keys: HeaderKeys = NINA_KEYS
    search_radius_arcmin: float = 12.0
    sip_degree: int = 3
    gain_e_per_adu: float = 1.0
    mag_column: str = "phot_g_mean_mag"
    min_stars: int = 6
    max_stars: int = 800
    nsigma: float = 5.0
    max_seconds: float = 30.0


def detect_for_astrometry(data: np.ndarray, settings: SolverSettings, *,
                          mask: np.ndarray | None = None,
                          saturation_adu: float | None = None) -> Table:
    """The stars the solver uses: the brightest ``settings.max_stars`` with centroid errors."""
    return detect_stars(data, mask=mask, nsigma=settings.nsigma, deblend=False,
                        max_stars=settings.max_stars, saturation_adu=saturation_adu,
                        gain_e_per_adu=settings.gain_e_per_adu)


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
    #: the reference stars in the field that the solution was checked on (astrometry.net:
    #: the index's stars, ``ra``, ``dec`` in degrees and ``phot_g_mean_mag``)
    reference: Table | None = field(default=None, repr=False)

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
               shape: tuple[int, int], *, sip_degree: int = 3, fwhm_px: float = 3.5,
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
            wcs = fit_tan_sip(det_xy[det_i], sky[cat_i], sip_degree=degree, shape=shape,
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
                 settings: SolverSettings, mask: np.ndarray | None = None, file: str = "",
                 saturation_adu: float | None = None) -> Solution:
    """Solve one frame with the pure-Python backend (never raises for a bad frame).

    Parameters
    ----------
    data : calibrated image, ADU.
    header : its FITS header (pointing and date through ``settings.keys``).
    catalog : reference stars (``ra``, ``dec`` in degrees, ``settings.mag_column``; proper
        motions ``pmra``/``pmdec`` in mas/yr and ``ref_epoch`` are used when present).
    settings : the solver's settings.
    mask : True where pixels are bad.
    file : frame name for messages and the summary.
    saturation_adu : peak level above the sky at which a star counts as saturated, ADU.
    """
    start = time.perf_counter()
    result = Solution(file=file, backend="python")
    try:
        _solve_python(result, np.asarray(data), header, catalog, settings=settings, mask=mask,
                      saturation_adu=saturation_adu)
    except FRAME_ERRORS as err:  # a degenerate fit raises numpy's LinAlgError, a ValueError
        result.success = False
        result.reason = str(err)
        result.wcs = None
    result.seconds = time.perf_counter() - start
    return result


def _solve_python(result: Solution, data: np.ndarray, header: fits.Header, catalog: Table, *,
                  settings: SolverSettings, mask: np.ndarray | None,
                  saturation_adu: float | None) -> None:
    """The steps of :func:`solve_python`, filling ``result``; raises AstrometryError."""
    shape = data.shape
    scale_arcsec = settings.scale_arcsec
    try:
        ra0, dec0 = header_pointing(header, settings.keys)
    except FrameError as err:
        raise AstrometryError(f"no usable pointing in the header: {err}; or use the "
                              "astrometry.net backend (blind)") from None
    stars = detect_for_astrometry(data, settings, mask=mask, saturation_adu=saturation_adu)
    bright = stars[stars["snr"] >= 10]
    result.n_detected = len(bright)
    if len(bright) < settings.min_stars:
        raise AstrometryError(f"only {len(bright)} stars detected with S/N >= 10 (need "
                              f"{settings.min_stars}): clouds, a closed dome or a blank frame?")
    fwhm = stars.meta["fwhm_px"]
    try:
        epoch = frame_epoch(header, settings.keys)
    except FrameError:
        epoch = None  # no date: the catalogue epoch (proper motions of a few mas per year)
    sky = catalog_at_epoch(catalog, epoch)
    mag = np.asarray(catalog[settings.mag_column], float)
    mag = np.where(np.isfinite(mag), mag, 99.0)
    # Only the stars that can fall on the frame, whatever the pointing error.
    hint = hint_wcs(ra0, dec0, scale_arcsec=scale_arcsec, shape=shape)
    near = _near(sky, hint, shape, 1.2 * settings.search_radius_arcmin * 60.0 / scale_arcsec)
    if len(near) < settings.min_stars:
        raise AstrometryError(f"only {len(near)} catalogue stars within "
                              f"{settings.search_radius_arcmin:g}' of the pointing: wrong "
                              "catalogue or wrong RA/DEC in the header?")
    sky, mag = sky[near], mag[near]
    det_xy = np.column_stack([bright["x"], bright["y"]])
    wcs0 = pattern_match_wcs(det_xy, sky, mag, ra0=ra0, dec0=dec0, scale_arcsec=scale_arcsec,
                             shape=shape, search_radius_arcmin=settings.search_radius_arcmin,
                             fwhm_px=fwhm, max_seconds=settings.max_seconds)
    wcs, matched = refine_wcs(wcs0, stars, sky, mag, shape, sip_degree=settings.sip_degree,
                              fwhm_px=fwhm)
    result.wcs = wcs
    result.matched = matched
    result.n_matched = len(matched)
    result.sip_degree = int(matched.meta["sip_degree"])
    dr2 = np.asarray(matched["dx"]) ** 2 + np.asarray(matched["dy"]) ** 2
    result.rms_px = float(np.sqrt(np.mean(dr2)))
    result.rms_arcsec = result.rms_px * pixel_scale_of(wcs)
    if result.n_matched < settings.min_stars:
        raise AstrometryError(f"only {result.n_matched} stars matched (need "
                              f"{settings.min_stars})")
    result.success = True


def pattern_match_wcs(det_xy: np.ndarray, sky: SkyCoord, mag: np.ndarray, *, ra0: float,
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
    hint = hint_wcs(ra0, dec0, scale_arcsec=scale_arcsec, shape=shape)
    for dx, dy, margin, n_det in attempts:
        if time.perf_counter() - start > max_seconds:
            last_error += f" (gave up after {max_seconds:g} s)"
            break
        det = det_xy[:n_det]
        grow = ((nx + 2 * margin) * (ny + 2 * margin)) / (nx * ny)
        n_ref = max(int(len(det) * grow * 1.3), len(det))
        centre = hint.pixel_to_world((nx - 1) / 2.0 + dx, (ny - 1) / 2.0 + dy)
        for mirrored in (False, True):
            wcs = hint_wcs(centre.ra.deg, centre.dec.deg, scale_arcsec=scale_arcsec, shape=shape,
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
            linear = initial_wcs(det[det_i], sky[ref_idx[ref_i]], shape=shape)
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


def write_solved(src: str | Path, dst: str | Path, solution: Solution) -> Path:
    """Write the calibrated frame ``src`` to ``dst`` with the solution's WCS in its header.

    Parameters
    ----------
    src : calibrated frame (read with :func:`datared.frame.read_frame`: image, mask,
        uncertainty and header are kept).
    dst : output file (overwritten: reruns are safe).
    solution : a successful :class:`Solution`.
    """
    if not solution.success or solution.wcs is None:
        raise AstrometryError(f"{Path(src).name}: no WCS to write ({solution.reason})")
    frame = read_frame(src)
    header = header_without_wcs(frame.header)
    header.extend(solution.wcs.to_header(relax=True), update=True)
    header["ASTRBACK"] = (solution.backend, "astrometry backend (datared)")
    header["ASTRNSTR"] = (solution.n_matched, "stars matched in the astrometric fit")
    header["ASTRRMS"] = (round(solution.rms_px, 4), "[pix] rms residual of the fit")
    return write_frame(frame, dst, header=header)


def solve_frame(frame: Frame, catalog: Table | None, *, settings: SolverSettings,
                backend: str = "python", index_config: str | Path | None = None,
                saturation_adu: float | None = None) -> Solution:
    """Solve one calibrated frame with either backend; both return a :class:`Solution`.

    Parameters
    ----------
    frame : the calibrated frame (:func:`datared.frame.read_frame`).
    catalog : reference stars for the "python" backend (not used by "astrometry.net").
    settings : the solver's settings (scale, keywords, SIP degree...).
    backend : "python" or "astrometry.net" (``config.astrometry_backend``).
    index_config : the ``backend.cfg`` of the index files, for "astrometry.net".
    saturation_adu : peak level above the sky at which a star counts as saturated, ADU
        ("python" backend).
    """
    if backend == "python":
        return solve_python(frame.data, frame.header, catalog, settings=settings,
                            mask=frame.mask, file=frame.name, saturation_adu=saturation_adu)
    if backend == "astrometry.net":
        from datared.astrometry_net import solve_field

        if index_config is None:
            raise ValueError("the astrometry.net backend needs index_config (a backend.cfg "
                             "listing index files; see astrometry_net.build_index)")
        result = solve_field(frame.path, index_config, scale_arcsec=settings.scale_arcsec,
                             keys=settings.keys, sip_degree=settings.sip_degree)
        return refine_solution(result, frame, settings=settings, saturation_adu=saturation_adu)
    raise ValueError(f"config.astrometry_backend = {backend!r}: use 'python' or "
                     "'astrometry.net'")


def refine_solution(result: Solution, frame: Frame, *, settings: SolverSettings,
                    saturation_adu: float | None = None) -> Solution:
    """Refine an astrometry.net solution with this module's fit: the frame's stars measured
    as for the python backend (:func:`detect_for_astrometry`), matched to the index stars
    in the field (``result.reference``), and a weighted TAN-SIP fit with outlier rejection
    (:func:`refine_wcs`).

    solve-field's own fit weighs its centroids alike and keeps wrong pairs: on a sparse
    field it can miss by pixels at the edges. A solution is returned unchanged when it failed,
    has no reference stars, or the refinement cannot match enough of them.
    """
    if not result.success or result.reference is None or len(result.reference) < 5:
        return result
    start = time.perf_counter()
    shape = frame.data.shape
    try:
        epoch = frame_epoch(frame.header, settings.keys)
    except FrameError:
        epoch = None  # no date: the index positions as they are
    try:
        stars = detect_for_astrometry(frame.data, settings, mask=frame.mask,
                                      saturation_adu=saturation_adu)
    except FRAME_ERRORS:
        return result
    sky = catalog_at_epoch(result.reference, epoch)
    mag = np.asarray(result.reference["phot_g_mean_mag"], float)
    mag = np.where(np.isfinite(mag), mag, 99.0)
    try:
        wcs, matched = refine_wcs(result.wcs, stars, sky, mag, shape,
                                  sip_degree=settings.sip_degree, fwhm_px=stars.meta["fwhm_px"])
    except FRAME_ERRORS:  # too few index stars matched: keep solve-field's solution
        return result
    if len(matched) < settings.min_stars:
        return result
    result.wcs = wcs
    result.matched = matched
    result.n_detected = int(np.sum(stars["snr"] >= 10))
    result.n_matched = len(matched)
    result.sip_degree = int(matched.meta["sip_degree"])
    result.rms_px = float(np.sqrt(np.mean(np.asarray(matched["dx"]) ** 2
                                          + np.asarray(matched["dy"]) ** 2)))
    result.rms_arcsec = result.rms_px * pixel_scale_of(wcs)
    result.seconds += time.perf_counter() - start
    return result


def sky_level(image: np.ndarray) -> float:
    """The median pixel of a frame from every 4th row and column (ADU): the sky level of a
    star field to a small fraction of its noise, at a sixteenth of the cost of the whole
    frame's median."""
    return float(np.nanmedian(np.asarray(image)[::4, ::4]))


def solve_file(task: tuple, shared: dict) -> Solution:
    """One frame of chapter 03's loop, for :func:`datared.parallel.map_frames`: read the
    frame and :func:`solve_frame` it (nothing is written).

    Parameters
    ----------
    task : (calibrated frame path, target): the target names the frame's catalogue.
    shared : ``catalogs`` and ``index_configs`` (by target; the index only for
        "astrometry.net"), ``settings`` (:class:`SolverSettings`), ``backend`` and
        ``saturation_adu`` (the calibrated level at which a pixel saturates, ADU: the level
        above the frame's sky, :func:`sky_level`, is what the detection uses).
    """
    path, target = task
    frame = read_frame(path)
    return solve_frame(frame, shared["catalogs"].get(target), settings=shared["settings"],
                       backend=shared["backend"],
                       index_config=shared["index_configs"].get(target),
                       saturation_adu=shared["saturation_adu"] - sky_level(frame.data))
