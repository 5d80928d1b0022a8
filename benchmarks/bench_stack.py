"""Stacking on full-size frames: seconds per frame and peak memory of resampling and combine.

On a night simulated with the ``full`` preset (4788x3194 frames; a few frames per group,
generated once into ``/tmp/datared-bench-stack`` by default), with the cluster's frames
calibrated from the simulator's true bias, dark current and flats and given their true
WCS (stand-ins for chapters 02 and 03, not timed):

- resampling: :func:`datared.stack.prepare_frame` on every cluster frame (background,
  FWHM, star fluxes and the flux-conserving resampling onto the target's grid), the
  resampling alone (:func:`datared.stack.resample_frame`), and ``reproject_interp`` on one
  frame for comparison (with the largest difference between the two);
- combine: :func:`datared.stack.combine_in_strips` of one filter's resampled frames within
  ``config.combine_memory_budget``, and of the same files listed eight times (as many
  frames as a long series): the number of strips grows, the peak memory does not.

Each step runs in a fresh process whose peak resident memory (``ru_maxrss``) is reported
next to the budget. Prints a markdown table and writes ``benchmarks/results/stack.json``.
Usage: ``python -m benchmarks.bench_stack [--night DIR] [--max-per-group N]
[--budget BYTES] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import in_fresh_process, peak_rss_bytes

HERE = Path(__file__).resolve().parent
DEFAULT_NIGHT = Path(tempfile.gettempdir()) / "datared-bench-stack"


def ensure_night(night: Path, max_per_group: int) -> Path:
    """Generate the full-preset night into ``night`` unless it is already there."""
    if (night / "truth" / "params.json").exists():
        return night
    from datared.sim import simulate_night

    print(f"generating a full-size night with at most {max_per_group} frames per group in "
          f"{night} ...", flush=True)
    simulate_night(night, preset="full", max_per_group=max_per_group, progress=False)
    return night


def _cluster_lights(night: Path) -> list[tuple[Path, str]]:
    """The cluster's raw frames and their filters, from the truth's frame list."""
    from astropy.table import Table

    import config

    cluster = next(n for n, t in config.targets.items() if t["kind"] == "cluster")
    frames = Table.read(night / "truth" / "frames.ecsv")
    rows = frames[(frames["imagetyp"] == "LIGHT") & (frames["object"] == cluster)]
    return [(night / str(row["path"]), str(row["filter"])) for row in rows]


def _calibrated(night: Path, path: Path, band: str):
    """A Frame calibrated with the true bias, dark current and flat, with its true WCS."""
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS

    import config
    from datared.frame import Frame

    truth = night / "truth"
    raw = fits.getdata(path).astype(np.float32)
    header = fits.getheader(path)
    bias = fits.getdata(truth / "bias.fits").astype(np.float32)
    dark = fits.getdata(truth / "dark_current.fits").astype(np.float32)
    flat = fits.getdata(truth / f"flat_{band}.fits").astype(np.float32)
    exptime = float(header[config.exptime_key])
    data = (raw - bias - dark * exptime) / flat
    wcs_header = fits.getheader(truth / "wcs" / path.name)
    wcs_header["NAXIS"] = 2
    return Frame(path, data.astype(np.float32), header, WCS(wcs_header),
                 raw >= config.saturation_adu)


def _shape_and_wcs(night: Path, path: Path):
    """Shape and true WCS of a raw frame (from its header and the truth)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    header = fits.getheader(path)
    wcs_header = fits.getheader(night / "truth" / "wcs" / path.name)
    wcs_header["NAXIS"] = 2
    return (int(header["NAXIS2"]), int(header["NAXIS1"])), WCS(wcs_header)


def resample_step(night: str, work: str) -> dict:
    """prepare_frame on every cluster frame, the resampled frames saved for the combine."""
    import numpy as np

    import config
    from datared import catalogs
    from datared import stack as st
    from datared.wcsfit import catalog_at_epoch

    night_path, work_path = Path(night), Path(work)
    lights = _cluster_lights(night_path)
    grid_wcs, grid_shape = st.output_grid([_shape_and_wcs(night_path, path) for path, _ in lights],
                                          pixel_scale_arcsec=config.pixel_scale_arcsec)
    target = next(t for t in config.targets.values() if t["kind"] == "cluster")
    gaia = catalogs.load_gaia(target["ra_deg"], target["dec_deg"], 0.6, source="sample",
                              data_dir=night_path)
    sky = catalog_at_epoch(gaia, 2024.12)
    mag = np.asarray(gaia["phot_g_mean_mag"], dtype=float)
    radii = [8.0, 12.0, 16.0]
    prepare_seconds, files = [], {}
    frame_shape = None
    for path, band in lights:
        frame = _calibrated(night_path, path, band)
        frame_shape = frame.shape
        start = time.perf_counter()
        prepared = st.prepare_frame(frame, stars_sky=sky, stars_mag=mag, wcs_out=grid_wcs,
                                    shape_out=grid_shape, radii_px=radii,
                                    saturation_adu=config.saturation_adu,
                                    gain_e_per_adu=config.gain_e_per_adu)
        prepare_seconds.append(time.perf_counter() - start)
        out = work_path / band / f"{path.stem}.npy"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, prepared.resampled)
        files.setdefault(band, []).append(str(out))
        del prepared, frame
    return {"frames": len(lights), "frame_shape": list(frame_shape),
            "grid_shape": list(grid_shape), "prepare_s_per_frame": float(np.mean(prepare_seconds)),
            "peak_rss": peak_rss_bytes(), "files": files}


def interp_step(night: str) -> dict:
    """resample_frame and reproject_interp (times the pixel area) on one cluster frame."""
    import numpy as np
    from reproject import reproject_interp

    import config
    from datared import stack as st

    night_path = Path(night)
    lights = _cluster_lights(night_path)
    grid_wcs, grid_shape = st.output_grid([_shape_and_wcs(night_path, path) for path, _ in lights],
                                          pixel_scale_arcsec=config.pixel_scale_arcsec)
    frame = _calibrated(night_path, *lights[0])
    sub, _ = st.subtract_background(frame.data, frame.mask)
    start = time.perf_counter()
    mine = st.resample_frame(sub, frame.wcs, grid_wcs, grid_shape)
    resample_seconds = time.perf_counter() - start
    resample_peak = peak_rss_bytes()
    start = time.perf_counter()
    library, _ = reproject_interp((sub, frame.wcs), grid_wcs, shape_out=grid_shape,
                                  order="bilinear")
    library_seconds = time.perf_counter() - start
    library *= st.pixel_area_ratio(frame.wcs, grid_wcs, grid_shape)
    both = np.isfinite(mine) & np.isfinite(library)
    return {"resample_s": resample_seconds, "resample_peak_rss": resample_peak,
            "reproject_interp_s": library_seconds, "reproject_interp_peak_rss": peak_rss_bytes(),
            "max_difference_adu": float(np.max(np.abs(mine[both] - library[both])))}


def combine_step(files: list[str], shape: list[int], repeat: int, budget: float) -> dict:
    """combine_in_strips of ``files`` listed ``repeat`` times, within ``budget`` bytes."""
    import numpy as np

    import config
    from datared import stack as st

    paths = [Path(p) for p in files] * repeat
    n = len(paths)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    result, n_strips = st.combine_in_strips(
        paths, shape=tuple(shape), memory_budget=budget, scales=np.ones(n),
        noise=np.full(n, 10.0), weights=np.ones(n), gain_e_per_adu=config.gain_e_per_adu)
    seconds = time.perf_counter() - start
    return {"frames": n, "strips": n_strips, "seconds": seconds,
            "coverage_max": int(result.coverage.max()), "peak_rss": peak_rss_bytes(),
            "rss_before": baseline}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print a markdown table and write benchmarks/results/stack.json."""
    import config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--night", type=Path, default=DEFAULT_NIGHT,
                        help="full-preset night (generated if missing)")
    parser.add_argument("--max-per-group", type=int, default=4,
                        help="frames per group when generating the night")
    parser.add_argument("--budget", type=float, default=config.combine_memory_budget,
                        help="memory budget of the combine, bytes")
    parser.add_argument("--repeat", type=int, default=8,
                        help="the long series: one filter's frames listed this many times")
    args = parser.parse_args(argv)
    night = ensure_night(args.night.resolve(), args.max_per_group)
    work = Path(tempfile.mkdtemp(prefix="datared-bench-stack-work-"))
    try:
        resampled = in_fresh_process(resample_step, str(night), str(work))
        interp = in_fresh_process(interp_step, str(night))
        band = sorted(resampled["files"])[0]
        files = resampled["files"][band]
        combines = [in_fresh_process(combine_step, files, resampled["grid_shape"], repeat,
                                      args.budget) for repeat in (1, args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    rows = [
        {"step": "prepare_frame (background, FWHM, fluxes, resampling)",
         "frames": resampled["frames"], "s_per_frame": resampled["prepare_s_per_frame"],
         "peak_gb": resampled["peak_rss"] / gb},
        {"step": "resample_frame alone", "frames": 1, "s_per_frame": interp["resample_s"],
         "peak_gb": interp["resample_peak_rss"] / gb},
        {"step": "reproject_interp x pixel area (same frame)", "frames": 1,
         "s_per_frame": interp["reproject_interp_s"],
         "peak_gb": interp["reproject_interp_peak_rss"] / gb},
    ]
    for combine in combines:
        rows.append({"step": f"combine_in_strips, {combine['strips']} strip(s)",
                     "frames": combine["frames"],
                     "s_per_frame": combine["seconds"] / combine["frames"],
                     "peak_gb": combine["peak_rss"] / gb})
    print(f"full preset: frames {resampled['frame_shape'][1]}x{resampled['frame_shape'][0]}, "
          f"grid {resampled['grid_shape'][1]}x{resampled['grid_shape'][0]}; combine memory "
          f"budget {args.budget / gb:.1f} GB\n")
    print("| step | frames | s / frame | peak memory |")
    print("|---|---|---|---|")
    for row in rows:
        peak = "" if row["peak_gb"] is None else f"{row['peak_gb']:.2f} GB"
        if row["peak_gb"] is not None and row["peak_gb"] > args.budget / gb:
            peak += " (over budget)"
        print(f"| {row['step']} | {row['frames']} | {row['s_per_frame']:.2f} | {peak} |")
    speedup = interp["reproject_interp_s"] / interp["resample_s"]
    print(f"\nresample_frame is {speedup:.1f}x faster than reproject_interp; largest "
          f"difference {interp['max_difference_adu']:.2g} ADU.")
    print("The budget bounds the whole process during the combine (the process itself "
          "included); the resampling works one frame at a time and has no budget.")
    out = HERE / "results" / "stack.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    resampled.pop("files")
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "budget_bytes": args.budget, "resample": resampled, "interp": interp,
                               "combine": combines, "rows": rows}, indent=2))
    print(f"\nwritten {out.relative_to(HERE.parent)}")
    return rows


if __name__ == "__main__":
    main()
