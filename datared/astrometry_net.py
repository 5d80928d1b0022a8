"""The astrometry.net backend: ``solve-field`` in two passes, with an index built from the
reference catalogue (:func:`build_index`) so that it runs offline.

It returns the same :class:`~datared.solve.Solution` as the pure-Python backend, so chapter
03 treats both alike.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from datared.errors import AstrometryError, FrameError
from datared.frame import NINA_KEYS, HeaderKeys, header_pointing, pixel_scale_of
from datared.solve import Solution
from datared.wcsfit import catalog_at_epoch, sip_degree_for


def solve_field_available() -> bool:
    """True if astrometry.net's ``solve-field`` and ``build-astrometry-index`` are installed."""
    return shutil.which("solve-field") is not None and \
        shutil.which("build-astrometry-index") is not None


def build_index(catalog: Table, out_dir: str | Path, field_arcmin: float, *,
                mag_column: str = "phot_g_mean_mag", epoch_jyear: float | None = None,
                name: str = "sample") -> Path:
    """Build astrometry.net index files from a reference catalogue and a config for them.

    Parameters
    ----------
    catalog : reference stars (``ra``, ``dec`` in degrees, ``mag_column``).
    out_dir : folder for the index files and ``backend.cfg`` (created).
    field_arcmin : the field's width, arcmin (sets the quad sizes of the index scales).
    mag_column : brightness column (brightest stars are used first).
    epoch_jyear : move stars by their proper motions to this epoch first (Julian year).
    name : prefix of the file names.

    Returns the path of ``backend.cfg`` for ``solve-field --backend-config``. Existing files
    are rebuilt (safe to rerun).
    """
    if not solve_field_available():
        raise AstrometryError("build-astrometry-index is not installed: on Debian/Ubuntu "
                              "`sudo apt-get install astrometry.net`, or use the 'python' backend")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sky = catalog_at_epoch(catalog, epoch_jyear)
    mag = np.asarray(catalog[mag_column], float)
    good = np.isfinite(mag)
    table = Table({"RA": sky.ra.deg[good], "DEC": sky.dec.deg[good], "MAG": mag[good]})
    cat_path = out_dir / f"{name}-catalog.fits"
    table.write(cat_path, overwrite=True)
    # Index scales: preset P covers quads of about 2 * sqrt(2)**P arcmin; use the scales
    # whose quads fit in the field (from a fifth of it to the whole field).
    presets = [p for p in range(0, 20) if field_arcmin / 5 <= 2.0 * math.sqrt(2) ** p <= field_arcmin]
    presets = presets or [0]
    index_files = []
    for i, preset in enumerate(presets):
        out = out_dir / f"{name}-index-{preset:02d}.fits"
        cmd = ["build-astrometry-index", "-i", str(cat_path), "-o", str(out), "-P", str(preset),
               "-S", "MAG", "-A", "RA", "-D", "DEC", "-E", "-M", "-j", "0.1",
               "-I", str(9000 + i)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AstrometryError(f"build-astrometry-index failed for {out.name}:\n"
                                  + proc.stderr[-2000:])
        index_files.append(out)
    cfg = out_dir / "backend.cfg"
    lines = ["# astrometry.net engine config written by datared.astrometry_net.build_index",
             "inparallel", "cpulimit 60"]
    lines += [f"index {p.resolve()}" for p in index_files]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def solve_field(path: str | Path, backend_config: str | Path, *, scale_arcsec: float,
                keys: HeaderKeys = NINA_KEYS, radius_deg: float = 0.5,
                sip_degree: int = 3, timeout_s: float = 120.0) -> Solution:
    """Solve one frame with astrometry.net's ``solve-field`` in two passes.

    Pass 1 solves with scale and position hints and a SIP order 2 tweak; pass 2 verifies that
    solution on all detected stars and refines it with SIP order ``sip_degree`` and the
    reference point at the image centre (the original course's recipe). The order of pass 2
    is lowered, as in the python backend, when pass 1 matched too few stars for it.

    Parameters
    ----------
    path : calibrated FITS frame.
    backend_config : ``backend.cfg`` listing the index files (see :func:`build_index`).
    scale_arcsec : nominal pixel scale, arcsec per pixel (searched within +-10 %).
    keys : the night's header keywords (the pointing is used as a hint if present).
    radius_deg : search radius around the pointing, degrees.
    sip_degree : SIP order of the refinement pass.
    timeout_s : give up on a pass after this many seconds.
    """
    path = Path(path)
    start = time.perf_counter()
    result = Solution(file=path.name, backend="astrometry.net")
    if shutil.which("solve-field") is None:
        result.reason = "solve-field is not installed (apt-get install astrometry.net)"
        return result
    header = fits.getheader(path)
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    common = ["solve-field", "--no-plots", "--overwrite", "--backend-config", str(backend_config),
              "--scale-units", "arcsecperpix", "--scale-low", f"{0.9 * scale_arcsec:.4f}",
              "--scale-high", f"{1.1 * scale_arcsec:.4f}", "--crpix-center",
              "--new-fits", "none", "--index-xyls", "none",
              "--match", "none", "--solved", "none", "--cpulimit", str(int(timeout_s))]
    try:
        ra0, dec0 = header_pointing(header, keys, file=path)
        common += ["--ra", str(ra0), "--dec", str(dec0), "--radius", str(radius_deg)]
    except FrameError:
        pass  # no usable pointing: solve-field searches the whole index (blind)
    with tempfile.TemporaryDirectory(prefix="datared-solve-") as tmp:
        tmp = Path(tmp)
        first = tmp / "pass1"
        cmd1 = common + ["--dir", str(tmp), "--out", first.name, "--tweak-order", "2",
                         "--objs", "100", "--corr", str(tmp / "pass1.corr"),
                         "--rdls", "none", str(path)]
        ok, message = _run_solve_field(cmd1, timeout_s)
        wcs_file = tmp / "pass1.wcs"
        if not ok or not wcs_file.exists():
            result.reason = f"solve-field found no solution (pass 1): {message}"
            result.seconds = time.perf_counter() - start
            return result
        # The refinement (pass 2, all stars) asks for SIP order `sip_degree`; if it matched
        # too few stars for that many polynomial terms (order 3 on 20 stars overfits), it is
        # run again with the order those stars support.
        degree = max(1, sip_degree)
        second = tmp / "pass2"
        while True:
            for stale in tmp.glob("pass2.*"):  # a failed rerun must not leave the last WCS
                stale.unlink()
            cmd2 = common + ["--dir", str(tmp), "--out", second.name, "--verify", str(wcs_file),
                             "--tweak-order", str(degree), "--objs", "1000",
                             "--corr", str(tmp / "pass2.corr"),
                             "--rdls", str(tmp / "pass2.rdls"), "--tag-all", str(path)]
            ok, message = _run_solve_field(cmd2, timeout_s)
            corr2 = tmp / "pass2.corr"
            n_second = len(_read_corr(corr2)) if ok and corr2.exists() else 0
            supported = max(1, sip_degree_for(n_second, degree))
            if not ok or supported >= degree:
                break
            degree = supported
        final = tmp / "pass2.wcs" if (tmp / "pass2.wcs").exists() else wcs_file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(fits.getheader(final))
        # The degree actually fitted, read from the result (order 1 is a plain TAN).
        degree = int(wcs.sip.a_order) if wcs.sip is not None else 0
        degree = degree if degree >= 2 else 0
        wcs.pixel_shape = (shape[1], shape[0])
        rdls = tmp / "pass2.rdls"
        if final.name == "pass2.wcs" and rdls.exists():
            result.reference = _reference_stars(rdls)
        corr = tmp / ("pass2.corr" if final.name == "pass2.wcs" else "pass1.corr")
        if corr.exists():
            matched = _corr_table(corr, wcs)
            result.matched = matched
            result.n_matched = len(matched)
            dr2 = np.asarray(matched["dx"]) ** 2 + np.asarray(matched["dy"]) ** 2
            result.rms_px = float(np.sqrt(np.mean(dr2))) if len(dr2) else float("nan")
            result.rms_arcsec = result.rms_px * pixel_scale_of(wcs)
    result.wcs = wcs
    result.sip_degree = degree
    result.success = True
    result.seconds = time.perf_counter() - start
    return result


def _run_solve_field(cmd: list[str], timeout_s: float) -> tuple[bool, str]:
    """Run solve-field; return (finished without error, last lines of its output)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 30)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s"
    tail = " ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode == 0, tail


def _read_corr(path: Path) -> Table:
    """A solve-field correspondence table (its unit strings are not FITS units: ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        return Table.read(path)


def _reference_stars(rdls: Path) -> Table:
    """The index stars in the field from a solve-field ``.rdls`` file, as ``ra``, ``dec``
    (degrees) and ``phot_g_mean_mag`` (the index's magnitude, NaN where it has none)."""
    data = _read_corr(rdls)
    mag = (np.asarray(data["MAG"], float) if "MAG" in data.colnames
           else np.full(len(data), np.nan))
    return Table({"ra": np.asarray(data["RA"], float), "dec": np.asarray(data["DEC"], float),
                  "phot_g_mean_mag": mag})


def _corr_table(corr: Path, wcs: WCS) -> Table:
    """Matched stars of a solve-field ``.corr`` file with residuals under ``wcs``, pixels."""
    data = _read_corr(corr)
    x = np.asarray(data["field_x"], float) - 1.0
    y = np.asarray(data["field_y"], float) - 1.0
    sky = SkyCoord(np.asarray(data["index_ra"]) * u.deg, np.asarray(data["index_dec"]) * u.deg)
    px, py = wcs.world_to_pixel(sky)
    return Table({"x": x, "y": y, "ra": sky.ra.deg, "dec": sky.dec.deg,
                  "dx": x - px, "dy": y - py})


# --- Installed index files ----------------------------------------------------------------
#
# An index file covers quads (groups of four stars) of one range of sizes. The published
# series share the scale numbers of build-astrometry-index's presets: scale P holds quads of
# about 2 * sqrt(2)**P to 2 * sqrt(2)**(P + 1) arcmin (P = 7: 22'-30', Debian's
# astrometry-data-tycho2-07). The 5200 series (Gaia-based, from data.astrometry.net) has
# scales 0-6, the 4100 series (Tycho-2, Debian's astrometry-data-tycho2-* packages) 7-19.
# astrometry.net's documentation advises index files whose quads are 10 % to 100 % of the
# field's width.

# Debian's Tycho-2 packages: astrometry-data-tycho2-07, -08 and -09 hold scales 7, 8 and 9
# (quads of 22'-30', 30'-44', 44'-60'), astrometry-data-tycho2-10-19 the scales 10-19.


def index_scales_for(field_arcmin: float) -> list[int]:
    """Scale numbers P of the index files that suit a field of this width (arcmin): those
    whose quads (2 * sqrt(2)**P to 2 * sqrt(2)**(P + 1) arcmin) overlap 10-100 % of it."""
    return [p for p in range(20)
            if 2.0 * math.sqrt(2) ** (p + 1) >= 0.1 * field_arcmin
            and 2.0 * math.sqrt(2) ** p <= field_arcmin]


def index_advice(field_arcmin: float) -> str:
    """Which published index files to install for a field of this width (arcmin), as text."""
    scales = index_scales_for(field_arcmin)
    small = [f"52{p:02d}" for p in scales if p <= 6]
    large = [f"41{p:02d}" for p in scales if p >= 7]
    parts = []
    if small:
        parts.append(f"the 5200-series index files {', '.join(small)} (Gaia-based, "
                     "from data.astrometry.net)")
    if large:
        packages = sorted({f"astrometry-data-tycho2-{p:02d}" if p <= 9
                           else "astrometry-data-tycho2-10-19" for p in scales if p >= 7})
        parts.append(f"the Tycho-2 index files {', '.join(large)} (on Debian/Ubuntu: "
                     f"apt-get install {' '.join(packages)})")
    return " and ".join(parts) or "index files with quads of 10-100 % of the field's width"


def index_files(index_dir: str | Path) -> Table:
    """The astrometry.net index files in a folder, with the quad sizes each one covers.

    A FITS file is an index file when its primary header has the quad scale bounds
    ``SCALE_L`` and ``SCALE_U`` (radians) that ``build-astrometry-index`` writes. Other files
    are passed over.

    Returns a table with ``path``, ``index_id``, ``healpix`` (-1: all sky) and
    ``quad_min_arcmin``, ``quad_max_arcmin``, sorted by quad size.
    """
    index_dir = Path(index_dir)
    rows = []
    for path in sorted(index_dir.glob("*.fits")):
        try:
            header = fits.getheader(path)
        except (OSError, ValueError):
            continue  # not a readable FITS file: not an index
        if "SCALE_L" not in header or "SCALE_U" not in header:
            continue
        to_arcmin = 180.0 / math.pi * 60.0
        rows.append((str(path), int(header.get("INDEXID", -1)), int(header.get("HEALPIX", -1)),
                     float(header["SCALE_L"]) * to_arcmin, float(header["SCALE_U"]) * to_arcmin))
    table = Table(rows=rows or None, names=("path", "index_id", "healpix", "quad_min_arcmin",
                                            "quad_max_arcmin"),
                  dtype=(str, int, int, float, float))
    table.sort(["quad_min_arcmin", "path"])
    return table


def installed_index_config(index_dir: str | Path, out_dir: str | Path,
                           field_arcmin: float) -> Path:
    """A ``backend.cfg`` for ``solve-field`` listing the installed index files that suit the
    field: those whose quads are 10-100 % of its width (all healpix tiles of them; solve-field
    uses only the tiles near the pointing hint).

    Parameters
    ----------
    index_dir : folder of index files (``config.astrometry_index_dir``), e.g.
        ``/usr/share/astrometry`` for Debian's packages.
    out_dir : folder for ``backend.cfg`` (created).
    field_arcmin : the field's width (its longer side), arcmin.

    Raises :class:`AstrometryError` naming the folder and what to install when the folder is
    missing, holds no index file, or none of its files suits the field.
    """
    index_dir = Path(index_dir).expanduser()
    setting = f"config.astrometry_index_dir = {str(index_dir)!r}"
    advice = index_advice(field_arcmin)
    if not index_dir.is_dir():
        raise AstrometryError(f"{setting}: no such folder. For a field {field_arcmin:.1f}' wide "
                              f"install {advice} and set the folder that holds them, or set "
                              "astrometry_index_dir = None to build index files from the "
                              "reference catalogue.")
    files = index_files(index_dir)
    if len(files) == 0:
        raise AstrometryError(f"{setting}: the folder holds no astrometry.net index file "
                              f"(FITS with SCALE_L, SCALE_U). For a field {field_arcmin:.1f}' "
                              f"wide install {advice}.")
    suits = ((files["quad_max_arcmin"] >= 0.1 * field_arcmin)
             & (files["quad_min_arcmin"] <= field_arcmin))
    if not np.any(suits):
        raise AstrometryError(
            f"{setting}: its {len(files)} index files have quads of "
            f"{files['quad_min_arcmin'].min():.1f}'-{files['quad_max_arcmin'].max():.1f}', "
            f"and a field {field_arcmin:.1f}' wide needs quads of {0.1 * field_arcmin:.1f}'-"
            f"{field_arcmin:.1f}': install {advice}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = out_dir / "backend.cfg"
    lines = ["# astrometry.net engine config written by datared.astrometry_net."
             "installed_index_config", f"# index files of {index_dir.resolve()} with quads of "
             f"{0.1 * field_arcmin:.1f}'-{field_arcmin:.1f}'", "cpulimit 60"]
    lines += [f"index {Path(p).resolve()}" for p in files["path"][suits]]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def index_catalog(index_dir: str | Path, ra_deg: float, dec_deg: float,
                  radius_deg: float) -> Table:
    """The stars of the installed index files within a cone, as a Gaia-like table.

    Index files hold the positions (and, where they were built with it, a magnitude) of the
    catalogue they were made from, thinned to an even density per scale; ``query-starkd``
    reads them. Stars found in several files are kept once.

    Returns ``ra``, ``dec`` (degrees) and ``phot_g_mean_mag`` (the index's magnitude, NaN
    where it has none), brightest first. Positions are at the index's epoch (no proper
    motions), so they are good to the catalogue's motions since then (tens of mas for most
    stars).
    """
    if shutil.which("query-starkd") is None:
        raise AstrometryError("query-starkd is not installed: on Debian/Ubuntu `apt-get install "
                              "astrometry.net`, or set reference_catalog = \"sample\" or "
                              "\"online\" in config.py")
    files = index_files(index_dir)
    if len(files) == 0:
        raise AstrometryError(f"config.astrometry_index_dir = {str(index_dir)!r} holds no "
                              "astrometry.net index file, so reference_catalog = \"index\" has "
                              "no stars to read")
    ra, dec, mag = [], [], []
    with tempfile.TemporaryDirectory(prefix="datared-starkd-") as tmp:
        for i, path in enumerate(files["path"]):
            out = Path(tmp) / f"stars{i}.fits"
            cmd = ["query-starkd", "-r", f"{ra_deg:.7f}", "-d", f"{dec_deg:.7f}",
                   "-R", f"{radius_deg:.6f}", "-T", "-o", str(out), path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                raise AstrometryError(f"{path}: query-starkd could not read its stars: "
                                      + (proc.stdout + proc.stderr).strip()[-500:])
            stars = _read_corr(out)
            if len(stars) == 0:
                continue
            ra.append(np.asarray(stars["RA"], float))
            dec.append(np.asarray(stars["DEC"], float))
            mag.append(np.asarray(stars["MAG"], float) if "MAG" in stars.colnames
                       else np.full(len(stars), np.nan))
    table = Table({"ra": np.concatenate(ra) if ra else np.zeros(0),
                   "dec": np.concatenate(dec) if dec else np.zeros(0),
                   "phot_g_mean_mag": np.concatenate(mag) if mag else np.zeros(0)})
    if len(table) > 1:  # one row per star: the files share stars
        sky = SkyCoord(table["ra"] * u.deg, table["dec"] * u.deg)
        pairs_i, pairs_j, _, _ = sky.search_around_sky(sky, 0.1 * u.arcsec)
        duplicate = np.zeros(len(table), bool)
        duplicate[pairs_j[pairs_j > pairs_i]] = True
        table = table[~duplicate]
    table.sort("phot_g_mean_mag")
    table.meta["source"] = f"astrometry.net index files in {Path(index_dir).resolve()}"
    return table
