"""Segmentation losses over per-organ logits, as config parts (``loss=bce | dice_bce``).

Both take logits (B, K, H, W) (one channel per organ, sigmoid heads, the study's design) and binary targets of the
same shape, and return a scalar: the sum over organs of each organ's loss, so that an organ's weight does not
shrink when more organs share the network (the study's joint-learning loss, section 3.4.3).

- :class:`BCELoss`: binary cross-entropy with logits, the mean over the batch's pixels, per organ (the study).
- :class:`DiceBCELoss`: that plus the soft Dice loss of the organ over the whole batch (nnU-Net's "batch Dice": the
  sums run over every sample and pixel before the ratio, so a slice without the organ does not give a Dice of its
  own), ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with ``p = sigmoid(logit)`` and smoothing ``s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        dims = [d for d in range(logits.ndim) if d != 1]
        p, t = torch.sigmoid(logits.float()), target.float()
        dice = (2 * (p * t).sum(dim=dims) + self.smooth) / (p.sum(dim=dims) + t.sum(dim=dims) + self.smooth)
        return super().per_organ(logits, target) + (1 - dice)
