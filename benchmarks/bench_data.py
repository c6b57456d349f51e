"""Data-side benchmark at the study's size: loader rate vs model consumption rate, and data-side memory.

    python -m benchmarks.bench_data [--subjects 50] [--workers 2]

1. Generates (once, cached) a phantom of full-size 256 x 256 x 252 subjects and builds the preprocessed cache,
   timing first-run preprocessing and reload.
2. Iterates one training epoch (organ slices, batch 10) and one evaluation pass (every slice of the test bodies)
   through the real DataModule and DataLoader, with no model: slices per second and peak resident memory of the
   data side (this process plus its loader workers).
3. Times training steps of the study's 2D model at its fastest here (classic U-Net 64-1024, batch 10 x 2 x 256 x 256,
   RMSprop, channels-last, bf16-mixed) in the same process, fed by the same loader: slices per second the model
   consumes.
Reports the ratio loader/model (target >= 20) and the peak memory (target <= 2 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return kids


def rss_tree_gib() -> float:
    """Current resident memory of this process and all its descendants (loader workers), GiB (Linux /proc)."""
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += _rss_kib(pid)
        todo += _children(pid)
    return total / 2**20


def run(subjects: int = 50, workers: int = 2, model_steps: int = 3) -> dict:
    import torch

    from benchmarks.common import cache_dir, full_size_datamodule

    def datamodule():
        return full_size_datamodule(subjects=subjects, workers=workers)

    fresh = not any(Path(cache_dir(), "subjects").glob("*"))  # else "first build" only reloads
    t0 = time.perf_counter()
    dm = datamodule()
    dm.prepare_data()
    t_phantom = time.perf_counter() - t0
    t0 = time.perf_counter()
    dm.setup("fit")
    t_setup_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    dm2 = datamodule()
    dm2.setup("fit")
    t_setup_reload = time.perf_counter() - t0
    del dm2

    peak = rss_tree_gib()
    n, t0 = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        n += len(batch["image"])
        peak = max(peak, rss_tree_gib())
    train_rate = n / (time.perf_counter() - t0)
    n_train = n
    n, t0 = 0, time.perf_counter()
    for batch in dm.test_dataloader():
        n += len(batch["image"])
        peak = max(peak, rss_tree_gib())
    eval_rate = n / (time.perf_counter() - t0)

    from benchmarks.bench_train import plain_arm, study_module

    # the model at its fastest here (channels-last, bf16-mixed), fed by the same loader
    model_rate = 10 / min(plain_arm(study_module(), dm, "bf16-mixed", model_steps, torch.device("cpu")))
    return {
        "subjects": subjects,
        "phantom_generation_seconds_total": t_phantom,
        "cache_was_empty": fresh,
        "cache_first_build_seconds_per_subject": t_setup_first / subjects if fresh else None,
        "cache_reload_seconds_per_subject": t_setup_reload / subjects,
        "train_slices_per_epoch": n_train,
        "loader_train_slices_per_s": train_rate,
        "loader_eval_slices_per_s": eval_rate,
        "model_train_slices_per_s": model_rate,
        "data_vs_model_ratio": train_rate / model_rate,
        "data_peak_rss_gib": peak,
        "peak_rss_gib": peak,
        "data_peak_rss_main_gib_ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = run(args.subjects, args.workers)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
