"""Run every benchmark module ``benchmarks/bench_<name>.py`` (or the names given).

Each module's ``main(argv)`` prints a markdown table and writes
``benchmarks/results/<name>.json``. Compare ratios measured in the same run: the machines
are shared and noisy.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the benchmark modules, in file order."""
    return [p.stem.removeprefix("bench_") for p in sorted(HERE.glob("bench_*.py"))]


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}")
        return 2
    for name in names:
        print(f"\n## {name}\n")
        start = time.perf_counter()
        importlib.import_module(f"benchmarks.bench_{name}").main([])
        print(f"\n({name}: {time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
