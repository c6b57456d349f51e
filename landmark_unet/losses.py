"""Segmentation losses, as config parts (``loss=bce | dice_bce | dice_ce``).

``bce`` and ``dice_bce`` take logits (B, K, ...) (one channel per organ, sigmoid heads, the study's design) and
binary targets of the same shape, and return a scalar: the sum over organs of each organ's loss, so that an organ's
weight does not shrink when more organs share the network (the study's joint-learning loss, section 3.4.3).
``dice_ce`` is for the softmax head (:mod:`landmark_unet.heads`): logits (B, K + 1, ...), background first.

- :class:`BCELoss`: binary cross-entropy with logits, the mean over the batch's pixels, per organ (the study).
- :class:`DiceBCELoss`: that plus the soft Dice loss of the organ over the whole batch (nnU-Net's "batch Dice": the
  sums run over every sample and pixel before the ratio, so a slice without the organ does not give a Dice of its
  own), ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with ``p = sigmoid(logit)`` and smoothing ``s``.
- :class:`DiceCELoss`: for one softmax over background + organs (nnU-Net's default): cross-entropy over all K + 1
  classes (mean over voxels) plus the mean over the K organs of their soft batch Dice loss (background left out),
  with ``p`` the softmax probability of the organ's class. Equal to MONAI's ``DiceCELoss(softmax=True,
  to_onehot_y=True, include_background=False, batch=True)``.

All losses take spatial axes of any number (2D slices (B, K, H, W) or 3D patches (B, K, D, H, W)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from landmark_unet.heads import class_map


class BCELoss(nn.Module):
    """Sum over organs of the mean binary cross-entropy with logits.

    Shapes:
        ``forward(logits, target)``: logits (B, K, H, W), target (B, K, H, W) in {0, 1} -> scalar.
    """

    def per_organ(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(K,) the loss of each organ."""
        dims = [d for d in range(logits.ndim) if d != 1]
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").mean(dim=dims)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_organ(logits, target).sum()


class DiceBCELoss(BCELoss):
    """Sum over organs of (soft batch Dice loss + mean binary cross-entropy with logits).

    Args:
        smooth: ``s`` in the Dice ratio (numerator and denominator), so that an organ absent from the whole batch
            and not predicted scores a Dice loss near 0, not 0/0.

    Shapes:
        ``forward(logits, target)``: logits (B, K, H, W), target (B, K, H, W) in {0, 1} -> scalar.
    """

    def __init__(self, smooth: float = 1e-5):
        super().__init__()
        self.smooth = float(smooth)

    def per_organ(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice = soft_batch_dice(torch.sigmoid(logits.float()), target.float(), self.smooth)
        return super().per_organ(logits, target) + (1 - dice)


def soft_batch_dice(p: torch.Tensor, t: torch.Tensor, smooth: float) -> torch.Tensor:
    """(K,) soft Dice of probabilities ``p`` against targets ``t`` (B, K, ...), sums over the batch and voxels."""
    dims = [d for d in range(p.ndim) if d != 1]
    return (2 * (p * t).sum(dim=dims) + smooth) / (p.sum(dim=dims) + t.sum(dim=dims) + smooth)


class DiceCELoss(nn.Module):
    """Cross-entropy over background + organs plus the mean soft batch Dice loss of the organs (softmax head).

    Args:
        organs: the organs of the target's channels, in order (they fix the classes 1..K and the overlap
            priority, :func:`landmark_unet.heads.class_map`).
        smooth: ``s`` in the Dice ratio (numerator and denominator).

    Shapes:
        ``forward(logits, target)``: logits (B, K + 1, ...) (class 0 the background), target (B, K, ...) binary
        organ masks (overlaps allowed: resolved by priority) -> scalar.
    """

    def __init__(self, organs: list[str], smooth: float = 1e-5):
        super().__init__()
        self.organs = list(organs)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != len(self.organs) + 1:
            raise ValueError(f"dice_ce takes {len(self.organs) + 1} logit channels (background + "
                             f"{len(self.organs)} organs), got {logits.shape[1]}")
        labels = class_map(target, self.organs)  # (B, ...)
        logits = logits.float()
        ce = F.cross_entropy(logits, labels)
        p = torch.softmax(logits, dim=1)[:, 1:]
        onehot = torch.stack([labels == k + 1 for k in range(len(self.organs))], dim=1).float()
        return ce + (1 - soft_batch_dice(p, onehot, self.smooth)).mean()


def deep_supervision_weights(levels: int) -> list[float]:
    """Loss weights of the full-resolution output and ``levels`` coarser ones: halving per level (1, 1/2, 1/4, ...),
    normalised to sum to 1 (nnU-Net's scheme, without its zero weight for the coarsest level)."""
    raw = [0.5**i for i in range(levels + 1)]
    return [w / sum(raw) for w in raw]


def deep_supervision_loss(loss_fn: nn.Module, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weighted sum (:func:`deep_supervision_weights`) of ``loss_fn`` over a deep-supervised network's outputs
    [(B, K', *S), (B, K', *S/2), ...], each against the target masks (B, K, *S) resized to its size by nearest
    neighbour (the masks stay binary)."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for weight, out in zip(deep_supervision_weights(len(outputs) - 1), outputs):
        t = target if out.shape[2:] == target.shape[2:] else F.interpolate(target.float(), size=out.shape[2:],
                                                                            mode="nearest")
        total = total + weight * loss_fn(out, t)
    return total
