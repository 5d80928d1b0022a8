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
              "--new-fits", "none", "--index-xyls", "none", "--rdls", "none",
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
                         "--objs", "100", "--corr", str(tmp / "pass1.corr"), str(path)]
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
                             "--corr", str(tmp / "pass2.corr"), str(path)]
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


def _corr_table(corr: Path, wcs: WCS) -> Table:
    """Matched stars of a solve-field ``.corr`` file with residuals under ``wcs``, pixels."""
    data = _read_corr(corr)
    x = np.asarray(data["field_x"], float) - 1.0
    y = np.asarray(data["field_y"], float) - 1.0
    sky = SkyCoord(np.asarray(data["index_ra"]) * u.deg, np.asarray(data["index_dec"]) * u.deg)
    px, py = wcs.world_to_pixel(sky)
    return Table({"x": x, "y": y, "ra": sky.ra.deg, "dec": sky.dec.deg,
                  "dx": x - px, "dy": y - py})
