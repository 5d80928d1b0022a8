"""Settings for one observing night: the only file a student edits to use their own data.

Every notebook starts with ``import config``. Importing this module has no side effects:
it creates no folder and reads no file. Call :func:`make_work_dirs` to create the output
folders.

Environment variables override the paths without editing this file:

``DATARED_DATA_DIR``
    Folder with the raw frames of the night (read only: nothing is ever written there).
``DATARED_WORK_DIR``
    Folder where every chapter writes its outputs.
``DATARED_CACHE_DIR``
    Folder for downloads and the generated sample night.
``DATARED_SAMPLE_SEED``
    Seed of the simulated night (another night of the same simulator, in its own folder).
``DATARED_CONFIG``: a TOML file of settings that override this file's (section 6; read at import).

The chapter "Adapting the book to your telescope" (``book/adapting.md``) explains each
setting.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---------------------------------------------------------------------------------------
# 1. Where the data are and where the outputs go
# ---------------------------------------------------------------------------------------

#: Folder of this file (the repository root).
repo_dir = Path(__file__).resolve().parent

#: Which simulated night to use when no real night is configured: "small" (sub-frame,
#: fast, for the book and CI) or "full" (full 4788x3194 frames, for benchmarks).
sample_preset = "small"

#: Random seed of the simulated night (the same seed gives byte-identical files). The
#: environment variable DATARED_SAMPLE_SEED picks another night of the same simulator.
sample_seed = int(os.environ.get("DATARED_SAMPLE_SEED", "20240215"))


def _default_cache_dir() -> Path:
    """Per-user cache folder for the sample night (``~/.cache/datared`` on Linux)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA", str(Path.home() / "AppData" / "Local"))
    elif base is None and os.uname().sysname == "Darwin":
        base = str(Path.home() / "Library" / "Caches")
    return Path(base or Path.home() / ".cache") / "datared"


#: Cache for downloads and the generated sample night.
cache_dir = Path(os.environ.get("DATARED_CACHE_DIR", _default_cache_dir())).expanduser()


def _sample_night_name(preset: str, seed: int) -> str:
    """Folder name of a simulated night in cache_dir (a seed other than the book's: its own)."""
    return f"sample-night-{preset}" + ("" if seed == 20240215 else f"-seed{seed}")


#: Raw frames of the night. Default: the built-in simulated night in the cache (a night
#: with another seed than the book's gets its own folder).
_sample_name = _sample_night_name(sample_preset, sample_seed)
data_dir = Path(os.environ.get("DATARED_DATA_DIR", cache_dir / _sample_name)).expanduser()

#: Outputs of every chapter (master frames, calibrated frames, catalogues, figures).
work_dir = Path(os.environ.get("DATARED_WORK_DIR", repo_dir / "work")).expanduser()

#: Sub-folders of ``data_dir`` that hold no raw frames and are never scanned for them.
ignored_data_subdirs = ("truth", "catalogs")

# ---------------------------------------------------------------------------------------
# 2. FITS header keywords (NINA's names) and image-type values
# ---------------------------------------------------------------------------------------

imagetyp_key = "IMAGETYP"
filter_key = "FILTER"
exptime_key = "EXPTIME"
date_key = "DATE-OBS"
object_key = "OBJECT"
xbinning_key = "XBINNING"
ybinning_key = "YBINNING"
airmass_key = "AIRMASS"
ra_key = "RA"  # the mount's pointing: degrees, or sexagesimal hours as text
dec_key = "DEC"  # the mount's pointing: degrees (number or sexagesimal text)
pierside_key = "PIERSIDE"
#: Keyword of the time of day when date_key holds only the date (DATE-OBS = '2019-03-26',
#: TIME-OBS = '03:12:45.1'; MaxIm DL writes the time in "UT"). None: date_key holds both.
#: A date with a UTC offset at its end ('2019-03-26T21:12:45-0700') is converted to UTC.
time_key: str | None = None
#: One keyword with both binnings, e.g. CCDSUM = '3 3'; None: xbinning_key and ybinning_key.
binning_key: str | None = None
#: Keywords that differ for one frame type, e.g. {"flat": {"filter_key": "FILTNAME"}} when
#: the flats name their filter in FILTNAME and the other frames in filter_key.
header_overrides: dict = {}

#: Values of ``imagetyp_key`` for each kind of frame, matched ignoring case; an entry may
#: be a list of values, e.g. "light": ["LIGHT", "Light Frame"]. Other software writes e.g.
#: "Bias Frame", "Dark Frame", "Flat Field", "Light Frame": put those here. A night without
#: an image-type keyword may use imagetyp_key = object_key when OBJECT says 'bias', 'flat'...
imagetyp = {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "light": "LIGHT"}

# ---------------------------------------------------------------------------------------
# 3. The instrument: 35 cm corrected Dall-Kirkham, f = 2563 mm, QHY600M binned 2x2
# ---------------------------------------------------------------------------------------

telescope = "35 cm corrected Dall-Kirkham"
focal_length_mm = 2563.0
aperture_mm = 350.0
camera = "QHY600M"
unbinned_pixel_um = 3.76
binning = 2
#: Pixel scale of the binned frames, arcsec per pixel (206.265 * 7.52 um / 2563 mm).
pixel_scale_arcsec = 0.605
#: Nominal gain, electrons per ADU.
gain_e_per_adu = 0.85
#: Nominal read noise, electrons (binned pixel).
read_noise_e = 3.6
#: Level above which a pixel counts as saturated or non-linear, ADU.
saturation_adu = 60000.0
#: Overscan and trim sections in FITS notation, e.g. "[4789:4800, 1:3194]"; None if the
#: camera has none (CMOS cameras usually have none).
overscan_section: str | None = None
trim_section: str | None = None
#: Filters of the night, as written in the FILTER keyword.
filters = ["g", "r", "i"]

#: Observatory (Bonn): latitude and longitude in degrees, height in metres.
site = {"name": "Bonn", "lat_deg": 50.7275, "lon_deg": 7.0706, "height_m": 60.0}

# ---------------------------------------------------------------------------------------
# 4. Targets of the night, reference catalogues, isochrones
# ---------------------------------------------------------------------------------------

#: Targets, keyed by the OBJECT header value (other spellings of it in a list "aliases",
#: e.g. "aliases": ["M 37", "NGC2099"]; case, spaces, - and _ do not matter). ICRS, degrees.
targets = {
    "M37": {
        "kind": "cluster", "ra_deg": 88.074, "dec_deg": 32.545, "filters": ["g", "r", "i"],
        # Literature values (chapter 05 compares its fit with them and starts the fit at
        # the distance and reddening; a cluster without them starts at cmd_settings').
        "literature": {"log_age": 8.74, "mh": 0.045, "ebv": 0.227, "distance_modulus": 10.81},
        "literature_source": "age 550 Myr, [M/H] and E(B-V): Hartman et al. 2008, ApJ 675, "
                             "1233; distance 1450 pc from the Gaia DR2 parallax of Cantat-"
                             "Gaudin et al. 2018, A&A 618, A93",
    },
    "WASP-104": {
        "kind": "transit", "ra_deg": 160.6025, "dec_deg": 7.4350, "filters": ["r"],
        # Transit settings (chapter 06). The period and the shape parameters are those the
        # book's simulator takes from the literature (Smith et al. 2014, A&A 570, A64; Chen
        # et al. 2021, MNRAS 500, 5420); check them against the papers, or the NASA
        # Exoplanet Archive, before using them for a real night.
        "planet": "WASP-104 b",
        "period_d": 1.75540636,
        # Reference mid-transit time (BJD_TDB, days). The sample night's transit is
        # fictional: this is the sample night's own ephemeris (the simulator's mid-transit
        # time, the same for every seed, rounded to 1e-5 d), not a published one. For a real
        # night put the published T0 and its error here.
        "ephemeris_t0_bjd_tdb": 2460356.48846,
        "ephemeris_t0_err_d": 0.0,
        "ephemeris_source": "the sample night's own (fictional) mid-transit time, datared.sim",
        "rp_rs_guess": 0.12,  # starting value of the fit only (Rp/R* has no prior)
        "a_rs_prior": [6.90, 0.25],  # a/R*: value and 1-sigma width of a Gaussian prior
        "b_prior": [0.77, 0.04],  # impact parameter: value and 1-sigma width
        "priors_source": "a/R* = 6.90 and i = 83.6 deg (b = a/R* cos i) as adopted by "
                         "datared.sim from Smith et al. 2014 and Chen et al. 2021; the "
                         "widths are ours",
        # Host star and quadratic limb darkening (u1, u2) per filter, with a Gaussian prior
        # of width limb_darkening_sigma on each coefficient.
        "teff_k": 5450.0, "logg_cgs": 4.5,
        "limb_darkening": {"r": [0.46, 0.21]},
        "limb_darkening_sigma": 0.10,
        "limb_darkening_source": "approximate quadratic coefficients for SDSS r', Teff 5450 K, "
                                 "log g 4.5, after the tables of Claret (2004, A&A 428, 1001)",
    },
}

#: Reference catalogues: "sample" reads ``data_dir/catalogs/*.ecsv`` shipped with the
#: simulated night; "online" queries VizieR (ATLAS-REFCAT2) and Gaia DR3 and caches the
#: answers in ``cache_dir``; "index" takes the astrometry's reference stars from the
#: astrometry.net index files in ``astrometry_index_dir`` (no network, no catalogue file;
#: positions only, so chapters 05-07, which need REFCAT2 magnitudes, ask for another value).
reference_catalog = "sample"

#: Astrometry backend: "python" (pure Python, pip only) or "astrometry.net" (solve-field).
astrometry_backend = "python"

#: Folder of installed astrometry.net index files for the "astrometry.net" backend, e.g.
#: "/usr/share/astrometry" for Debian's astrometry-data-tycho2-* packages (fields wider than
#: about 25'), or a folder of 5200-series files from data.astrometry.net (smaller fields;
#: book/adapting.md lists which fit which field). Chapter 03 then solves with them and loads
#: no reference catalogue for it. None: index files are built from the reference catalogue.
astrometry_index_dir: str | None = None

#: Isochrones for the CMD chapter: "uwastro465isos" (PARSEC SDSS isochrones from PyPI).
isochrone_source = "uwastro465isos"

#: The CMD chapter (05). Radii and limits are in the units their names say; magnitudes are
#: in the first filter of the cluster's target entry.
cmd_settings = {
    # reference stars (REFCAT2, Gaia) read within this radius of the target, degrees
    "catalog_radius_deg": 0.15,
    # colour used in each filter's colour term, and the colour at which ZP is quoted
    "colour_index": {"g": "g-r", "r": "g-r", "i": "r-i"},
    "colour_ref": {"g-r": 0.6, "r-i": 0.2},
    # calibration stars: magnitude range, isolation (REFCAT2 rp1), clipping, fewest stars
    "calibration_mag_range": [12.5, 18.0],
    "min_isolation_arcsec": 4.0,
    "clip_sigma": 3.0,
    "min_calibration_stars": 8,
    # chapter 04 flag bits that make a measurement unusable (1 saturated, 2 edge,
    # 4 off the frame, 8 bad pixels; 16 = crowded is allowed)
    "bad_flag_bits": 15,
    # the aperture is chosen by the frame-to-frame scatter of stars in this range
    "aperture_test_mag_range": [15.0, 18.0],
    # an extinction coefficient is fitted only over at least this range of airmass
    "min_airmass_range": 0.1,
    # membership: smallest probability of the cluster component of the proper motions
    "member_probability": 0.5,
    # isochrone fit: members brighter than fit_faint_limit; grid ranges; model choices
    "fit_faint_limit": 18.5,
    "log_age_range": [8.0, 9.4],
    "mh_range": [-1.0, 0.0],
    "binary_fraction": 0.3,
    "sigma_int": 0.02,
    "field_fraction_start": 0.05,
    "start_distance_modulus": 10.0,
    "start_ebv": 0.2,
    "mcmc_steps": 300,
    # model choices changed one at a time for the systematic errors of the fit
    "systematic_variants": [{"binary_fraction": 0.15}, {"binary_fraction": 0.45},
                            {"sigma_int": 0.01}, {"sigma_int": 0.04}],
    # ages of the isochrones drawn for the by-eye exercise
    "eye_ages": [8.4, 8.65, 8.9],
}

# ---------------------------------------------------------------------------------------
# 5. Resources
# ---------------------------------------------------------------------------------------

#: Memory budget for combining frames (bytes).
combine_memory_budget = 2_000_000_000
#: Worker processes for the per-frame loops of chapters 02-04 (datared.parallel): 0 uses
#: every core, a negative number leaves that many cores free, 1 runs one loop in the
#: notebook's own process. Each worker holds one frame: memory grows with the number.
workers = 0
#: Per-frame figures written to work_dir/figures (chapter 03's residual plots): "all"
#: frames, "some" (the first frame of each target, filter and pier side, and the worst) or
#: "none". A figure costs more than the frame's astrometry on a full-size frame.
per_frame_figures = "some"

#: Pre-reduction options (chapter 02). Clean cosmic rays from every calibrated science
#: frame with L.A.Cosmic (slow on full frames; the chapter always shows it on a cut-out).
clean_cosmic_rays = False
#: Write a per-pixel uncertainty extension (CCD noise equation) with each calibrated frame
#: (doubles the size of every calibrated frame on disk and in memory).
write_uncertainty = False
#: Science frames of a filter without flats: "unflattened" calibrates them with bias and
#: dark only and flags them (FLATFLD = F in the header, listed by chapter 02): their
#: photometry keeps the vignetting and dust of the optics, a few percent across the field.
#: "skip" leaves them out.
missing_flat = "unflattened"
#: Photometry (chapter 04): aperture radii in arcsec. Catalogue columns name each radius
#: with a "p" for the decimal point: 3.0 arcsec -> sum_3p0, sum_err_3p0, max_3p0, back_sum_3p0.
aperture_radii_arcsec = [2.0, 3.0, 4.0, 6.0]
#: Frame quality (chapter 04): a frame beyond any of these limits is flagged in
#: PHOTOMETRY/frame_quality.ecsv and in its catalogue's metadata (QUALITY), never chosen as
#: a reference frame, and left out by the later chapters. The ratios compare a frame with the
#: median of the frames of the same target and filter; the transparency is the flux of the
#: bright stars relative to the clearest frames (1 = clear).
frame_quality_limits = {"max_fwhm_ratio": 1.8, "max_ellipticity": 0.3,
                        "min_transparency": 0.3, "max_sky_ratio": 5.0, "min_clean_stars": 3}


def make_work_dirs() -> Path:
    """Create ``work_dir`` and its sub-folders if missing; return ``work_dir``.

    Raises PermissionError, naming the folder and the setting to change, if the work folder
    cannot be written (a read-only disk, another user's folder).
    """
    try:
        for sub in ("", "LIGHT_PRERED", "ASTROMETRY", "PHOTOMETRY", "CMD", "LIGHTCURVE", "STACK",
                    "figures"):
            (work_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = work_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"the work folder {work_dir} cannot be written ({err.strerror or err}): set "
            "work_dir in config.py, or the environment variable DATARED_WORK_DIR, to a folder "
            "you can write to") from None
    return work_dir


# ---------------------------------------------------------------------------------------
# 6. A settings file: DATARED_CONFIG names a TOML file whose values replace those above
# ---------------------------------------------------------------------------------------
# Read once, at import, when the variable is set (book/adapting.md, section 2.2). Precedence:
# the values above < the settings file < the DATARED_* variables (DATARED_DATA_DIR,
# DATARED_WORK_DIR, DATARED_CACHE_DIR, DATARED_SAMPLE_SEED): a variable that is set wins
# over the file. A table in the file (imagetyp, site, frame_quality_limits) changes only the
# keys it names; ``targets`` in the file replaces config.py's targets whole. TOML has no
# None: ``overscan_section = ""`` (empty text) means None for the settings that allow None.

#: The settings file in use (absolute path), or None when the settings are config.py's only.
settings_file: Path | None = None
#: Settings the file gives, in config.py's order, and those of them (with data_dir when it
#: follows a new cache_dir, sample_preset or sample_seed) whose value differs from config.py.
settings_in_file: tuple[str, ...] = ()
settings_changed_by_file: tuple[str, ...] = ()
#: Settings of the file that a DATARED_* variable overrides: {setting: variable}.
settings_overridden_by_environment: dict[str, str] = {}



if os.environ.get("DATARED_CONFIG", "").strip():
    from datared.settings import apply_settings_file

    apply_settings_file(globals(), os.environ["DATARED_CONFIG"].strip(),
                        sample_night_name=_sample_night_name)
