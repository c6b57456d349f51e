"""Per-body Dice (the study's equation 2, DESIGN.md).

Dice is computed per body on the whole 3D volume: for 2D models the per-slice intersections and volumes are
summed over every slice of the body before the ratio is taken, which equals stacking the slices back into the
volume first. A body where prediction and ground truth are both empty scores 1. The study's figure is the mean
over bodies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric


def dice_from_counts(inter: torch.Tensor, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``2|X∩Y| / (|X|+|Y|)`` elementwise, 1 where ``|X|+|Y| = 0``."""
    denom = pred + true
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom, dtype=torch.float64))


def dice_volume(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two binary volumes of any shape (1.0 when both are empty)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    denom = int(pred.sum()) + int(true.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(pred, true).sum()) / denom


class PerBodyDice(Metric):
    """Accumulates voxel counts per body and organ over any number of batches of slices (or volumes).

    ``update(pred, target, subject)`` takes binary ``pred`` and ``target`` of shape (B, K, *spatial) and the
    body id of each sample, (B,). ``compute()`` returns ``(ids, dice)``: the sorted body ids (S,) and their Dice
    (S, K) in float64. States are concatenated across processes, so it works under DDP.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("subject", default=[], dist_reduce_fx="cat")
        self.add_state("inter", default=[], dist_reduce_fx="cat")
        self.add_state("pred_sum", default=[], dist_reduce_fx="cat")
        self.add_state("true_sum", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, subject: torch.Tensor) -> None:
        pred, target = pred.bool(), target.bool()
        dims = tuple(range(2, pred.ndim))
        self.subject.append(subject.reshape(-1).long())
        self.inter.append((pred & target).sum(dims, dtype=torch.int64))
        self.pred_sum.append(pred.sum(dims, dtype=torch.int64))
        self.true_sum.append(target.sum(dims, dtype=torch.int64))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        subject, inter, pred, true = (cat(s) for s in (self.subject, self.inter, self.pred_sum, self.true_sum))
        ids, inverse = torch.unique(subject, return_inverse=True)
        k = inter.shape[1]
        totals = [torch.zeros(len(ids), k, dtype=torch.float64, device=inter.device) for _ in range(3)]
        for total, counts in zip(totals, (inter, pred, true)):
            total.index_add_(0, inverse, counts.double())
        return ids, dice_from_counts(*totals)

    def per_body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`compute` with the shapes kept: ids (S,), dice (S, K) (torchmetrics squeezes one-element results)."""
        ids, dice = self.compute()
        ids = ids.reshape(-1)
        return ids, dice.reshape(len(ids), -1)


class VolumeRatio(Metric):
    """Predicted over true foreground voxels per organ, each summed over every sample of an epoch: 1 is the right
    volume, below 1 too little, 0 nothing predicted at all (a network whose outputs never cross the threshold).

    ``organs``: K. ``update(pred, target)`` takes binary ``pred`` and ``target`` of shape (B, K, *spatial);
    ``compute()`` returns (K,) float32, NaN for an organ with no true voxel. Counts are int64 on the device (no host
    read in a step), summed across processes.
    """

    full_state_update = False

    def __init__(self, organs: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("pred", default=torch.zeros(organs, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("true", default=torch.zeros(organs, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        dims = (0, *range(2, pred.ndim))
        self.pred += pred.bool().sum(dims, dtype=torch.int64)
        self.true += target.bool().sum(dims, dtype=torch.int64)

    def compute(self) -> torch.Tensor:
        true = self.true.float()
        return torch.where(true > 0, self.pred.float() / true.clamp_min(1), torch.full_like(true, float("nan")))


class SampleMean(Metric):
    """Mean of per-batch scalars (a batch's mean loss, say) weighted by their batch sizes, over an epoch.

    ``update(value, n)`` takes a 0-d tensor and the batch's sample count; it only adds on the tensor's device, so a
    training step that calls it never waits for the device. (Lightning's ``self.log`` of a tensor every step moves
    its result states with ``move_data_to_device`` every step; on an H200 that function made about three
    synchronising host-to-device copies a Lightning step, none in a plain loop: benchmarks/README.md.)
    ``compute()`` is the weighted mean, summed across processes under DDP; NaN when nothing was added. float32
    states (float64 is missing on some accelerators).
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(()), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, n: int) -> None:
        self.total += value.detach().float() * n
        self.count += n

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def summarise(per_body: dict[str, float]) -> dict:
    """``{"dice_mean", "dice_std", "per_body"}`` of a {body: dice} mapping (population std over bodies)."""
    values = np.array(list(per_body.values()), dtype=np.float64)
    return {
        "dice_mean": float(values.mean()) if len(values) else float("nan"),
        "dice_std": float(values.std()) if len(values) else float("nan"),
        "per_body": {k: float(v) for k, v in sorted(per_body.items())},
    }


def per_body_table(ids: torch.Tensor, dice: torch.Tensor, names: Sequence[str], organs: Sequence[str]) -> dict:
    """{organ: summarise({body name: dice})} from :meth:`PerBodyDice.compute` output."""
    return {
        organ: summarise({names[int(i)]: float(d) for i, d in zip(ids.tolist(), dice[:, j].tolist())})
        for j, organ in enumerate(organs)
    }
