"""Data-side benchmark at the study's size: loader rate vs model consumption rate, and data-side memory.

    python -m benchmarks.bench_data [--subjects 50] [--workers 2]

1. Generates (once, cached) a phantom of full-size 256 x 256 x 252 subjects and builds the preprocessed cache,
   timing first-run preprocessing and reload.
2. Iterates two training epochs (organ slices, batch 10; the first starts the loader workers, the second runs
   with them warm, as every later epoch of a run does) and one evaluation pass (every slice of the test bodies)
   through the real DataModule and DataLoader, with no model: slices per second and peak resident memory of the
   data side (this process plus its loader workers), summed as RSS (``peak_rss_gib``: the pages the workers share
   with this process counted once per process, an upper bound) and as PSS (``data_peak_pss_gib``: counted once).
3. ``data.on_device``: copies the training bodies' slices into the device's memory
   (:class:`~landmark_unet.data.device_slices.DeviceSlices`) and gathers one shuffled epoch of batches of 10 there,
   each batch's slice indices sent from the host as a training loader sends them: slices per second (on a CPU it
   measures the gather in RAM; the figure that matters is a GPU's); then the same bodies as Table 4's training
   input, depth-5 stacks with random 208 x 208 crops in batches of 4 (``device_gather_cropped_stacks_per_s``).
4. Times training steps of the study's 2D model at its fastest here (classic U-Net 64-1024, batch 10 x 2 x 256 x 256,
   RMSprop, channels-last, bf16-mixed) in the same process, fed by the same loader: slices per second the model
   consumes.
Reports the ratio loader/model (target >= 20) and the peak memory (target <= 2 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process, KiB, from /proc/PID/smaps_rollup (Linux >= 4.14); (0, 0) once it has exited.
    RSS counts every page the process has resident, PSS splits each page shared by n processes into n parts."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return kids


def memory_tree_gib() -> tuple[float, float]:
    """Resident memory of this process and all its descendants (loader workers), GiB: (sum of RSS, sum of PSS).
    Forked workers share the pages they inherited from this process until one writes them, so the RSS sum counts
    each shared page once per process (an upper bound), and the PSS sum counts it once in all (what the tree
    occupies)."""
    rss = pss = 0
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        r, p = _memory_kib(pid)
        rss, pss = rss + r, pss + p
        todo += _children(pid)
    return rss / 2**20, pss / 2**20


class PeakMemory:
    """Peaks of :func:`memory_tree_gib` (``rss``, ``pss``), sampled every ``interval`` s by a background thread
    while in the ``with`` block (sampling between batches in the loop itself slowed the loop it measures: a /proc
    walk per batch)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.rss, self.pss = memory_tree_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _update(self) -> None:
        rss, pss = memory_tree_gib()
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()


def device_gather(dm, dev, batch_size: int = 10) -> dict:
    """``data.on_device`` at the study's 2D setting: seconds to copy the training bodies' organ slices into the
    memory of ``dev``, its size, and the slices per second of gathering one shuffled epoch there in batches of
    ``batch_size`` (the indices of each batch copied from the host, as the loader sends them)."""
    import numpy as np
    import torch

    from benchmarks.common import sync
    from landmark_unet.data.device_slices import DeviceSlices
    from landmark_unet.data.slices import widen

    ds = dm.dataset("train", organ_slices_only=True)
    t0 = time.perf_counter()
    store = DeviceSlices(ds, dev)
    sync(dev)
    build = time.perf_counter() - t0
    order = ds.index[np.random.default_rng(0).permutation(len(ds))]
    rates = []
    for _ in range(2):  # the first pass warms the allocator
        sync(dev)
        t0 = time.perf_counter()
        for i in range(0, len(order), batch_size):
            batch = widen(store.gather(torch.from_numpy(order[i:i + batch_size]).to(dev, non_blocking=True)))
        sync(dev)
        rates.append(len(order) / (time.perf_counter() - t0))
    assert batch["image"].shape[1:] == (len(ds.channels), *ds.size)
    out = {"device_gather_train_slices_per_s": rates[1], "device_slices_build_seconds": build,
           "device_slices_gib": store.nbytes() / 2**30}
    del store
    out["device_gather_cropped_stacks_per_s"] = cropped_stacks_rate(ds, dev, batch_size=4)
    return out


def cropped_stacks_rate(ds, dev, batch_size: int, crop: int = 208) -> float:
    """Depth-5 stacks with random ``crop x crop`` windows (Table 4's training input) gathered per second on
    ``dev`` from the bodies of ``ds`` (``data.on_device`` with ``data.crop``), in batches of ``batch_size`` (the
    depth-5 network's 4); rows and corners computed on the host as the loader does."""
    import copy

    import numpy as np

    from benchmarks.common import sync
    from landmark_unet.data.device_slices import DeviceSlices, SliceRows
    from landmark_unet.data.slices import widen

    stacks = copy.copy(ds)  # the same bodies and slices, as depth-5 stacks with crops
    stacks.stack, stacks.crop = 5, crop
    store = DeviceSlices(stacks, dev)
    rows = SliceRows(stacks.index, "train", crop, [e.shape[:2] for e in stacks.entries])
    rng = np.random.default_rng(0)
    draws = [(int(p), *rng.random(2).tolist()) for p in rng.permutation(len(stacks))]
    rates = []
    for _ in range(2):  # the first pass warms the allocator
        sync(dev)
        t0 = time.perf_counter()
        for i in range(0, len(draws), batch_size):
            batch = widen(store.gather(rows.__getitems__(draws[i:i + batch_size])["rows"].to(dev, non_blocking=True)))
        sync(dev)
        rates.append(len(draws) / (time.perf_counter() - t0))
    assert batch["image"].shape[1:] == (len(ds.channels), 5, crop, crop)
    del store
    return rates[1]


def run(subjects: int = 50, workers: int = 2, model_steps: int = 3) -> dict:
    from benchmarks.common import cache_dir, device, full_size_datamodule
    from landmark_unet import host_memory

    host_memory.reuse_freed_memory(True)  # as the entry points run (reuse_host_memory=true)

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

    with PeakMemory() as memory:
        loader = dm.train_dataloader()
        rates = []
        for _ in range(2):  # the first epoch starts the (persistent) workers, the second is the steady state
            n, t0 = 0, time.perf_counter()
            for batch in loader:
                n += len(batch["image"])
            rates.append(n / (time.perf_counter() - t0))
        train_rate = rates[0]
        n_train = n
        n, t0 = 0, time.perf_counter()
        for batch in dm.test_dataloader():
            n += len(batch["image"])
        eval_rate = n / (time.perf_counter() - t0)
    dev = device()
    gather = device_gather(dm, dev)

    from benchmarks.bench_train import plain_arm, study_module
    # the model at its fastest here (channels-last, bf16-mixed, on the GPU when there is one), fed by the same loader
    steps = model_steps if dev.type == "cpu" else 10 * model_steps  # GPU steps take milliseconds
    model_rate = 10 / min(plain_arm(study_module(), dm, "bf16-mixed", steps, dev))
    return {
        "subjects": subjects,
        "phantom_generation_seconds_total": t_phantom,
        "cache_was_empty": fresh,
        "cache_first_build_seconds_per_subject": t_setup_first / subjects if fresh else None,
        "cache_reload_seconds_per_subject": t_setup_reload / subjects,
        "train_slices_per_epoch": n_train,
        "loader_train_slices_per_s": train_rate,
        "loader_train_slices_per_s_second_epoch": rates[1],
        "data_vs_model_ratio_second_epoch": rates[1] / model_rate,
        "loader_eval_slices_per_s": eval_rate,
        "model_train_slices_per_s": model_rate,
        "data_vs_model_ratio": train_rate / model_rate,
        **gather,
        "device_gather_vs_model_ratio": gather["device_gather_train_slices_per_s"] / model_rate,
        "data_peak_rss_gib": memory.rss,
        "peak_rss_gib": memory.rss,
        "data_peak_pss_gib": memory.pss,
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
