"""WCS geometry and fitting: a TAN hint from the pointing, catalogue positions at the frame's
epoch, star-pattern matching, the weighted TAN-SIP least-squares fit, and the checks of a fit
(errors on a grid against a known WCS, residual plots).

Nothing here detects stars or reads files: :mod:`datared.solve` chains these steps into the
pure-Python solver, and chapter 03 runs them one by one on a frame. All pixel coordinates are
0-based (numpy, and astropy's ``pixel_to_world``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from datared.errors import AstrometryError


def hint_wcs(ra_deg: float, dec_deg: float, *, scale_arcsec: float, shape: tuple[int, int],
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
    except (astroalign.MaxIterError, ValueError) as err:
        raise AstrometryError(f"no star pattern matched the catalogue ({err})") from None
    det_idx = _index_of(det_xy, src)
    ref_idx = _index_of(ref_xy, dst)
    return det_idx, ref_idx


def _index_of(points: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Row index in ``points`` of each row of ``chosen`` (exact copies)."""
    from scipy.spatial import cKDTree

    _, idx = cKDTree(points).query(chosen)
    return np.asarray(idx, int)


def initial_wcs(xy: np.ndarray, sky: SkyCoord, *, shape: tuple[int, int]) -> WCS:
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


def fit_tan_sip(xy: np.ndarray, sky: SkyCoord, *, sip_degree: int | None,
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


def grid_errors(fitted: WCS, truth: WCS, shape: tuple[int, int], *, n: int = 20) -> np.ndarray:
    """Position error (pixels) of ``fitted`` against ``truth`` on an n x n pixel grid."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, n), np.linspace(0, ny - 1, n))
    sky = fitted.pixel_to_world(gx.ravel(), gy.ravel())
    tx, ty = truth.world_to_pixel(sky)
    return np.hypot(tx - gx.ravel(), ty - gy.ravel())


def plot_residuals(ax, matched: Table, shape: tuple[int, int], *, title: str = "",
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
