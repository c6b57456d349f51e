"""Output heads (``head=sigmoid | softmax``): how a network's logits become one probability map and one mask per
organ, so that everything after the network (Dice, panels, prediction files, post-processing) sees the same
(K, ...) probabilities whichever head made them.

- ``sigmoid`` (the study's): K logit channels, one per organ; probability ``sigmoid(logit)`` per organ, mask
  ``probability > threshold``. Organs are independent and may overlap.
- ``softmax`` (nnU-Net's): K + 1 logit channels, background first, then the organs in ``data.organs`` order; the
  probabilities are a softmax over the channels, and an organ's mask is where its class is the most probable one
  (argmax), so masks never overlap and the threshold is not used. Training targets are one class per voxel: where
  reference masks overlap, the organ earliest in :data:`OVERLAP_PRIORITY` wins (:func:`class_map`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from landmark_unet.data.organs import ORGANS

HEADS = ("sigmoid", "softmax")
# Where reference masks overlap (they come from separate files per organ), the first organ of this list gets the
# voxel: the small organs first, so that a thin organ on a boundary shared with a large one keeps its voxels; the
# liver, the largest, last.
OVERLAP_PRIORITY: tuple[str, ...] = ("pancreas", "kidneys", "spleen", "bladder", "liver")
assert sorted(OVERLAP_PRIORITY) == sorted(ORGANS)


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r} (choose from {', '.join(HEADS)})")
    return head


def output_channels(head: str, organs: Sequence[str]) -> int:
    """Logit channels of a network with ``head`` for ``organs``: K (sigmoid) or K + 1 (softmax, background first)."""
    return len(organs) + (check_head(head) == "softmax")


def probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Per-organ probabilities (B, K, ...) float32 of logits (B, K, ...) (sigmoid) or (B, K + 1, ...) (softmax)."""
    if check_head(head) == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=1)[:, 1:]


def organ_masks(prob, head: str, threshold: float = 0.5, dim: int = 1):
    """Boolean masks of per-organ probabilities ``prob`` (organs along ``dim``; a tensor or a numpy array, returned
    as the same type). Sigmoid: ``prob > threshold``. Softmax: an organ where its probability exceeds the
    background's (one minus the organs' sum) and every other organ's, i.e. the argmax of the softmax."""
    if isinstance(prob, np.ndarray):
        return organ_masks(torch.from_numpy(prob), head, threshold, dim).numpy()
    if check_head(head) == "sigmoid":
        return prob > threshold
    background = 1 - prob.sum(dim=dim, keepdim=True)
    best = prob.amax(dim=dim, keepdim=True)
    return (prob >= best) & (prob > background)


def class_map(mask: torch.Tensor, organs: Sequence[str]) -> torch.Tensor:
    """One class per voxel (B, ...) int64 from binary organ masks (B, K, ...) in ``organs`` order: 0 for background,
    k + 1 for ``organs[k]``; where masks overlap, the organ earliest in :data:`OVERLAP_PRIORITY` wins."""
    rank = torch.tensor([len(OVERLAP_PRIORITY) - OVERLAP_PRIORITY.index(o) for o in organs], device=mask.device)
    score = (mask > 0.5) * rank.view(1, -1, *([1] * (mask.ndim - 2)))  # 0 where absent, higher = more priority
    value, index = score.max(dim=1)
    return torch.where(value > 0, index + 1, 0)
