"""A full-size night through the per-frame work of chapters 02-04, against the original course.

On a night simulated with the ``full`` preset (4788x3194 frames, a few per group; generated
once into ``/tmp/datared-bench-night`` by default), each step runs in a fresh process (its
peak resident memory is reported) with the calls of the notebooks:

- 02: the master bias, darks and flats (``build_master_bias``, ``build_master_darks``,
  ``build_master_flat``), then ``calibrate_lights`` on the science frames with the
  notebook's arguments; the original course: a plain ccdproc loop (``CCDData.read``,
  ``subtract_bias``, ``subtract_dark``, ``flat_correct``, ``write``) with the same masters.
- 03: ``solve.solve_file`` with the pure-Python backend in ``config.workers`` processes
  (pattern match and TAN-SIP fit of degree 3), ``write_solved`` and the residual figures of
  chapter 03's default (a few frames); the original course: two-pass
  ``solve-field`` (``astrometry_net.solve_field``), only where ``solve-field`` is installed.
- 04: ``photometry.frame_quality`` and ``photometry.measure_frame`` (two-pass background,
  forced photometry, FWHM) on every solved frame, with one ``reference_catalog`` per
  target; the original course: a one-pass ``Background2D`` with 300 px boxes, then one
  ``ApertureStats`` per radius on the image and on the background map.

Prints seconds per frame per chapter, the ratios, the extrapolation to a night of 200
science frames plus 45 calibration frames, and writes ``benchmarks/results/night.json``.
Usage: ``python -m benchmarks.bench_night [--night DIR] [--frames N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import in_fresh_process, night_frames, peak_rss_bytes

HERE = Path(__file__).resolve().parent
DEFAULT_NIGHT = Path(tempfile.gettempdir()) / "datared-bench-night"
#: The night extrapolated to: science frames and calibration frames.
NIGHT_SCIENCE, NIGHT_CALIBRATION = 200, 45
BOX_SIZE, FILTER_SIZE = 64, 3  # chapter 04's background boxes
ORIGINAL_BOX = 300  # the original course's one-pass background boxes


def ensure_night(night: Path, per_group: int) -> Path:
    """Generate the full-preset night into ``night`` unless it is already there."""
    if not (night / "truth" / "params.json").exists():
        from datared.sim import simulate_night

        print(f"generating a full-size night with at most {per_group} frames per group in "
              f"{night} ...", flush=True)
        simulate_night(night, preset="full", max_per_group=per_group, progress=False)
    return night


def _quiet() -> None:
    """Raw frames warn that MJD-OBS was derived from DATE-OBS (harmless); figures off-screen."""
    import warnings

    import matplotlib
    from astropy.wcs import FITSFixedWarning

    matplotlib.use("Agg")
    warnings.simplefilter("ignore", FITSFixedWarning)


def _chosen_lights(night: Path, n_frames: int) -> list[Path]:
    """``n_frames`` science frames taken in turn from each (object, filter) group."""
    from astropy.io import fits

    import config

    groups: dict[tuple[str, str], list[Path]] = {}
    for path in night_frames(night, "light"):
        header = fits.getheader(path)
        key = (str(header[config.object_key]), str(header[config.filter_key]).strip())
        groups.setdefault(key, []).append(path)
    chosen: list[Path] = []
    while len(chosen) < n_frames and any(groups.values()):
        for paths in groups.values():
            if paths and len(chosen) < n_frames:
                chosen.append(paths.pop(0))
    return sorted(chosen)


def ch02_ours(night: str, work: str, lights: list[str]) -> dict:
    """Chapter 02 as the notebook: masters from every calibration frame, then the lights."""
    import config
    from datared import reduction as red
    from datared.frame import HeaderKeys

    _quiet()
    night_path, work_path = Path(night), Path(work)
    keys = HeaderKeys.from_settings(config)
    budget, scratch = config.combine_memory_budget, work_path / "scratch"
    start = time.perf_counter()
    bias_files, dark_files = night_frames(night_path, "bias"), night_frames(night_path, "dark")
    master_bias, _ = red.build_master_bias(bias_files, scratch_dir=scratch, memory_budget=budget)
    red.write_master(master_bias, work_path / "masterbias.fits")
    master_darks, _ = red.build_master_darks(dark_files, master_bias.data, scratch_dir=scratch,
                                             memory_budget=budget, keys=keys)
    red.write_master_darks(master_darks, work_path, keys=keys)
    calibration = red.Calibration(bias=master_bias.data,
                                  darks={t: d.data for t, d in master_darks.items()})
    n_flats = 0
    for band in config.filters:
        flat_files = night_frames(night_path, "flat", band)
        if not flat_files:
            continue
        n_flats += len(flat_files)
        master_flat, _ = red.build_master_flat(flat_files, calibration, scratch_dir=scratch,
                                               memory_budget=budget,
                                               saturation_adu=config.saturation_adu, keys=keys)
        red.write_master(master_flat, work_path / f"masterflat_{band}.fits")
        calibration.flats[band] = master_flat.data
    masters_s = time.perf_counter() - start
    start = time.perf_counter()
    table, log = red.calibrate_lights(
        [Path(p) for p in lights], calibration, work_path / "LIGHT_PRERED", keys=keys,
        saturation_adu=config.saturation_adu, overscan_section=config.overscan_section,
        trim_section=config.trim_section, gain_e_per_adu=config.gain_e_per_adu,
        read_noise_e=config.read_noise_e, with_uncertainty=config.write_uncertainty,
        cosmic_rays=config.clean_cosmic_rays, workers=config.workers)
    lights_s = time.perf_counter() - start
    return {"calibration_frames": len(bias_files) + len(dark_files) + n_flats,
            "masters_s": masters_s, "frames": len(table), "skipped": len(log),
            "seconds": lights_s, "peak_rss": peak_rss_bytes(),
            "files": [str(f) for f in table["file"]]}


def ch02_original(night: str, work: str, lights: list[str]) -> dict:
    """The original course's calibration: a plain ccdproc loop with the same masters."""
    import ccdproc
    from astropy import units as u
    from astropy.nddata import CCDData

    import config
    from datared import reduction as red

    _quiet()
    work_path = Path(work)
    bias = CCDData.read(work_path / "masterbias.fits", unit="adu")
    darks = {}
    for path in sorted(work_path.glob("masterdark*.fits")):
        dark = CCDData.read(path, unit="adu")
        darks[float(dark.header[config.exptime_key])] = dark
    flats = {band: CCDData.read(work_path / f"masterflat_{band}.fits", unit="adu")
             for band in config.filters if (work_path / f"masterflat_{band}.fits").exists()}
    # The masters' combine: ccdproc.combine against the book's clipped_combine, on the raw
    # bias and dark frames (the same rejection and average; the book's engine is the default).
    combine_s = {}
    frames = night_frames(Path(night), "bias") + night_frames(Path(night), "dark")
    for engine in ("ccdproc", "datared"):
        begin = time.perf_counter()
        red.combine_files(frames, memory_budget=config.combine_memory_budget, engine=engine)
        combine_s[engine] = (time.perf_counter() - begin) / len(frames)
    out = work_path / "plain"
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    for name in lights:
        ccd = CCDData.read(name, unit="adu")
        ccd = ccdproc.subtract_bias(ccd, bias)
        dark_exptime, _ = red.choose_dark(darks, float(ccd.header[config.exptime_key]))
        if dark_exptime is not None:
            ccd = ccdproc.subtract_dark(ccd, darks[dark_exptime], exposure_time=config.exptime_key,
                                        exposure_unit=u.s, scale=True)
        ccd = ccdproc.flat_correct(ccd, flats[str(ccd.header[config.filter_key]).strip()],
                                   norm_value=1.0)
        ccd.write(out / Path(name).name, overwrite=True)
    seconds = time.perf_counter() - start
    return {"frames": len(lights), "seconds": seconds, "peak_rss": peak_rss_bytes(),
            "combine_s_per_frame": combine_s, "combined_frames": len(frames)}


def _compare_calibrations(work: Path, names: list[str]) -> float:
    """Largest relative difference of the two calibrations on pixels above 1000 ADU."""
    import numpy as np
    from astropy.io import fits

    worst = 0.0
    for name in names:
        ours = fits.getdata(work / "LIGHT_PRERED" / name).astype(np.float64)
        plain = fits.getdata(work / "plain" / name).astype(np.float64)
        bright = plain > 1000
        if bright.any():
            worst = max(worst, float(np.max(np.abs(ours[bright] - plain[bright]) / plain[bright])))
    return worst


def _solver_settings():
    import config
    from datared import solve as slv
    from datared.frame import HeaderKeys

    return slv.SolverSettings(scale_arcsec=config.pixel_scale_arcsec,
                              keys=HeaderKeys.from_settings(config),
                              gain_e_per_adu=config.gain_e_per_adu, sip_degree=3,
                              search_radius_arcmin=12.0)


def _catalogs(names: list[str], prered: Path) -> tuple[dict, dict]:
    """Chapter 03's Gaia catalogue of each frame's target, and each frame's target."""
    import numpy as np
    from astropy.io import fits

    import config
    from datared import catalogs
    from datared.frame import HeaderKeys, header_pointing, target_of

    keys = HeaderKeys.from_settings(config)
    header = fits.getheader(prered / names[0])
    ny, nx = header["NAXIS2"], header["NAXIS1"]
    radius = 0.5 * np.hypot(nx, ny) * config.pixel_scale_arcsec / 3600 + 12.0 / 60
    source = {"source": config.reference_catalog, "data_dir": config.data_dir,
              "cache_dir": config.cache_dir}
    reference, target_of_frame = {}, {}
    for name in names:
        header = fits.getheader(prered / name)
        target = target_of(header, keys, config.targets, file=name)
        target_of_frame[name] = target
        if target not in reference:
            reference[target] = catalogs.load_gaia(*header_pointing(header, keys, file=name),
                                                   radius, **source)
    return reference, target_of_frame


def ch03_ours(work: str, names: list[str]) -> dict:
    """Chapter 03 as the notebook: every frame solved in parallel (pure Python, TAN-SIP) and
    written; residual figures of the first frame of each target and of the worst frame."""
    import numpy as np
    from astropy.io import fits
    from matplotlib.figure import Figure

    import config
    from datared import solve as slv
    from datared import wcsfit
    from datared.parallel import map_frames

    _quiet()
    work_path = Path(work)
    prered, out_dir = work_path / "LIGHT_PRERED", work_path / "ASTROMETRY"
    fig_dir = work_path / "figures"
    out_dir.mkdir(exist_ok=True)
    fig_dir.mkdir(exist_ok=True)
    settings = _solver_settings()
    setup = time.perf_counter()
    reference, target_of_frame = _catalogs(names, prered)
    setup_s = time.perf_counter() - setup
    start = time.perf_counter()
    shared = {"catalogs": reference, "index_configs": {}, "settings": settings,
              "backend": "python", "saturation_adu": 0.9 * config.saturation_adu}
    tasks = [(prered / name, target_of_frame[name]) for name in names]
    solutions = [o.value for o in map_frames(slv.solve_file, tasks, shared=shared,
                                             workers=config.workers, desc="astrometry")
                 if o.error is None and o.value.success]
    solve_s = time.perf_counter() - start
    drawn = {next(s.file for s in solutions if target_of_frame[s.file] == t)
             for t in {target_of_frame[s.file] for s in solutions}}
    if solutions:
        drawn.add(max(solutions, key=lambda s: s.rms_px).file)
    solved, rms = [], []
    for sol in solutions:
        if not sol.success:
            continue
        slv.write_solved(prered / sol.file, out_dir / sol.file, sol)
        solved.append(sol.file)
        rms.append(float(sol.rms_arcsec))
        if sol.file in drawn and sol.matched is not None and len(sol.matched):
            fig = Figure(figsize=(7, 5))
            wcsfit.plot_residuals(fig.add_subplot(), sol.matched,
                                  fits.getdata(prered / sol.file).shape)
            fig.savefig(fig_dir / f"{Path(sol.file).stem}_residuals.png", dpi=80)
    seconds = time.perf_counter() - start
    return {"frames": len(names), "solved": solved, "seconds": seconds, "solve_s": solve_s,
            "setup_s": setup_s,
            "median_rms_arcsec": float(np.median(rms)) if rms else float("nan"),
            "peak_rss": peak_rss_bytes()}


def ch03_original(work: str, names: list[str]) -> dict:
    """The original course's astrometry: two-pass solve-field on each calibrated frame."""
    import numpy as np

    import config
    from datared import astrometry_net
    from datared.frame import read_frame

    _quiet()
    work_path = Path(work)
    prered = work_path / "LIGHT_PRERED"
    settings = _solver_settings()
    setup = time.perf_counter()
    reference, target_of_frame = _catalogs(names, prered)
    frame = read_frame(prered / names[0])
    field_arcmin = max(frame.data.shape) * config.pixel_scale_arcsec / 60
    index = {target: astrometry_net.build_index(cat, work_path / "index" / target, field_arcmin,
                                                name=target)
             for target, cat in reference.items()}
    setup_s = time.perf_counter() - setup
    solved, rms = 0, []
    start = time.perf_counter()
    for name in names:
        sol = astrometry_net.solve_field(prered / name, index[target_of_frame[name]],
                                         scale_arcsec=settings.scale_arcsec, keys=settings.keys,
                                         sip_degree=settings.sip_degree, timeout_s=60.0)
        if sol.success:
            solved += 1
            rms.append(float(sol.rms_arcsec))
    seconds = time.perf_counter() - start
    return {"frames": len(names), "solved": solved, "seconds": seconds, "setup_s": setup_s,
            "median_rms_arcsec": float(np.median(rms)) if rms else float("nan"),
            "peak_rss": peak_rss_bytes()}


def ch04_ours(work: str, names: list[str]) -> dict:
    """Chapter 04 as the notebook: frame quality (in parallel), a reference catalogue per
    target, then photometry of every frame (in parallel, ``config.workers``)."""
    import config
    from datared import photometry as ph
    from datared.frame import HeaderKeys, number_value, read_frame, target_of, text_value
    from datared.parallel import map_frames, resolve_workers
    _quiet()
    work_path = Path(work)
    solved_dir, phot_dir = work_path / "ASTROMETRY", work_path / "PHOTOMETRY"
    phot_dir.mkdir(exist_ok=True)
    keys = HeaderKeys.from_settings(config)
    radii = [float(r) for r in config.aperture_radii_arcsec]
    start = time.perf_counter()
    quality = {}
    for outcome in map_frames(ph.quality_of_file, [solved_dir / n for n in names],
                              shared={"saturation_adu": config.saturation_adu, "min_snr": 10.0},
                              workers=config.workers, desc="frame quality"):
        quality[outcome.item.name] = outcome.value
    quality_s = time.perf_counter() - start
    setup = time.perf_counter()
    frame_keys, targets = {}, {}
    for name in names:
        header = read_frame(solved_dir / name).header
        targets[name] = target_of(header, keys, config.targets, file=name)
        frame_keys[name] = (text_value(header, keys, "filter", file=name),
                            number_value(header, keys, "exptime", file=name))
    references = {}
    for target in sorted(set(targets.values())):
        best = max((n for n in names if targets[n] == target),
                   key=lambda n: quality[n]["n_sources"])
        catalog = ph.reference_catalog(read_frame(solved_dir / best),
                                       fwhm_pix=float(quality[best]["fwhm_pix"]),
                                       max_radius_arcsec=max(radii),
                                       gain_e_per_adu=config.gain_e_per_adu, keys=keys,
                                       nsigma=3.0, n_pixels=5, min_snr=10.0, box_size=BOX_SIZE,
                                       filter_size=FILTER_SIZE)
        ph.write_catalog(catalog, phot_dir / ph.reference_catalog_name(target))
        references[target] = catalog
    setup_s = time.perf_counter() - setup
    options = {"radii_arcsec": radii, "gain_e_per_adu": config.gain_e_per_adu,
               "read_noise_e": config.read_noise_e, "saturation_adu": config.saturation_adu,
               "keys": keys, "box_size": BOX_SIZE, "filter_size": FILTER_SIZE,
               "measure_fwhm": True, "aperture_mm": config.aperture_mm,
               "height_m": config.site["height_m"]}
    seconds = 0.0
    for target in sorted(references):
        mine = [n for n in names if targets[n] == target]
        begin = time.perf_counter()
        tasks = [(solved_dir / n, phot_dir / f"{Path(n).stem}.fits", frame_keys[n])
                 for n in mine]
        shared = {"target": target, "reference": references[target], "work_dir": work_path,
                  "options": options}
        for outcome in map_frames(ph.measure_file, tasks, shared=shared,
                                  workers=config.workers, desc=f"photometry {target}"):
            if outcome.error is not None:
                raise outcome.error
        seconds += time.perf_counter() - begin
    return {"frames": len(names), "seconds": seconds, "quality_s": quality_s,
            "setup_s": setup_s, "targets": targets, "workers": resolve_workers(config.workers),
            "peak_rss": peak_rss_bytes()}


def ch04_original(work: str, names: list[str], targets: dict) -> dict:
    """The original course's photometry: one-pass Background2D, ApertureStats per radius."""
    import numpy as np
    from astropy.stats import SigmaClip
    from astropy.table import QTable
    from photutils.aperture import ApertureStats, CircularAperture
    from photutils.background import Background2D, MedianBackground
    from photutils.utils import calc_total_error

    import config
    from datared import photometry as ph
    from datared.frame import read_frame

    _quiet()
    work_path = Path(work)
    radii = [float(r) for r in config.aperture_radii_arcsec]
    references = {t: QTable.read(work_path / "PHOTOMETRY" / ph.reference_catalog_name(t))
                  for t in set(targets.values())}
    start = time.perf_counter()
    for name in names:
        frame = read_frame(work_path / "ASTROMETRY" / name)
        data = frame.data.astype(np.float64)
        background = Background2D(data, ORIGINAL_BOX, mask=frame.mask,
                                  filter_size=(FILTER_SIZE, FILTER_SIZE),
                                  sigma_clip=SigmaClip(sigma=3.0),
                                  bkg_estimator=MedianBackground())
        x, y = ph.world_to_frame(frame.wcs, references[targets[name]]["sky"])
        inside = (x > 0) & (y > 0) & (x < data.shape[1] - 1) & (y < data.shape[0] - 1)
        positions = np.column_stack([x[inside], y[inside]])
        error = calc_total_error(data - background.background,
                                 bkg_error=background.background_rms,
                                 effective_gain=config.gain_e_per_adu)
        for radius in radii:
            aperture = CircularAperture(positions, r=radius / frame.pixel_scale_arcsec)
            on_data = ApertureStats(data, aperture, error=error, mask=frame.mask)
            on_background = ApertureStats(background.background, aperture, mask=frame.mask)
            _ = (on_data.sum - on_background.sum, on_data.sum_err, on_data.max)
    seconds = time.perf_counter() - start
    return {"frames": len(names), "seconds": seconds, "peak_rss": peak_rss_bytes()}


def _per_frame(row: dict, key: str = "seconds") -> float:
    return row[key] / max(row["frames"], 1)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and write benchmarks/results/night.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--night", type=Path, default=DEFAULT_NIGHT,
                        help="full-preset night (generated there if missing)")
    parser.add_argument("--per-group", type=int, default=2,
                        help="frames per group when generating the night")
    parser.add_argument("--frames", type=int, default=4,
                        help="science frames taken through chapters 02-04")
    parser.add_argument("--quick", action="store_true",
                        help="2 science frames and no solve-field: a check that it runs")
    args = parser.parse_args(argv)
    n_frames = 2 if args.quick else args.frames

    night = ensure_night(args.night, args.per_group)
    settings_file = night / "datared.toml"
    if settings_file.exists() and not os.environ.get("DATARED_CONFIG"):
        os.environ["DATARED_CONFIG"] = str(settings_file)  # the night's settings, in children
    work = Path(tempfile.mkdtemp(prefix="datared-bench-night-"))
    os.environ["DATARED_WORK_DIR"] = str(work)
    started = time.perf_counter()
    try:
        lights = [str(p) for p in in_fresh_process(_chosen_lights, night, n_frames)]
        ours = {"02": in_fresh_process(ch02_ours, str(night), str(work), lights)}
        original = {"02": in_fresh_process(ch02_original, str(night), str(work), lights)}
        names = ours["02"]["files"]
        max_difference = _compare_calibrations(work, names)
        ours["03"] = in_fresh_process(ch03_ours, str(work), names)
        solve_field = shutil.which("solve-field")
        if solve_field and not args.quick:
            original["03"] = in_fresh_process(ch03_original, str(work), names)
        solved = ours["03"]["solved"]
        ours["04"] = in_fresh_process(ch04_ours, str(work), solved)
        original["04"] = in_fresh_process(ch04_original, str(work), solved,
                                          ours["04"]["targets"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started

    ours_s = {"02": _per_frame(ours["02"]), "03": _per_frame(ours["03"]),
              "04": _per_frame(ours["04"]) + _per_frame(ours["04"], "quality_s")}
    calibration_s = ours["02"]["masters_s"] / max(ours["02"]["calibration_frames"], 1)
    minutes = {ch: NIGHT_SCIENCE * s / 60 for ch, s in ours_s.items()}
    minutes["02"] += NIGHT_CALIBRATION * calibration_s / 60
    workers = ours["04"]["workers"]
    original_s = {ch: _per_frame(row) for ch, row in original.items()}

    print(f"Night: {night} ({n_frames} science frames of the full preset, "
          f"{ours['02']['calibration_frames']} calibration frames); {os.cpu_count()} cores.\n")
    print("| chapter | datared s/frame | original s/frame | original / datared "
          "| peak memory datared (GB) | peak memory original (GB) |")
    print("|---|---|---|---|---|---|")
    for ch in ("02", "03", "04"):
        if ch in original:
            theirs = f"{original_s[ch]:.2f} | {original_s[ch] / ours_s[ch]:.2f}"
            theirs_memory = f"{original[ch]['peak_rss'] / 1e9:.2f}"
        else:
            theirs, theirs_memory = "- | -", "-"
        print(f"| {ch} | {ours_s[ch]:.2f} | {theirs} | {ours[ch]['peak_rss'] / 1e9:.2f} "
              f"| {theirs_memory} |")
    combine = original["02"]["combine_s_per_frame"]
    print(f"\n02: masters {calibration_s:.2f} s per calibration frame; science frames differ from "
          f"the ccdproc loop by at most {max_difference:.1e} (relative, pixels above 1000 ADU).")
    print(f"    combine of {original['02']['combined_frames']} bias and dark frames: "
          f"ccdproc.combine {combine['ccdproc']:.2f} s, clipped_combine {combine['datared']:.2f} s "
          f"per frame ({combine['ccdproc'] / combine['datared']:.1f}x).")
    print(f"03: {len(solved)} of {len(names)} frames solved, median RMS "
          f"{ours['03']['median_rms_arcsec']:.3f} arcsec; catalogues {ours['03']['setup_s']:.1f} s.")
    if "03" in original:
        print(f"    solve-field: {original['03']['solved']} of {original['03']['frames']} solved, "
              f"median RMS {original['03']['median_rms_arcsec']:.3f} arcsec; index "
              f"{original['03']['setup_s']:.1f} s.")
    elif not solve_field:
        print("    solve-field is not installed: the original course's astrometry was skipped.")
    else:
        print("    --quick: the original course's astrometry (solve-field) was skipped.")
    print(f"04: photometry {_per_frame(ours['04']):.2f} s + frame quality "
          f"{_per_frame(ours['04'], 'quality_s'):.2f} s per frame; reference catalogues "
          f"{ours['04']['setup_s']:.1f} s.")
    print(f"\nExtrapolated to {NIGHT_SCIENCE} science + {NIGHT_CALIBRATION} calibration frames "
          f"({workers} workers, as measured): 02 {minutes['02']:.1f} min, 03 {minutes['03']:.1f} min, "
          f"04 {minutes['04']:.1f} min; {sum(minutes.values()):.1f} min in all. "
          f"This run: {total:.0f} s.")
    for rows in (ours, original):
        for row in rows.values():
            row.pop("files", None)
    results = {"night": str(night), "science_frames": n_frames, "ours": ours,
               "original": original, "seconds_per_frame": ours_s,
               "original_seconds_per_frame": original_s, "calibration_s_per_frame": calibration_s,
               "extrapolated_minutes": minutes, "max_relative_difference_02": max_difference,
               "run_seconds": total, "cores": os.cpu_count(), "machine": platform.platform(),
               "python": platform.python_version()}
    out = HERE / "results" / "night.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
