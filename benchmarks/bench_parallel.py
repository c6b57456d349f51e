"""A sweep's jobs side by side on a CPU: ``hydra/launcher=submitit_local`` with each job given its share of the cores
against each job running as many threads as there are cores, and against the default launcher's one job at a time.

    python -m benchmarks.bench_parallel [--jobs 2] [--rounds 2] [--epochs 6]

The sweep: ``experiment=quick organ=liver`` over ``jobs`` seeds, ``trainer.max_epochs=epochs``. Arms, alternating
for ``rounds`` rounds, each a whole ``python -m landmark_unet.train -m`` process timed from start to end:

- ``shared``: submitit_local, ``hydra.launcher.cpus_per_task`` = cores // jobs, so each job's ``cpu_threads``
  follows (:func:`landmark_unet.launch.set_cpu_threads`);
- ``oversubscribed``: submitit_local, ``cpu_threads`` = cores in every job (what each job ran before ``cpu_threads``
  read the launcher: torch's default);
- ``sequential``: the basic launcher, one job after another with every core.

Reports each arm's median seconds per sweep and the ratios ``oversubscribed / shared`` and ``sequential / shared``
(above 1: sharing the cores is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import cache_dir, median


def sweep_seconds(arm: str, jobs: int, epochs: int, folder: Path) -> float:
    """Wall seconds of one sweep of ``jobs`` quick runs under ``arm`` (module docstring)."""
    cores = os.cpu_count() or 1
    args = ["experiment=quick", "organ=liver", f"trainer.max_epochs={epochs}",
            f"seed={','.join(str(s) for s in range(jobs))}", f"hydra.sweep.dir={folder}", f"paths.cache_dir={Path(cache_dir()).resolve()}"]
    if arm != "sequential":
        args += ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=60"]
    if arm == "shared":
        args.append(f"hydra.launcher.cpus_per_task={max(1, cores // jobs)}")
    elif arm == "oversubscribed":
        args.append(f"cpu_threads={cores}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "landmark_unet.train", "-m", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} sweep failed:\n{proc.stderr[-3000:]}")
    done = list(folder.glob("*/metrics.json"))
    if len(done) != jobs:
        raise RuntimeError(f"{arm} sweep: {len(done)} of {jobs} runs wrote metrics.json")
    threads = {json.loads(p.read_text())["cpu_threads"] for p in done}
    expected = max(1, cores // jobs) if arm == "shared" else cores
    if threads != {expected}:
        raise RuntimeError(f"{arm} sweep ran with cpu_threads {sorted(threads)}, expected {expected}")
    return seconds


def run(jobs: int = 2, rounds: int = 2, epochs: int = 6) -> dict:
    arms = ("shared", "oversubscribed", "sequential")
    times: dict[str, list[float]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        sweep_seconds("sequential", 1, 1, Path(tmp, "warm"))  # the phantom's cache, built once before timing
        for r in range(rounds):
            for a in arms if r % 2 == 0 else arms[::-1]:
                times[a].append(sweep_seconds(a, jobs, epochs, Path(tmp, f"{a}{r}")))
    sec = {a: median(t) for a, t in times.items()}
    return {"jobs": jobs, "epochs": epochs, "cores": os.cpu_count(), "seconds": times,
            **{f"parallel_sweep_seconds_{a}": s for a, s in sec.items()},
            "parallel_oversubscribed_vs_shared": sec["oversubscribed"] / sec["shared"],
            "parallel_sequential_vs_shared": sec["sequential"] / sec["shared"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    print(json.dumps(run(args.jobs, args.rounds, args.epochs), indent=2))


if __name__ == "__main__":
    main()
