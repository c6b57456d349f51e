"""What a run writes about itself: metrics.json, its overrides, environment and summary lines."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.metrics import per_body_table

if TYPE_CHECKING:  # Lightning only for annotations: predict and evaluate start without importing it
    import pytorch_lightning as pl


def run_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job ([] outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not running under @hydra.main (tests compose configs directly)
        return []


def run_postprocess(run_dir: Path) -> dict:
    """The post-processing chosen on the validation bodies by a run (its metrics.json ``postprocess``), or {}."""
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text()).get("postprocess") or {}
    except (OSError, ValueError):
        return {}


def checkpoint_callback(trainer: pl.Trainer) -> pl.callbacks.ModelCheckpoint | None:
    return trainer.checkpoint_callback


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def peak_memory_gib() -> dict[str, float]:
    """Peak host resident memory of this process and, on CUDA, peak allocated GPU memory, in GiB."""
    out = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def machine() -> dict:
    """The CPU (its name, and which of the vector and matrix extensions :data:`CPU_FLAGS` it has), its cores, the
    platform and the GPU. oneDNN picks its kernels by those extensions, and runs of the same seed on two CPUs have
    come out different (each deterministic): benchmarks/README.md, session 13."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


PACKAGES = ("torch", "pytorch_lightning", "hydra-core", "omegaconf", "torchmetrics", "numpy", "scipy", "nibabel",
            "monai", "landmark_unet")


def versions() -> dict[str, str]:
    """Python, the packages a run's numbers depend on, and the git commit of the code (with ``git_dirty`` when
    the working tree had uncommitted changes), where the package runs from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            pass
    repo = Path(__file__).resolve().parent
    try:
        git = [subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=repo)
               for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])]
        if git[0].returncode == 0:
            info["git_commit"] = git[0].stdout.strip()
            info["git_dirty"] = bool(git[1].stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_metrics(path: Path | None, model, datamodule, extra: dict) -> dict:
    """Assemble metrics.json from the model's test result and write it atomically (not when ``path`` is None:
    the other ranks of a DDP run)."""
    ids, dice = model.test_result
    memory = peak_memory_gib()
    metrics = {
        "test": per_body_table(ids, dice, datamodule.subject_names, model.organs),
        **extra,
        "peak_memory_gib": memory.get("peak_gpu_gib", memory["peak_host_rss_gib"]),
        **memory,
        "split": {k: len(v) for k, v in datamodule.split.items() if isinstance(v, list)},
        "versions": versions(),
        "machine": machine(),
    }
    if path is not None:
        atomic_write_bytes(path, json.dumps(metrics, indent=2).encode())
    return metrics


def nothing_predicted(history: dict[str, list[float]], epochs: int = 3) -> list[str]:
    """Warnings for the organs a run predicted nowhere in the validation bodies in each of its last ``epochs``
    validation epochs (``val/volume_ratio/<organ>`` 0 in :class:`~landmark_unet.lit.callbacks.MetricHistory`'s
    curves), one line each.

    Such a network keeps every output below the threshold. A small network can learn that and stay there while its
    loss still falls: the quick configuration's 8-channel U-Net did for 1 seed in 20, its 1 x 1 output weights
    all negative after ReLU features, so the liver's probability stopped at 0.47 (benchmarks/README.md). Its kept
    checkpoint is then an early epoch's, and its test Dice reads as a failed setting."""
    out = []
    loss = [v for v in history.get("val/loss", []) if v == v]
    for key, series in history.items():
        if not key.startswith("val/volume_ratio/") or len(series) < epochs or any(v != 0 for v in series[-epochs:]):
            continue
        organ = key.rsplit("/", 1)[1]
        trend = f"; validation loss {loss[0]:.4g} -> {loss[-1]:.4g}" if len(loss) > 1 else ""
        out.append(f"{organ}: no voxel predicted in the validation bodies in the last {epochs} epochs{trend}: "
                   f"the network's outputs stay below the threshold; train it longer, with another seed or a wider "
                   f"network (model.net.features)")
    return out


def summary_lines(metrics: dict) -> list[str]:
    """One line per organ: mean and std of the per-body test Dice; then the run's warnings, one line each."""
    spe = metrics.get("seconds_per_epoch")
    tail = f", {spe:.1f} s/epoch" if isinstance(spe, float) and spe == spe else ""
    return [
        f"{organ:<9} test Dice {m['dice_mean']:.4f} ± {m['dice_std']:.4f} over {len(m['per_body'])} bodies{tail}"
        for organ, m in metrics["test"].items()
    ] + [f"warning: {w}" for w in metrics.get("warnings") or []]
