"""Chapter 05's machinery: photometric calibration, cluster membership and isochrone fits.

The chapter shows each step with the plain library calls first; these functions do the same
work for every frame and star and are unit-tested in ``tests/test_cmd.py``.

- Reference catalogue: ATLAS-REFCAT2 is on a Pan-STARRS1-like system; ``ps1_to_sdss`` moves
  it to SDSS (the isochrones' system) with the quadratic relations of Tonry et al. (2012,
  ApJ 750, 99, Table 6) and adds their scatter to the errors; ``calibration_stars`` applies
  the cuts on isolation, variability and duplication.
- Zero points: ``fit_zeropoint`` fits ``m_ref - m_inst = ZP + C * colour`` per frame with
  weights and sigma clipping; ``combine_magnitudes`` averages the frames of a star.
- Membership: ``pm_membership`` fits a two-component Gaussian mixture to the proper motions
  (cluster and field, each star's errors included).
- Isochrones: ``read_isochrones`` reads a PARSEC table (e.g. the one shipped by
  ``uwastro465isos``) without pandas' removed ``delim_whitespace``; ``IsochroneModel`` gives
  the log-likelihood of the stars' magnitudes for (log age, [M/H], distance modulus, E(B-V))
  with unresolved binaries and field stars in the model; ``fit_isochrone_grid`` profiles it
  over the grid and ``sample_distance_reddening`` samples it with emcee.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table

from datared.errors import DataredError

#: SDSS - PS1 = a0 + a1 x + a2 x^2, x = (g - r)_PS1, and the scatter about the relation
#: (Tonry et al. 2012, ApJ 750, 99, Table 6, quadratic fits).
SDSS_MINUS_PS1 = {"g": (0.013, 0.145, 0.019), "r": (-0.001, 0.004, 0.007),
                  "i": (-0.005, 0.011, 0.010), "z": (0.013, -0.039, -0.012)}
SDSS_MINUS_PS1_SCATTER = {"g": 0.008, "r": 0.004, "i": 0.004, "z": 0.010}
SDSS_MINUS_PS1_SOURCE = "Tonry et al. 2012, ApJ 750, 99, Table 6 (quadratic in (g-r)_PS1)"

#: A_lambda / E(B-V) for SDSS bands and R_V = 3.1 (Schlafly & Finkbeiner 2011, ApJ 737, 103,
#: Table 6) and for Johnson-Cousins B, V, R, I (same table, Landolt filters).
EXTINCTION_PER_EBV = {"u": 4.239, "g": 3.303, "r": 2.285, "i": 1.698, "z": 1.263,
                      "B": 3.626, "V": 2.742, "R": 2.169, "I": 1.505}
EXTINCTION_SOURCE = "Schlafly & Finkbeiner 2011, ApJ 737, 103, Table 6 (R_V = 3.1)"


class CalibrationError(DataredError, ValueError):
    """Too few or unusable calibration stars in a frame."""


# ---------------------------------------------------------------------------------------
# Reference catalogue
# ---------------------------------------------------------------------------------------

def ps1_to_sdss(mags: dict[str, np.ndarray], errors: dict[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SDSS magnitudes and errors of stars with Pan-STARRS1 magnitudes.

    Parameters
    ----------
    mags : PS1 magnitudes by band; must hold ``g`` and ``r`` (the relation's colour).
    errors : their errors by band.

    Returns SDSS magnitudes and errors (catalogue error and the relation's scatter added in
    quadrature) for every band of ``mags`` that has a relation.
    """
    x = np.asarray(mags["g"], float) - np.asarray(mags["r"], float)
    out, err = {}, {}
    for band, m in mags.items():
        if band not in SDSS_MINUS_PS1:
            continue
        a0, a1, a2 = SDSS_MINUS_PS1[band]
        out[band] = np.asarray(m, float) + a0 + a1 * x + a2 * x**2
        err[band] = np.hypot(np.asarray(errors[band], float), SDSS_MINUS_PS1_SCATTER[band])
    return out, err


def calibration_stars(refcat: Table, *, bands: Sequence[str], mag_range: tuple[float, float],
                      min_isolation_arcsec: float, max_error: float = 0.05
                      ) -> tuple[np.ndarray, Table]:
    """Which reference stars are fit to calibrate a frame, and why the others are not.

    Parameters
    ----------
    refcat : REFCAT2 rows (VizieR column names).
    bands : filters that must have finite magnitudes (e.g. the target's filters).
    mag_range : (bright, faint) limits in the first band, mag.
    min_isolation_arcsec : ``rp1`` (radius where neighbours reach 0.1x the star's flux) must
        be at least this; skipped when the column is absent.
    max_error : largest catalogue error in any band, mag.

    Returns a boolean array (True = use) and a table with one row per cut: ``cut``, ``left``
    (stars surviving after it).
    """
    n = len(refcat)
    keep = np.ones(n, bool)
    steps = []

    def cut(name, mask):
        nonlocal keep
        keep = keep & mask
        steps.append((name, int(keep.sum())))

    steps.append(("in the catalogue", n))
    finite = np.ones(n, bool)
    for band in bands:
        finite &= np.isfinite(np.asarray(refcat[f"{band}mag"], float))
        finite &= np.asarray(refcat[f"e_{band}mag"], float) <= max_error
    cut(f"magnitudes in {', '.join(bands)} with errors <= {max_error:g} mag", finite)
    first = np.asarray(refcat[f"{bands[0]}mag"], float)
    cut(f"{mag_range[0]:g} <= {bands[0]} <= {mag_range[1]:g}",
        (first >= mag_range[0]) & (first <= mag_range[1]))
    if "dupvar" in refcat.colnames:
        flag = np.asarray(refcat["dupvar"], float)
        flag = np.where(np.isfinite(flag), flag, 2).astype(int)
        cut("not variable, not duplicated (dupvar)", ((flag & 4) == 0) & ((flag & 3) != 1))
    if "rp1" in refcat.colnames:
        rp1 = np.asarray(refcat["rp1"], float)
        cut(f"isolated: rp1 >= {min_isolation_arcsec:g} arcsec",
            np.nan_to_num(rp1, nan=0.0) >= min_isolation_arcsec)
    if "Gmag" in refcat.colnames:
        cut("has a Gaia counterpart (not spurious)",
            np.isfinite(np.asarray(refcat["Gmag"], float)))
    return keep, Table(rows=steps, names=("cut", "left"))


# ---------------------------------------------------------------------------------------
# Zero points
# ---------------------------------------------------------------------------------------

@dataclass
class ZeroPoint:
    """Result of ``fit_zeropoint``: m_ref - m_inst = zeropoint + colour_term * colour."""

    zeropoint: float
    zeropoint_err: float
    colour_term: float
    colour_term_err: float
    covariance: float
    rms: float
    n_stars: int
    used: np.ndarray = field(repr=False)
    colour_ref: float = 0.0

    def apply(self, m_inst: np.ndarray, colour: np.ndarray) -> np.ndarray:
        """Calibrated magnitudes of stars with instrumental magnitudes and colours."""
        return np.asarray(m_inst, float) + self.zeropoint + self.colour_term * (
            np.asarray(colour, float) - self.colour_ref)

    def error(self, colour: np.ndarray) -> np.ndarray:
        """Error of the calibration at a colour (zero point, colour term and covariance)."""
        d = np.asarray(colour, float) - self.colour_ref
        var = self.zeropoint_err**2 + d**2 * self.colour_term_err**2 + 2 * d * self.covariance
        return np.sqrt(np.clip(var, 0, None))


def fit_zeropoint(m_ref: np.ndarray, m_inst: np.ndarray, colour: np.ndarray,
                  err: np.ndarray, *, nsigma: float = 3.0, max_iter: int = 10,
                  min_stars: int = 5, colour_ref: float | None = None) -> ZeroPoint:
    """Weighted fit of m_ref - m_inst = ZP + C (colour - colour_ref), with sigma clipping.

    Parameters
    ----------
    m_ref, m_inst : reference and instrumental magnitudes of the calibration stars.
    colour : their reference colours (e.g. g - r), mag.
    err : their combined errors (reference and instrumental), mag.
    nsigma : clip stars further than this many (scaled) errors from the fit.
    max_iter : clipping iterations.
    min_stars : fewer stars than this after clipping raises ``CalibrationError``.
    colour_ref : colour at which ZP is quoted (default: median colour of the stars), so that
        ZP and C are nearly uncorrelated.

    The errors of ZP and C are scaled by sqrt(reduced chi^2) when it exceeds 1: scatter the
    errors do not explain (a colour term that is not linear, catalogue systematics) then
    widens them instead of being ignored.
    """
    m_ref, m_inst, colour, err = (np.asarray(v, float) for v in (m_ref, m_inst, colour, err))
    good = np.isfinite(m_ref) & np.isfinite(m_inst) & np.isfinite(colour) & (err > 0)
    if good.sum() < min_stars:
        raise CalibrationError(f"only {int(good.sum())} calibration stars with finite values "
                               f"(at least {min_stars} needed)")
    c0 = float(np.median(colour[good])) if colour_ref is None else float(colour_ref)
    y = m_ref - m_inst
    d = colour - c0
    used = good.copy()
    for _ in range(max_iter):
        w = 1.0 / err[used] ** 2
        a = np.column_stack([np.ones(used.sum()), d[used]])
        cov = np.linalg.inv(a.T @ (a * w[:, None]))
        beta = cov @ (a.T @ (w * y[used]))
        resid = y - (beta[0] + beta[1] * d)
        chi2 = float(np.sum(w * resid[used] ** 2))
        scale = math.sqrt(max(1.0, chi2 / max(1, used.sum() - 2)))
        new = good & (np.abs(resid) <= nsigma * scale * err)
        if new.sum() < min_stars:
            raise CalibrationError(f"only {int(new.sum())} calibration stars left after "
                                   f"{nsigma:g}-sigma clipping (at least {min_stars} needed)")
        if np.array_equal(new, used):
            break
        used = new
    cov = cov * scale**2
    rms = float(np.sqrt(np.mean(resid[used] ** 2)))
    return ZeroPoint(float(beta[0]), float(math.sqrt(cov[0, 0])), float(beta[1]),
                     float(math.sqrt(cov[1, 1])), float(cov[0, 1]), rms, int(used.sum()),
                     used, c0)


def combine_magnitudes(mags: np.ndarray, errors: np.ndarray, *, min_frames: int = 1
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted mean magnitude of each star over frames, with an honest error.

    Parameters
    ----------
    mags, errors : arrays (n_frames, n_stars); NaN where a frame has no measurement.
    min_frames : stars measured in fewer frames get NaN.

    Returns (mean, error, reduced chi^2, number of frames). The error is the error of the
    weighted mean, multiplied by sqrt(reduced chi^2) when the frames scatter more than their
    errors say (never made smaller).
    """
    mags, errors = np.asarray(mags, float), np.asarray(errors, float)
    ok = np.isfinite(mags) & np.isfinite(errors) & (errors > 0)
    w = np.where(ok, 1.0 / np.where(ok, errors, 1.0) ** 2, 0.0)
    n = ok.sum(axis=0)
    wsum = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sum(w * np.where(ok, mags, 0.0), axis=0) / wsum
        chi2 = np.sum(w * (np.where(ok, mags, 0.0) - mean) ** 2, axis=0)
        red = np.where(n > 1, chi2 / np.maximum(n - 1, 1), np.nan)
        err = np.sqrt(1.0 / wsum) * np.sqrt(np.maximum(1.0, np.nan_to_num(red, nan=1.0)))
    bad = n < max(1, min_frames)
    mean[bad] = np.nan
    err[bad] = np.nan
    return mean, err, red, n


# ---------------------------------------------------------------------------------------
# Membership
# ---------------------------------------------------------------------------------------

@dataclass
class Membership:
    """Result of ``pm_membership``."""

    probability: np.ndarray
    cluster_pm: tuple[float, float]
    cluster_dispersion: float
    field_pm: tuple[float, float]
    field_dispersion: tuple[float, float]
    cluster_fraction: float
    iterations: int


def pm_membership(pmra: np.ndarray, pmdec: np.ndarray, pmra_err: np.ndarray,
                  pmdec_err: np.ndarray, *, guess: tuple[float, float] | None = None,
                  max_iter: int = 300, tol: float = 1e-7) -> Membership:
    """Cluster membership probabilities from proper motions (two-Gaussian mixture, EM).

    The cluster is a circular Gaussian (mean and intrinsic dispersion fitted), the field a
    broad Gaussian with its own mean and dispersions; each star's measurement errors are
    added to both components' widths. Stars without a proper motion get NaN.

    Parameters
    ----------
    pmra, pmdec : proper motions (mas/yr; pmra includes cos dec).
    pmra_err, pmdec_err : their errors, mas/yr.
    guess : starting cluster proper motion (e.g. from the literature); default the densest
        point of the proper-motion plane.
    max_iter, tol : EM iterations and the change of log-likelihood per star that stops them.
    """
    x, y, ex, ey = (np.asarray(v, float) for v in (pmra, pmdec, pmra_err, pmdec_err))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(ex) & np.isfinite(ey)
    if ok.sum() < 10:
        raise CalibrationError(f"only {int(ok.sum())} stars with proper motions: at least 10 "
                               "are needed for a membership fit")
    xs, ys, exs, eys = x[ok], y[ok], ex[ok], ey[ok]
    if guess is None:
        # Densest point: the star with most neighbours within 0.5 mas/yr.
        d2 = (xs[:, None] - xs[None, :]) ** 2 + (ys[:, None] - ys[None, :]) ** 2
        k = int(np.argmax((d2 < 0.25).sum(axis=1)))
        guess = (float(xs[k]), float(ys[k]))
    mc = np.array(guess, float)
    sc = 0.3
    mf = np.array([np.median(xs), np.median(ys)])
    sf = np.array([max(1.0, float(np.std(xs))), max(1.0, float(np.std(ys)))])
    frac = 0.5
    last = -np.inf
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - reported as Membership.iterations
        vcx, vcy = sc**2 + exs**2, sc**2 + eys**2
        vfx, vfy = sf[0] ** 2 + exs**2, sf[1] ** 2 + eys**2
        lc = -0.5 * ((xs - mc[0]) ** 2 / vcx + (ys - mc[1]) ** 2 / vcy) - 0.5 * np.log(
            4 * np.pi**2 * vcx * vcy)
        lf = -0.5 * ((xs - mf[0]) ** 2 / vfx + (ys - mf[1]) ** 2 / vfy) - 0.5 * np.log(
            4 * np.pi**2 * vfx * vfy)
        a, b = np.log(frac) + lc, np.log(1 - frac) + lf
        top = np.maximum(a, b)
        total = top + np.log(np.exp(a - top) + np.exp(b - top))
        p = np.exp(a - total)
        loglike = float(np.mean(total))
        frac = float(np.clip(p.mean(), 1e-4, 1 - 1e-4))
        # M-step with error-weighted means (weights 1 / variance, a standard approximation).
        wcx, wcy = p / vcx, p / vcy
        mc = np.array([np.sum(wcx * xs) / wcx.sum(), np.sum(wcy * ys) / wcy.sum()])
        resid = ((xs - mc[0]) ** 2 - exs**2 + (ys - mc[1]) ** 2 - eys**2) / 2
        sc = float(np.sqrt(max(np.sum(p * resid) / p.sum(), 0.01**2)))
        q = 1 - p
        wfx, wfy = q / vfx, q / vfy
        mf = np.array([np.sum(wfx * xs) / wfx.sum(), np.sum(wfy * ys) / wfy.sum()])
        sf = np.array([
            math.sqrt(max(np.sum(q * ((xs - mf[0]) ** 2 - exs**2)) / q.sum(), 0.25)),
            math.sqrt(max(np.sum(q * ((ys - mf[1]) ** 2 - eys**2)) / q.sum(), 0.25))])
        if abs(loglike - last) < tol:
            break
        last = loglike
    prob = np.full(x.size, np.nan)
    prob[ok] = p
    return Membership(prob, (float(mc[0]), float(mc[1])), sc, (float(mf[0]), float(mf[1])),
                      (float(sf[0]), float(sf[1])), frac, it)


# ---------------------------------------------------------------------------------------
# Isochrones
# ---------------------------------------------------------------------------------------

def isochrone_file(system: str = "sdss") -> Path:
    """Path of a PARSEC table shipped by ``uwastro465isos`` ("sdss" or "johnson")."""
    try:
        import uwastro465isos
    except ImportError:
        raise DataredError("the isochrone package uwastro465isos is not installed: run "
                           "`make install` (it is in pyproject.toml)") from None
    name = {"sdss": "isochrones_ugriz.dat", "johnson": "isochrones_ubvrijhk.dat"}[system]
    return Path(uwastro465isos.__file__).parent / "data" / name


def read_isochrones(path: str | Path, bands: Sequence[str], *, max_label: int = 7,
                    log_age_range: tuple[float, float] = (6.0, 10.5)) -> Table:
    """All isochrones of a PARSEC table: ``MH``, ``logAge``, ``Mini``, ``label``, ``<band>``.

    Parameters
    ----------
    path : PARSEC output ("CMD 3.x" format: '#'-comment header with the column names).
    bands : magnitudes to keep, e.g. ["g", "r", "i"] (columns ``gmag``, ...).
    max_label : highest PARSEC evolutionary label kept (7 = early AGB; later phases dropped).
    log_age_range : ages kept.
    """
    path = Path(path)
    names = None
    with open(path) as fh:
        for line in fh:
            if "Mini" in line and "logAge" in line:
                names = line.lstrip("#").split()
                break
    if names is None:
        raise DataredError(f"{path}: no header line with the column names (Mini, logAge): "
                           "is this a PARSEC isochrone table?")
    wanted = ["MH", "logAge", "Mini", "label"] + [f"{b}mag" for b in bands]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DataredError(f"{path}: no column {', '.join(missing)}; it has "
                           f"{', '.join(n for n in names if n.endswith('mag'))}")
    cols = [names.index(w) for w in wanted]
    with open(path) as fh:
        # data lines only: the table repeats its header before each block of isochrones
        rows = (line for line in fh if line[:1] != "#" and "Mini" not in line)
        data = np.loadtxt(rows, usecols=cols, ndmin=2)
    keep = (data[:, 3] <= max_label) & (data[:, 1] >= log_age_range[0]) & (
        data[:, 1] <= log_age_range[1])
    data = data[keep]
    tab = Table({"MH": np.round(data[:, 0], 2), "logAge": np.round(data[:, 1], 2),
                 "Mini": data[:, 2], "label": data[:, 3].astype(int)})
    for k, band in enumerate(bands):
        tab[band] = data[:, 4 + k]
    return tab


def isochrone(table: Table, log_age: float, mh: float) -> Table:
    """One isochrone of ``read_isochrones``' table, sorted by initial mass."""
    sel = (np.abs(table["logAge"] - log_age) < 0.005) & (np.abs(table["MH"] - mh) < 0.005)
    if not np.any(sel):
        raise DataredError(f"no isochrone with log age {log_age} and [M/H] {mh} in the table; "
                           f"ages {table['logAge'].min()}-{table['logAge'].max()}, [M/H] "
                           f"{', '.join(f'{v:g}' for v in np.unique(table['MH']))}")
    out = table[sel]
    out.sort("Mini")
    return out


def _kroupa(m: np.ndarray) -> np.ndarray:
    return np.where(m < 0.5, (m / 0.5) ** -1.3, (m / 0.5) ** -2.3)


@dataclass
class IsochroneModel:
    """Likelihood of cluster stars' magnitudes given an isochrone, distance and reddening.

    Each star is either a cluster star (single, or an unresolved binary with mass ratio
    q uniform in [``q_min``, 1], binary fraction ``binary_fraction``) drawn along the
    isochrone with a Kroupa mass function, or a field star (fraction ``field_fraction``,
    uniform over the box of the observed magnitudes). The model magnitudes are blurred by
    each star's errors and an intrinsic width ``sigma_int`` (spread the errors miss:
    differential reddening, rotation, calibration). The stars are a magnitude-limited
    sample: ``window`` (bright, faint) in the first band, by default the observed range; the
    model's mass function is normalised inside it.
    """

    bands: Sequence[str]
    mags: np.ndarray            # (n_stars, n_bands) observed
    errors: np.ndarray          # (n_stars, n_bands)
    extinction: np.ndarray      # A_band / E(B-V), (n_bands,)
    binary_fraction: float = 0.3
    q_min: float = 0.2
    sigma_int: float = 0.02
    n_mass: int = 600
    q_grid: Sequence[float] = tuple(np.round(np.arange(0.25, 1.001, 0.05), 2))
    binary_stride: int = 3
    window: tuple[float, float] | None = None

    def __post_init__(self):
        self.mags = np.asarray(self.mags, float)
        self.errors = np.asarray(self.errors, float)
        self.extinction = np.asarray(self.extinction, float)
        self.var = self.errors**2 + self.sigma_int**2
        lo, hi = np.nanmin(self.mags, axis=0) - 0.5, np.nanmax(self.mags, axis=0) + 0.5
        self.log_field_density = -float(np.sum(np.log(hi - lo)))
        if self.window is None:
            self.window = (float(np.nanmin(self.mags[:, 0])) - 0.05,
                           float(np.nanmax(self.mags[:, 0])) + 0.05)

    def model_points(self, iso: Table) -> tuple[np.ndarray, np.ndarray]:
        """Absolute magnitudes (n_points, n_bands) of single and binary stars, and weights."""
        mass = np.asarray(iso["Mini"], float)
        # Resample the track evenly in its length in magnitude space (so fast phases such as
        # the turn-off are not represented by a few points), weight each point by the IMF.
        mags = np.column_stack([np.asarray(iso[b], float) for b in self.bands])
        step = np.sqrt(np.sum(np.diff(mags, axis=0) ** 2, axis=1))
        s = np.concatenate([[0.0], np.cumsum(step)])
        grid = np.linspace(0, s[-1], self.n_mass)
        m_grid = np.interp(grid, s, mass)
        track = np.column_stack([np.interp(grid, s, mags[:, k]) for k in range(mags.shape[1])])
        dm = np.gradient(m_grid)
        w_single = _kroupa(m_grid) * np.abs(dm)
        w_single /= w_single.sum()
        points, weights = [track], [(1 - self.binary_fraction) * w_single]
        # Binaries: every binary_stride-th point of the track is a primary; companions of mass
        # q m interpolated on the same isochrone (near the turn-off the companion's light
        # changes fast with q, so the q grid must be fine).
        m_lo = float(mass.min())
        prim = np.arange(m_grid.size) % self.binary_stride == 0
        flux_p = 10 ** (-0.4 * track[prim])
        wq = np.ones(len(self.q_grid)) / len(self.q_grid)
        for q, wqk in zip(self.q_grid, wq, strict=True):
            m2 = q * m_grid[prim]
            f2 = np.zeros_like(flux_p)
            has = m2 >= m_lo
            for k, b in enumerate(self.bands):
                f2[has, k] = 10 ** (-0.4 * np.interp(m2[has], mass, np.asarray(iso[b], float)))
            points.append(-2.5 * np.log10(flux_p + f2))
            wb = w_single[prim] / w_single[prim].sum()  # same mass function as the singles
            weights.append(self.binary_fraction * wqk * wb)
        return np.vstack(points), np.concatenate(weights)

    def log_likelihood(self, iso_points: tuple[np.ndarray, np.ndarray], distance_modulus: float,
                       ebv: float, field_fraction: float, subset: np.ndarray | None = None
                       ) -> float:
        """Log-likelihood of the stars (or of ``subset`` of them) under the model."""
        pts, w = iso_points
        model = pts + distance_modulus + self.extinction * ebv
        # The sample is limited in magnitude (saturation at the bright end, the fit's faint
        # limit): a cluster star of the model can only be one of these stars if it falls in
        # the window, so the mass function is normalised there. Without this, a model that
        # puts more of its stars in the window (another distance or metallicity) would be
        # preferred for that reason alone.
        inside = (model[:, 0] >= self.window[0]) & (model[:, 0] <= self.window[1])
        if inside.sum() < 2:
            return -1e30
        model, w = model[inside], w[inside] / w[inside].sum()
        obs = self.mags if subset is None else self.mags[subset]
        var = self.var if subset is None else self.var[subset]
        # chi2[i, j] = sum_k (obs_ik - model_jk)^2 / var_ik, expanded into two matrix products
        # (the offsets keep the numbers small, so the big matrix can be float32: the
        # likelihood differences that matter are far above its rounding)
        inv = 1.0 / var
        centre = np.median(obs, axis=0)
        o, mo = obs - centre, model - centre
        chi2 = (np.sum(o**2 * inv, axis=1)[:, None] - 2.0 * (o * inv) @ mo.T
                + inv @ (mo**2).T).astype(np.float32)
        norm = -0.5 * np.sum(np.log(2 * np.pi * var), axis=1)
        best = chi2.min(axis=1)
        chi2 -= best[:, None]
        chi2 *= np.float32(-0.5)
        np.exp(chi2, out=chi2)
        like = np.log(chi2 @ w.astype(np.float32)).astype(float) - 0.5 * best
        lc = np.log(1 - field_fraction) + norm + like
        lf = np.full_like(lc, math.log(field_fraction) + self.log_field_density)
        hi = np.maximum(lc, lf)
        return float(np.sum(hi + np.log(np.exp(lc - hi) + np.exp(lf - hi))))


@dataclass
class GridFit:
    """Result of ``fit_isochrone_grid``: the profile over the (log age, [M/H]) grid."""

    table: Table                # log_age, mh, distance_modulus, ebv, loglike per node
    best: dict


def fit_isochrone_grid(model: IsochroneModel, isochrones: Table, *, log_ages: Sequence[float],
                       mhs: Sequence[float], start: tuple[float, float],
                       field_fraction: float = 0.1, coarse_step: int = 2,
                       refine_dex: float = 0.151, progress=None) -> GridFit:
    """Profile likelihood: for each (log age, [M/H]) the best distance modulus and E(B-V).

    Coarse to fine: every ``coarse_step``-th age at every metallicity first, then every age
    within ``refine_dex`` of the best node at the best metallicity and its neighbours.

    Parameters
    ----------
    model : the stars and the likelihood.
    isochrones : ``read_isochrones`` table.
    log_ages, mhs : grid nodes.
    start : starting (distance modulus, E(B-V)) of the optimiser.
    field_fraction : fraction of field stars assumed in the profile (the final sampling fits
        it).
    coarse_step, refine_dex : the two stages, see above.
    progress : optional wrapper for each stage's node loop (``datared.progress.progress``).
    """
    from scipy.optimize import minimize

    log_ages, mhs = sorted(float(a) for a in log_ages), sorted(float(m) for m in mhs)
    done: dict[tuple[float, float], tuple[float, float, float]] = {}

    def fit_node(age, mh):
        pts = model.model_points(isochrone(isochrones, age, mh))

        def nll(p):
            if not (0 <= p[1] <= 2.0):
                return 1e30
            return -model.log_likelihood(pts, p[0], p[1], field_fraction)

        # Start from the best of a few distances and of the nearest node already fitted at
        # this metallicity (the likelihood has local maxima where the main sequence slides
        # along itself), then refine twice with Nelder-Mead.
        trial = [(start[0] + dd, start[1]) for dd in (-0.5, 0.0, 0.5)]
        same = [k for k in done if k[1] == mh]
        if same:
            near = min(same, key=lambda k: abs(k[0] - age))
            trial.append(done[near][:2])
        x0 = np.array(min(trial, key=nll), float)
        for _ in range(2):
            simplex = [x0, x0 + [0.08, 0.0], x0 + [0.0, 0.03]]
            res = minimize(nll, x0, method="Nelder-Mead",
                           options={"initial_simplex": simplex, "xatol": 1e-3, "fatol": 0.02,
                                    "maxiter": 200})
            x0 = res.x
        done[(age, mh)] = (float(res.x[0]), float(res.x[1]), -float(res.fun))

    def run(nodes):
        nodes = [n for n in nodes if n not in done]
        for node in (progress(nodes) if progress is not None and nodes else nodes):
            fit_node(*node)

    run([(a, m) for m in mhs for a in log_ages[::max(1, coarse_step)]])
    best = max(done, key=lambda k: done[k][2])
    k_mh = mhs.index(best[1])
    near_mh = mhs[max(0, k_mh - 1):k_mh + 2]
    run([(a, m) for m in near_mh for a in log_ages if abs(a - best[0]) <= refine_dex])
    rows = [(a, m, *done[(a, m)]) for (a, m) in sorted(done, key=lambda k: (k[1], k[0]))]
    tab = Table(rows=rows, names=("log_age", "mh", "distance_modulus", "ebv", "loglike"))
    k = int(np.argmax(tab["loglike"]))
    return GridFit(tab, {name: float(tab[name][k]) for name in tab.colnames})


def profile_estimate(values: np.ndarray, loglike: np.ndarray) -> tuple[float, float]:
    """Best value and 1-sigma error of a parameter from its profile log-likelihood.

    A parabola through the best node and its neighbours gives the maximum and the curvature
    (error = 1 / sqrt(-2 a) for loglike = a x^2 + ...); at the edge of the grid, or when the
    profile is not curved, the error is the grid step over sqrt(12) at least.
    """
    values, loglike = np.asarray(values, float), np.asarray(loglike, float)
    order = np.argsort(values)
    values, loglike = values[order], loglike[order]
    k = int(np.argmax(loglike))
    step = float(np.min(np.diff(values))) if values.size > 1 else 1.0
    floor = step / math.sqrt(12.0)
    if k == 0 or k == values.size - 1:
        return float(values[k]), max(floor, step)
    a, b, _ = np.polyfit(values[k - 1:k + 2], loglike[k - 1:k + 2], 2)
    if a >= 0:
        return float(values[k]), max(floor, step)
    best = float(np.clip(-b / (2 * a), values[k - 1], values[k + 1]))
    return best, max(floor, 1.0 / math.sqrt(-2 * a))


def sample_distance_reddening(model: IsochroneModel, points, start: Sequence[float], *,
                              n_walkers: int = 12, n_steps: int = 300, seed: int = 0
                              ) -> tuple[np.ndarray, np.ndarray]:
    """emcee samples of (distance modulus, E(B-V), field fraction) at one isochrone.

    Returns the flattened chain after dropping the first third as burn-in, and the
    integrated autocorrelation time of each parameter (steps; compare with the chain length).
    """
    import emcee

    def log_prob(p):
        dm, ebv, ff = p
        if not (0.0 <= ebv <= 2.0 and 1e-3 < ff < 0.9 and 0 < dm < 20):
            return -np.inf
        return model.log_likelihood(points, dm, ebv, ff)

    rng = np.random.default_rng(seed)
    p0 = np.asarray(start, float) + rng.normal(0, [0.02, 0.005, 0.01], (n_walkers, 3))
    p0[:, 2] = np.clip(p0[:, 2], 0.01, 0.5)
    p0[:, 1] = np.clip(p0[:, 1], 0.0, 2.0)
    sampler = emcee.EnsembleSampler(n_walkers, 3, log_prob)
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(p0, n_steps, progress=False)
    try:
        tau = sampler.get_autocorr_time(discard=n_steps // 3)
    except emcee.autocorr.AutocorrError as err:
        # a chain shorter than 50 tau: the caller prints the ratio chain / tau itself
        tau = err.tau
    chain = sampler.get_chain(discard=n_steps // 3, flat=True)
    return chain, np.asarray(tau, float)
