"""Astrometry: seconds per frame and accuracy of both backends, small and full frames.

Frames of the sample night (``small`` preset: ``config.data_dir``) and of a full-size night
(``full`` preset, generated once with ``max_per_group=2`` into ``/tmp/datared-bench-full``
unless it exists) are calibrated with the truth, ``(raw - bias - dark_current * exptime) /
flat``, into a temporary folder. Per frame, both backends solve it:

- ``python``: :func:`datared.solve.solve_python` (pattern match + weighted TAN-SIP fit);
- ``astrometry.net``: :func:`datared.astrometry_net.solve_field`, the two-pass ``solve-field``
  run (skipped when it is not installed), with an index built once per target from the
  night's Gaia catalogue (the build time is reported separately).

Accuracy is the error of the fitted WCS against the true WCS on a 20 x 20 pixel grid: the
median over frames of the RMS, and the worst point over all frames. Prints a markdown table
and writes ``benchmarks/results/astrometry.json``. Usage:
``python -m benchmarks.bench_astrometry [--frames N] [--full-night DIR] [--no-full]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_FULL = Path(tempfile.gettempdir()) / "datared-bench-full"


def ensure_full_night(night: Path) -> Path:
    """Generate the full-preset night (two frames per group) unless it is already there."""
    if (night / "truth" / "params.json").exists():
        return night
    from datared.sim import simulate_night

    print(f"generating a full-size night (2 frames per group) in {night} ...")
    return simulate_night(night, preset="full", max_per_group=2)


def pick_frames(night: Path, n: int) -> list[str]:
    """Up to ``n`` light frames, spread over the targets and both pier sides."""
    from astropy.table import Table

    frames = Table.read(night / "truth" / "frames.ecsv")
    lights = frames[frames["imagetyp"] == "LIGHT"]
    groups: dict[tuple, list[str]] = {}
    for row in lights:
        groups.setdefault((str(row["object"]), str(row["pierside"])), []).append(str(row["file"]))
    chosen: list[str] = []
    while len(chosen) < n and any(groups.values()):
        for key in sorted(groups):
            if groups[key] and len(chosen) < n:
                chosen.append(groups[key].pop(0))
    return chosen


def calibrate_with_truth(night: Path, names: list[str], out: Path) -> list[Path]:
    """Calibrate raw frames with the true bias, dark current and flat into ``out``."""
    from astropy.io import fits

    truth = night / "truth"
    bias = fits.getdata(truth / "bias.fits").astype(float)
    dark = fits.getdata(truth / "dark_current.fits").astype(float)
    flats: dict[str, np.ndarray] = {}
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        with fits.open(night / "LIGHT" / name) as hdul:
            raw = hdul[0].data.astype(float)
            header = hdul[0].header.copy()
        band = str(header["FILTER"]).strip()
        if band not in flats:
            flats[band] = fits.getdata(truth / f"flat_{band}.fits").astype(float)
        image = (raw - bias - dark * float(header["EXPTIME"])) / flats[band]
        path = out / name
        fits.PrimaryHDU(image.astype(np.float32), header).writeto(path, overwrite=True)
        paths.append(path)
    return paths


def run_preset(night: Path, n_frames: int, work: Path) -> dict:
    """Solve ``n_frames`` frames of ``night`` with both backends; timings and errors."""
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    import config
    from datared import astrometry_net, catalogs, wcsfit
    from datared import solve as slv
    from datared.frame import HeaderKeys, frame_epoch

    warnings.simplefilter("ignore", FITSFixedWarning)  # header-only truth files
    names = pick_frames(night, n_frames)
    paths = calibrate_with_truth(night, names, work / "frames")
    shape = fits.getdata(paths[0]).shape
    half_diag = 0.5 * np.hypot(*shape) * config.pixel_scale_arcsec / 3600
    cats = {}
    for name, target in config.targets.items():
        cats[name] = catalogs.load_gaia(target["ra_deg"], target["dec_deg"], half_diag + 0.2,
                                        source="sample", data_dir=night)
    result = {"night": str(night), "shape": list(shape), "frames": names, "backends": {}}

    def record(backend: str, solutions: list, extra: dict) -> None:
        rms, worst = [], []
        for sol in solutions:
            if sol.success:
                err = wcsfit.grid_errors(sol.wcs, WCS(fits.getheader(night / "truth" / "wcs" / sol.file)),
                                      shape)
                rms.append(float(np.sqrt(np.mean(err**2))))
                worst.append(float(err.max()))
        result["backends"][backend] = {
            "solved": int(sum(s.success for s in solutions)), "n": len(solutions),
            "seconds_per_frame": float(np.mean([s.seconds for s in solutions])),
            "median_grid_rms_px": float(np.median(rms)) if rms else None,
            "worst_grid_px": float(max(worst)) if worst else None,
            "median_stars": float(np.median([s.n_matched for s in solutions if s.success] or [0])),
            "reasons": sorted({s.reason for s in solutions if not s.success}), **extra,
        }

    settings = slv.SolverSettings(scale_arcsec=config.pixel_scale_arcsec,
                                  keys=HeaderKeys.from_settings(config),
                                  gain_e_per_adu=config.gain_e_per_adu)
    solutions = []
    for path in paths:
        with fits.open(path) as hdul:
            data = np.asarray(hdul[0].data, float)
            header = hdul[0].header
        cat = cats[str(header["OBJECT"]).strip()]
        sol = slv.solve_python(data, header, cat, settings=settings, file=path.name,
                               saturation_adu=0.9 * config.saturation_adu - float(np.median(data)))
        solutions.append(sol)
    record("python", solutions, {})

    if astrometry_net.solve_field_available():
        epoch = frame_epoch(fits.getheader(paths[0]))
        field_arcmin = max(shape) * config.pixel_scale_arcsec / 60
        start = time.perf_counter()
        cfgs = {name: astrometry_net.build_index(cat, work / "index" / name, field_arcmin,
                                      epoch_jyear=epoch, name=name) for name, cat in cats.items()}
        build_s = time.perf_counter() - start
        solutions = []
        for path in paths:
            target = str(fits.getheader(path)["OBJECT"]).strip()
            solutions.append(astrometry_net.solve_field(path, cfgs[target], scale_arcsec=config.pixel_scale_arcsec))
        record("astrometry.net", solutions, {"index_build_seconds": build_s})
    return result


def main(argv: list[str] | None = None) -> int:
    import config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6, help="frames per preset (default 6)")
    parser.add_argument("--full-night", type=Path, default=DEFAULT_FULL)
    parser.add_argument("--no-full", action="store_true", help="skip the full-size frames")
    args = parser.parse_args(argv)

    nights = {"small": Path(config.data_dir)}
    if not args.no_full:
        nights["full"] = ensure_full_night(args.full_night)
    results = {"machine": platform.platform(), "python": platform.python_version(), "presets": {}}
    for preset, night in nights.items():
        if not (night / "truth" / "params.json").exists():
            print(f"{preset}: no sample night with truth at {night}; run `make sample`")
            continue
        with tempfile.TemporaryDirectory(prefix=f"datared-bench-astrometry-{preset}-") as tmp:
            results["presets"][preset] = run_preset(night, args.frames, Path(tmp))

    print("| preset | frame (px) | backend | solved | s / frame | median grid RMS (px) "
          "| worst grid point (px) | median stars |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, res in results["presets"].items():
        shape = "x".join(str(s) for s in res["shape"][::-1])
        for backend, b in res["backends"].items():
            rms = f"{b['median_grid_rms_px']:.4f}" if b["median_grid_rms_px"] is not None else "-"
            worst = f"{b['worst_grid_px']:.3f}" if b["worst_grid_px"] is not None else "-"
            print(f"| {preset} | {shape} | {backend} | {b['solved']}/{b['n']} | "
                  f"{b['seconds_per_frame']:.2f} | {rms} | {worst} | {b['median_stars']:.0f} |")
        b = res["backends"]
        if "astrometry.net" in b:
            ratio = b["astrometry.net"]["seconds_per_frame"] / b["python"]["seconds_per_frame"]
            res["speedup_python_vs_solve_field"] = ratio
            print(f"\n{preset}: the python backend is {ratio:.1f}x faster than two-pass "
                  f"solve-field (index build once: {b['astrometry.net']['index_build_seconds']:.1f} s)")
    out = HERE / "results" / "astrometry.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
