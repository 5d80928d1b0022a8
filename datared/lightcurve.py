"""Light curves of a transit: times, comparison stars, relative flux, baseline and transit fit.

This module owns the machinery of the light-curve chapter (``notebooks/06-lightcurve.ipynb``):

- times: mid-exposure BJD_TDB of a frame (:func:`bjd_tdb`, :func:`catalog_bjd_tdb`) with
  astropy's built-in solar-system ephemeris (no download);
- the per-frame catalogues of chapter 04 as arrays, frames x stars (:func:`load_series`);
- comparison stars: candidates (:func:`comparison_candidates`), iterative inverse-variance
  weights of an ensemble with a variability check (:func:`select_comparisons`, after the
  idea of Broeg, Fernandez & Neuhaeuser 2005), and the target's flux relative to the
  weighted ensemble with its uncertainty (:func:`relative_flux`);
- the baseline: design matrices of per-segment normalisations and decorrelation terms
  (:func:`design_matrix`) and the choice of terms by the Bayesian information criterion;
- the transit: a batman model with quadratic limb darkening (:class:`TransitFit`), a
  least-squares fit and an emcee sampling with the baseline solved at every step;
- the time-averaging red-noise factor beta of Winn et al. (2008) (:func:`red_noise_beta`);
- the export in the AAVSO exoplanet format (:func:`write_aavso`).

It reads no settings: the chapter passes them in. Fluxes are in ADU as in the catalogues,
relative fluxes are dimensionless, times are BJD_TDB in days unless a name says otherwise.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.stats import mad_std
from astropy.table import Table

from datared.errors import DataredError, FrameError
from datared.photometry import FLAG_BITS

#: Decorrelation terms the baseline may use, and the per-frame arrays they come from.
BASELINE_TERMS = ("airmass", "fwhm", "sky", "x", "y")


class FitError(DataredError, ValueError):
    """A transit fit or a chain cannot start (the message names the problem and the fix)."""


class FitWarning(UserWarning):
    """A transit fit or a chain that should not be trusted as it is (the message says why)."""


# ---------------------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------------------

def site_location(*, lat_deg: float, lon_deg: float, height_m: float):
    """The observatory as an astropy ``EarthLocation`` (degrees, metres)."""
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation(lat=lat_deg * u.deg, lon=lon_deg * u.deg, height=height_m * u.m)


def bjd_tdb(time_utc, target, location) -> np.ndarray:
    """Barycentric Julian dates in TDB of UTC times (days), built-in ephemeris.

    Parameters
    ----------
    time_utc : astropy ``Time`` (scalar or array), UTC.
    target : ``SkyCoord`` of the star (the light travel time depends on the direction).
    location : ``EarthLocation`` of the telescope.
    """
    from astropy.time import Time

    times = Time(time_utc, location=location)
    ltt = times.light_travel_time(target, kind="barycentric", ephemeris="builtin")
    return np.asarray((times.tdb + ltt).jd, dtype=float)


def catalog_bjd_tdb(meta, target, location, *, file: str | Path | None = None) -> float:
    """Mid-exposure BJD_TDB (days) of a chapter-04 catalogue from its metadata.

    The metadata use NINA's keywords (``DATE-OBS``, ``EXPTIME``) whatever the camera wrote;
    the middle of the exposure comes from :func:`datared.frame.frame_time`.
    """
    from datared.frame import frame_time

    return float(bjd_tdb(frame_time(meta, file=file), target, location))


# ---------------------------------------------------------------------------------------
# The catalogues of a target as arrays
# ---------------------------------------------------------------------------------------

@dataclass
class Series:
    """The catalogues of one target, frames x stars, for every aperture radius.

    ``flux[tag]``, ``flux_err[tag]``, ``peak[tag]``, ``flags[tag]`` are arrays of shape
    (frames, stars) for the radius tag (``"3p0"``); ``x``, ``y`` (pixels) and ``sky``
    (ADU per pixel) too. Per frame: ``files`` (frame names), ``paths`` (catalogues),
    ``meta`` (each catalogue's metadata), ``airmass``, ``fwhm`` (arcsec), ``scint``
    (relative), ``pierside``, ``exptime`` (s).
    """

    files: list[str]
    paths: list[Path]
    meta: list[dict]
    tags: list[str]
    flux: dict[str, np.ndarray]
    flux_err: dict[str, np.ndarray]
    peak: dict[str, np.ndarray]
    flags: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    sky: np.ndarray
    airmass: np.ndarray
    fwhm: np.ndarray
    scint: np.ndarray
    pierside: np.ndarray
    exptime: np.ndarray
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, int))

    def __len__(self) -> int:
        return len(self.files)


#: Columns every per-frame catalogue must have besides the per-radius ones.
CATALOG_COLUMNS = ("id", "x", "y", "sky")


def check_catalog(table: Table, path: str | Path, tags: Sequence[str], *,
                  ids: np.ndarray) -> None:
    """Raise :class:`FrameError` if one per-frame catalogue cannot join the series.

    The message names the catalogue and the fix: its rows must be those of the reference
    catalogue (``ids``) in the same order, and it needs the columns ``sum``, ``sum_err``,
    ``max`` and ``flags`` of every radius tag. The chapter calls it for each catalogue in
    its loop, so one bad catalogue is skipped instead of stopping :func:`load_series`.
    """
    ids = np.asarray(ids)
    name = Path(path).name
    missing = [column for column in CATALOG_COLUMNS if column not in table.colnames]
    missing += [f"{kind}_{tag}" for tag in tags for kind in ("sum", "sum_err", "max", "flags")
                if f"{kind}_{tag}" not in table.colnames]
    if missing:
        raise FrameError(f"{name}: no column {missing[0]}; rerun "
                         "notebooks/04-photometry.ipynb (with this aperture radius)")
    if len(table) != len(ids) or not np.array_equal(np.asarray(table["id"]), ids):
        raise FrameError(f"{name}: its rows are not those of the reference "
                         "catalogue; rerun notebooks/04-photometry.ipynb")


def load_series(tables: Sequence[Table], paths: Sequence[str | Path], tags: Sequence[str],
                *, ids: np.ndarray) -> Series:
    """Stack chapter 04's per-frame catalogues of one target into arrays (frames x stars).

    Raises :class:`FrameError` naming the first catalogue that :func:`check_catalog`
    rejects; check each one in the reading loop first to skip bad ones.

    Parameters
    ----------
    tables : the catalogues (astropy Tables), one per frame, in time order.
    paths : their files, for messages.
    tags : aperture radius tags (``datared.photometry.radius_tag``).
    ids : the reference catalogue's ``id`` column.
    """
    ids = np.asarray(ids)
    for table, path in zip(tables, paths, strict=True):
        check_catalog(table, path, tags, ids=ids)

    def stack(name, dtype=float):
        return np.array([np.asarray(t[name], dtype=dtype) for t in tables])

    def meta_number(name, default=np.nan):
        return np.array([float(t.meta.get(name, default)) for t in tables], dtype=float)

    fwhm = meta_number("FWHM")
    fwhm[fwhm <= 0] = np.nan  # -1: no star could be measured on the frame
    return Series(
        files=[str(t.meta.get("FRAME", Path(p).name)) for t, p in zip(tables, paths,
                                                                      strict=True)],
        paths=[Path(p) for p in paths], meta=[dict(t.meta) for t in tables], tags=list(tags),
        flux={tag: stack(f"sum_{tag}") for tag in tags},
        flux_err={tag: stack(f"sum_err_{tag}") for tag in tags},
        peak={tag: stack(f"max_{tag}") for tag in tags},
        flags={tag: stack(f"flags_{tag}", int) for tag in tags},
        x=stack("x"), y=stack("y"), sky=stack("sky"), airmass=meta_number("AIRMASS"),
        fwhm=fwhm, scint=meta_number("SCINT", 0.0),
        pierside=np.array([str(t.meta.get("PIERSIDE", "")).strip() for t in tables]),
        exptime=meta_number("EXPTIME"), ids=ids)


def segments_of(pierside: Sequence[str]) -> np.ndarray:
    """Integer label of each frame's segment: a new segment starts at every pier flip."""
    sides = np.asarray(pierside)
    if len(sides) == 0:
        return np.zeros(0, dtype=int)
    return np.concatenate([[0], np.cumsum(sides[1:] != sides[:-1])]).astype(int)


# ---------------------------------------------------------------------------------------
# Comparison stars
# ---------------------------------------------------------------------------------------

def comparison_candidates(series: Series, tag: str, *, target_index: int,
                          colour: np.ndarray | None = None,
                          max_colour_difference: float = 0.5,
                          brightness_range: tuple[float, float] = (0.1, 10.0),
                          max_flagged_fraction: float = 0.02) -> list[str]:
    """Why each star cannot be a comparison star ("" for the candidates).

    A candidate is not the target, is measured on every frame (finite, positive flux), is
    never saturated (chapter 04's ``saturated`` flag bit, set where a pixel of the aperture
    reached the saturation level of that pixel, is never set), is clean (flags 0)
    on all but ``max_flagged_fraction`` of the frames, has a median flux within
    ``brightness_range`` times the target's, and a colour within ``max_colour_difference``
    mag of the target's where both are known (``colour``, NaN where unknown).

    Parameters
    ----------
    series : the target's catalogues (:func:`load_series`).
    tag : aperture radius tag.
    target_index : row of the target in the catalogues.
    colour : colour index per star (e.g. g - r, mag), NaN where unknown; None: not used.
    """
    flux = series.flux[tag]
    flags = series.flags[tag]
    saturated = (flags & FLAG_BITS["saturated"]) != 0
    target_flux = np.nanmedian(flux[:, target_index])
    reasons = []
    for star in range(flux.shape[1]):
        f = flux[:, star]
        if star == target_index:
            reasons.append("the target")
        elif not np.all(np.isfinite(f) & (f > 0)):
            reasons.append(f"not measured on {np.sum(~(np.isfinite(f) & (f > 0)))} frame(s)")
        elif np.any(saturated[:, star]):
            reasons.append(f"saturated on {np.sum(saturated[:, star])} frame(s)")
        elif np.mean(flags[:, star] != 0) > max_flagged_fraction:
            reasons.append(f"flagged on {np.sum(flags[:, star] != 0)} frame(s)")
        elif not (brightness_range[0] <= np.median(f) / target_flux <= brightness_range[1]):
            reasons.append(f"flux {np.median(f) / target_flux:.2f} x the target's")
        elif (colour is not None and np.isfinite(colour[star])
              and np.isfinite(colour[target_index])
              and abs(colour[star] - colour[target_index]) > max_colour_difference):
            reasons.append(f"colour differs by {colour[star] - colour[target_index]:+.2f} mag")
        else:
            reasons.append("")
    return reasons


def normalise_by_segment(values: np.ndarray, segments: np.ndarray,
                         use: np.ndarray | None = None) -> np.ndarray:
    """Divide each column of ``values`` by its median in each segment (over frames ``use``)."""
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    use = np.ones(len(values), dtype=bool) if use is None else np.asarray(use, dtype=bool)
    for label in np.unique(segments):
        rows = segments == label
        ref = rows & use if np.any(rows & use) else rows
        out[rows] = values[rows] / np.nanmedian(values[ref], axis=0)
    return out


def within_clip(values: np.ndarray, axis: int = 0, clip: float = 4.0) -> np.ndarray:
    """True for the values within ``clip`` robust sigmas (astropy's ``mad_std``) of the
    median along ``axis`` (False for NaN)."""
    values = np.asarray(values, dtype=float)
    median = np.nanmedian(values, axis=axis, keepdims=True)
    sigma = np.expand_dims(mad_std(values, axis=axis, ignore_nan=True), axis)
    return np.abs(values - median) <= clip * sigma


def clipped_std(values: np.ndarray, axis: int = 0, clip: float = 4.0) -> np.ndarray:
    """Standard deviation along ``axis`` of the values within ``clip`` robust sigmas
    (1.4826 MAD) of the median: a cosmic ray does not count, and unlike the MAD itself the
    result changes smoothly with the data (so iterated weights converge). NaN ignored."""
    values = np.asarray(values, dtype=float)
    kept = np.where(within_clip(values, axis=axis, clip=clip), values, np.nan)
    return np.nanstd(kept, axis=axis, ddof=1)


@dataclass
class ComparisonResult:
    """Result of :func:`select_comparisons` (arrays over the candidate stars given)."""

    stars: np.ndarray  # the candidate columns, in the order given
    weight: np.ndarray  # normalised inverse-variance weights (0 for the stars not used)
    rms: np.ndarray  # scatter of each star against the ensemble of the others (relative)
    expected: np.ndarray  # expected scatter from its errors and the ensemble's
    used: np.ndarray  # boolean
    reason: list[str]  # why a star is not used ("" if used)
    iterations: int  # weight iterations in all rounds
    converged: bool  # the weights of the last round changed by less than tol
    light_curves: np.ndarray  # frames x candidates: each star over the ensemble of the others


def weighted_ensemble(rel: np.ndarray, rel_var: np.ndarray,
                      weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the weighted mean of the stars' relative fluxes and its variance.

    A star without a value on a frame (NaN: flagged there, or not measured) leaves the
    ensemble of that frame only; the weights of the others are renormalised on it, so the
    ensemble stays near 1. ``E_j = sum_i w_i r_ij / sum_i w_i`` and
    ``var_j = sum_i w_i^2 v_ij / (sum_i w_i)^2`` over the stars with a value on frame j
    (NaN where none has one).

    Parameters
    ----------
    rel, rel_var : frames x stars, each star's flux over its median and its variance.
    weights : one weight per star (need not sum to 1).
    """
    rel = np.asarray(rel, dtype=float)
    rel_var = np.asarray(rel_var, dtype=float)
    have = np.isfinite(rel) & np.isfinite(rel_var)
    w = np.where(have, np.asarray(weights, dtype=float)[None, :], 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sum(np.where(have, rel, 0.0) * w, axis=1) / total
        var = np.sum(np.where(have, rel_var, 0.0) * w ** 2, axis=1) / total ** 2
    none = total <= 0
    mean[none] = np.nan
    var[none] = np.nan
    return mean, var


def _ensemble_of_others(rel: np.ndarray, rel_var: np.ndarray, weights: np.ndarray,
                        segments: np.ndarray):
    """Each star's flux relative to the weighted ensemble of the others, and its variance."""
    n_stars = rel.shape[1]
    curves = np.full(rel.shape, np.nan)
    variance = np.full(rel.shape, np.nan)
    for star in range(n_stars):
        w = weights.copy()
        w[star] = 0.0
        if w.sum() <= 0:
            continue
        ensemble, ensemble_var = weighted_ensemble(rel, rel_var, w)
        ratio = rel[:, star] / ensemble
        curves[:, star] = ratio
        variance[:, star] = ratio ** 2 * (rel_var[:, star] / rel[:, star] ** 2
                                          + ensemble_var / ensemble ** 2)
    curves = normalise_by_segment(curves, segments)
    return curves, variance


def select_comparisons(flux: np.ndarray, flux_err: np.ndarray, *, segments: np.ndarray,
                       scint: np.ndarray | float = 0.0, max_ratio: float = 1.5,
                       min_stars: int = 2, max_iter: int = 50, tol: float = 1e-5,
                       freeze_clip_after: int = 5) -> ComparisonResult:
    """Iterative inverse-variance weights of comparison stars, rejecting variable ones.

    Each star is divided by the weighted ensemble of the *other* stars and normalised in each
    segment (pier side); its scatter ``rms`` (:func:`clipped_std`: points beyond 4 robust
    sigmas left out) sets its new weight
    1/rms^2, and the weights are iterated until they change by less than ``tol`` (in the
    spirit of Broeg et al. 2005). A star whose scatter exceeds ``max_ratio`` times the
    scatter expected from its errors and the ensemble's is variable (or badly measured): the
    worst such star is rejected and the weights are iterated again, until none is left or
    only ``min_stars`` remain. After ``freeze_clip_after`` iterations of a round the points
    left out by the clip are kept fixed for the rest of the round: a point right at the limit
    could otherwise flip in and out at every iteration and the weights would never settle.

    Parameters
    ----------
    flux, flux_err : frames x candidates, ADU.
    segments : segment label of each frame (:func:`segments_of`).
    scint : relative scintillation noise per frame (or one value), added to every star.
    max_ratio : largest accepted ratio of measured to expected scatter.
    min_stars : the fewest comparison stars kept.
    """
    flux = np.asarray(flux, dtype=float)
    scint = np.broadcast_to(np.asarray(scint, dtype=float).reshape(-1, 1)
                            if np.ndim(scint) else scint, flux.shape)
    median = np.nanmedian(flux, axis=0)
    rel = flux / median
    rel_var = (np.asarray(flux_err, dtype=float) / median) ** 2 + (scint * rel) ** 2
    n_stars = flux.shape[1]
    used = np.ones(n_stars, dtype=bool)
    reason = [""] * n_stars
    weights = 1.0 / np.nanmedian(rel_var, axis=0)
    iterations = 0
    while True:
        converged = False
        for step in range(max_iter):
            iterations += 1
            w = np.where(used, weights, 0.0)
            curves, variance = _ensemble_of_others(rel, rel_var, w, segments)
            if step < freeze_clip_after:
                kept = within_clip(curves, axis=0)
            rms = np.nanstd(np.where(kept, curves, np.nan), axis=0, ddof=1)
            new = np.where(used, 1.0 / rms ** 2, 0.0)
            change = np.max(np.abs(new / new.sum() - w / w.sum()))
            weights = new
            if change < tol:
                converged = True
                break
        expected = np.sqrt(np.nanmedian(variance, axis=0))
        ratio = rms / expected
        bad = used & (ratio > max_ratio)
        if not bad.any() or used.sum() <= min_stars:
            break
        worst = int(np.argmax(np.where(bad, ratio, -np.inf)))
        used[worst] = False
        reason[worst] = f"variable (or badly measured): rms {ratio[worst]:.1f} x expected"
    weights = np.where(used, weights, 0.0)
    curves, variance = _ensemble_of_others(rel, rel_var, weights, segments)
    rms = clipped_std(curves, axis=0)
    expected = np.sqrt(np.nanmedian(variance, axis=0))
    return ComparisonResult(stars=np.arange(n_stars), weight=weights / weights.sum(), rms=rms,
                            expected=expected, used=used, reason=reason,
                            iterations=iterations, converged=converged, light_curves=curves)


def relative_flux(target_flux: np.ndarray, target_err: np.ndarray, comp_flux: np.ndarray,
                  comp_err: np.ndarray, weights: np.ndarray, *,
                  scint: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The target's flux over the weighted ensemble of comparison stars, and its 1-sigma error.

    Each comparison star is first divided by its median flux, so the ensemble
    ``E = sum_i w_i F_i / m_i`` (weights normalised to a sum of 1) is near 1; the relative
    flux is ``R = F_t / E`` (in units of the target's ADU). The error adds in quadrature the
    target's ``sum_err``, the ensemble's (``sum_i w_i^2 sigma_i^2 / m_i^2``) and the
    scintillation of every star (relative sigma ``scint``, independent from star to star).
    A comparison star that is NaN on a frame (flagged there) leaves that frame's ensemble
    only (:func:`weighted_ensemble`).

    Parameters
    ----------
    target_flux, target_err : per frame, ADU.
    comp_flux, comp_err : frames x comparison stars, ADU (NaN: not usable on that frame).
    weights : weight of each comparison star.
    scint : relative scintillation noise per frame (or one value).
    """
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    comp_flux = np.asarray(comp_flux, dtype=float)
    median = np.nanmedian(comp_flux, axis=0)
    scint = np.asarray(scint, dtype=float)
    ensemble, ensemble_var = weighted_ensemble(
        comp_flux / median, (np.asarray(comp_err, dtype=float) ** 2
                             + (np.atleast_1d(scint)[:, None] * comp_flux) ** 2) / median ** 2,
        w)
    target_flux = np.asarray(target_flux, dtype=float)
    ratio = target_flux / ensemble
    relative_var = ((np.asarray(target_err, dtype=float) / target_flux) ** 2 + scint ** 2
                    + ensemble_var / ensemble ** 2)
    return ratio, ratio * np.sqrt(relative_var)


def out_of_transit(bjd: np.ndarray, *, t0: float, t14_d: float,
                   margin_d: float = 10.0 / 1440) -> np.ndarray:
    """True for the frames outside the predicted transit window (plus a margin, days)."""
    return np.abs(np.asarray(bjd) - t0) > 0.5 * t14_d + margin_d


def detrended_scatter(flux: np.ndarray, bjd: np.ndarray, segments: np.ndarray,
                      use: np.ndarray) -> float:
    """Scatter (:func:`clipped_std`) of ``flux`` over frames ``use`` after a straight line in
    time per segment, relative to that line."""
    residuals = []
    for label in np.unique(segments):
        rows = (segments == label) & use & np.isfinite(flux)
        if rows.sum() < 3:
            continue
        t = bjd[rows] - bjd[rows].mean()
        coeffs = np.polyfit(t, flux[rows], 1)
        residuals.append(flux[rows] / np.polyval(coeffs, t) - 1.0)
    if not residuals:
        return float("nan")
    return float(clipped_std(np.concatenate(residuals)))


# ---------------------------------------------------------------------------------------
# Baseline
# ---------------------------------------------------------------------------------------

def design_matrix(regressors: dict[str, np.ndarray], terms: Sequence[str],
                  segments: np.ndarray, *, per_segment: Sequence[str] = ("x", "y")
                  ) -> tuple[np.ndarray, list[str]]:
    """Columns of a multiplicative baseline: one normalisation per segment, then the terms.

    Each term is centred and scaled to unit standard deviation (the terms named in
    ``per_segment``, the position, are centred in each segment, since the star lands on
    other pixels after a flip). Returns the matrix (frames x columns) and the column names.

    Parameters
    ----------
    regressors : per-frame arrays by name (``airmass``, ``fwhm``, ``sky``, ``x``, ``y``).
    terms : which of them to use.
    segments : segment label of each frame.
    """
    labels = np.unique(segments)
    columns = [(segments == label).astype(float) for label in labels]
    names = [f"norm_{label}" for label in labels]
    for term in terms:
        values = np.asarray(regressors[term], dtype=float).copy()
        if term in per_segment:
            for label in labels:
                rows = segments == label
                values[rows] -= np.mean(values[rows])
        else:
            values -= np.mean(values)
        scale = np.std(values)
        columns.append(values / scale if scale > 0 else values)
        names.append(term)
    return np.column_stack(columns), names


def solve_baseline(flux: np.ndarray, flux_err: np.ndarray, shape: np.ndarray,
                   design: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least-squares coefficients ``c`` of ``flux ~ shape * (design @ c)``, and chi^2."""
    a = design * (shape / flux_err)[:, None]
    b = flux / flux_err
    # normal equations: the design has a handful of columns, so this is fast and stable
    coeffs = np.linalg.solve(a.T @ a, a.T @ b)
    resid = b - a @ coeffs
    return coeffs, float(resid @ resid)


# ---------------------------------------------------------------------------------------
# The transit model and its fit
# ---------------------------------------------------------------------------------------

#: Names of the transit parameters fitted, in the order of the parameter vectors.
PARAMETERS = ("t0", "rp_rs", "a_rs", "b", "u1", "u2")


@dataclass
class Prior:
    """A Gaussian prior: value and 1-sigma width (``sigma = inf``: no prior)."""

    value: float
    sigma: float = math.inf


def inclination_deg(a_rs: float, b: float) -> float:
    """Orbital inclination (degrees) of a circular orbit from a/R* and the impact parameter."""
    return math.degrees(math.acos(min(1.0, b / a_rs)))


def transit_duration_h(period_d: float, rp_rs: float, a_rs: float, b: float) -> float:
    """Total duration T14 (first to fourth contact) of a circular orbit, hours."""
    inc = math.acos(min(1.0, b / a_rs))
    arg = (1 + rp_rs) ** 2 - b ** 2
    if arg <= 0:
        return 0.0
    return 24.0 * period_d / math.pi * math.asin(min(1.0, math.sqrt(arg) / (a_rs * math.sin(inc))))


class TransitFit:
    """A batman transit times a linear multiplicative baseline, fitted to one light curve.

    The baseline coefficients are linear: for every set of transit parameters they are
    solved by weighted least squares, and the sampler's posterior integrates over them
    analytically (:meth:`log_probability`), so the fit and the sampler explore only the
    transit parameters :data:`PARAMETERS`; the baseline is fitted jointly with them.

    Parameters
    ----------
    bjd : times, BJD_TDB (days).
    flux, flux_err : relative flux and its 1-sigma error.
    design : baseline design matrix (:func:`design_matrix`).
    period_d : orbital period (days, fixed).
    priors : a :class:`Prior` for each name of :data:`PARAMETERS` (``t0`` may have none).
    """

    def __init__(self, bjd, flux, flux_err, design, *, period_d: float,
                 priors: dict[str, Prior]):
        import batman

        self.bjd = np.asarray(bjd, dtype=float)
        self.t_ref = float(np.round(np.mean(self.bjd), 1))
        self.flux = np.asarray(flux, dtype=float)
        self.flux_err = np.asarray(flux_err, dtype=float)
        self.design = np.asarray(design, dtype=float)
        self.period_d = float(period_d)
        self.priors = {name: priors.get(name, Prior(np.nan)) for name in PARAMETERS}
        self._params = batman.TransitParams()
        self._params.t0 = 0.0
        self._params.per = self.period_d
        self._params.rp = 0.1
        self._params.a = 10.0
        self._params.inc = 90.0
        self._params.ecc = 0.0
        self._params.w = 90.0
        self._params.limb_dark = "quadratic"
        self._params.u = [0.4, 0.2]
        # times relative to t_ref keep the precision of a float in the model
        self._model = batman.TransitModel(self._params, self.bjd - self.t_ref)

    def transit(self, theta, times=None) -> np.ndarray:
        """Relative flux of the star (1 outside transit) for parameters ``theta``."""
        t0, rp, a_rs, b, u1, u2 = (float(v) for v in theta)
        self._params.t0 = t0 - self.t_ref
        self._params.rp = rp
        self._params.a = a_rs
        self._params.inc = inclination_deg(a_rs, b)
        self._params.u = [u1, u2]
        if times is None:
            return np.asarray(self._model.light_curve(self._params), dtype=float)
        import batman

        model = batman.TransitModel(self._params, np.asarray(times, dtype=float) - self.t_ref)
        return np.asarray(model.light_curve(self._params), dtype=float)

    @staticmethod
    def bounds_violations(theta) -> list[str]:
        """The physical limits that ``theta`` breaks ([] if none): 0 < Rp/R* < 0.5,
        a/R* > 1.5, 0 <= b < min(1 + Rp/R*, a/R*), and the quadratic limb darkening of
        Kipping (2013) that keeps the intensity positive and decreasing towards the limb:
        u1 > 0, u1 + u2 < 1, u1 + 2 u2 > 0 (and u1 + u2 > 0)."""
        _, rp, a_rs, b, u1, u2 = (float(v) for v in theta)
        tests = [(0.0 < rp < 0.5, f"Rp/R* = {rp:.4g} not in (0, 0.5)"),
                 (a_rs > 1.5, f"a/R* = {a_rs:.4g} not above 1.5"),
                 (0.0 <= b < min(1.0 + rp, a_rs), f"b = {b:.4g} not in [0, min(1 + Rp/R*, a/R*))"),
                 (u1 > 0.0, f"u1 = {u1:.4g} not above 0"),
                 (0.0 < u1 + u2 < 1.0, f"u1 + u2 = {u1 + u2:.4g} not in (0, 1)"),
                 (u1 + 2.0 * u2 > 0.0, f"u1 + 2 u2 = {u1 + 2.0 * u2:.4g} not above 0")]
        return [message for ok, message in tests if not ok]

    def in_bounds(self, theta) -> bool:
        """True within the physical limits of :meth:`bounds_violations`."""
        return not self.bounds_violations(theta)

    def prior_residuals(self, theta) -> np.ndarray:
        """(value - prior) / sigma for every parameter with a finite prior."""
        out = []
        for name, value in zip(PARAMETERS, theta, strict=True):
            prior = self.priors[name]
            if np.isfinite(prior.sigma) and prior.sigma > 0:
                out.append((value - prior.value) / prior.sigma)
        return np.asarray(out, dtype=float)

    def solve(self, theta) -> tuple[np.ndarray, np.ndarray, float]:
        """Transit model, baseline and chi^2 of the data for parameters ``theta``."""
        shape = self.transit(theta)
        coeffs, chi2 = solve_baseline(self.flux, self.flux_err, shape, self.design)
        return shape, self.design @ coeffs, chi2

    def log_probability(self, theta) -> float:
        """Log posterior (up to a constant) of the transit parameters, with the baseline
        coefficients integrated out (flat priors on them): Gaussian likelihood at the
        least-squares baseline, minus half the log-determinant of the baseline's normal
        matrix, plus the Gaussian priors."""
        if not self.in_bounds(theta):
            return -np.inf
        shape = self.transit(theta)
        a = self.design * (shape / self.flux_err)[:, None]
        b = self.flux / self.flux_err
        normal = a.T @ a
        # Cholesky factor of the normal matrix: solves the least squares and gives its
        # log-determinant (twice the sum of the logs of the factor's diagonal)
        factor = np.linalg.cholesky(normal)
        projected = np.linalg.solve(factor, a.T @ b)
        chi2 = float(b @ b - projected @ projected)
        log_det = 2.0 * float(np.sum(np.log(np.diag(factor))))
        prior = self.prior_residuals(theta)
        return -0.5 * (chi2 + log_det + float(prior @ prior))

    def least_squares(self, theta0):
        """Best-fitting parameters from ``theta0`` (scipy ``least_squares``, priors included)."""
        from scipy.optimize import least_squares

        start = np.asarray(theta0, dtype=float)
        # the fit moves steps in units of a typical uncertainty of each parameter (a mid-time
        # of 2.46e6 days would otherwise make finite differences meaningless)
        scale = np.array([1e-3, 1e-2, 0.1, 0.05, 0.05, 0.05])
        n_priors = len(self.prior_residuals(start))

        def residuals(step):
            theta = start + step * scale
            if not self.in_bounds(theta):
                return np.full(len(self.flux) + n_priors, 1e3)
            shape = self.transit(theta)
            coeffs, _ = solve_baseline(self.flux, self.flux_err, shape, self.design)
            data = (self.flux - shape * (self.design @ coeffs)) / self.flux_err
            return np.concatenate([data, self.prior_residuals(theta)])

        def jacobian(step, h=0.05):
            # forward differences with a fixed step of 0.05 scale units: batman integrates
            # to about 1 ppm, so much smaller steps would only measure its rounding
            r0 = residuals(step)
            return np.column_stack([(residuals(step + h * unit) - r0) / h
                                    for unit in np.eye(len(step))])

        problems = self.bounds_violations(start)
        if problems:
            raise FitError(f"the least-squares start is outside the physical limits "
                             f"({'; '.join(problems)}); start from the priors' centres and "
                             "check the priors in config.targets")
        # Steps are in units of a typical uncertainty, so a change below 1e-4 of them ends the
        # fit: batman's integration noise (about 1 ppm) keeps the cost from settling to the
        # default relative 1e-8, and the fit would run to its evaluation limit instead.
        result = least_squares(residuals, np.zeros(len(start)), jac=jacobian, method="trf",
                               xtol=1e-4)
        if not result.success:
            warnings.warn(f"the least-squares transit fit did not converge ({result.message}):"
                          " its parameters are no good start for the sampler; check the "
                          "starting values (ephemeris, Rp/R* guess) and the light curve",
                          FitWarning, stacklevel=2)
        return start + result.x * scale

    def sample(self, theta0, *, n_walkers: int = 32, n_steps: int = 2500, seed: int = 0,
               spread=(2e-4, 2e-3, 0.05, 0.01, 0.02, 0.02), max_tries: int = 1000,
               min_acceptance: float = 0.1):
        """Run emcee from a small ball around ``theta0`` (seeded); returns the sampler.

        Raises :class:`FrameError` if ``theta0`` breaks a physical limit or has no finite
        posterior (start from :meth:`least_squares`), or if ``max_tries`` draws of a walker
        all fall outside the limits (``theta0`` is at a limit: shrink ``spread``). Warns
        (:class:`FitWarning`) if the mean acceptance fraction ends below ``min_acceptance``:
        the walkers are stuck, and the chain's spread is not the posterior's.
        """
        import emcee

        theta0 = np.asarray(theta0, dtype=float)
        problems = self.bounds_violations(theta0)
        if problems:
            raise FitError(f"the sampler's start is outside the physical limits "
                             f"({'; '.join(problems)}); start from the result of "
                             "TransitFit.least_squares, or check the priors in config.targets")
        if not np.isfinite(self.log_probability(theta0)):
            raise FitError("the posterior is not finite at the sampler's start (NaN flux or "
                             "error bars?); check the light curve and start from "
                             "TransitFit.least_squares")
        rng = np.random.default_rng(seed)
        spread = np.asarray(spread, dtype=float)
        start = theta0 + rng.normal(size=(n_walkers, len(theta0))) * spread
        for k in range(n_walkers):
            for _ in range(max_tries):
                if self.in_bounds(start[k]):
                    break
                start[k] = theta0 + rng.normal(size=len(theta0)) * spread
            else:
                broken = "; ".join(self.bounds_violations(start[k]))
                raise FitError(f"no walker start within the physical limits in {max_tries} "
                                 f"draws around the start (last: {broken}); the start is at "
                                 "a limit: shrink spread or start from "
                                 "TransitFit.least_squares")
        sampler = emcee.EnsembleSampler(n_walkers, len(theta0), self.log_probability)
        sampler.random_state = np.random.RandomState(seed).get_state()
        sampler.run_mcmc(start, n_steps, progress=False)
        acceptance = float(np.mean(sampler.acceptance_fraction))
        if acceptance < min_acceptance:
            warnings.warn(f"emcee: mean acceptance fraction {acceptance:.3f} is below "
                          f"{min_acceptance}: the walkers are stuck and the chain does not "
                          "sample the posterior; start from TransitFit.least_squares, shrink "
                          "spread, or check the priors and error bars", FitWarning,
                          stacklevel=2)
        return sampler


def bic(chi2: float, n_parameters: int, n_points: int) -> float:
    """Bayesian information criterion ``chi^2 + k ln n``."""
    return float(chi2 + n_parameters * math.log(n_points))


def choose_baseline(bjd, flux, flux_err, regressors: dict[str, np.ndarray],
                    segments: np.ndarray, *, theta0, period_d: float,
                    priors: dict[str, Prior],
                    terms: Sequence[str] = BASELINE_TERMS) -> Table:
    """Fit the transit with every subset of the baseline ``terms``; one row per subset.

    Columns: ``terms`` (comma-separated, "" for normalisations only), ``n_terms``,
    ``chi2``, ``bic`` (counting the transit parameters, the normalisations and the terms)
    and ``delta_bic`` (against the lowest), sorted by BIC.
    """
    rows = []
    n = len(flux)
    for k in range(len(terms) + 1):
        for subset in itertools.combinations(terms, k):
            design, names = design_matrix(regressors, subset, segments)
            fit = TransitFit(bjd, flux, flux_err, design, period_d=period_d, priors=priors)
            theta = fit.least_squares(theta0)
            _, _, chi2 = fit.solve(theta)
            rows.append({"terms": ", ".join(subset), "n_terms": len(subset), "chi2": chi2,
                         "bic": bic(chi2, len(PARAMETERS) + len(names), n)})
    table = Table(rows=rows)
    table["delta_bic"] = table["bic"] - np.min(table["bic"])
    table.sort("bic")
    return table


# ---------------------------------------------------------------------------------------
# Red noise
# ---------------------------------------------------------------------------------------

def red_noise_beta(residuals: np.ndarray, bin_sizes: Sequence[int]) -> tuple[float, np.ndarray]:
    """Time-averaging red-noise factor beta (Winn et al. 2008) and its value per bin size.

    For bins of ``N`` consecutive points (``M`` bins), the scatter of the bin means is
    compared with the white-noise expectation ``sigma_1 / sqrt(N) * sqrt(M / (M - 1))``;
    beta is the mean ratio over the bin sizes given (1 for white noise).
    """
    residuals = np.asarray(residuals, dtype=float)
    residuals = residuals[np.isfinite(residuals)]
    sigma_1 = np.std(residuals, ddof=1)
    ratios = []
    for size in (int(s) for s in bin_sizes):
        m = len(residuals) // size
        if m < 2:
            ratios.append(np.nan)
            continue
        means = residuals[: m * size].reshape(m, size).mean(axis=1)
        expected = sigma_1 / math.sqrt(size) * math.sqrt(m / (m - 1))
        ratios.append(np.std(means, ddof=1) / expected)
    ratios = np.asarray(ratios, dtype=float)
    return float(np.nanmean(ratios)), ratios


def bin_series(x: np.ndarray, y: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Means of ``y`` in bins of ``x`` of the given width, their standard errors, bin centres."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    edges = np.arange(x.min(), x.max() + width, width)
    index = np.digitize(x, edges)
    centres, means, errors = [], [], []
    for k in np.unique(index):
        rows = index == k
        if rows.sum() < 2:
            continue
        centres.append(x[rows].mean())
        means.append(y[rows].mean())
        errors.append(y[rows].std(ddof=1) / math.sqrt(rows.sum()))
    return np.array(centres), np.array(means), np.array(errors)


def corner_plot(samples: np.ndarray, labels: Sequence[str], *, bins: int = 30,
                reference: Sequence[float] | None = None):
    """A corner plot of posterior samples (histograms on the diagonal, 2-D histograms below).

    Parameters
    ----------
    samples : samples x parameters.
    labels : axis label of each parameter (with units).
    bins : histogram bins per axis.
    reference : values to mark with lines (e.g. the priors' centres), or None.
    """
    import matplotlib.pyplot as plt

    n = samples.shape[1]
    fig, axes = plt.subplots(n, n, figsize=(1.9 * n, 1.9 * n), squeeze=False)
    limits = [np.percentile(samples[:, k], [0.5, 99.5]) for k in range(n)]
    for row in range(n):
        for col in range(n):
            ax = axes[row, col]
            if col > row:
                ax.set_visible(False)
                continue
            if row == col:
                ax.hist(samples[:, col], bins=bins, range=limits[col], color="0.35",
                        histtype="step")
                for q in np.percentile(samples[:, col], [16, 50, 84]):
                    ax.axvline(q, color="C0", ls="--" if q != np.median(samples[:, col])
                               else "-", lw=1)
                ax.set_yticks([])
            else:
                ax.hist2d(samples[:, col], samples[:, row], bins=bins,
                          range=[limits[col], limits[row]], cmap="Greys")
                if reference is not None:
                    ax.axhline(reference[row], color="C1", lw=0.8)
            if reference is not None:
                ax.axvline(reference[col], color="C1", lw=0.8)
            if row == n - 1:
                ax.set_xlabel(labels[col])
            else:
                ax.set_xticklabels([])
            if col == 0 and row > 0:
                ax.set_ylabel(labels[row])
            elif col > 0:
                ax.set_yticklabels([])
            ax.tick_params(labelsize="x-small", labelrotation=45)
    fig.subplots_adjust(hspace=0.08, wspace=0.08)
    return fig


# ---------------------------------------------------------------------------------------
# AAVSO exoplanet format
# ---------------------------------------------------------------------------------------

def write_aavso(path: str | Path, *, bjd: np.ndarray, flux: np.ndarray, flux_err: np.ndarray,
                detrend: dict[str, np.ndarray], header: dict[str, str]) -> Path:
    """Write a light curve in the AAVSO exoplanet database's extended format.

    Header lines ``#KEY=value`` (``TYPE=EXOPLANET``, ``DELIM=,``, ``DATE_TYPE=BJD_TDB`` and
    the ``header`` given, e.g. ``STAR_NAME``, ``FILTER``, ``PRIORS``, ``RESULTS``), then
    ``#DATE,DIFF,ERR,DETREND_1,...`` and one comma-separated row per frame (dates with 8
    decimals, fluxes with 7; ``na`` for a missing value).

    Parameters
    ----------
    path : output file.
    bjd : times, BJD_TDB.
    flux, flux_err : relative flux (``MEASUREMENT_TYPE=Rnflux``) and error.
    detrend : the decorrelation parameters, by name (written as DETREND_1, ...).
    header : further header values; ``DETREND_PARAMETERS`` is filled from ``detrend``.
    """
    fixed = {"TYPE": "EXOPLANET", "DELIM": ",", "DATE_TYPE": "BJD_TDB",
             "MEASUREMENT_TYPE": "Rnflux"}
    values = {**fixed, **{k: v for k, v in header.items() if k not in fixed}}
    values["DETREND_PARAMETERS"] = ", ".join(name.upper() for name in detrend) or "NONE"
    for key, value in values.items():
        if "\n" in str(value):
            raise ValueError(f"AAVSO header {key}: a value cannot contain a line break")
    lines = [f"#{key}={value}" for key, value in values.items()]
    columns = ["DATE", "DIFF", "ERR"] + [f"DETREND_{k + 1}" for k in range(len(detrend))]
    lines.append("#" + ",".join(columns))

    def number(value, decimals):
        return f"{value:.{decimals}f}" if np.isfinite(value) else "na"

    extra = [np.asarray(v, dtype=float) for v in detrend.values()]
    for k in range(len(bjd)):
        row = [number(bjd[k], 8), number(flux[k], 7), number(flux_err[k], 7)]
        row += [number(v[k], 7) for v in extra]
        lines.append(",".join(row))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
