"""Forced photometry speed: datared's one-pass cut-outs against one ApertureStats per radius.

For a synthetic frame of the ``small`` and ``full`` sizes with about 1000 stars and 4
aperture radii, both approaches compute the background-subtracted sums, their
uncertainties and peak pixels from the same background map:

- straightforward (as the original course): a full-frame error map, then per radius one
  ``photutils.aperture.ApertureStats`` on the image (sum, sum_err, max) and one on the
  background map (sum);
- datared: :func:`datared.photometry.forced_photometry` (all radii from one stack of
  cut-outs, CCD noise equation and flags included).

Prints a markdown table (seconds per frame, best of ``--repeat``; ratio of the two) and
writes ``benchmarks/results/photometry.json``. The frames come from
``tests/synthetic.py`` (Gaussian stars on a flat sky); run from the repository root:
``python -m benchmarks.bench_photometry [--repeat N] [--stars N] [--presets small full]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: Frame shapes (ny, nx) of the simulator presets (the small preset is a sub-frame).
PRESET_SHAPES = {"small": (900, 1200), "full": (3194, 4788)}
RADII_ARCSEC = [2.0, 3.0, 4.0, 6.0]
PIXEL_SCALE = 0.605
GAIN, READ_NOISE = 0.85, 3.6


def preset_shape(name: str) -> tuple[int, int]:
    """Frame shape of a simulator preset (from datared.sim when it says, else the table)."""
    try:
        from datared.sim import PRESETS

        shape = PRESETS[name].shape
        return int(shape[0]), int(shape[1])
    except (ImportError, AttributeError, KeyError, TypeError, IndexError):
        return PRESET_SHAPES[name]


def straightforward(data, background, positions_xy, radii_pix):
    """One ApertureStats per radius on the image (with an error map) and on the background."""
    from photutils.aperture import ApertureStats, CircularAperture
    from photutils.utils import calc_total_error

    data_sub = data - background.background
    error = calc_total_error(data_sub, bkg_error=background.rms, effective_gain=GAIN)
    out = {}
    for radius in radii_pix:
        aperture = CircularAperture(positions_xy, r=radius)
        on_data = ApertureStats(data, aperture, error=error)
        on_background = ApertureStats(background.background, aperture)
        out[radius] = (on_data.sum - on_background.sum, on_data.sum_err, on_data.max,
                       on_background.sum)
    return out


def run_one(name: str, n_stars: int, repeat: int, seed: int = 1) -> dict:
    """Time both approaches on one synthetic frame; returns a result row."""
    from datared import photometry as ph
    from datared.detection import estimate_background
    from tests.synthetic import synthetic_star_field

    shape = preset_shape(name)
    image, stars = synthetic_star_field(shape, n_stars, fwhm_pix=4.0, sky_adu=800.0,
                                        gain_e_per_adu=GAIN, read_noise_e=READ_NOISE,
                                        flux_range_adu=(2e3, 3e5), margin=15, seed=seed)
    estimate_background(image[:256, :256])  # imports and first-call set-up not timed
    t0 = time.perf_counter()
    background = estimate_background(image)
    t_background = time.perf_counter() - t0
    positions = np.column_stack([stars["x"], stars["y"]])
    radii_pix = [r / PIXEL_SCALE for r in RADII_ARCSEC]

    def timed(function):
        best, result = np.inf, None
        for _ in range(repeat):
            start = time.perf_counter()
            result = function()
            best = min(best, time.perf_counter() - start)
        return best, result

    t_slow, slow = timed(lambda: straightforward(image, background, positions, radii_pix))
    t_fast, fast = timed(lambda: ph.forced_photometry(
        image, stars["x"], stars["y"], RADII_ARCSEC, pixel_scale_arcsec=PIXEL_SCALE,
        background=background, gain_e_per_adu=GAIN, read_noise_e=READ_NOISE,
        saturation_adu=6e4))
    worst = 0.0
    for radius_arcsec, radius_pix in zip(RADII_ARCSEC, radii_pix, strict=True):
        tag = ph.radius_tag(radius_arcsec)
        reference = np.asarray(slow[radius_pix][0])
        worst = max(worst, float(np.max(np.abs(np.asarray(fast[f"sum_{tag}"]) - reference)
                                        / np.maximum(np.abs(reference), 1.0))))
        np.testing.assert_array_equal(np.asarray(fast[f"max_{tag}"]), slow[radius_pix][2])
    return {"preset": name, "shape": list(shape), "n_stars": n_stars,
            "n_radii": len(RADII_ARCSEC), "background_s": t_background,
            "straightforward_s": t_slow, "datared_s": t_fast, "speedup": t_slow / t_fast,
            "max_relative_sum_difference": worst}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, print a markdown table and write benchmarks/results/photometry.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (best is kept)")
    parser.add_argument("--stars", type=int, default=1000, help="stars per frame")
    parser.add_argument("--presets", nargs="+", default=["small", "full"],
                        choices=sorted(PRESET_SHAPES))
    args = parser.parse_args(argv)
    rows = [run_one(name, args.stars, args.repeat) for name in args.presets]
    print("| preset | frame (px) | stars x radii | background (s) | ApertureStats per radius (s) "
          "| datared (s) | speed-up | max rel. sum difference |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['preset']} | {row['shape'][1]}x{row['shape'][0]} | "
              f"{row['n_stars']}x{row['n_radii']} | {row['background_s']:.2f} | "
              f"{row['straightforward_s']:.3f} | {row['datared_s']:.3f} | "
              f"{row['speedup']:.1f}x | {row['max_relative_sum_difference']:.1e} |")
    out = HERE / "results" / "photometry.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                               "rows": rows}, indent=2))
    print(f"\nwritten {out.relative_to(HERE.parent)}")
    return rows


if __name__ == "__main__":
    main()
