"""Data-side benchmark at the study's size: loader rate vs model consumption rate, and data-side memory.

    python -m benchmarks.bench_data [--subjects 50] [--workers 2]

1. Generates (once, cached) a phantom of full-size 256 x 256 x 252 subjects and builds the preprocessed cache,
   timing first-run preprocessing and reload.
2. Iterates one training epoch (organ slices, batch 10) and one evaluation pass (every slice of the test bodies)
   through the real DataModule and DataLoader, with no model: slices per second and peak resident memory of the
   data side (this process plus its loader workers).
3. Times training steps of the study's 2D model (classic U-Net 64-1024, batch 10 x 2 x 256 x 256, RMSprop, fp32) in
   the same process: slices per second the model consumes.
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


def run(subjects: int = 50, workers: int = 2, model_steps: int = 3, cache_dir: str | None = None) -> dict:
    import torch

    from landmark_unet.data.datamodule import SliceDataModule

    cache_dir = cache_dir or os.environ.get("LANDMARK_UNET_BENCH_CACHE", ".cache/bench")
    phantom = {"n_subjects": subjects, "seed": 0, "shape": [256, 256, 252], "fov_mm": [480.0, 480.0, 1008.0],
               "workers": workers}
    split = {"rounds": 5, "round": 0, "val_fraction": 0.15, "seed": 0}

    def datamodule():
        return SliceDataModule(source="phantom", cache_dir=cache_dir, organs=["liver"], channels=["fat", "water"],
                               phantom=phantom, split=split, batch_size=10, num_workers=workers, cache_workers=workers)

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

    from landmark_unet.models.unet2d import UNet2d

    torch.manual_seed(0)
    net = UNet2d(2, 1, features=64, depth=4)
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-5, weight_decay=1e-8, momentum=0.9)
    x, y = torch.randn(10, 2, 256, 256), (torch.rand(10, 1, 256, 256) > 0.5).float()
    times = []
    for _ in range(model_steps):
        t = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    model_rate = 10 / min(times[1:] or times)
    return {
        "subjects": subjects,
        "phantom_generation_seconds_total": t_phantom,
        "cache_first_build_seconds_per_subject": t_setup_first / subjects,
        "cache_reload_seconds_per_subject": t_setup_reload / subjects,
        "train_slices_per_epoch": n_train,
        "loader_train_slices_per_s": train_rate,
        "loader_eval_slices_per_s": eval_rate,
        "model_train_slices_per_s": model_rate,
        "data_vs_model_ratio": train_rate / model_rate,
        "data_peak_rss_gib": peak,
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
