"""Generate the book's sample night: raw frames, reference catalogues and the ground truth.

::

    from datared.sim import simulate_night
    simulate_night("sample-night", preset="small", seed=20240215)

The night of 2024-02-15 at Bonn: bias and dark frames in the afternoon, twilight flats in
g, r, i at dusk, the open cluster M37 in g, r, i (dithered), then a transit of WASP-104 b
in r with a meridian flip after egress. The same seed gives byte-identical files. See
``truth/README.md`` of a generated night for every file and convention. The stars and the
atmosphere come from :mod:`datared.sim.sky`, the camera from :mod:`datared.sim.instrument`;
the command line is :mod:`datared.sim.__main__` (``python -m datared.sim``).
Each night also gets ``datared.toml``, the settings that reduce it (config.py's names), for
``DATARED_CONFIG=<night>/datared.toml``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from datared.photometry import scintillation_sigma
from datared.sim import instrument, sky
from datared.sim.instrument import Camera

#: Recorded as ``generator`` in truth/params.json: how a folder is known as a sample night.
GENERATOR = "datared.sim"
#: Generator names of earlier versions of the simulator (their nights are sample nights
#: too, so that they are replaced rather than mistaken for real data).
FORMER_GENERATORS = ("datared.simulate",)
#: Seed of the book's sample night (config.sample_seed).
DEFAULT_SEED = 20240215
FORMAT_VERSION = 1
NIGHT_DATE = "2024-02-15"
SITE = {"name": "Bonn", "lat_deg": 50.7275, "lon_deg": 7.0706, "height_m": 60.0}
TELESCOPE = {"name": "35 cm corrected Dall-Kirkham", "aperture_mm": 350.0,
             "focal_length_mm": 2563.0, "camera": "QHY600M", "binning": 2,
             "pixel_scale_arcsec": 0.605}
FILTERS = ["g", "r", "i"]


@dataclass(frozen=True)
class Preset:
    """Size and frame counts of a simulated night."""

    name: str
    shape: tuple[int, int]  # (ny, nx) pixels
    n_bias: int
    n_dark: int
    n_dark_other: int
    n_flat: int
    n_cluster_dithers: int
    transit_cadence_s: float
    exptime_s: float = 60.0
    dark_other_exptime_s: float = 180.0
    flat_exptime_s: dict = field(default_factory=lambda: {"g": 3.0, "r": 2.0, "i": 4.0})
    catalog_margin_arcmin: float = 10.0
    n_comparison: int = 6


PRESETS = {
    "small": Preset("small", (900, 1200), 10, 10, 3, 7, 4, 80.0),
    "full": Preset("full", (3194, 4788), 10, 10, 3, 7, 4, 80.0),
    # Hidden preset for the unit tests: a few small frames.
    "tiny": Preset("tiny", (192, 256), 3, 3, 2, 2, 1, 1500.0, catalog_margin_arcmin=2.0),
}

#: Atmosphere, sky and seeing (every value recorded in truth/params.json).
ATMOSPHERE = {
    "zp_above_atmosphere": {"g": 21.85, "r": 21.75, "i": 21.30},
    "extinction_mag_per_airmass": {"g": 0.20, "r": 0.12, "i": 0.08},
    "colour_index": {"g": "g-r", "r": "g-r", "i": "r-i"},
    "colour_ref": {"g-r": 0.6, "r-i": 0.2},
    "colour_term": {"g": 0.03, "r": -0.02, "i": 0.02},
    "second_order_extinction": {"g": -0.02, "r": 0.0, "i": 0.0},
    "sky_dark_zenith_mag_arcsec2": {"g": 20.3, "r": 19.6, "i": 18.9},
    "sky_moon_factor": {"g": 1.4, "r": 1.0, "i": 0.7},
    "sky_twilight_dex_per_deg": 0.3,
    "sky_airmass_coeff": 0.3,
    "sky_cloud_brightening": 0.5,
    "sky_gradient_fraction": 0.02,
    "seeing_zenith_r_mean_arcsec": 2.6,
    "seeing_zenith_r_wave_arcsec": 0.2,
    "seeing_wave_period_h": 2.7,
    "seeing_random_rms_arcsec": 0.1,
    "seeing_wavelength_exponent": -0.2,
    "seeing_airmass_exponent": 0.6,
    "effective_wavelength_nm": {"g": 477.0, "r": 623.1, "i": 762.5},
    "fwhm_clip_arcsec": [2.0, 4.0],
    "psf_beta": 3.0,
    "transparency_wander_rms": 0.01,
    "scintillation": "sigma = 0.09 D_cm^(-2/3) X^1.75 exp(-h/8000 m) (2 t_s)^(-1/2) (Young 1967)",
}

POINTING = {
    "mount_error_arcmin": [0.8, 2.5],
    "centring_residual_arcsec": 8.0,
    "dither_arcsec": 30.0,
    "drift_arcsec_per_min": [0.25, -0.15],
    "camera_angle_deg": 0.35,
    "field_rotation_deg_per_h": 0.04,
    "sip_radial_k_per_px2": 1.3e-10,
    "sip_quadratic": {"A_2_0": 2e-8, "A_1_1": -1.5e-8, "B_0_2": 1.8e-8, "B_1_1": 1.2e-8},
    "flip_after_meridian_min": 5.0,
    "flip_duration_min": 4.0,
    "egress_before_flip_min": 15.0,
    "baseline_before_ingress_min": 45.0,
    "baseline_after_flip_min": 45.0,
}


# ---------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------

def _jsonable(obj):
    """Convert numpy scalars/arrays and tuples into plain JSON types (recursively)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def source_fingerprint() -> str:
    """Short SHA-256 of the simulator's source files: a night records the code that made it."""
    import hashlib

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("night.py", "sky.py", "instrument.py"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


def is_current_sample_night(path: str | Path, preset: str, seed: int,
                            max_per_group: int | None = None) -> bool:
    """True if ``path`` holds a sample night made by this very code with ``preset``, ``seed``
    and ``max_per_group`` (None: every frame)."""
    if not is_sample_night(path):
        return False
    params = json.loads((Path(path) / "truth" / "params.json").read_text())
    return (params.get("generator") == GENERATOR
            and params.get("source_fingerprint") == source_fingerprint()
            and params.get("preset") == preset and params.get("seed") == seed
            and params.get("max_per_group") == max_per_group)


def is_sample_night(path: str | Path) -> bool:
    """True if ``path`` holds a night written by this simulator or an earlier version of it
    (``generator`` in truth/params.json)."""
    params = Path(path) / "truth" / "params.json"
    if not params.is_file():
        return False
    try:
        generator = json.loads(params.read_text()).get("generator")
    except (ValueError, OSError):
        return False
    return generator == GENERATOR or generator in FORMER_GENERATORS


def sexagesimal(value_deg: float, hours: bool) -> str:
    """'HH MM SS.s' (hours=True) or '+DD MM SS' string of an angle in degrees."""
    v = value_deg / 15.0 if hours else value_deg
    sign = "-" if v < 0 else ("" if hours else "+")
    v = abs(v)
    d = int(v)
    m = int((v - d) * 60)
    s = (v - d - m / 60) * 3600
    return f"{sign}{d:02d} {m:02d} {s:04.1f}" if hours else f"{sign}{d:02d} {m:02d} {s:02.0f}"


def colour_of(stars: Table, band: str) -> np.ndarray:
    """Colour index used by the colour term of ``band`` (g-r for g and r, r-i for i)."""
    a, b = ATMOSPHERE["colour_index"][band].split("-")
    return np.asarray(stars[a]) - np.asarray(stars[b])


def star_flux_adu(stars: Table, band: str, zeropoint: float, exptime_s: float,
                  airmass: float, atmosphere: dict = ATMOSPHERE) -> np.ndarray:
    """Expected total flux (ADU, calibrated frame) of constant stars in one frame.

    flux = exptime * 10**(-0.4 * (m + (c_f + k2_f * X) * (C - C_ref) - zeropoint)), where
    C is the colour of ``colour_of`` and zeropoint the frame's value in truth/frames.ecsv.

    Parameters
    ----------
    stars : table with columns g, r, i (true magnitudes above the atmosphere).
    band : filter.
    zeropoint : the frame's zero point (mag), for a star of the reference colour.
    exptime_s : exposure time, seconds.
    airmass : the frame's airmass.
    atmosphere : atmosphere parameters (``params["atmosphere"]`` of the truth).
    """
    cref = atmosphere["colour_ref"][atmosphere["colour_index"][band]]
    coef = atmosphere["colour_term"][band] + atmosphere["second_order_extinction"][band] * airmass
    m = np.asarray(stars[band]) + coef * (colour_of(stars, band) - cref)
    return exptime_s * 10 ** (-0.4 * (m - zeropoint))


def frame_wcs(crval: tuple[float, float], angle_deg: float, shape: tuple[int, int],
              pixel_scale_arcsec: float, pointing: dict = POINTING):
    """The true TAN-SIP WCS of a frame (rotation ``angle_deg``, distortion about centre)."""
    from astropy.wcs import WCS, Sip

    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    w.wcs.crval = [float(crval[0]), float(crval[1])]
    w.wcs.radesys = "ICRS"
    s = pixel_scale_arcsec / 3600.0
    th = math.radians(angle_deg)
    w.wcs.cd = s * np.array([[-math.cos(th), math.sin(th)], [math.sin(th), math.cos(th)]])
    k = pointing["sip_radial_k_per_px2"]
    q = pointing["sip_quadratic"]
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[3, 0] = a[1, 2] = k  # u (u^2 + v^2)
    b[2, 1] = b[0, 3] = k  # v (u^2 + v^2)
    a[2, 0], a[1, 1] = q["A_2_0"], q["A_1_1"]
    b[0, 2], b[1, 1] = q["B_0_2"], q["B_1_1"]
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.pixel_shape = (nx, ny)
    return w


def _smooth_series(n: int, rms: float, width: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random series of ``n`` samples with standard deviation ``rms``."""
    from scipy.ndimage import gaussian_filter1d

    s = gaussian_filter1d(rng.normal(0, 1, n + 200), width)[100:-100]
    return s * rms / s.std()


# ---------------------------------------------------------------------------------------
# The schedule of the night
# ---------------------------------------------------------------------------------------

def _time(hours_after_midnight: float):
    """astropy Time (UTC) at ``hours_after_midnight`` of NIGHT_DATE."""
    import astropy.units as u
    from astropy.time import Time

    return Time(f"{NIGHT_DATE}T00:00:00", scale="utc") + hours_after_midnight * u.hour


def _meridian_hours(ra_deg: float, after_h: float = 12.0) -> float:
    """UTC hour (after midnight of NIGHT_DATE, may exceed 24) of the first meridian transit
    of ``ra_deg`` after ``after_h`` hours."""
    import astropy.units as u

    t_ref = _time(after_h)
    lst = t_ref.sidereal_time("apparent", longitude=SITE["lon_deg"] * u.deg).hour
    return after_h + ((ra_deg / 15.0 - lst) % 24.0) / 1.0027379093


def _nina_name(t_start, label: str, filt: str, exptime: float, number: int) -> str:
    """NINA-like file name: date_time_label_filter_temperature_exposure_number.fits."""
    stamp = t_start.strftime("%Y-%m-%d_%H-%M-%S")
    parts = [stamp, label] + ([filt] if filt else []) + ["-10.00", f"{exptime:.2f}s",
                                                         f"{number:04d}"]
    return "_".join(parts) + ".fits"


def build_schedule(preset: Preset, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """Every raw frame of the night in time order, and the timing/pointing facts."""
    import astropy.units as u

    frames: list[dict] = []

    def add(kind: str, t_h: float, exptime: float, filt: str = "", obj: str = "", **extra):
        frames.append(dict(imagetyp=kind, t_start_h=t_h, exptime=exptime, filter=filt,
                           object=obj, **extra))

    # Calibration frames in the afternoon (camera cooled, telescope capped).
    t = 14.5
    for _ in range(preset.n_bias):
        add("BIAS", t, 0.0)
        t += 4.0 / 3600
    t = 14.6
    for exptime, n in ((preset.exptime_s, preset.n_dark),
                       (preset.dark_other_exptime_s, preset.n_dark_other)):
        for _ in range(n):
            add("DARK", t, exptime)
            t += (exptime + 3.0) / 3600
    # Twilight flats at dusk (sun ~2-6 deg below the horizon), constant exposure per filter:
    # the level drops from ~44 to ~31 kADU as the sky darkens.
    t = 16.95
    for filt in FILTERS:
        exptime = preset.flat_exptime_s[filt]
        for k in range(preset.n_flat):
            frac = k / max(1, preset.n_flat - 1)
            level = 44000.0 - 13000.0 * frac + rng.normal(0, 300)
            add("FLAT", t, exptime, filt, flat_level=level)
            t += (exptime + 4.0) / 3600
        t += 1.0 / 60
    # M37: dithered g, r, i sequence after astronomical twilight.
    cl = sky.CLUSTER
    t = 18.0 + 40.0 / 60  # 18:40 UTC
    for k in range(preset.n_cluster_dithers):
        dither = (0.0, 0.0) if k == 0 else tuple(rng.uniform(-1, 1, 2) * POINTING["dither_arcsec"])
        for filt in FILTERS:
            add("LIGHT", t, preset.exptime_s, filt, "M37", dither=dither, side="West")
            t += (preset.exptime_s + 20.0) / 3600
        t += 20.0 / 3600
    # WASP-104 transit series in r with a meridian flip after egress.
    host = sky.TRANSIT_HOST
    t_meridian = _meridian_hours(host["ra_deg"])
    t_flip = t_meridian + POINTING["flip_after_meridian_min"] / 60
    t14_h = sky.transit_duration_days() * 24
    t_egress = t_flip - POINTING["egress_before_flip_min"] / 60
    t_mid = t_egress - t14_h / 2
    t_start = t_mid - t14_h / 2 - POINTING["baseline_before_ingress_min"] / 60
    t_start = round(t_start * 3600) / 3600  # whole seconds, like a sequencer
    t_restart = round((t_flip + POINTING["flip_duration_min"] / 60) * 3600) / 3600
    t_end = t_restart + POINTING["baseline_after_flip_min"] / 60
    cad = preset.transit_cadence_s / 3600
    t = t_start
    while t + preset.exptime_s / 3600 <= t_flip:
        add("LIGHT", t, preset.exptime_s, "r", "WASP-104", dither=(0.0, 0.0), side="West")
        t += cad
    t = t_restart
    while t <= t_end:
        add("LIGHT", t, preset.exptime_s, "r", "WASP-104", dither=(0.0, 0.0), side="East")
        t += cad

    # Pointing errors of the mount per (object, pier side), centring residuals, drift.
    pointing = {}
    for key in (("M37", "West"), ("WASP-104", "West"), ("WASP-104", "East")):
        amp = rng.uniform(*POINTING["mount_error_arcmin"]) * 60
        pa = rng.uniform(0, 2 * np.pi)
        pointing[f"{key[0]}/{key[1]}"] = {
            "mount_error_arcsec": [amp * math.sin(pa), amp * math.cos(pa)],
            "centring_residual_arcsec": list(rng.normal(0, POINTING["centring_residual_arcsec"], 2)),
            "t0_h": None,
        }
    for fr in frames:
        if fr["imagetyp"] == "LIGHT":
            p = pointing[f"{fr['object']}/{fr['side']}"]
            if p["t0_h"] is None:
                p["t0_h"] = fr["t_start_h"]
    timing = {
        "wasp104_meridian_utc": _time(t_meridian).isot,
        "meridian_flip_utc": _time(t_flip).isot,
        "transit_mid_utc": _time(t_mid).isot,
        "transit_t14_h": t14_h,
        "transit_series_start_utc": _time(t_start).isot,
        "m37_meridian_utc": _time(_meridian_hours(cl["ra_deg"])).isot,
        "t_mid_h": t_mid,
        "t_start_h": t_start,
    }
    # Times as astropy Time and NINA names.
    counters: dict[str, int] = {}
    for fr in frames:
        tt = _time(fr["t_start_h"])
        fr["time"] = tt
        fr["date_obs"] = tt.isot
        label = fr["object"] if fr["imagetyp"] == "LIGHT" else fr["imagetyp"]
        key = f"{fr['imagetyp']}/{fr['object']}/{fr['filter']}/{fr['exptime']}"
        counters[key] = counters.get(key, 0)
        fr["number"] = counters[key]
        counters[key] += 1
        fr["group"] = key
        fr["file"] = _nina_name(tt.datetime, label, fr["filter"], fr["exptime"], fr["number"])
        fr["folder"] = fr["imagetyp"]
        fr["t_mid"] = tt + fr["exptime"] / 2 * u.s
    return frames, {"timing": timing, "pointing": pointing}


# ---------------------------------------------------------------------------------------
# The night
# ---------------------------------------------------------------------------------------

def _site_location():
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation(lat=SITE["lat_deg"] * u.deg, lon=SITE["lon_deg"] * u.deg,
                         height=SITE["height_m"] * u.m)


def _observing_conditions(frames: list[dict], rng: np.random.Generator) -> None:
    """Airmass, sun/moon altitude, BJD, seeing, transparency and sky for every LIGHT frame."""
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord, get_body, get_sun
    from astropy.time import Time

    loc = _site_location()
    lights = [f for f in frames if f["imagetyp"] == "LIGHT"]
    if not lights:
        return
    t_mid = Time([f["t_mid"].jd for f in lights], format="jd", scale="utc", location=loc)
    t_start = Time([f["time"].jd for f in lights], format="jd", scale="utc", location=loc)
    ra = np.array([sky.CLUSTER["ra_deg"] if f["object"] == "M37" else sky.TRANSIT_HOST["ra_deg"]
                   for f in lights])
    dec = np.array([sky.CLUSTER["dec_deg"] if f["object"] == "M37"
                    else sky.TRANSIT_HOST["dec_deg"] for f in lights])
    target = SkyCoord(ra * u.deg, dec * u.deg)
    frame_mid = AltAz(obstime=t_mid, location=loc)
    alt_mid = target.transform_to(frame_mid).alt.deg
    alt_start = target.transform_to(AltAz(obstime=t_start, location=loc)).alt.deg
    sun_alt = get_sun(t_mid).transform_to(frame_mid).alt.deg
    moon_alt = get_body("moon", t_mid, loc).transform_to(frame_mid).alt.deg
    bjd = (t_mid.tdb + t_mid.light_travel_time(target)).jd

    def airmass(alt):
        # Pickering (2002) airmass, good down to the horizon.
        h = np.asarray(alt)
        return 1.0 / np.sin(np.radians(h + 244.0 / (165.0 + 47.0 * h**1.1)))

    x_mid, x_start = airmass(alt_mid), airmass(alt_start)
    # Seeing and transparency as smooth functions of time (per-minute grid from 14h UTC).
    minutes = np.arange(0, 16 * 60)
    wave = ATMOSPHERE["seeing_zenith_r_wave_arcsec"] * np.sin(
        2 * np.pi * minutes / (ATMOSPHERE["seeing_wave_period_h"] * 60) + rng.uniform(0, 6.28))
    seeing = (ATMOSPHERE["seeing_zenith_r_mean_arcsec"] + wave
              + _smooth_series(minutes.size, ATMOSPHERE["seeing_random_rms_arcsec"], 15.0, rng))
    wander = _smooth_series(minutes.size, ATMOSPHERE["transparency_wander_rms"], 20.0, rng)
    transparency = np.clip(1.0 - np.abs(wander), 0, 1)
    for fr, xm, xs, sa, ma, b in zip(lights, x_mid, x_start, sun_alt, moon_alt, bjd,
                                     strict=True):
        fr["airmass"], fr["airmass_start"] = float(xm), float(xs)
        fr["sun_alt"], fr["moon_alt"], fr["bjd_tdb"] = float(sa), float(ma), float(b)
        fr["jd_mid_utc"] = float(fr["t_mid"].jd)
    return {"seeing_minutes": seeing, "transparency_minutes": transparency}


def simulate_night(out_dir: str | Path, preset: str = "small", seed: int = DEFAULT_SEED,
                   max_per_group: int | None = None, progress: bool = True) -> Path:
    """Generate a simulated night at ``out_dir`` and return its path.

    Parameters
    ----------
    out_dir : folder to create (refused if it holds anything but a previous sample night,
        which is replaced).
    preset : "small" (book and CI), "full" (full 4788x3194 frames) or "tiny" (unit tests).
    seed : random seed; the same seed gives byte-identical files.
    max_per_group : keep at most this many frames per (imagetyp, object, filter, exptime)
        group (e.g. for benchmarks with the full preset); None keeps all.
    progress : show a tqdm progress bar.
    """
    from astropy.utils import iers

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose another --out folder.")
    if out.is_dir() and any(out.iterdir()) and not is_sample_night(out):
        raise FileExistsError(
            f"{out} is not empty and is not a sample night written by {GENERATOR}: refusing to "
            "write there (it may hold real data). Choose an empty or new folder for --out."
        )
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with iers.conf.set_temp("auto_download", False):
            _generate(tmp, PRESETS[preset], int(seed), max_per_group, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def _rounded(tab: Table) -> Table:
    """Round positions and magnitudes so that the written ECSV is exactly what was used."""
    for name in ("ra", "dec"):
        tab[name] = np.round(np.asarray(tab[name], dtype=float), 8)
    for name in ("g", "r", "i"):
        tab[name] = np.round(np.asarray(tab[name], dtype=float), 5)
    return tab


def _write_header_only(path: Path, header: fits.Header) -> None:
    fits.PrimaryHDU(header=header).writeto(path, checksum=False)


def _nina_header(fr: dict, cam: Camera, preset: Preset, rng: np.random.Generator) -> fits.Header:
    """NINA-like header of one raw frame (no WCS)."""
    import astropy.units as u

    h = fits.Header()
    h["IMAGETYP"] = (fr["imagetyp"], "Type of exposure")
    h["EXPOSURE"] = (fr["exptime"], "[s] Exposure duration")
    h["EXPTIME"] = (fr["exptime"], "[s] Exposure duration")
    h["DATE-LOC"] = ((fr["time"] + 1 * u.hour).isot, "Time of observation (local)")
    h["DATE-OBS"] = (fr["date_obs"], "Time of observation (UTC)")
    h["XBINNING"] = (TELESCOPE["binning"], "X axis binning factor")
    h["YBINNING"] = (TELESCOPE["binning"], "Y axis binning factor")
    h["GAIN"] = (cam.gain_setting, "Sensor gain (camera setting)")
    h["OFFSET"] = (cam.offset_setting, "Sensor gain offset (camera setting)")
    h["EGAIN"] = (cam.gain_e_per_adu, "[e-/ADU] Electrons per A/D unit")
    h["XPIXSZ"] = (instrument.PIXEL_UM, "[um] Pixel X axis size")
    h["YPIXSZ"] = (instrument.PIXEL_UM, "[um] Pixel Y axis size")
    h["INSTRUME"] = (TELESCOPE["camera"], "Imaging instrument name")
    h["SET-TEMP"] = (cam.set_temp_c, "[degC] CCD temperature setpoint")
    h["CCD-TEMP"] = (round(cam.set_temp_c + float(rng.normal(0, 0.1)), 2),
                     "[degC] CCD temperature")
    h["TELESCOP"] = (TELESCOPE["name"], "Name of telescope")
    h["FOCALLEN"] = (TELESCOPE["focal_length_mm"], "[mm] Focal length")
    h["FOCRATIO"] = (round(TELESCOPE["focal_length_mm"] / TELESCOPE["aperture_mm"], 2),
                     "Focal ratio")
    if fr["imagetyp"] == "LIGHT":
        h["RA"] = (round(fr["header_ra"], 5), "[deg] RA of telescope")
        h["DEC"] = (round(fr["header_dec"], 5), "[deg] Declination of telescope")
        h["OBJCTRA"] = (sexagesimal(fr["header_ra"], True), "[H M S] RA of imaged object")
        h["OBJCTDEC"] = (sexagesimal(fr["header_dec"], False), "[D M S] Declination of imaged object")
        h["PIERSIDE"] = (fr["side"], "Telescope pointing state")
    h["SITEELEV"] = (SITE["height_m"], "[m] Observation site elevation")
    h["SITELAT"] = (SITE["lat_deg"], "[deg] Observation site latitude")
    h["SITELONG"] = (SITE["lon_deg"], "[deg] Observation site longitude")
    if fr["filter"]:
        h["FWHEEL"] = ("QHYCFW3", "Filter Wheel name")
        h["FILTER"] = (fr["filter"], "Active filter name")
    temp = 6.0 - 5.0 * (fr["t_start_h"] - 14.5) / 12.0
    h["FOCNAME"] = ("ZWO EAF", "Focusing equipment name")
    h["FOCPOS"] = (int(12000 + 40 * (6.0 - temp)), "[step] Focuser position")
    h["FOCUSPOS"] = (int(12000 + 40 * (6.0 - temp)), "[step] Focuser position")
    h["FOCTEMP"] = (round(temp, 2), "[degC] Focuser temperature")
    if fr["imagetyp"] == "LIGHT":
        h["OBJECT"] = (fr["object"], "Name of the object of interest")
        h["AIRMASS"] = (round(fr["airmass_start"], 4), "Airmass at frame start")
    h["SWCREATE"] = ("N.I.N.A. 3.0.0.2017 (x64)", "Software that created this file")
    return h


def _generate(root: Path, preset: Preset, seed: int, max_per_group: int | None,
              progress: bool) -> None:
    """Write the whole night into ``root`` (an empty folder)."""
    from tqdm.auto import tqdm

    cam = Camera()
    shape = preset.shape
    ny, nx = shape
    pix = TELESCOPE["pixel_scale_arcsec"]
    rng_sky = np.random.default_rng([seed, 1])
    rng_inst = np.random.default_rng([seed, 2])
    rng_sched = np.random.default_rng([seed, 3])
    rng_atm = np.random.default_rng([seed, 4])
    rng_cat = np.random.default_rng([seed, 5])

    # --- instrument truth ---
    bias = instrument.bias_map(shape, cam, rng_inst)
    dark = instrument.dark_current_map(shape, cam, rng_inst)
    flats, flat_recipe = instrument.flat_fields(shape, FILTERS, cam, rng_inst)

    # --- sky content ---
    half_diag_deg = math.hypot(nx, ny) / 2 * pix / 3600
    cat_radius = half_diag_deg + (preset.catalog_margin_arcmin + 3.0) / 60
    cl = sky.CLUSTER
    members = sky.cluster_members(rng_sky, cat_radius)
    m37_field = sky.field_stars(rng_sky, cl["ra_deg"], cl["dec_deg"], cat_radius,
                                sky.FIELD["M37"]["density_per_deg2"],
                                sky.FIELD["M37"]["ebv_max"], sky.FIELD["r_bright"],
                                sky.FIELD["r_faint"], sky.FIELD["count_slope_dex_per_mag"])
    h = sky.TRANSIT_HOST
    w_field = sky.field_stars(rng_sky, h["ra_deg"], h["dec_deg"], cat_radius,
                              sky.FIELD["WASP-104"]["density_per_deg2"],
                              sky.FIELD["WASP-104"]["ebv_max"], sky.FIELD["r_bright"],
                              sky.FIELD["r_faint"], sky.FIELD["count_slope_dex_per_mag"])
    specials = sky.transit_field_specials(rng_sky, preset.n_comparison)
    parts = []
    for tab, fld in ((members, "M37"), (m37_field, "M37"), (specials, "WASP-104"),
                     (w_field, "WASP-104")):
        t = tab.copy()
        if "name" not in t.colnames:
            t["name"] = np.full(len(t), "", dtype="U16")
        t["field"] = np.full(len(t), fld, dtype="U16")
        parts.append(t[["name", "field", "ra", "dec", "g", "r", "i", "member", "variable",
                        "binary", "mass_msun", "parallax", "pmra", "pmdec"]])
    from astropy.table import vstack

    stars = _rounded(vstack(parts))
    stars.add_column(np.arange(1, len(stars) + 1), name="id", index=0)
    stars["binary"] = stars["binary"].astype(bool)
    stars["member"] = stars["member"].astype(bool)
    stars["variable"] = stars["variable"].astype(bool)

    # --- schedule, pointing, conditions ---
    frames, facts = build_schedule(preset, rng_sched)
    if max_per_group is not None:
        frames = [f for f in frames if f["number"] < max_per_group]
    cond = _observing_conditions(frames, rng_atm)
    timing = facts["timing"]
    t0_bjd = None
    t_var_ref = None
    if cond is not None:
        import astropy.units as u
        from astropy.coordinates import SkyCoord
        from astropy.time import Time

        loc = _site_location()
        tm = Time(_time(timing["t_mid_h"]).jd, format="jd", scale="utc", location=loc)
        target = SkyCoord(h["ra_deg"] * u.deg, h["dec_deg"] * u.deg)
        t0_bjd = float((tm.tdb + tm.light_travel_time(target)).jd)
        t_var_ref = round(t0_bjd - 0.3, 6)
    # Clouds: a passage in the pre-ingress baseline, a thin one during the transit, and a
    # faint veil during the M37 sequence (hours after midnight UTC; depth; width in minutes).
    clouds = [
        {"t_h": timing["t_start_h"] + 25 / 60, "depth": 0.18, "width_min": 5.0},
        {"t_h": timing["t_mid_h"] + 20 / 60, "depth": 0.07, "width_min": 8.0},
        {"t_h": 18.0 + 46.0 / 60, "depth": 0.04, "width_min": 3.0},
    ]

    def seeing_at(t_h):
        return float(np.interp((t_h - 14.0) * 60, np.arange(16 * 60), cond["seeing_minutes"]))

    def transparency_at(t_h):
        base = float(np.interp((t_h - 14.0) * 60, np.arange(16 * 60), cond["transparency_minutes"]))
        for c in clouds:
            base *= 1.0 - c["depth"] * math.exp(-(((t_h - c["t_h"]) * 60 / c["width_min"]) ** 2))
        return base

    # Per-object pointing state and sky gradient direction.
    gradients = {obj: rng_sched.uniform(0, 2 * np.pi) for obj in ("M37", "WASP-104")}
    targets = {"M37": (cl["ra_deg"], cl["dec_deg"]), "WASP-104": (h["ra_deg"], h["dec_deg"])}
    field_tabs = {obj: stars[stars["field"] == obj] for obj in targets}

    for sub in ("BIAS", "DARK", "FLAT", "LIGHT", "catalogs", "truth/wcs"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    atm = ATMOSPHERE
    rows = []
    lc_rows = []
    xx = (np.arange(nx) - nx / 2)[None, :] / nx  # for the sky gradient (broadcast)
    yy = (np.arange(ny) - ny / 2)[:, None] / ny
    for index, fr in enumerate(tqdm(frames, desc="Simulating night", unit="frame",
                                    disable=not progress)):
        rng = np.random.default_rng([seed, 7, index])
        kind = fr["imagetyp"]
        exptime = fr["exptime"]
        row = dict(file=fr["file"], path=f"{fr['folder']}/{fr['file']}", imagetyp=kind,
                   filter=fr["filter"], object=fr["object"], date_obs=fr["date_obs"],
                   exptime=exptime, airmass=np.nan, fwhm_arcsec=np.nan, sky_adu=np.nan,
                   transparency=np.nan, zeropoint=np.nan, pierside=fr.get("side", ""),
                   jd_mid_utc=np.nan, bjd_tdb_mid=np.nan, ra_center=np.nan, dec_center=np.nan,
                   rotation_deg=np.nan, header_ra=np.nan, header_dec=np.nan,
                   flat_level_adu=np.nan, n_cosmic=0, scintillation=np.nan)
        electrons = np.zeros(shape)
        if kind in ("DARK", "LIGHT") and exptime > 0:
            cr, n_cr = instrument.cosmic_rays(shape, exptime, cam, rng)
            row["n_cosmic"] = n_cr
        else:
            cr = None
        if kind == "FLAT":
            level = fr["flat_level"] - cam.bias_level_adu
            expected = level * cam.gain_e_per_adu * flats[fr["filter"]].astype(np.float64)
            expected += dark * exptime * cam.gain_e_per_adu
            electrons = rng.poisson(expected).astype(np.float64)
            row["flat_level_adu"] = round(level, 3)
            row["sky_adu"] = round(level, 3)
        elif kind == "DARK":
            electrons = rng.poisson(dark.astype(np.float64) * exptime * cam.gain_e_per_adu)
            electrons = electrons.astype(np.float64) + cr
        elif kind == "LIGHT":
            obj, filt, side = fr["object"], fr["filter"], fr["side"]
            p = facts["pointing"][f"{obj}/{side}"]
            t_h = fr["t_start_h"] + exptime / 7200
            minutes = (fr["t_start_h"] - p["t0_h"]) * 60
            drift = np.array(POINTING["drift_arcsec_per_min"]) * minutes if obj == "WASP-104" \
                else np.zeros(2)
            off = np.array(p["centring_residual_arcsec"]) + np.array(fr["dither"]) + drift
            ra0, dec0 = targets[obj]
            ra_c, dec_c = sky.tangent_to_radec(ra0, dec0, off[0] / 3600, off[1] / 3600)
            hdr_off = off - np.array(p["mount_error_arcsec"]) + rng.normal(0, 1.0, 2)
            ra_h, dec_h = sky.tangent_to_radec(ra0, dec0, hdr_off[0] / 3600, hdr_off[1] / 3600)
            angle = (POINTING["camera_angle_deg"]
                     + POINTING["field_rotation_deg_per_h"] * (t_h - 18.0)
                     + (180.0 if side == "East" else 0.0))
            wcs = frame_wcs((float(ra_c), float(dec_c)), angle, shape, pix)
            fr["header_ra"], fr["header_dec"] = float(ra_h), float(dec_h)
            x_air = fr["airmass"]
            fwhm = seeing_at(t_h) * (atm["effective_wavelength_nm"][filt] / 623.1) ** \
                atm["seeing_wavelength_exponent"] * x_air ** atm["seeing_airmass_exponent"]
            fwhm = float(np.clip(fwhm, *atm["fwhm_clip_arcsec"]))
            transp = transparency_at(t_h)
            zp = (atm["zp_above_atmosphere"][filt]
                  - atm["extinction_mag_per_airmass"][filt] * x_air + 2.5 * math.log10(transp))
            # Sky: dark sky x airmass + moon + twilight, brighter under clouds.
            dark_sky = 10 ** (-0.4 * (atm["sky_dark_zenith_mag_arcsec2"][filt]
                                      - atm["zp_above_atmosphere"][filt])) * pix**2
            moon = atm["sky_moon_factor"][filt] * max(0.0, math.sin(math.radians(fr["moon_alt"])))
            twilight = max(0.0, 10 ** (atm["sky_twilight_dex_per_deg"] * (fr["sun_alt"] + 18.0)) - 1.0)
            sky_rate = dark_sky * (1 + atm["sky_airmass_coeff"] * (x_air - 1) + moon + twilight)
            sky_rate *= 1 + atm["sky_cloud_brightening"] * (1 - transp)
            sky_adu = sky_rate * exptime
            g_ang = gradients[obj]
            grad = atm["sky_gradient_fraction"] * (xx * math.cos(g_ang) + yy * math.sin(g_ang))
            # Stars: positions from the true WCS, fluxes through the zero-point convention.
            tab = field_tabs[obj]
            sep = np.hypot(*sky.radec_to_tangent(float(ra_c), float(dec_c),
                                                 np.asarray(tab["ra"]), np.asarray(tab["dec"])))
            near = tab[sep < half_diag_deg + 2.0 / 60]
            x, y = wcs.all_world2pix(np.asarray(near["ra"]), np.asarray(near["dec"]), 0)
            flux = star_flux_adu(near, filt, zp, exptime, x_air)
            lc_host = lc_var = 1.0
            if obj == "WASP-104":
                lc_host = float(sky.transit_flux(np.array([fr["bjd_tdb"]]), t0_bjd)[0])
                lc_var = float(sky.variable_flux(np.array([fr["bjd_tdb"]]), t_var_ref, filt)[0])
                flux = np.where(near["name"] == h["name"], flux * lc_host, flux)
                flux = np.where(near["name"] == sky.VARIABLE["name"], flux * lc_var, flux)
                lc_rows.append(dict(file=fr["file"], bjd_tdb=fr["bjd_tdb"],
                                    jd_utc=fr["jd_mid_utc"], host_flux=lc_host,
                                    variable_flux=lc_var, pierside=side))
            scint = scintillation_sigma(x_air, exptime, aperture_mm=TELESCOPE["aperture_mm"],
                                        height_m=SITE["height_m"])
            flux = flux * (1.0 + rng.normal(0, scint, flux.size))
            psf = sky.Moffat(fwhm / pix, atm["psf_beta"])
            stars_e = sky.render_stars(shape, x, y, flux * cam.gain_e_per_adu, psf)
            expected = (sky_adu * (1 + grad) * cam.gain_e_per_adu + stars_e) * flats[filt]
            expected += dark * exptime * cam.gain_e_per_adu
            electrons = rng.poisson(expected).astype(np.float64) + cr
            header_wcs = wcs.to_header(relax=True)
            header_wcs["IMAGEW"] = (nx, "Image width, pixels")
            header_wcs["IMAGEH"] = (ny, "Image height, pixels")
            header_wcs["RAWFILE"] = fr["file"]
            _write_header_only(root / "truth" / "wcs" / fr["file"], header_wcs)
            row.update(airmass=round(x_air, 6), fwhm_arcsec=round(fwhm, 5),
                       sky_adu=round(sky_adu, 4), transparency=round(transp, 6),
                       zeropoint=round(zp, 6), jd_mid_utc=fr["jd_mid_utc"],
                       bjd_tdb_mid=fr["bjd_tdb"], ra_center=round(float(ra_c), 8),
                       dec_center=round(float(dec_c), 8), rotation_deg=round(angle % 360, 6),
                       header_ra=round(float(ra_h), 5), header_dec=round(float(dec_h), 5),
                       scintillation=round(scint, 6))
        raw = instrument.read_out(electrons, bias, cam, rng)
        hdr = _nina_header(fr, cam, preset, rng)
        fits.PrimaryHDU(data=raw, header=hdr).writeto(root / fr["folder"] / fr["file"],
                                                      checksum=False)
        rows.append(row)

    # --- truth files ---
    truth = root / "truth"
    fits.PrimaryHDU(bias, header=fits.Header([("BUNIT", "adu")])).writeto(
        truth / "bias.fits", checksum=False)
    fits.PrimaryHDU(dark, header=fits.Header([("BUNIT", "adu / s")])).writeto(
        truth / "dark_current.fits", checksum=False)
    for f, flat in flats.items():
        fits.PrimaryHDU(flat, header=fits.Header([("FILTER", f)])).writeto(
            truth / f"flat_{f}.fits", checksum=False)
    frames_tab = Table(rows=rows)
    frames_tab.write(truth / "frames.ecsv", format="ascii.ecsv", overwrite=True)
    star_out = stars.copy()
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("g", "mag"), ("r", "mag"), ("i", "mag"),
                       ("parallax", "mas"), ("pmra", "mas / yr"), ("pmdec", "mas / yr")):
        star_out[name].unit = unit
    for name in ("parallax", "pmra", "pmdec", "mass_msun"):
        star_out[name] = np.round(np.asarray(star_out[name], dtype=float), 5)
    star_out.write(truth / "stars.ecsv", format="ascii.ecsv", overwrite=True)
    if lc_rows:
        Table(rows=lc_rows).write(truth / "lightcurves.ecsv", format="ascii.ecsv", overwrite=True)
    _write_catalogs(root / "catalogs", stars, rng_cat)

    params = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source_fingerprint(),
        "preset": preset.name,
        "seed": seed,
        "max_per_group": max_per_group,
        "night_date": NIGHT_DATE,
        "shape_yx": list(shape),
        "subframe_origin_yx": list(instrument.subframe_origin(shape)),
        "gain_e_per_adu": cam.gain_e_per_adu,
        "read_noise_e": cam.read_noise_e,
        "read_noise_adu": cam.read_noise_adu,
        "saturation_adu": cam.saturation_adu,
        "pixel_scale_arcsec": pix,
        "site": SITE,
        "telescope": TELESCOPE,
        "camera": asdict(cam),
        "flat": flat_recipe,
        "atmosphere": ATMOSPHERE,
        "clouds": clouds,
        "pointing": POINTING,
        "pointing_per_side": facts["pointing"],
        "timing": timing,
        "cluster": sky.CLUSTER,
        "extinction_coeff_per_ebv": sky.EXTINCTION_COEFF,
        "field": sky.FIELD,
        "transit_host": sky.TRANSIT_HOST,
        "planet": {**sky.PLANET, "t0_bjd_tdb": t0_bjd},
        "variable": {**sky.VARIABLE, "t_ref_bjd_tdb": t_var_ref},
        "gaia_g_coeffs": sky.GAIA_G_COEFFS,
        "refcat2": sky.REFCAT2_MODEL,
        "gaia": sky.GAIA_MODEL,
        "catalog_radius_deg": cat_radius,
        "epoch_of_positions": 2024.12,
        "zeropoint_convention": (
            "In a frame calibrated as (raw - bias - dark_current*exptime)/flat_<filter>, a star "
            "of true magnitude m and colour C has total flux exptime*10**(-0.4*(m + (c_f + "
            "k2_f*X)*(C - C_ref) - zeropoint)) ADU; c_f = atmosphere.colour_term, k2_f = "
            "atmosphere.second_order_extinction, X = airmass, C per atmosphere.colour_index, "
            "C_ref per atmosphere.colour_ref. zeropoint = zp_above_atmosphere - k_f X + "
            "2.5 log10(transparency)."),
    }
    (truth / "params.json").write_text(json.dumps(_jsonable(params), indent=2) + "\n")
    (truth / "README.md").write_text(_readme(preset, params))
    settings = night_settings(preset.name, seed, t0_bjd)
    (root / SETTINGS_FILE).write_text(settings_toml(settings, preset.name, seed, max_per_group))


def _write_catalogs(folder: Path, stars: Table, rng: np.random.Generator) -> None:
    """refcat2.ecsv (ATLAS-REFCAT2 columns) and gaia.ecsv (Gaia DR3 columns)."""
    g, r, i = (np.asarray(stars[b], dtype=float) for b in ("g", "r", "i"))
    ra, dec = np.asarray(stars["ra"], dtype=float), np.asarray(stars["dec"], dtype=float)
    pmra, pmdec = np.asarray(stars["pmra"], dtype=float), np.asarray(stars["pmdec"], dtype=float)
    plx = np.asarray(stars["parallax"], dtype=float)
    G = sky.gaia_g(g, r, i)
    cosd = np.cos(np.radians(dec))

    def at_epoch(epoch, sigma_mas):
        dt = epoch - 2024.12
        d_ra = (pmra * dt + rng.normal(0, 1, ra.size) * sigma_mas) / 3.6e6 / cosd
        d_dec = (pmdec * dt + rng.normal(0, 1, ra.size) * sigma_mas) / 3.6e6
        return ra + d_ra, dec + d_dec

    # Gaia DR3 (epoch 2016.0): completeness falling near G = 20.6, 2-parameter solutions,
    # duplicated sources and random source ids (nothing in the catalogue points at the truth).
    gm = sky.GAIA_MODEL
    sig = 0.02 + 0.5 * 10 ** (0.4 * (G - 20.0))
    p_seen = 1.0 / (1.0 + np.exp((G - gm["completeness_g50"]) / gm["completeness_width"]))
    sel = rng.random(ra.size) < p_seen
    gra, gdec = at_epoch(2016.0, sig)
    eg = 0.0003 + 0.01 * 10 ** (0.4 * (G - 20.0))
    frac_2p = gm["two_param_fraction_bright"] + (
        gm["two_param_fraction_faint"] - gm["two_param_fraction_bright"]) * np.clip(
        (G - 17.0) / 4.0, 0.0, 1.0)
    two_param = rng.random(ra.size) < frac_2p
    noise = rng.normal(0, 1, (4, ra.size))
    cols = {
        "ra": gra, "ra_error": sig, "dec": gdec, "dec_error": sig,
        "parallax": np.where(two_param, np.nan, plx + noise[0] * 1.2 * sig),
        "parallax_error": np.where(two_param, np.nan, 1.2 * sig),
        "pmra": np.where(two_param, np.nan, pmra + noise[1] * 1.1 * sig),
        "pmra_error": np.where(two_param, np.nan, 1.1 * sig),
        "pmdec": np.where(two_param, np.nan, pmdec + noise[2] * 1.1 * sig),
        "pmdec_error": np.where(two_param, np.nan, 1.1 * sig),
        "phot_g_mean_mag": G + noise[3] * eg,
    }
    rows = np.flatnonzero(sel)
    dup = rows[rng.random(rows.size) < gm["duplicate_fraction"]]
    rows = np.concatenate([rows, dup])
    gaia = Table()
    gaia["source_id"] = rng.choice(np.arange(10**6, 10**7), size=rows.size, replace=False) * (
        10**12) + rng.integers(0, 10**12, rows.size)
    for name, values in cols.items():
        column = values[rows].copy()
        if name in ("ra", "dec") and dup.size:
            step = gm["duplicate_sep_mas"] / 3.6e6 * rng.normal(0, 1, dup.size)
            if name == "ra":
                step = step / cosd[dup]
            column[-dup.size:] += step
        gaia[name] = np.round(column, 9 if name in ("ra", "dec") else 5 if name.startswith(
            "phot") else 4)
    gaia["ref_epoch"] = np.full(rows.size, 2016.0)
    order = ["source_id", "ra", "ra_error", "dec", "dec_error", "parallax", "parallax_error",
             "pmra", "pmra_error", "pmdec", "pmdec_error", "ref_epoch", "phot_g_mean_mag"]
    gaia = gaia[order]
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("ra_error", "mas"), ("dec_error", "mas"),
                       ("parallax", "mas"), ("parallax_error", "mas"), ("pmra", "mas / yr"),
                       ("pmra_error", "mas / yr"), ("pmdec", "mas / yr"),
                       ("pmdec_error", "mas / yr"), ("ref_epoch", "yr"),
                       ("phot_g_mean_mag", "mag")):
        gaia[name].unit = unit
    gaia.sort("phot_g_mean_mag")
    gaia.meta = {"description": "Simulated Gaia DR3 gaia_source subset (sample night)"}
    gaia.write(folder / "gaia.ecsv", format="ascii.ecsv", overwrite=True)
    _write_refcat2(folder, stars, rng, G)


def _ps1_from_sdss(g: np.ndarray, r: np.ndarray, i: np.ndarray, rng: np.random.Generator,
                   ra: np.ndarray, dec: np.ndarray) -> dict[str, np.ndarray]:
    """Pan-STARRS1-like g, r, i of stars with true SDSS g, r, i (see ``sky.REFCAT2_MODEL``)."""
    model = sky.REFCAT2_MODEL
    locus = (r - i) - (0.38 * (g - r) - 0.05)
    extra = {b: model["locus_term"][b] * np.clip(locus, -0.5, 0.5)
             + rng.normal(0, model["scatter_mag"][b], g.size) for b in "gri"}
    x = g - r
    for _ in range(6):  # the relation is written in the PS1 colour: iterate
        ps1 = {b: m - np.polyval(model["sdss_minus_ps1"][b][::-1], x) - extra[b]
               for b, m in (("g", g), ("r", r), ("i", i))}
        x = ps1["g"] - ps1["r"]
    period = model["spatial_period_arcmin"] / 60.0
    pattern = 1e-3 * model["spatial_mmag"] * np.sin(2 * np.pi * ra * np.cos(np.radians(dec))
                                                     / period) * np.cos(2 * np.pi * dec / period)
    return {b: ps1[b] + pattern for b in "gri"}


def _write_refcat2(folder: Path, stars: Table, rng: np.random.Generator, G: np.ndarray) -> None:
    """refcat2.ecsv: ATLAS-REFCAT2 columns on a Pan-STARRS1-like system, see REFCAT2_MODEL."""
    model = sky.REFCAT2_MODEL
    g, r, i = (np.asarray(stars[b], dtype=float) for b in ("g", "r", "i"))
    ra, dec = np.asarray(stars["ra"], dtype=float), np.asarray(stars["dec"], dtype=float)
    pmra, pmdec = np.asarray(stars["pmra"], dtype=float), np.asarray(stars["pmdec"], dtype=float)
    plx = np.asarray(stars["parallax"], dtype=float)
    ps1 = _ps1_from_sdss(g, r, i, rng, ra, dec)
    fields = np.asarray(stars["field"]).astype(str)
    parts = [_refcat2_field(np.flatnonzero(fields == name), ra, dec, pmra, pmdec, plx, G, ps1,
                            np.asarray(stars["variable"], bool), rng, model)
             for name in np.unique(fields)]
    cols = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    ref = Table()
    for name in ("RA_ICRS", "DE_ICRS", "Plx", "pmRA", "pmDE", "Gmag", "gmag", "e_gmag",
                 "rmag", "e_rmag", "imag", "e_imag", "rp1", "r1", "dupvar"):
        digits = {"RA_ICRS": 8, "DE_ICRS": 8, "rp1": 1, "r1": 1}.get(name, 3)
        ref[name] = cols[name] if name == "dupvar" else np.round(cols[name], digits)
    for name in ref.colnames:
        ref[name].unit = {"RA_ICRS": "deg", "DE_ICRS": "deg", "Plx": "mas", "pmRA": "mas / yr",
                          "pmDE": "mas / yr", "rp1": "arcsec", "r1": "arcsec",
                          "dupvar": None}.get(name, "mag")
    ref.sort("rmag")
    ref.meta = {"description": "Simulated ATLAS-REFCAT2 (J/ApJ/867/105) subset (sample night), "
                               "on a Pan-STARRS1-like system; see truth/params.json refcat2"}
    ref.write(folder / "refcat2.ecsv", format="ascii.ecsv", overwrite=True)


def _refcat2_field(rows: np.ndarray, ra, dec, pmra, pmdec, plx, G, ps1, variable,
                   rng: np.random.Generator, model: dict) -> dict[str, np.ndarray]:
    """REFCAT2 columns of the stars ``rows`` of one field (blends, neighbours, spurious)."""
    from scipy.spatial import cKDTree

    ra, dec, pmra, pmdec, plx, G, variable = (np.asarray(v)[rows] for v in (
        ra, dec, pmra, pmdec, plx, G, variable))
    ps1 = {b: np.asarray(v)[rows] for b, v in ps1.items()}
    ra0, dec0 = float(np.median(ra)), float(np.median(dec))
    xi, eta = sky.radec_to_tangent(ra0, dec0, ra, dec)
    xy = np.column_stack([xi, eta]) * 3600.0  # arcsec
    tree = cKDTree(xy)
    # Blends: stars closer than blend_arcsec become one entry (summed flux, flux-weighted
    # position) carried by the brighter star.
    flux = {b: 10 ** (-0.4 * ps1[b]) for b in "gri"}
    keep = np.ones(ra.size, bool)
    pos = xy.copy()
    for a, b in sorted(tree.query_pairs(model["blend_arcsec"])):
        first, second = (a, b) if flux["r"][a] >= flux["r"][b] else (b, a)
        if not (keep[first] and keep[second]):
            continue
        w1, w2 = flux["r"][first], flux["r"][second]
        pos[first] = (w1 * pos[first] + w2 * pos[second]) / (w1 + w2)
        for band in "gri":
            flux[band][first] += flux[band][second]
        keep[second] = False
    mags = {b: -2.5 * np.log10(flux[b]) for b in "gri"}
    sel = keep & (mags["r"] < model["r_limit"]) & (mags["g"] < 20.5)
    # missing entries: faint stars only (the bright ones are in several of REFCAT2's surveys)
    sel &= (rng.random(ra.size) >= model["missing_fraction"]) | (mags["r"] < 16.0)
    # Neighbour radii: where the G flux of the other stars exceeds 0.1x and 1x the star's.
    g_flux = 10 ** (-0.4 * G)
    rp1 = np.full(ra.size, 36.0)
    r1 = np.full(ra.size, 36.0)
    for k in np.flatnonzero(sel):
        near = [j for j in tree.query_ball_point(xy[k], 36.0) if j != k]
        if not near:
            continue
        dist = np.hypot(*(xy[near] - xy[k]).T)
        order = np.argsort(dist)
        total = np.cumsum(g_flux[near][order])
        for out, level in ((rp1, 0.1), (r1, 1.0)):
            above = np.flatnonzero(total > level * g_flux[k])
            if above.size:
                out[k] = dist[order][above[0]]
    ra_b, dec_b = sky.tangent_to_radec(ra0, dec0, pos[:, 0] / 3600.0, pos[:, 1] / 3600.0)
    cosd = np.cos(np.radians(dec_b))
    dt = 2015.5 - 2024.12
    rra = ra_b + (pmra * dt + rng.normal(0, 2.0, ra.size)) / 3.6e6 / cosd
    rdec = dec_b + (pmdec * dt + rng.normal(0, 2.0, ra.size)) / 3.6e6
    dupvar = np.where(variable, 1, np.where(G > 19.0, 2, 0))
    n = int(sel.sum())
    cols = {
        "RA_ICRS": rra[sel], "DE_ICRS": rdec[sel],
        "Plx": plx[sel] + rng.normal(0, 0.1, n), "pmRA": pmra[sel] + rng.normal(0, 0.2, n),
        "pmDE": pmdec[sel] + rng.normal(0, 0.2, n),
        "Gmag": G[sel] + rng.normal(0, 0.003, n),
    }
    for band in "gri":
        err = np.sqrt(0.008**2 + (0.03 * 10 ** (0.4 * (mags[band] - 19.0))) ** 2)
        cols[f"{band}mag"] = mags[band][sel] + rng.normal(0, 1, n) * err[sel]
        cols[f"e_{band}mag"] = err[sel]
    cols.update(rp1=rp1[sel], r1=r1[sel], dupvar=dupvar[sel])
    # Spurious entries (artefacts of the surveys), at random places in the field's circle.
    radius = float(np.max(np.hypot(xy[:, 0], xy[:, 1])))
    n_fake = rng.poisson(model["spurious_per_deg2"] * np.pi * (radius / 3600.0) ** 2)
    rad = radius * np.sqrt(rng.random(n_fake))
    phi = rng.uniform(0, 2 * np.pi, n_fake)
    fake_ra, fake_dec = sky.tangent_to_radec(ra0, dec0, rad * np.cos(phi) / 3600.0,
                                             rad * np.sin(phi) / 3600.0)
    fr = rng.uniform(16.5, 19.0, n_fake)
    nan = np.full(n_fake, np.nan)
    fake = {"RA_ICRS": fake_ra, "DE_ICRS": fake_dec, "Plx": nan, "pmRA": nan, "pmDE": nan,
            "Gmag": nan, "gmag": fr + rng.uniform(0.0, 1.5, n_fake), "rmag": fr,
            "imag": fr - rng.uniform(0.0, 0.8, n_fake), "rp1": np.full(n_fake, 36.0),
            "r1": np.full(n_fake, 36.0), "dupvar": np.full(n_fake, 2)}
    for band in "gri":
        fake[f"e_{band}mag"] = np.sqrt(0.008**2 + (0.03 * 10 ** (
            0.4 * (fake[f"{band}mag"] - 19.0))) ** 2)
    return {k: np.concatenate([v, fake[k]]) for k, v in cols.items()}


# ---------------------------------------------------------------------------------------
# The night's settings file (datared.toml)
# ---------------------------------------------------------------------------------------

#: Name of the settings file every night gets: ``DATARED_CONFIG=<night>/datared.toml``.
SETTINGS_FILE = "datared.toml"
#: The FITS keywords ``_nina_header`` writes, under the names of config.py's settings.
HEADER_KEYS = {"imagetyp_key": "IMAGETYP", "filter_key": "FILTER", "exptime_key": "EXPTIME",
               "date_key": "DATE-OBS", "object_key": "OBJECT", "xbinning_key": "XBINNING",
               "ybinning_key": "YBINNING", "airmass_key": "AIRMASS", "ra_key": "RA",
               "dec_key": "DEC", "pierside_key": "PIERSIDE"}
#: The book's analysis choices for the transit of this night (chapter 06): the same values as
#: config.py's WASP-104 entry, which tests/test_settings_file.py compares with this file.
TRANSIT_ANALYSIS = {
    "ephemeris_t0_err_d": 0.0,
    "ephemeris_source": "the sample night's own (fictional) mid-transit time, datared.sim",
    "rp_rs_guess": 0.12,
    "a_rs_prior_sigma": 0.25,
    "b_prior_sigma": 0.04,
    "priors_source": "a/R* = 6.90 and i = 83.6 deg (b = a/R* cos i) as adopted by "
                     "datared.sim from Smith et al. 2014 and Chen et al. 2021; the widths "
                     "are ours",
    "teff_k": 5450.0,
    "logg_cgs": 4.5,
    "limb_darkening_sigma": 0.10,
    "limb_darkening_source": "approximate quadratic coefficients for SDSS r', Teff 5450 K, "
                             "log g 4.5, after the tables of Claret (2004, A&A 428, 1001)",
}

#: The literature values of the cluster that chapter 05 compares with and starts from: the
#: same as config.py's M37 entry (compared by tests/test_settings_file.py).
CLUSTER_ANALYSIS = {
    "literature": {"log_age": 8.74, "mh": 0.045, "ebv": 0.227, "distance_modulus": 10.81},
    "literature_source": "age 550 Myr, [M/H] and E(B-V): Hartman et al. 2008, ApJ 675, "
                         "1233; distance 1450 pc from the Gaia DR2 parallax of Cantat-"
                         "Gaudin et al. 2018, A&A 618, A93",
}


def night_settings(preset: str, seed: int, t0_bjd_tdb: float | None) -> dict:
    """The settings (config.py's names) that reduce a night of this simulator.

    Parameters
    ----------
    preset, seed : the night's preset name and random seed.
    t0_bjd_tdb : the night's mid-transit time (BJD_TDB, days), or None without a transit.
    """
    cam = Camera()
    planet = sky.PLANET
    transit = {"kind": "transit", "ra_deg": sky.TRANSIT_HOST["ra_deg"],
               "dec_deg": sky.TRANSIT_HOST["dec_deg"], "filters": ["r"],
               "planet": planet["name"], "period_d": planet["period_d"]}
    if t0_bjd_tdb is not None:
        a = TRANSIT_ANALYSIS
        impact = planet["a_rs"] * math.cos(math.radians(planet["inc_deg"]))
        transit.update({
            "ephemeris_t0_bjd_tdb": round(float(t0_bjd_tdb), 5),
            "ephemeris_t0_err_d": a["ephemeris_t0_err_d"],
            "ephemeris_source": a["ephemeris_source"],
            "rp_rs_guess": a["rp_rs_guess"],
            "a_rs_prior": [planet["a_rs"], a["a_rs_prior_sigma"]],
            "b_prior": [round(impact, 2), a["b_prior_sigma"]],
            "priors_source": a["priors_source"],
            "teff_k": a["teff_k"], "logg_cgs": a["logg_cgs"],
            "limb_darkening": {"r": list(planet["u_r"])},
            "limb_darkening_sigma": a["limb_darkening_sigma"],
            "limb_darkening_source": a["limb_darkening_source"],
        })
    return {
        "data_dir": ".",
        "sample_preset": preset,
        "sample_seed": int(seed),
        "ignored_data_subdirs": ["truth", "catalogs"],
        **HEADER_KEYS,
        "imagetyp": {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "light": "LIGHT"},
        "telescope": TELESCOPE["name"],
        "focal_length_mm": TELESCOPE["focal_length_mm"],
        "aperture_mm": TELESCOPE["aperture_mm"],
        "camera": TELESCOPE["camera"],
        "unbinned_pixel_um": instrument.PIXEL_UM / TELESCOPE["binning"],
        "binning": TELESCOPE["binning"],
        "pixel_scale_arcsec": TELESCOPE["pixel_scale_arcsec"],
        "gain_e_per_adu": cam.gain_e_per_adu,
        "read_noise_e": cam.read_noise_e,
        "saturation_adu": cam.nonlinearity_start_adu,
        "overscan_section": "",
        "trim_section": "",
        "filters": list(FILTERS),
        "site": dict(SITE),
        "targets": {"M37": {"kind": "cluster", "ra_deg": sky.CLUSTER["ra_deg"],
                            "dec_deg": sky.CLUSTER["dec_deg"], "filters": list(FILTERS),
                            **CLUSTER_ANALYSIS},
                    "WASP-104": transit},
        "reference_catalog": "sample",
    }


#: Comment above each group of settings in datared.toml (the tables come last, as TOML wants).
_SETTINGS_GROUPS = (
    ("Where the frames are (a relative path starts at this file's folder) and which simulated "
     "night this is", ("data_dir", "sample_preset", "sample_seed", "ignored_data_subdirs")),
    ("FITS header keywords (NINA's names)", tuple(HEADER_KEYS)),
    ('The instrument. "" means None: the camera has no overscan and no trim section',
     ("telescope", "focal_length_mm", "aperture_mm", "camera", "unbinned_pixel_um", "binning",
      "pixel_scale_arcsec", "gain_e_per_adu", "read_noise_e", "saturation_adu",
      "overscan_section", "trim_section")),
    ('Filters of the night; "sample": the reference catalogues are in catalogs/',
     ("filters", "reference_catalog")),
    ("Values of IMAGETYP for each kind of frame", ("imagetyp",)),
    ("The observatory: degrees (east positive) and metres", ("site",)),
    ("Targets, keyed by OBJECT (ICRS degrees): they replace config.py's targets whole",
     ("targets",)),
)


def _toml_key(key: str) -> str:
    """A TOML key: bare when it may be, else quoted."""
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else json.dumps(key)


def _toml_value(value) -> str:
    """A TOML value (inline) for a bool, number, text, list or table of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's shortest float repr is a TOML float (0.605, 1e-05)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def settings_toml(settings: dict, preset: str, seed: int, max_per_group: int | None) -> str:
    """Text of datared.toml for ``settings`` (from :func:`night_settings`), with comments."""
    extent = "" if max_per_group is None else f", max_per_group {max_per_group}"
    lines = [f"# Settings of the simulated night written by {GENERATOR}",
             f"# (preset {preset}, seed {seed}{extent}).",
             "# They override config.py's when DATARED_CONFIG names this file, e.g.",
             f"#     DATARED_CONFIG=/path/to/this/night/{SETTINGS_FILE} .venv/bin/jupyter lab",
             "# (book/adapting.md, section 2.2). The DATARED_* path variables win over them."]
    written = set()
    for comment, names in _SETTINGS_GROUPS:
        lines += ["", f"# {comment}"]
        for name in names:
            value = settings[name]
            written.add(name)
            if not isinstance(value, dict):
                lines.append(f"{name} = {_toml_value(value)}")
            elif all(isinstance(v, dict) for v in value.values()):  # targets: a table each
                for i, (key, entry) in enumerate(value.items()):
                    lines += ([] if i == 0 else [""]) + [f"[{name}.{_toml_key(key)}]"]
                    lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
            else:
                lines.append(f"[{name}]")
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
    missing = set(settings) - written
    if missing:
        raise ValueError(f"settings without a group in datared.toml: {sorted(missing)}")
    return "\n".join(lines) + "\n"


def _readme(preset: Preset, params: dict) -> str:
    """Text of truth/README.md."""
    return f"""# Ground truth of the simulated night

Written by `{GENERATOR}` (preset `{preset.name}`, seed {params['seed']}). Used by tests and by
clearly marked "check against the truth" cells only; the reduction itself never reads it.

| file | content |
|---|---|
| `params.json` | every parameter of the simulation: detector (gain_e_per_adu, read_noise_e, saturation_adu = 16-bit clip level), pixel scale, site, atmosphere (zero points, extinction, colour terms, sky, seeing), clouds, pointing and meridian flip, cluster, transit and variable star, catalogues |
| `stars.ecsv` | every simulated star: `id`, `name` (WASP-104, V1, C1.. comparison stars), `field`, `ra`, `dec` (ICRS deg, epoch 2024.12), true `g`, `r`, `i` above the atmosphere (AB mag), `member` (M37), `variable`, `binary`, `mass_msun`, `parallax`, `pmra`, `pmdec` |
| `frames.ecsv` | one row per raw frame: `file` (name), `path` (relative to the night), `imagetyp`, `filter`, `object`, `date_obs` (UTC start), `exptime` (s), `airmass` (mid-exposure), `fwhm_arcsec`, `sky_adu` (per pixel over the exposure at the frame centre; flats: illumination level), `transparency`, `zeropoint` (mag), `pierside`, `jd_mid_utc`, `bjd_tdb_mid`, `ra_center`/`dec_center` (true CRVAL), `rotation_deg`, `header_ra`/`header_dec` (the mount's reported pointing), `n_cosmic`, `scintillation` (relative rms per star) |
| `lightcurves.ecsv` | per WASP-104 frame: `file`, `bjd_tdb` (BJD_TDB at mid-exposure), `jd_utc` (JD UTC at mid-exposure), `host_flux` (transit model, relative), `variable_flux` (V1, relative), `pierside` |
| `wcs/<light file name>` | header-only FITS with the frame's true TAN-SIP WCS (stars were rendered at `all_world2pix` of this WCS, 0-based pixels) |
| `bias.fits` | noise-free bias, ADU |
| `dark_current.fits` | dark current, ADU/s, hot and warm pixels included |
| `flat_<filter>.fits` | relative response (PRNU x vignetting x dust), median 1 |

## Zero-point convention
In a frame calibrated as `(raw - bias - dark_current * exptime) / flat_<filter>`, a star of
true magnitude `m` in that filter has expected total flux
`exptime * 10**(-0.4 * (m - zeropoint))` ADU **for the reference colour**. The colour term
enters as `m -> m + (c_f + k2_f * X) * (C - C_ref)` with `c_f` = `atmosphere.colour_term`,
`k2_f` = `atmosphere.second_order_extinction`, `X` the airmass, `C` the colour in
`atmosphere.colour_index` (g-r for g and r, r-i for i) and `C_ref` in `atmosphere.colour_ref`.
`datared.sim.star_flux_adu` evaluates it. `zeropoint = zp_above_atmosphere - k_f * X +
2.5 log10(transparency)`. The transit host and V1 are additionally multiplied by their light
curves; every star's flux in every frame scatters by scintillation (Young's formula). Stars
are rendered with a Moffat PSF truncated and renormalised so each stamp sums to the flux.

## Raw values
`raw = round(clip(nonlin(electrons / gain + bias + read noise), 0, 65535))`, where
`electrons ~ Poisson((sky + stars) * flat * gain + dark_current * exptime * gain)` plus
cosmic rays; `nonlin` compresses values above `camera.nonlinearity_start_adu` by
`camera.nonlinearity_slope`. The header `GAIN` is NINA's camera gain setting; `EGAIN` is
electrons per ADU.

## Transit
The mid-transit time `planet.t0_bjd_tdb` is {params['planet']['mid_transit_source']}.
The meridian flip (`timing.meridian_flip_utc`) happens after egress: `PIERSIDE` changes from
West to East and the field is rotated by 180 degrees.
"""
