"""Benchmark: seconds per full-size (256 x 256 x 252) phantom subject on one core, generation and writing apart.

Run ``python -m benchmarks.bench_phantom`` (prints a table) or call :func:`run` (returns a dict, for
``benchmarks/run.py``). Thread pools are limited to one thread before numpy is imported, so the figures are
per core. Never part of the test suite.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from landmark_unet.data.phantom import PhantomConfig, generate_subject, write_subject  # noqa: E402


def run(n_subjects: int = 3, seed: int = 0, shape: tuple[int, int, int] = (256, 256, 252)) -> dict:
    """Time ``generate_subject`` and ``write_subject`` for ``n_subjects`` subjects (after one warm-up).

    Returns:
        {"phantom_seconds_per_subject": generation + writing (median), "phantom_generate_seconds": median,
         "phantom_write_seconds": median, "phantom_mb_per_subject": size on disk, "shape": [...], "n_subjects": n}
    """
    cfg = PhantomConfig(shape=tuple(shape))
    gen, wri, sizes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_phantom_") as tmp:
        generate_subject(seed, 10_000, PhantomConfig(shape=(32, 32, 32)))  # warm-up: imports, tables
        for i in range(n_subjects):
            t0 = time.perf_counter()
            subject = generate_subject(seed, i, cfg)
            t1 = time.perf_counter()
            out = Path(tmp) / f"sub{i:03d}"
            write_subject(subject, out)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            wri.append(t2 - t1)
            sizes.append(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6)
            del subject
    g, w = statistics.median(gen), statistics.median(wri)
    return {
        "phantom_seconds_per_subject": g + w,
        "phantom_generate_seconds": g,
        "phantom_write_seconds": w,
        "phantom_mb_per_subject": statistics.median(sizes),
        "shape": list(shape),
        "n_subjects": n_subjects,
    }


def main() -> None:
    res = run()
    print(f"phantom {res['shape']}: generate {res['phantom_generate_seconds']:.2f} s + write "
          f"{res['phantom_write_seconds']:.2f} s = {res['phantom_seconds_per_subject']:.2f} s per subject "
          f"(one core, median of {res['n_subjects']}), {res['phantom_mb_per_subject']:.1f} MB on disk")
    json.dump(res, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
