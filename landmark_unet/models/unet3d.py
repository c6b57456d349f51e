"""The study's depth-5 "3D" U-Net (section 3.5.1, Figure 4): five consecutive axial slices in, the middle slice's
mask out. Two 3x3x3 convolutions without padding along the stack (5 -> 3 -> 1) and with zero padding in-plane
replace the first double convolution; the rest is the 2D U-Net."""

from __future__ import annotations

import torch
from torch import nn

from landmark_unet.models.fusion import FusionSegmenter, fused_channels
from landmark_unet.models.unet2d import UNet2dTrunk

STACK_DEPTH = 5


class Stem3d(nn.Sequential):
    """(3x3x3 conv, BatchNorm, ReLU) x 2, padding (0, 1, 1): (B, C, 5, H, W) -> (B, F, H, W).

    Raises:
        ValueError: the stack is not 5 slices deep.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != STACK_DEPTH:
            raise ValueError(f"the depth-5 network takes (B, C, 5, H, W) stacks, got {tuple(x.shape)}")
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 3D convolutions have no fast CPU kernel (measured: > 5 min against 1.35 s in fp32 for one
            # forward + backward of this stem at 4 x 2 x 5 x 256 x 256): keep the stem in fp32 on the CPU.
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float()).squeeze(2)
        return super().forward(x).squeeze(2)


class UNet3d(FusionSegmenter):
    """Depth-5 U-Net: :class:`Stem3d` + the 2D U-Net's levels + a 1x1 head.

    Args:
        in_channels: image channels C.
        out_channels: organs K.
        features: first-level width (64).
        depth: pooling levels (4: H and W divisible by 16; the smallest input is 16 x 5 x 16).
        fusion: ``none`` | ``early`` (maps of all five slices as extra channels) | ``late`` (the middle slice's
            maps before the head).
        map_channels: distance-map channels L.

    Shapes:
        ``forward(image, distance=None)``: image (B, C, 5, H, W), distance (B, L, 5, H, W) -> logits (B, K, H, W)
        of the middle slice.

    Raises:
        ValueError: a stack that is not 5 deep, or H, W not divisible by ``2**depth``.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 64, depth: int = 4,
                 fusion: str = "none", map_channels: int = 1):
        trunk_in = fused_channels(in_channels, map_channels, fusion, "trunk")
        trunk = UNet2dTrunk(trunk_in, features, depth, stem=Stem3d(trunk_in, features))
        head = nn.Conv2d(fused_channels(features, map_channels, fusion, "head"), out_channels, kernel_size=1)
        super().__init__(trunk, head, fusion)
        self.size_multiple = 2**depth
