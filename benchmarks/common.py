"""What several benchmarks share: the full-size phantom DataModule, the measured matmul peak, device sync."""

from __future__ import annotations

import os
import time

import torch

FULL_SIZE = {"shape": [256, 256, 252], "fov_mm": [480.0, 480.0, 1008.0]}
PEAK_DTYPE = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # by precision


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that wall time measures the work itself."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dtype: torch.dtype, dev: torch.device, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the fastest of ``repeats`` square matmuls of size n (default 4096 on the CPU, 8192 on a GPU): the
    machine's practical dense peak for ``dtype``, against which FLOP utilisation is reported."""
    n = n or (8192 if dev.type == "cuda" else 4096)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# Dense (no structured sparsity) bf16 / fp16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s (the sparse figure
# halved), by a part of torch.cuda.get_device_name(); more specific names first. The GPU target names "the card's
# dense bf16 peak": reported beside the matmul measured in each run, which on an H200 reached 778-786 of its 989.
DATASHEET_DENSE_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                          ("H100", 989.5), ("A100", 312.0))


def datasheet_peak(name: str, precision: str) -> float | None:
    """The datasheet's dense tensor-core peak in FLOP/s of the GPU called ``name`` for a ``bf16-mixed`` or
    ``16-mixed`` run; None for fp32, a CPU or a card not in :data:`DATASHEET_DENSE_TFLOPS`."""
    if precision not in ("bf16-mixed", "16-mixed"):
        return None
    return next((tflops * 1e12 for part, tflops in DATASHEET_DENSE_TFLOPS if part in name), None)


def cache_dir() -> str:
    return os.environ.get("LANDMARK_UNET_BENCH_CACHE", ".cache/bench")


def full_size_datamodule(subjects: int = 50, workers: int = 2, organs=("liver",), channels=("fat", "water"),
                         batch_size: int = 10, **kwargs):
    """The real SliceDataModule over ``subjects`` full-size (256 x 256 x 252) phantom bodies, round 0 of 5,
    cached under :func:`cache_dir` (generated and preprocessed on first use)."""
    from landmark_unet.data.datamodule import SliceDataModule

    phantom = {"n_subjects": subjects, "seed": 0, **FULL_SIZE, "workers": workers}
    split = {"rounds": 5, "round": 0, "val_fraction": 0.15, "seed": 0}
    return SliceDataModule(source="phantom", cache_dir=cache_dir(), organs=list(organs), channels=list(channels),
                           phantom=phantom, split=split, batch_size=batch_size, num_workers=workers,
                           cache_workers=workers, **kwargs)


def median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return float(xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)
