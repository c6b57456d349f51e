"""Landmark fusion (the study's Figure 6) as a wrapper around any trunk and head.

``early``: the distance map(s) join the image as extra input channels of the trunk. ``late``: they are concatenated
to the trunk's output feature map (the decoder's last, full-resolution features), resized to it if needed, right
before the head's convolution(s). ``none``: the map is ignored. Single-task, multi-task and depth-5 networks are all
a trunk plus a head, so each takes fusion from this one class, and deep supervision too (auxiliary heads on the
trunk's coarser decoder maps, used while training only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("none", "early", "late")


def fused_channels(channels: int, map_channels: int, fusion: str, where: str) -> int:
    """Input channels of the trunk (``where="trunk"``) or head (``where="head"``) once the maps are fused."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
    adds = (fusion == "early" and where == "trunk") or (fusion == "late" and where == "head")
    return channels + (map_channels if adds else 0)


def auxiliary_heads(trunk: nn.Module, out_channels: int, levels: int, conv: type[nn.Module] = nn.Conv2d) -> nn.ModuleList:
    """Deep supervision: one 1x1 convolution to ``out_channels`` logits per coarser decoder level 1..``levels`` of
    ``trunk`` (which gives their widths by ``level_channels``); empty for ``levels=0``."""
    if levels < 0 or levels >= getattr(trunk, "depth", 1):
        raise ValueError(f"deep_supervision must be 0 .. {getattr(trunk, 'depth', 1) - 1} (the coarser decoder "
                         f"levels), got {levels}")
    return nn.ModuleList(conv(trunk.level_channels(j), out_channels, kernel_size=1) for j in range(1, levels + 1))


class FusionSegmenter(nn.Module):
    """trunk + head, with the landmark distance maps fused early or late, and optional deep supervision.

    Args:
        trunk: maps (B, C [+ L], *spatial_in) to features (B, F, H, W) (or (B, F, D, H, W) for a volumetric
            network); with ``levels=n`` also to the decoder's n coarser maps (deep supervision).
        head: maps (B, F [+ L], H, W) to logits (B, K, H, W) (or the same with D).
        fusion: ``none`` | ``early`` | ``late``.
        aux_heads: deep supervision's heads (:func:`auxiliary_heads`), one per coarser level; they see the
            trunk's maps only (late fusion feeds the main head).

    Shapes:
        ``forward(image, distance)``: image (B, C, H, W) or a depth-5 stack (B, C, D, H, W); distance, the maps of
        the same samples, (B, L, H, W) or (B, L, D, H, W). Late fusion of a stack uses the maps of its middle slice
        (the slice the network predicts). Returns logits (B, K, H, W); in training mode with auxiliary heads, a
        list [logits, (B, K, H/2, W/2), (B, K, H/4, W/4), ...].

    Attributes:
        stack_depth: axial slices per sample the network takes (class attribute; 1 for 2D networks, D for a
            stack), checked against ``data.stack`` before a run starts (:func:`landmark_unet.config.validate`).
    """

    stack_depth = 1

    def __init__(self, trunk: nn.Module, head: nn.Module, fusion: str = "none",
                 aux_heads: nn.ModuleList | None = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
        self.trunk = trunk
        self.head = head
        self.fusion = fusion
        if aux_heads:  # only then a submodule: the weights of a network without them keep their names
            self.aux_heads = aux_heads

    def forward(self, image: torch.Tensor, distance: torch.Tensor | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
        if self.fusion != "none" and distance is None:
            raise ValueError(f"{self.fusion} fusion needs the distance maps")
        if self.fusion == "early":
            image = torch.cat([image, distance.to(image.dtype)], dim=1)
        aux = getattr(self, "aux_heads", None) if self.training else None
        if aux:
            features, coarse = self.trunk(image, levels=len(aux))
        else:
            features = self.trunk(image)
        if self.fusion == "late":
            d = distance
            if d.ndim == features.ndim + 1:  # a stack: the middle slice's maps
                d = d[:, :, d.shape[2] // 2]
            if d.shape[2:] != features.shape[2:]:  # (bi|tri)linear for 2D | volumetric features
                d = F.interpolate(d, size=features.shape[2:], mode="trilinear" if d.ndim == 5 else "bilinear",
                                  align_corners=False)
            features = torch.cat([features, d.to(features.dtype)], dim=1)
        logits = self.head(features)
        return [logits, *(h(c) for h, c in zip(aux, coarse))] if aux else logits
