"""Benchmark of the night simulator: generation time and peak memory per frame.

Each preset runs in its own subprocess (so its peak resident memory is its own) and writes a
night into a temporary folder that is deleted afterwards. The full preset is capped with
``max_per_group`` to a handful of frames. Prints a markdown table and writes
``benchmarks/results/simulate.json``.

    python -m benchmarks.bench_simulate [--small-per-group N] [--full-per-group N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from datared.sim import simulate_night
from astropy.table import Table
out, preset, per_group = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
night = simulate_night(out, preset=preset, max_per_group=per_group, progress=False)
seconds = time.perf_counter() - t0
frames = Table.read(Path(night) / "truth" / "frames.ecsv")
size = sum(p.stat().st_size for p in Path(night).rglob("*") if p.is_file())
print(json.dumps({"seconds": seconds, "n_frames": len(frames),
                  "n_light": int((frames["imagetyp"] == "LIGHT").sum()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "disk_mb": size / 1e6}))
"""


def run_preset(preset: str, per_group: int) -> dict:
    """Generate one capped night in a subprocess; return its timing and memory figures."""
    from datared.sim import PRESETS

    with tempfile.TemporaryDirectory(prefix="datared-bench-sim-") as tmp:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(tmp) / "night"), preset,
                               str(per_group)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"simulating the {preset} preset failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ny, nx = PRESETS[preset].shape
    res.update(preset=preset, max_per_group=per_group, shape=[ny, nx],
               megapixels=nx * ny / 1e6,
               seconds_per_frame=res["seconds"] / res["n_frames"],
               seconds_per_megapixel=res["seconds"] / res["n_frames"] / (nx * ny / 1e6))
    return res


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a markdown table, write benchmarks/results/simulate.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-per-group", type=int, default=5)
    parser.add_argument("--full-per-group", type=int, default=1)
    args = parser.parse_args(argv)
    rows = [run_preset("small", args.small_per_group), run_preset("full", args.full_per_group)]
    small, full = rows
    summary = {
        "rows": rows,
        "full_over_small_pixels": full["megapixels"] / small["megapixels"],
        "full_over_small_seconds_per_frame": full["seconds_per_frame"] / small["seconds_per_frame"],
        "full_over_small_peak_rss": full["peak_rss_mb"] / small["peak_rss_mb"],
    }
    print("| preset | frame (px) | frames | s total | s/frame | s/Mpx | peak RSS (MB) | disk (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} (max {r['max_per_group']}/group) | {r['shape'][1]}x{r['shape'][0]} "
              f"| {r['n_frames']} | {r['seconds']:.1f} | {r['seconds_per_frame']:.2f} "
              f"| {r['seconds_per_megapixel']:.3f} | {r['peak_rss_mb']:.0f} | {r['disk_mb']:.0f} |")
    print(f"\nfull/small in this run: {summary['full_over_small_pixels']:.1f}x the pixels, "
          f"{summary['full_over_small_seconds_per_frame']:.1f}x the time per frame, "
          f"{summary['full_over_small_peak_rss']:.1f}x the peak memory.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulate.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
