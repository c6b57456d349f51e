"""The classic 2D U-Net, split into a trunk (encoder-decoder) and a 1x1 head so that landmark fusion and
multi-task heads can be composed around the same trunk."""

from __future__ import annotations

import torch
from torch import nn

from landmark_unet.models.blocks import DoubleConv, Down, Up


class UNet2dTrunk(nn.Module):
    """Encoder-decoder of the classic U-Net without its output convolution.

    Args:
        in_channels: input channels C.
        features: channels of the first level (64 in the study; doubled per level, 1024 at the bottom).
        depth: number of 2x2 max-pooling levels (4 in the study).

    Shapes:
        input (B, C, H, W) with H and W divisible by ``2**depth``; output (B, features, H, W), the last
        decoder feature map.

    Raises:
        ValueError: H or W not divisible by ``2**depth``.
    """

    def __init__(self, in_channels: int, features: int = 64, depth: int = 4):
        super().__init__()
        if in_channels < 1 or features < 1 or depth < 1:
            raise ValueError(f"in_channels, features and depth must be >= 1, got {in_channels}, {features}, {depth}")
        self.depth = depth
        self.out_channels = features
        widths = [features * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2**self.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"U-Net of depth {self.depth} needs H and W divisible by {m}, got {tuple(x.shape[-2:])}")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return x


class UNet2d(nn.Module):
    """Classic 2D U-Net (the study's Figure 1): trunk + 1x1 convolution head, one logit channel per organ.

    Args:
        in_channels: input channels (1 for fat or water, 2 for both).
        out_channels: output logit channels K (one per organ).
        features: first-level width (the study: 64).
        depth: pooling levels (the study: 4).

    Shapes:
        input (B, in_channels, H, W), H and W divisible by ``2**depth``; output logits (B, K, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 64, depth: int = 4):
        super().__init__()
        self.trunk = UNet2dTrunk(in_channels, features, depth)
        self.head = nn.Conv2d(features, out_channels, kernel_size=1)
        self.size_multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
