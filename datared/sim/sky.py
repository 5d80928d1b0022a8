"""The sky of the simulated night: stars (cluster, field, transit host), catalogues, PSF.

Everything here is deterministic given a ``numpy.random.Generator``. Magnitudes are SDSS
g, r, i (AB), true values above the atmosphere; positions are ICRS degrees at the epoch
of the observations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

# ---------------------------------------------------------------------------------------
# Literature-like parameters (recorded in truth/params.json by datared.sim.night)
# ---------------------------------------------------------------------------------------

#: M37 = NGC 2099. Age, metallicity, reddening after Hartman et al. (2008, ApJ 675, 1233:
#: 550 Myr, [M/H] = +0.045, E(B-V) = 0.227) rounded to the PARSEC grid; distance after
#: Cantat-Gaudin et al. (2018, A&A 618, A93: parallax ~0.67 mas); proper motion ibid.
CLUSTER = {
    "name": "M37",
    "ra_deg": 88.074,
    "dec_deg": 32.545,
    "log_age": 8.65,
    "mh": 0.0,
    "distance_pc": 1450.0,
    "ebv": 0.25,
    "plummer_radius_arcmin": 4.5,
    "n_systems": 5000,
    "binary_fraction": 0.3,
    "binary_q_min": 0.2,
    "imf": "Kroupa (2001): dN/dm ~ m^-1.3 (0.08-0.5 Msun), m^-2.3 (>0.5 Msun)",
    "mass_min_msun": 0.08,
    "pmra_masyr": 1.92,
    "pmdec_masyr": -5.65,
    "pm_dispersion_masyr": 0.12,
    "isochrone": "PARSEC v1.2S SDSS ugriz (uwastro465isos isochrones_ugriz.dat), labels 0-7",
    "literature": "Hartman et al. 2008 ApJ 675 1233; Cantat-Gaudin et al. 2018 A&A 618 A93",
}

#: A_lambda / E(B-V) for SDSS g, r, i with R_V = 3.1 (Schlafly & Finkbeiner 2011, Table 6).
EXTINCTION_COEFF = {"g": 3.303, "r": 2.285, "i": 1.698}

#: WASP-104 and its planet. Shape after Smith et al. (2014, A&A 570, A64) and Chen et al.
#: (2021, MNRAS 500, 5420); the mid-transit time of this night is fictional (chosen so the
#: transit falls in the night before the meridian flip).
TRANSIT_HOST = {
    "name": "WASP-104",
    "ra_deg": 160.6025,
    "dec_deg": 7.4350,
    "g": 12.45,
    "r": 11.90,
    "i": 11.73,
    "spectral_type": "G8V (Teff ~5450 K, log g ~4.5)",
    "parallax_mas": 6.9,
    "pmra_masyr": -16.0,
    "pmdec_masyr": 4.0,
}
PLANET = {
    "name": "WASP-104 b",
    "period_d": 1.75540636,
    "rp_rs": 0.1203,
    "a_rs": 6.90,
    "inc_deg": 83.6,
    "ecc": 0.0,
    "w_deg": 90.0,
    "limb_darkening": "quadratic",
    "u_r": [0.46, 0.21],
    "u_source": "approximate quadratic coefficients for SDSS r, Teff 5450 K, log g 4.5 "
                "(Claret 2004-like)",
    "literature": "Smith et al. 2014 A&A 570 A64; Chen et al. 2021 MNRAS 500 5420",
    "mid_transit_source": "fictional (timed to fall in this night); period and shape "
                          "from the literature",
}

#: A pulsating variable near the host (two-harmonic light curve in magnitudes).
VARIABLE = {
    "name": "V1",
    "offset_arcmin": [1.6, -1.1],
    "r": 13.2,
    "g_r": 0.35,
    "r_i": 0.10,
    "period_h": 1.9,
    "amplitude_r_mag": 0.06,
    "second_harmonic_ratio": 0.35,
    "amplitude_scale": {"g": 1.3, "r": 1.0, "i": 0.8},
}

#: How the simulated ATLAS-REFCAT2 differs from the true SDSS magnitudes. REFCAT2 is on a
#: Pan-STARRS1-like system: SDSS - PS1 = a0 + a1 x + a2 x^2 with x = (g - r)_PS1 (the
#: quadratic fits of Tonry et al. 2012, ApJ 750, 99, Table 6), plus what the published fit
#: does not describe: a term in the star's offset from the stellar locus in r - i
#: (``locus_term`` x [(r - i) - (0.38 (g - r) - 0.05)]), a per-star scatter, a smooth
#: pattern across the sky of a few mmag (amplitude ``spatial_mmag``, period
#: ``spatial_period_arcmin``), blends of stars closer than ``blend_arcsec`` (one entry, summed
#: flux), missing stars (``missing_fraction`` of those fainter than r = 16) and spurious
#: entries (``spurious_per_deg2``).
REFCAT2_MODEL = {
    "system": "Pan-STARRS1-like (SDSS - PS1 after Tonry et al. 2012, Table 6, plus extra terms)",
    "sdss_minus_ps1": {"g": [0.013, 0.145, 0.019], "r": [-0.001, 0.004, 0.007],
                       "i": [-0.005, 0.011, 0.010]},
    "locus_term": {"g": 0.02, "r": -0.01, "i": 0.015},
    "scatter_mag": {"g": 0.006, "r": 0.003, "i": 0.003},
    "spatial_mmag": 4.0,
    "spatial_period_arcmin": 9.0,
    "blend_arcsec": 1.2,
    "missing_fraction": 0.02,
    "spurious_per_deg2": 300.0,
    "r_limit": 19.0,
}

#: How the simulated Gaia DR3 differs from the truth: magnitude-dependent completeness (50 %
#: at ``completeness_g50``, width ``completeness_width`` mag), 2-parameter solutions (no
#: parallax or proper motion) for a fraction rising from ``two_param_fraction_bright`` to
#: ``two_param_fraction_faint`` towards G = 21, duplicated sources (``duplicate_fraction``,
#: a second entry within ``duplicate_sep_mas``), random ``source_id`` values.
GAIA_MODEL = {
    "completeness_g50": 20.6,
    "completeness_width": 0.25,
    "two_param_fraction_bright": 0.01,
    "two_param_fraction_faint": 0.4,
    "duplicate_fraction": 0.003,
    "duplicate_sep_mas": 150.0,
}

#: Field star surface densities to r = 21.5 (stars per square degree) and the slope of the
#: differential counts (dex per magnitude).
FIELD = {
    "M37": {"density_per_deg2": 20000.0, "ebv_max": 0.6},
    "WASP-104": {"density_per_deg2": 3000.0, "ebv_max": 0.04},
    "r_bright": 8.0,
    "r_faint": 21.5,
    "count_slope_dex_per_mag": 0.25,
}

#: Gaia-like G from SDSS g, i: G - r = c0 + c1 x + c2 x^2 + c3 x^3 with x = g - i
#: (form of the Gaia DR2 photometric relations, Evans et al. 2018, Table A.2).
GAIA_G_COEFFS = [-0.12879, 0.24662, -0.027464, -0.049465]


# ---------------------------------------------------------------------------------------
# Small geometry helpers
# ---------------------------------------------------------------------------------------

def tangent_to_radec(ra0: float, dec0: float, xi: np.ndarray, eta: np.ndarray):
    """Gnomonic (TAN) inverse projection.

    Parameters
    ----------
    ra0, dec0 : tangent point, degrees.
    xi, eta : standard coordinates (east, north), degrees.
    """
    a0, d0 = np.radians(ra0), np.radians(dec0)
    x, y = np.radians(xi), np.radians(eta)
    denom = np.cos(d0) - y * np.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


def radec_to_tangent(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray):
    """Gnomonic (TAN) projection; returns (xi, eta) in degrees (east, north)."""
    a0, d0 = np.radians(ra0), np.radians(dec0)
    a, d = np.radians(ra), np.radians(dec)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta)


# ---------------------------------------------------------------------------------------
# Isochrone
# ---------------------------------------------------------------------------------------

def isochrone_path() -> Path:
    """Path of the PARSEC SDSS isochrone table shipped by ``uwastro465isos``."""
    import uwastro465isos

    return Path(uwastro465isos.__file__).parent / "data" / "isochrones_ugriz.dat"


def load_isochrone(log_age: float, mh: float, path: str | Path | None = None,
                   max_label: int = 7) -> Table:
    """One PARSEC isochrone (columns Mini, label, gmag, rmag, imag), sorted by Mini.

    Parameters
    ----------
    log_age : log10 of the age in years (matched to 0.01 dex).
    mh : metallicity [M/H] in dex (matched to 0.01 dex).
    path : isochrone file (default: the one in ``uwastro465isos``).
    max_label : highest PARSEC evolutionary label kept (7 = early AGB; drops post-AGB/WD).
    """
    path = Path(path) if path is not None else isochrone_path()
    names = None
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("#"):
                if names is None and "Mini" in line and "logAge" in line:
                    names = line[1:].split()
                continue
            parts = line.split()
            if len(parts) < 10:
                continue
            try:
                mh_row, age_row = float(parts[1]), float(parts[2])
            except ValueError:
                continue
            if abs(mh_row - mh) < 0.005 and abs(age_row - log_age) < 0.005:
                rows.append(parts)
    if names is None or not rows:
        raise ValueError(
            f"{path}: no isochrone with log_age={log_age} and [M/H]={mh}; pick values on the "
            "file's grid (log_age in steps of 0.05, [M/H] in {-2,-1.5,-1,-0.5,0})."
        )
    arr = np.array(rows, dtype=float)
    col = {n: i for i, n in enumerate(names)}
    tab = Table({k: arr[:, col[k]] for k in ("Mini", "label", "gmag", "rmag", "imag")})
    tab = tab[tab["label"] <= max_label]
    tab.sort("Mini")
    return tab


# ---------------------------------------------------------------------------------------
# Stars
# ---------------------------------------------------------------------------------------

def kroupa_masses(n: int, rng: np.random.Generator, m_min: float, m_max: float) -> np.ndarray:
    """Draw ``n`` masses (Msun) from the Kroupa (2001) IMF between ``m_min`` and ``m_max``."""
    grid = np.geomspace(m_min, m_max, 4000)
    pdf = np.where(grid < 0.5, (grid / 0.5) ** -1.3, (grid / 0.5) ** -2.3)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    cdf /= cdf[-1]
    return np.interp(rng.random(n), cdf, grid)


def _add_mags(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """Magnitude of the sum of two fluxes (NaN/inf in ``m2`` counts as no flux)."""
    f2 = np.where(np.isfinite(m2), 10 ** (-0.4 * np.nan_to_num(m2, nan=99.0)), 0.0)
    return -2.5 * np.log10(10 ** (-0.4 * m1) + f2)


def cluster_members(rng: np.random.Generator, radius_deg: float,
                    params: dict = CLUSTER, r_faint: float = 21.5) -> Table:
    """Cluster members (single stars and unresolved binaries) within ``radius_deg``.

    Parameters
    ----------
    rng : random generator.
    radius_deg : radius of the region to fill around the cluster centre, degrees.
    params : cluster parameters (see ``CLUSTER``).
    r_faint : faintest r magnitude kept.
    """
    iso = load_isochrone(params["log_age"], params["mh"])
    m_max = float(iso["Mini"].max())
    mass = kroupa_masses(params["n_systems"], rng, params["mass_min_msun"], m_max)
    is_binary = rng.random(mass.size) < params["binary_fraction"]
    q = rng.uniform(params["binary_q_min"], 1.0, mass.size)
    m2 = np.where(is_binary, q * mass, 0.0)
    dm = 5 * np.log10(params["distance_pc"]) - 5
    out = {}
    for band in ("g", "r", "i"):
        mag1 = np.interp(mass, iso["Mini"], iso[f"{band}mag"])
        lo = float(iso["Mini"].min())
        mag2 = np.where(m2 >= lo, np.interp(m2, iso["Mini"], iso[f"{band}mag"]), np.nan)
        total = _add_mags(mag1, mag2)
        out[band] = total + dm + EXTINCTION_COEFF[band] * params["ebv"]
    # Plummer surface density: R = a sqrt(u / (1 - u)), truncated at radius_deg.
    a = params["plummer_radius_arcmin"] / 60.0
    u_max = radius_deg**2 / (radius_deg**2 + a**2)
    u = rng.uniform(0, u_max, mass.size)
    rad = a * np.sqrt(u / (1 - u))
    phi = rng.uniform(0, 2 * np.pi, mass.size)
    ra, dec = tangent_to_radec(params["ra_deg"], params["dec_deg"], rad * np.cos(phi),
                               rad * np.sin(phi))
    plx = 1000.0 / params["distance_pc"]
    sd = params["pm_dispersion_masyr"]
    tab = Table({
        "ra": ra, "dec": dec, "g": out["g"], "r": out["r"], "i": out["i"],
        "member": np.ones(mass.size, bool), "variable": np.zeros(mass.size, bool),
        "mass_msun": mass, "binary": is_binary, "parallax": np.full(mass.size, plx),
        "pmra": params["pmra_masyr"] + rng.normal(0, sd, mass.size),
        "pmdec": params["pmdec_masyr"] + rng.normal(0, sd, mass.size),
    })
    return tab[tab["r"] < r_faint]


def field_stars(rng: np.random.Generator, ra0: float, dec0: float, radius_deg: float,
                density_per_deg2: float, ebv_max: float, r_bright: float = 8.0,
                r_faint: float = 21.5, slope: float = 0.25) -> Table:
    """Foreground/background stars in a circle, with Galactic-like counts and colours.

    Parameters
    ----------
    rng : random generator.
    ra0, dec0 : centre, degrees.
    radius_deg : radius of the circle, degrees.
    density_per_deg2 : stars per square degree brighter than ``r_faint``.
    ebv_max : largest reddening E(B-V) of the field stars (uniform in [0, ebv_max]), mag.
    r_bright, r_faint : magnitude range in r.
    slope : slope of log10 differential counts per magnitude.
    """
    n = rng.poisson(density_per_deg2 * np.pi * radius_deg**2)
    # Inverse CDF of dN/dr ~ 10**(slope r) between r_bright and r_faint.
    k = slope * np.log(10)
    u = rng.random(n)
    r_dered = np.log(np.exp(k * r_bright) + u * (np.exp(k * r_faint) - np.exp(k * r_bright))) / k
    # Colours: a blue (thick disk / halo turn-off) and a red (M dwarf) population on the
    # SDSS stellar locus (r - i from g - r, Covey et al. 2007-like).
    red = rng.random(n) < np.clip(0.1 + 0.03 * (r_dered - 14), 0.05, 0.35)
    gr0 = np.where(red, rng.normal(1.35, 0.12, n), rng.normal(0.55, 0.16, n))
    gr0 = np.clip(gr0, -0.2, 1.6)
    ri0 = 0.38 * gr0 - 0.05 + np.clip(gr0 - 1.2, 0, None) * 2.2 + rng.normal(0, 0.03, n)
    ebv = rng.uniform(0, ebv_max, n)
    r = r_dered + EXTINCTION_COEFF["r"] * ebv
    g = r + gr0 + (EXTINCTION_COEFF["g"] - EXTINCTION_COEFF["r"]) * ebv
    i = r - ri0 - (EXTINCTION_COEFF["r"] - EXTINCTION_COEFF["i"]) * ebv
    # Crude dwarf absolute magnitudes for parallaxes.
    abs_r = np.clip(3.5 + 5.5 * (gr0 - 0.4), 1.0, 14.0)
    dist_pc = 10 ** ((r_dered - abs_r + 5) / 5)
    rad = radius_deg * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    ra, dec = tangent_to_radec(ra0, dec0, rad * np.cos(phi), rad * np.sin(phi))
    vt = 30.0  # km/s tangential velocity dispersion
    pm_scale = vt / (4.74 * dist_pc / 1000.0)  # mas/yr
    return Table({
        "ra": ra, "dec": dec, "g": g, "r": r, "i": i,
        "member": np.zeros(n, bool), "variable": np.zeros(n, bool),
        "mass_msun": np.full(n, np.nan), "binary": np.zeros(n, bool),
        "parallax": 1000.0 / dist_pc,
        "pmra": rng.normal(0, 1, n) * pm_scale, "pmdec": rng.normal(0, 1, n) * pm_scale,
    })


def transit_field_specials(rng: np.random.Generator, n_comparison: int = 6) -> Table:
    """The transit host, the variable star V1 and comparison stars of similar brightness."""
    h = TRANSIT_HOST
    rows = [dict(name=h["name"], ra=h["ra_deg"], dec=h["dec_deg"], g=h["g"], r=h["r"],
                 i=h["i"], variable=False, parallax=h["parallax_mas"],
                 pmra=h["pmra_masyr"], pmdec=h["pmdec_masyr"])]
    v = VARIABLE
    ra, dec = tangent_to_radec(h["ra_deg"], h["dec_deg"], v["offset_arcmin"][0] / 60,
                               v["offset_arcmin"][1] / 60)
    rows.append(dict(name=v["name"], ra=float(ra), dec=float(dec), g=v["r"] + v["g_r"],
                     r=v["r"], i=v["r"] - v["r_i"], variable=True, parallax=0.9,
                     pmra=-3.1, pmdec=-1.2))
    for k in range(n_comparison):
        # Within +-4.5' x +-3' of the host (inside the small sub-frame on both pier sides).
        while True:
            xi, eta = rng.uniform(-4.5, 4.5), rng.uniform(-3.0, 3.0)
            if np.hypot(xi, eta) > 1.0 and np.hypot(xi - v["offset_arcmin"][0],
                                                     eta - v["offset_arcmin"][1]) > 1.0:
                break
        ra, dec = tangent_to_radec(h["ra_deg"], h["dec_deg"], xi / 60, eta / 60)
        r = rng.uniform(11.4, 13.0)
        gr = rng.uniform(0.4, 0.8)
        rows.append(dict(name=f"C{k + 1}", ra=float(ra), dec=float(dec), g=r + gr, r=r,
                         i=r - (0.38 * gr - 0.05), variable=False,
                         parallax=rng.uniform(1.0, 4.0), pmra=rng.normal(0, 8),
                         pmdec=rng.normal(0, 8)))
    tab = Table(rows=rows)
    tab["member"] = np.zeros(len(tab), bool)
    tab["mass_msun"] = np.full(len(tab), np.nan)
    tab["binary"] = np.zeros(len(tab), bool)
    return tab


def gaia_g(g: np.ndarray, r: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Gaia-like G magnitude from SDSS g, r, i (see ``GAIA_G_COEFFS``)."""
    x = np.clip(g - i, -0.5, 3.5)
    c = GAIA_G_COEFFS
    return r + c[0] + c[1] * x + c[2] * x**2 + c[3] * x**3


# ---------------------------------------------------------------------------------------
# Light curves
# ---------------------------------------------------------------------------------------

def transit_flux(bjd_tdb: np.ndarray, t0_bjd: float, planet: dict = PLANET) -> np.ndarray:
    """Relative flux of the host (batman quadratic limb-darkened model).

    Parameters
    ----------
    bjd_tdb : times, BJD_TDB (days).
    t0_bjd : mid-transit time, BJD_TDB (days).
    planet : planet parameters (see ``PLANET``).
    """
    import batman

    p = batman.TransitParams()
    p.t0 = 0.0
    p.per = planet["period_d"]
    p.rp = planet["rp_rs"]
    p.a = planet["a_rs"]
    p.inc = planet["inc_deg"]
    p.ecc = planet["ecc"]
    p.w = planet["w_deg"]
    p.limb_dark = "quadratic"
    p.u = list(planet["u_r"])
    t = np.asarray(bjd_tdb, dtype=float) - t0_bjd  # relative times keep float precision
    model = batman.TransitModel(p, t)
    return np.asarray(model.light_curve(p), dtype=float)


def transit_duration_days(planet: dict = PLANET) -> float:
    """Total transit duration T14 (first to fourth contact) of a circular orbit, days."""
    inc = math.radians(planet["inc_deg"])
    b = planet["a_rs"] * math.cos(inc)
    arg = math.sqrt((1 + planet["rp_rs"]) ** 2 - b**2) / (planet["a_rs"] * math.sin(inc))
    return planet["period_d"] / math.pi * math.asin(arg)


def variable_flux(bjd_tdb: np.ndarray, t_ref_bjd: float, band: str = "r",
                  params: dict = VARIABLE) -> np.ndarray:
    """Relative flux of the variable star V1 (mean magnitude = catalogue magnitude).

    Parameters
    ----------
    bjd_tdb : times, BJD_TDB (days).
    t_ref_bjd : epoch of phase zero, BJD_TDB (days).
    band : filter name.
    params : variable-star parameters (see ``VARIABLE``).
    """
    phase = 2 * np.pi * (np.asarray(bjd_tdb) - t_ref_bjd) / (params["period_h"] / 24.0)
    amp = params["amplitude_r_mag"] * params["amplitude_scale"][band]
    dmag = -amp * (np.sin(phase) + params["second_harmonic_ratio"] * np.sin(2 * phase + 0.7))
    return 10 ** (-0.4 * dmag)


# ---------------------------------------------------------------------------------------
# PSF rendering
# ---------------------------------------------------------------------------------------

@dataclass
class Moffat:
    """Circular Moffat profile with full width at half maximum ``fwhm_px`` (pixels)."""

    fwhm_px: float
    beta: float = 3.0

    @property
    def alpha(self) -> float:
        """Core width alpha of the Moffat profile, pixels."""
        return self.fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def radius_enclosing(self, fraction: float) -> float:
        """Radius (pixels) that encloses ``fraction`` of the total flux."""
        return self.alpha * math.sqrt((1.0 - fraction) ** (1.0 / (1.0 - self.beta)) - 1.0)


def render_stars(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                 psf: Moffat, faint_fraction: float = 0.995, bright_flux: float = 2e5,
                 chunk: int = 1500) -> np.ndarray:
    """Image (float64, same unit as ``flux``) of point sources with a Moffat PSF.

    Each star's stamp is normalised to sum to its flux (the PSF is truncated at the radius
    enclosing ``faint_fraction`` of the light; stars brighter than ``bright_flux`` get a
    stamp enclosing 99.95%), so the total counts of an isolated star equal ``flux``.

    Parameters
    ----------
    shape : (ny, nx) of the image, pixels.
    x, y : 0-based pixel positions of the star centres.
    flux : total flux of each star (e.g. electrons).
    psf : the PSF.
    faint_fraction : enclosed flux fraction defining the stamp radius of normal stars.
    bright_flux : stars above this flux get a larger stamp.
    chunk : stars rendered per vectorised batch (limits memory).
    """
    ny, nx = shape
    image = np.zeros(ny * nx, dtype=np.float64)
    x, y, flux = (np.asarray(v, dtype=float) for v in (x, y, flux))
    for bright, fraction in ((False, faint_fraction), (True, 0.9995)):
        sel = (flux > bright_flux) if bright else (flux <= bright_flux)
        half = int(math.ceil(psf.radius_enclosing(fraction)))
        keep = sel & (x > -half) & (x < nx + half) & (y > -half) & (y < ny + half)
        xs, ys, fs = x[keep], y[keep], flux[keep]
        offs = np.arange(-half, half + 1)
        n_chunk = max(1, chunk * 1369 // offs.size**2)
        for start in range(0, xs.size, n_chunk):
            cx, cy, cf = xs[start:start + n_chunk], ys[start:start + n_chunk], fs[start:start + n_chunk]
            ix, iy = np.rint(cx).astype(np.int64), np.rint(cy).astype(np.int64)
            px = ix[:, None] + offs[None, :]
            py = iy[:, None] + offs[None, :]
            dx2 = (px - cx[:, None]) ** 2
            dy2 = (py - cy[:, None]) ** 2
            prof = (1.0 + (dy2[:, :, None] + dx2[:, None, :]) / psf.alpha**2) ** (-psf.beta)
            prof *= (cf / prof.sum(axis=(1, 2)))[:, None, None]
            okx = (px >= 0) & (px < nx)
            oky = (py >= 0) & (py < ny)
            ok = oky[:, :, None] & okx[:, None, :]
            idx = py[:, :, None] * nx + px[:, None, :]
            image += np.bincount(idx[ok], weights=prof[ok], minlength=ny * nx)
    return image.reshape(ny, nx)
