"""Pre-reduction on full-size frames: memory of the master-flat combine, speed per science frame.

On a night simulated with the ``full`` preset (4788x3194 frames, generated once into a
folder outside the repository, ``/tmp/datared-bench-full`` by default):

- master-flat combine: :func:`datared.reduction.build_master_flat` (frames staged on disk,
  ``ccdproc.combine`` tiled under the memory budget) against the plain recipe (all flats
  processed into a list of ``CCDData`` in memory, then ``ccdproc.combine``), with the flats
  of one filter and the same list repeated to four times as many frames. Each run happens
  in a fresh process whose peak resident memory (``ru_maxrss``) is reported, with the peak
  before the combine started (Python, libraries and the master bias and darks loaded).
- science frames: :func:`datared.reduction.calibrate_lights` against a plain ccdproc loop
  (``CCDData.read``, ``subtract_bias``, ``subtract_dark``, ``flat_correct``, ``write``) on the
  same frames with the same masters; seconds per frame and the largest relative difference
  of the results on bright pixels.

Prints a markdown table and writes ``benchmarks/results/prereduction.json``. Usage:
``python -m benchmarks.bench_prereduction [--night DIR] [--frames N] [--budget BYTES]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import in_fresh_process, night_frames, peak_rss_bytes

HERE = Path(__file__).resolve().parent
DEFAULT_NIGHT = Path(tempfile.gettempdir()) / "datared-bench-full"


def ensure_night(night: Path, frames: int) -> Path:
    """Generate the full-preset night into ``night`` unless it is already there."""
    if (night / "truth" / "params.json").exists():
        return night
    from datared.sim import simulate_night

    print(f"generating a full-size night with at most {frames} frames per group in {night} ...")
    simulate_night(night, preset="full", max_per_group=frames)
    return night


def _quiet_wcs_warnings() -> None:
    """CCDData.read warns on every raw frame that it derived MJD-OBS from DATE-OBS: harmless."""
    import warnings

    from astropy.wcs import FITSFixedWarning

    warnings.simplefilter("ignore", FITSFixedWarning)


def _masters(night: Path, work: Path, budget: float) -> dict:
    """Master bias and darks written to ``work`` (done once, not timed)."""
    import config
    from datared import reduction as red
    from datared.frame import HeaderKeys

    keys = HeaderKeys.from_settings(config)
    bias, _ = red.build_master_bias(night_frames(night, "bias"), scratch_dir=work / "scratch",
                                    memory_budget=budget)
    red.write_master(bias, work / "masterbias.fits")
    darks, _ = red.build_master_darks(night_frames(night, "dark"), bias.data,
                                      scratch_dir=work / "scratch", memory_budget=budget,
                                      keys=keys)
    red.write_master_darks(darks, work, keys=keys)
    return {"dark_exptimes": list(darks)}


def _load_calibration(work: Path):
    import config
    from datared import reduction as red
    from datared.frame import HeaderKeys, number_value

    keys = HeaderKeys.from_settings(config)
    bias = red.read_master(work / "masterbias.fits").data
    darks = {}
    for path in sorted(work.glob("masterdark*.fits")):
        master = red.read_master(path)  # each master dark read once
        darks[number_value(master.header, keys, "exptime", file=path)] = master.data
    return red.Calibration(bias=bias, darks=darks)


def flat_datared(night: str, work: str, band: str, repeat: int, budget: float) -> dict:
    """Master flat with datared (staged, tiled combine); time and peak memory."""
    import config
    from datared import reduction as red
    from datared.frame import HeaderKeys

    work_path = Path(work)
    paths = night_frames(Path(night), "flat", band) * repeat
    # Repeated files get distinct staged names through separate links.
    links = work_path / "flat-links"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True)
    linked = []
    for i, path in enumerate(paths):
        link = links / f"{i:03d}_{path.name}"
        link.symlink_to(path)
        linked.append(link)
    calibration = _load_calibration(work_path)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    master, _ = red.build_master_flat(linked, calibration, scratch_dir=work_path / "scratch",
                                      memory_budget=budget, saturation_adu=config.saturation_adu,
                                      keys=HeaderKeys.from_settings(config))
    seconds = time.perf_counter() - start
    red.write_master(master, work_path / f"masterflat_{band}_datared_x{repeat}.fits")
    shutil.rmtree(links)
    return {"frames": len(paths), "seconds": seconds, "peak_rss": peak_rss_bytes(),
            "rss_before": baseline}


def flat_plain(night: str, work: str, band: str, repeat: int, budget: float) -> dict:
    """Master flat the plain way: every processed flat in memory, then ccdproc.combine."""
    import ccdproc
    import numpy as np
    from astropy import units as u
    from astropy.nddata import CCDData

    import config
    from datared import reduction as red

    _quiet_wcs_warnings()
    work_path = Path(work)
    paths = night_frames(Path(night), "flat", band) * repeat
    calibration = _load_calibration(work_path)
    bias = CCDData(calibration.bias, unit="adu")
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    processed = []
    for path in paths:
        ccd = CCDData.read(path, unit="adu")
        ccd = ccdproc.subtract_bias(ccd, bias)
        if calibration.darks:
            dark_exptime, _ = red.choose_dark(calibration.darks, ccd.header[config.exptime_key])
            dark = CCDData(calibration.darks[dark_exptime], unit="adu",
                           meta={config.exptime_key: dark_exptime})
            ccd = ccdproc.subtract_dark(ccd, dark, exposure_time=config.exptime_key,
                                        exposure_unit=u.s, scale=True)
        processed.append(ccd.divide(np.median(ccd.data) * u.adu))
    master = ccdproc.combine(processed, method="average", mem_limit=budget, sigma_clip=True,
                             sigma_clip_low_thresh=5, sigma_clip_high_thresh=5,
                             sigma_clip_func="median", sigma_clip_dev_func="mad_std")
    seconds = time.perf_counter() - start
    del processed
    master.data = (master.data / np.median(master.data)).astype(np.float32)
    master.write(work_path / f"masterflat_{band}_plain_x{repeat}.fits", overwrite=True)
    return {"frames": len(paths), "seconds": seconds, "peak_rss": peak_rss_bytes(),
            "rss_before": baseline}


def lights_datared(night: str, work: str, band: str, n_lights: int) -> dict:
    """Calibrate science frames with datared.reduction.calibrate_lights."""
    import config
    from datared import reduction as red
    from datared.frame import HeaderKeys

    work_path = Path(work)
    paths = night_frames(Path(night), "light", band)[:n_lights]
    calibration = _load_calibration(work_path)
    calibration.flats[band] = red.read_master(
        work_path / f"masterflat_{band}_datared_x1.fits").data
    start = time.perf_counter()
    table, log = red.calibrate_lights(paths, calibration, work_path / "datared",
                                      keys=HeaderKeys.from_settings(config),
                                      saturation_adu=config.saturation_adu)
    seconds = time.perf_counter() - start
    return {"frames": len(table), "skipped": len(log), "seconds": seconds,
            "peak_rss": peak_rss_bytes(), "files": [p.name for p in paths]}


def lights_plain(night: str, work: str, band: str, n_lights: int) -> dict:
    """Calibrate science frames with the plain ccdproc loop (masters read once)."""
    import ccdproc
    from astropy import units as u
    from astropy.nddata import CCDData

    import config
    from datared import reduction as red

    _quiet_wcs_warnings()
    work_path = Path(work)
    paths = night_frames(Path(night), "light", band)[:n_lights]
    calibration = _load_calibration(work_path)
    bias = CCDData(calibration.bias, unit="adu")
    # The same dark as datared: the master of the same exposure time, else the longest scaled.
    darks = {t: CCDData(d, unit="adu", meta={config.exptime_key: t})
             for t, d in calibration.darks.items()}
    flat = CCDData.read(work_path / f"masterflat_{band}_datared_x1.fits", unit="adu")
    out = work_path / "plain"
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    for path in paths:
        ccd = CCDData.read(path, unit="adu")
        ccd = ccdproc.subtract_bias(ccd, bias)
        dark_exptime, _ = red.choose_dark(darks, float(ccd.header[config.exptime_key]))
        if dark_exptime is not None:
            ccd = ccdproc.subtract_dark(ccd, darks[dark_exptime],
                                        exposure_time=config.exptime_key, exposure_unit=u.s,
                                        scale=True)
        ccd = ccdproc.flat_correct(ccd, flat, norm_value=1.0)
        ccd.write(out / path.name, overwrite=True)
    seconds = time.perf_counter() - start
    return {"frames": len(paths), "seconds": seconds, "peak_rss": peak_rss_bytes()}


def compare_outputs(work: Path, names: list[str]) -> float:
    """Largest relative difference between the two calibrations on pixels above 1000 ADU."""
    import numpy as np
    from astropy.io import fits

    worst = 0.0
    for name in names:
        ours = fits.getdata(work / "datared" / name).astype(np.float64)
        plain = fits.getdata(work / "plain" / name).astype(np.float64)
        bright = plain > 1000
        if bright.any():
            worst = max(worst, float(np.max(np.abs(ours[bright] - plain[bright]) / plain[bright])))
    return worst


def compare_flats(work: Path, band: str) -> float:
    """RMS relative difference between the datared and the plain master flat."""
    import numpy as np
    from astropy.io import fits

    ours = fits.getdata(work / f"masterflat_{band}_datared_x1.fits").astype(np.float64)
    plain = fits.getdata(work / f"masterflat_{band}_plain_x1.fits").astype(np.float64)
    return float(np.std(ours / plain - 1))


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a markdown table and write benchmarks/results/prereduction.json."""
    import config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--night", type=Path, default=DEFAULT_NIGHT,
                        help="full-preset night (generated there if missing)")
    parser.add_argument("--frames", type=int, default=8,
                        help="frames per group when generating the night")
    parser.add_argument("--lights", type=int, default=6, help="science frames to calibrate")
    parser.add_argument("--budget", type=float, default=config.combine_memory_budget,
                        help="combine memory budget, bytes")
    parser.add_argument("--repeat", type=int, default=4,
                        help="also combine the flat list repeated this many times")
    args = parser.parse_args(argv)

    night = ensure_night(args.night, args.frames)
    work = Path(tempfile.mkdtemp(prefix="datared-bench-work-"))
    try:
        in_fresh_process(_masters, night, work, args.budget)
        light_band = str(_light_band(night))
        results: dict = {"night": str(night), "budget_bytes": args.budget, "filter": light_band}
        flats = {}
        # The plain recipe holds every processed flat in memory: run it on the list once
        # only (its memory grows with the number of frames); datared on both lengths.
        runs = [("datared", flat_datared, 1), ("plain", flat_plain, 1)]
        if args.repeat > 1:
            runs.append(("datared", flat_datared, args.repeat))
        for label, function, repeat in runs:
            flats[f"{label}_x{repeat}"] = in_fresh_process(
                function, str(night), str(work), light_band, repeat, args.budget)
        results["flats"] = flats
        results["flat_rms_difference"] = compare_flats(work, light_band)
        lights = {"datared": in_fresh_process(lights_datared, str(night), str(work), light_band,
                                               args.lights),
                  "plain": in_fresh_process(lights_plain, str(night), str(work), light_band,
                                             args.lights)}
        results["lights"] = lights
        results["light_max_relative_difference"] = compare_outputs(work,
                                                                   lights["datared"]["files"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Night: {night}; memory budget {args.budget / 1e9:.1f} GB; filter {light_band}.\n")
    print("| step | method | frames | seconds | s/frame | peak memory (GB) | before (GB) |")
    print("|---|---|---|---|---|---|---|")
    for key, row in flats.items():
        method, times = key.split("_x")
        print(f"| master flat (list x{times}) | {method} | {row['frames']} | {row['seconds']:.1f} "
              f"| {row['seconds'] / row['frames']:.2f} | {row['peak_rss'] / 1e9:.2f} "
              f"| {row['rss_before'] / 1e9:.2f} |")
    for method, row in lights.items():
        print(f"| science frames | {method} | {row['frames']} | {row['seconds']:.1f} "
              f"| {row['seconds'] / max(row['frames'], 1):.2f} | {row['peak_rss'] / 1e9:.2f} "
              f"| - |")
    speedup = lights["plain"]["seconds"] / max(lights["datared"]["seconds"], 1e-9)
    print(f"\nScience frames: datared is {speedup:.2f}x the speed of the plain loop; largest "
          f"relative difference on pixels above 1000 ADU: "
          f"{results['light_max_relative_difference']:.1e}. Master flats differ by "
          f"{results['flat_rms_difference']:.1e} RMS.")
    results["science_speedup"] = speedup
    results["machine"] = platform.platform()
    results["python"] = platform.python_version()
    out = HERE / "results" / "prereduction.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


def _light_band(night: Path) -> str:
    """The filter with the most science frames."""
    from collections import Counter

    from astropy.io import fits

    import config

    bands = Counter(str(fits.getval(p, config.filter_key)).strip()
                    for p in night_frames(night, "light"))
    return bands.most_common(1)[0][0]


if __name__ == "__main__":
    main()
