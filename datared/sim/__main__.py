"""Command line of the simulator: write a sample night into a folder given as an argument.

::

    python -m datared.sim --out DIR [--preset small] [--seed N] [--max-per-group N]
    python -m datared.sim --out DIR --preset small --seed N --if-missing

Every night gets ``DIR/datared.toml``, its settings for ``DATARED_CONFIG=DIR/datared.toml``.
``--if-missing`` does nothing when ``DIR`` already holds this night (same preset, seed and
simulator code) or frames of a real night. Every setting comes from the arguments; the
book's ``make sample`` passes ``config.data_dir``, ``config.sample_preset`` and
``config.sample_seed``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datared.io import find_fits
from datared.sim.night import (
    DEFAULT_SEED,
    PRESETS,
    SETTINGS_FILE,
    is_current_sample_night,
    is_sample_night,
    simulate_night,
)


def _generate_if_missing(target: Path, preset: str, seed: int, max_per_group: int | None,
                         progress: bool) -> int:
    """Generate the night at ``target`` unless it is there already or ``target`` holds a
    real night; return the exit status."""
    if is_current_sample_night(target, preset, seed, max_per_group):
        print(f"Sample night already present at {target}: nothing to do.")
        return 0
    if is_sample_night(target):
        print(f"{target} holds a sample night from another version of the simulator (or "
              "another preset or seed): generating it again.")
    elif target.is_dir() and any(target.iterdir()):
        if find_fits(target):
            print(f"{target} holds FITS frames but no sample-night truth: treating it as a "
                  "real night and generating nothing.")
            return 0
        print(f"{target} is not empty and holds no night: refusing to write there. Empty "
              "it or choose another --out folder (for `make sample`: set DATARED_DATA_DIR "
              "or data_dir in config.py).", file=sys.stderr)
        return 1
    print(f"Generating the {preset} sample night (seed {seed}) at {target} ...")
    simulate_night(target, preset, seed, max_per_group, progress=progress)
    print(f"Done: {target}")
    print(f"Its settings file: {target / SETTINGS_FILE} (for DATARED_CONFIG)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m datared.sim",
                                     description="Generate the simulated sample night.")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder of the night (created; a previous sample night there is "
                             "replaced, any other content is refused)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="N")
    parser.add_argument("--max-per-group", type=int, default=None, metavar="N",
                        help="keep at most N frames per group (default: all)")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing if --out already holds this night (same preset, "
                             "seed and simulator code) or the FITS frames of a real night")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.out.strip():
        parser.error("--out is empty: give the folder of the night")
    out = Path(args.out).expanduser()
    if args.if_missing:
        return _generate_if_missing(out, args.preset, args.seed, args.max_per_group,
                                    progress=not args.no_progress)
    out = simulate_night(out, args.preset, args.seed, args.max_per_group,
                         progress=not args.no_progress)
    print(f"Wrote the {args.preset} night (seed {args.seed}) to {out}")
    print(f"Its settings file: {out / SETTINGS_FILE} (for DATARED_CONFIG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
