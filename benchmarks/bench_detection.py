"""Star detection: datared's sep-based ``detect_stars`` against photutils' segmentation.

On raw science frames of a simulated night (``small`` and ``full`` presets, both targets),
minus their median level, both find the stars of the frame:

- photutils (what chapter 04 shows step by step): a Gaussian-smoothed image,
  ``detect_sources`` + ``deblend_sources`` and ``SourceCatalog`` windowed centroids,
  sources with S/N >= 10;
- datared, for photometry: :func:`datared.detection.detect_stars` with the same background
  map (chapter 04's two-pass ``estimate_background``: the background is not what is
  compared), S/N >= 10;
- datared, for astrometry: the solver's call (sep's own mesh background, the brightest 800
  stars), which is what chapter 03 runs on every frame.

Prints a markdown table (seconds per frame, best of ``--repeat``; stars found; photutils
stars with a datared star within 0.5 px; median position difference), the two-pass
background's time with sep (the default) and with photutils' ``Background2D`` and the
difference of the two maps, and writes
``benchmarks/results/detection.json``. Run from the repository root:
``python -m benchmarks.bench_detection [--repeat N] [--presets small full]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def night_frames(preset: str, work: Path) -> list[Path]:
    """One raw frame of each target of a freshly simulated night."""
    from datared.sim import simulate_night

    night = simulate_night(work / preset, preset=preset, max_per_group=1, progress=False)
    lights = sorted((night / "LIGHT").rglob("*.fits"))
    picked = {}
    for path in lights:
        target = path.name.split("_")[2]
        picked.setdefault(target, path)
    return list(picked.values())


def photutils_detect(data, background, fwhm):
    """The photutils steps of chapter 04: kept sources' windowed centroids (x, y)."""
    from photutils.segmentation import SourceCatalog, deblend_sources, detect_sources
    from photutils.utils import calc_total_error

    from datared.detection import convolve_for_detection, too_sharp

    sub = data - background.background
    convolved = convolve_for_detection(sub, fwhm)
    segments = detect_sources(convolved, threshold=3.0 * background.rms, n_pixels=5)
    segments = deblend_sources(convolved, segments, n_pixels=5, n_levels=32, contrast=0.001,
                               progress_bar=False)
    error = calc_total_error(sub, bkg_error=background.rms, effective_gain=0.85)
    cat = SourceCatalog(sub, segments, convolved_data=convolved, error=error)
    table = cat.to_table(columns=["x_centroid_win", "y_centroid_win", "segment_flux",
                                  "segment_flux_err", "max_value"])
    snr = np.asarray(table["segment_flux"] / table["segment_flux_err"], float)
    x = np.asarray(table["x_centroid_win"], float)
    y = np.asarray(table["y_centroid_win"], float)
    iy = np.clip(np.round(np.nan_to_num(y)).astype(int), 0, sub.shape[0] - 1)
    ix = np.clip(np.round(np.nan_to_num(x)).astype(int), 0, sub.shape[1] - 1)
    sharp = too_sharp(np.asarray(table["max_value"], float),
                      np.asarray(table["segment_flux"], float), fwhm, background.rms[iy, ix])
    keep = (snr >= 10) & ~sharp & np.isfinite(x)
    return np.column_stack([x[keep], y[keep]])


def best_of(repeat, func):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return min(times), result


def run_frame(path: Path, repeat: int) -> dict:
    from astropy.io import fits
    from scipy.spatial import cKDTree

    from datared import detection as det

    data = fits.getdata(path).astype(np.float32)
    data = data - np.float32(np.median(data))
    t_bkg, background = best_of(repeat, lambda: det.estimate_background(data))
    t_bkg_photutils, slow = best_of(
        repeat, lambda: det.estimate_background(data, method="photutils"))
    in_sigma = np.abs(background.background - slow.background) / slow.rms
    fast = det.detect_stars(data)  # measures the FWHM
    fwhm = fast.meta["fwhm_px"]
    t_phot, ref_xy = best_of(repeat, lambda: photutils_detect(data, background, fwhm))
    t_sep, ours = best_of(repeat, lambda: det.detect_stars(
        data, background=background, fwhm_px=fwhm, min_snr=10, gain_e_per_adu=0.85))
    t_astro, astro = best_of(repeat, lambda: det.detect_stars(
        data, nsigma=5.0, deblend=False, max_stars=800, gain_e_per_adu=0.85))
    dist, _ = cKDTree(np.column_stack([ours["x"], ours["y"]])).query(ref_xy)
    found = dist < 0.5
    return {"frame": path.name, "shape": list(data.shape), "fwhm_px": float(fwhm),
            "background_s": t_bkg, "background_photutils_s": t_bkg_photutils,
            "background_difference_p99_sigma": float(np.percentile(in_sigma, 99)),
            "photutils_s": t_phot, "datared_s": t_sep,
            "astrometry_s": t_astro, "n_photutils": int(len(ref_xy)), "n_datared": len(ours),
            "n_astrometry": len(astro), "fraction_found": float(found.mean()),
            "median_offset_px": float(np.median(dist[found]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["small", "full"])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="datared-bench-detection-") as tmp:
        for preset in args.presets:
            for path in night_frames(preset, Path(tmp)):
                row = run_frame(path, args.repeat)
                row["preset"] = preset
                rows.append(row)
    print("| preset | frame | photutils segmentation (s) | datared, photometry (s) | "
          "datared, astrometry (s) | stars photutils / datared | found within 0.5 px | "
          "median offset (px) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['frame'].split('_')[2]} | {r['photutils_s']:.3f} | "
              f"{r['datared_s']:.3f} | {r['astrometry_s']:.3f} | {r['n_photutils']} / "
              f"{r['n_datared']} | {r['fraction_found']:.1%} | {r['median_offset_px']:.4f} |")
    print("\nTwo-pass background map (both photometry columns use the default, sep; not in the "
          "times), sep against photutils (99th percentile of the difference, in noise sigma):")
    for r in rows:
        print(f"    {r['preset']} {r['frame'].split('_')[2]}: sep {r['background_s']:.2f} s, "
              f"photutils {r['background_photutils_s']:.2f} s "
              f"({r['background_photutils_s'] / r['background_s']:.1f}x), difference "
              f"{r['background_difference_p99_sigma']:.3f}")
    out = HERE / "results" / "detection.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
