"""Chapter 05's isochrone fit: the likelihood, the grid, and (optionally) the whole chapter.

- The likelihood of ``datared.cmd.IsochroneModel`` (two matrix products and a float32
  exponential) against the plain evaluation (a loop over the filters in float64, written
  here as the reference), on a synthetic cluster of the sample night's size drawn from the
  PARSEC isochrones: seconds per evaluation and the difference of the log-likelihoods.
- ``fit_isochrone_grid`` on 10 nodes: seconds per node.
- With ``--work DIR`` (a work folder where chapters 01-04 ran), the run time of
  notebooks/05-cmd.ipynb executed into it.

Prints a markdown table and writes ``benchmarks/results/cmd.json``. Run from the repository
root: ``python -m benchmarks.bench_cmd [--repeat N] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def plain_log_likelihood(model, points, mu, ebv, field_fraction):
    """The same likelihood as IsochroneModel.log_likelihood, written plainly in float64."""
    pts, w = points
    mod = pts + mu + model.extinction * ebv
    inside = (mod[:, 0] >= model.window[0]) & (mod[:, 0] <= model.window[1])
    mod, w = mod[inside], w[inside] / w[inside].sum()
    total = 0.0
    for star, var in zip(model.mags, model.var, strict=True):
        chi2 = np.sum((star - mod) ** 2 / var, axis=1)
        like = np.sum(w * np.exp(-0.5 * chi2)) / np.sqrt(np.prod(2 * np.pi * var))
        total += np.log((1 - field_fraction) * like
                        + field_fraction * np.exp(model.log_field_density))
    return total


def synthetic(isochrones, rng, n=360):
    from datared import cmd

    iso = cmd.isochrone(isochrones, 8.65, 0.0)
    mass = rng.uniform(0.6, float(iso["Mini"].max()), n)
    mags = np.column_stack([np.interp(mass, iso["Mini"], iso[b]) for b in "gri"])
    mags = mags + 10.8 + np.array([cmd.EXTINCTION_PER_EBV[b] for b in "gri"]) * 0.25
    keep = (mags[:, 0] > 11) & (mags[:, 0] < 18.5)
    errs = np.full((keep.sum(), 3), 0.01)
    return mags[keep] + rng.normal(0, 0.01, errs.shape), errs


def best_of(repeat, func):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        value = func()
        times.append(time.perf_counter() - start)
    return min(times), value


def main(argv=None) -> int:
    from datared import cmd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None,
                        help="work folder with chapters 01-04 done: also time chapter 05")
    args = parser.parse_args(argv)
    isochrones = cmd.read_isochrones(cmd.isochrone_file(), ["g", "r", "i"],
                                     log_age_range=(8.3, 9.0))
    mags, errs = synthetic(isochrones, np.random.default_rng(1))
    model = cmd.IsochroneModel(bands=["g", "r", "i"], mags=mags, errors=errs,
                               extinction=[cmd.EXTINCTION_PER_EBV[b] for b in "gri"])
    points = model.model_points(cmd.isochrone(isochrones, 8.65, 0.0))
    t_fast, fast = best_of(args.repeat,
                           lambda: model.log_likelihood(points, 10.8, 0.25, 0.05))
    t_plain, plain = best_of(max(1, args.repeat // 2),
                             lambda: plain_log_likelihood(model, points, 10.8, 0.25, 0.05))
    ages = [8.45, 8.5, 8.55, 8.6, 8.65, 8.7, 8.75, 8.8, 8.85, 8.9]
    t_grid, grid = best_of(1, lambda: cmd.fit_isochrone_grid(
        model, isochrones, log_ages=ages, mhs=[0.0], start=(10.5, 0.2), coarse_step=1))
    rows = [("likelihood, datared (matrix products, float32 exp)", f"{t_fast * 1e3:.1f} ms"),
            ("likelihood, plain loop over stars (float64)", f"{t_plain * 1e3:.1f} ms"),
            ("ratio plain / datared", f"{t_plain / t_fast:.1f}"),
            ("log-likelihood difference", f"{abs(fast - plain):.2e}"),
            ("grid fit, seconds per node", f"{t_grid / len(ages):.2f} s"),
            ("best node (truth 8.65)", f"{grid.best['log_age']:.2f}")]
    result = {"stars": len(mags), "model_points": len(points[0]), "likelihood_s": t_fast,
              "plain_likelihood_s": t_plain, "loglike_difference": abs(fast - plain),
              "grid_s_per_node": t_grid / len(ages), "machine": platform.platform()}
    if args.work is not None:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tests.execute", "--work", str(args.work),
                               "05"], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        rows.append(("chapter 05 executed (s)", f"{elapsed:.0f}" if proc.returncode == 0
                     else f"failed ({proc.stderr.strip().splitlines()[-1:]})"))
        result["chapter_s"] = elapsed
    print(f"{len(mags)} stars, {len(points[0])} model points\n")
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "cmd.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
