"""The study's multi-task 2D U-Net (section 3.4.1, Figure 2): one shared trunk, one head per organ."""

from __future__ import annotations

import torch
from torch import nn

from landmark_unet.models.blocks import DoubleConv
from landmark_unet.models.fusion import FusionSegmenter, auxiliary_heads, fused_channels
from landmark_unet.models.unet2d import UNet2dTrunk


class MultiTaskHead(nn.Module):
    """One (double conv + 1x1 conv) branch per organ on copies of the same feature map.

    Shapes:
        (B, in_channels, H, W) -> logits (B, K, H, W), channel k from branch k.
    """

    def __init__(self, in_channels: int, features: int, organs: int):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(DoubleConv(in_channels, features), nn.Conv2d(features, 1, kernel_size=1))
            for _ in range(organs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class UNet2dMultiTask(FusionSegmenter):
    """Shared U-Net trunk up to the last upsampled map (2 x ``features`` channels at full resolution, the
    128-channel map of the study's Figure 2), then one head per organ.

    Args:
        in_channels: image channels.
        out_channels: organs K (one head each).
        features: first-level width (the study: 64).
        depth: pooling levels (4).
        fusion: ``none`` | ``early`` | ``late`` (late: the maps join every head's input).
        map_channels: distance-map channels L.
        deep_supervision: auxiliary 1x1 heads (all organs at once) on the n coarser decoder levels.

    Shapes:
        ``forward(image, distance=None)``: (B, C, H, W) [, (B, L, H, W)] -> logits (B, K, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int = 5, features: int = 64, depth: int = 4,
                 fusion: str = "none", map_channels: int = 1, deep_supervision: int = 0):
        trunk = UNet2dTrunk(fused_channels(in_channels, map_channels, fusion, "trunk"), features, depth,
                            last_conv=False)
        head = MultiTaskHead(fused_channels(trunk.out_channels, map_channels, fusion, "head"), features, out_channels)
        super().__init__(trunk, head, fusion, auxiliary_heads(trunk, out_channels, deep_supervision))
        self.size_multiple = 2**depth
