"""Clinical scores of one predicted mask against its reference, per organ and per body, and their summary.

- **Dice** (DESIGN.md): ``2|X∩Y| / (|X|+|Y|)`` on the whole 3D volume, 1 when both are empty.
- **HD95** (mm): the 95th percentile of the symmetric surface distances (MONAI's ``compute_hausdorff_distance``
  with ``percentile=95`` and the voxel spacing). 0 when both are empty; undefined (``None``) when exactly one is.
- **NSD** (normalised surface Dice at a tolerance in mm; MONAI's ``compute_surface_dice``): the share of both
  surfaces lying within the tolerance of the other. 1 when both are empty, 0 when exactly one is.
- **Volume** (ml) of prediction and reference, and their difference (prediction - reference).

``summary.json`` follows nnU-Net's layout: ``metric_per_case`` (one entry per body and organ) and ``mean`` (per
organ, over bodies; an undefined HD95 is left out of its mean and counted in ``hd95_undefined``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.metrics import dice_volume

METRICS = ("dice", "hd95_mm", "nsd", "volume_pred_ml", "volume_ref_ml", "volume_diff_ml")


def score_masks(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 3.0) -> dict:
    """Scores of one binary prediction (X, Y, Z) against its reference on the same grid of voxel size ``spacing``
    (mm, one value per array axis)."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {"dice": dice_volume(pred, ref)}
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        p = torch.from_numpy(pred)[None, None]
        r = torch.from_numpy(ref)[None, None]
        spacing = [float(s) for s in spacing]
        out["hd95_mm"] = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                          spacing=spacing))
        out["nsd"] = float(compute_surface_dice(p, r, class_thresholds=[float(tolerance_mm)],
                                                include_background=True, spacing=spacing))
    else:
        out["hd95_mm"] = 0.0 if not (has_pred or has_ref) else None
        out["nsd"] = 1.0 if not (has_pred or has_ref) else 0.0
    out["volume_pred_ml"] = float(pred.sum()) * voxel_ml
    out["volume_ref_ml"] = float(ref.sum()) * voxel_ml
    out["volume_diff_ml"] = out["volume_pred_ml"] - out["volume_ref_ml"]
    return out


def summarise(rows: list[dict]) -> dict:
    """Per organ: the mean and standard deviation of each metric over bodies (``rows``: ``case``, ``organ`` and the
    :data:`METRICS`)."""
    mean: dict[str, dict] = {}
    for organ in dict.fromkeys(r["organ"] for r in rows):
        of = [r for r in rows if r["organ"] == organ]
        entry: dict = {"n": len(of)}
        for m in METRICS:
            values = [r[m] for r in of if r[m] is not None and not math.isnan(r[m])]
            entry[m] = float(np.mean(values)) if values else None
            entry[f"{m}_std"] = float(np.std(values)) if values else None
        entry["hd95_undefined"] = sum(r["hd95_mm"] is None for r in of)
        mean[organ] = entry
    return mean


def write_summary(out_dir: Path, rows: list[dict], extra: dict) -> dict:
    """Write ``summary.json`` and ``scores.csv`` (one row per body and organ) atomically; returns the summary."""
    summary = {"metric_per_case": rows, "mean": summarise(rows), **extra}
    atomic_write_bytes(Path(out_dir) / "summary.json", json.dumps(summary, indent=2).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["case", "organ", *METRICS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(out_dir) / "scores.csv", buf.getvalue().encode())
    return summary


def summary_table(summary: dict) -> list[str]:
    """One line per organ for the terminal."""
    lines = []
    for organ, m in summary["mean"].items():
        hd = "n/a" if m["hd95_mm"] is None else f"{m['hd95_mm']:.1f} mm"
        nsd = "n/a" if m["nsd"] is None else f"{m['nsd']:.3f}"
        lines.append(f"{organ:<9} Dice {m['dice']:.4f}  HD95 {hd}  NSD {nsd}  "
                     f"volume diff {m['volume_diff_ml']:+.1f} ml  over {m['n']} bodies")
    return lines
