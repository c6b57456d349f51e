"""The classic 2D U-Net, split into a trunk (encoder-decoder) and a 1x1 head so that landmark fusion and
multi-task heads can be composed around the same trunk."""

from __future__ import annotations

import torch
from torch import nn

from landmark_unet.models.blocks import DoubleConv, Down, Up
from landmark_unet.models.fusion import FusionSegmenter, auxiliary_heads, fused_channels


class UNet2dTrunk(nn.Module):
    """Encoder-decoder of the classic U-Net without its output convolution.

    Args:
        in_channels: input channels C.
        features: channels of the first level (64 in the study; doubled per level, 1024 at the bottom).
        depth: number of 2x2 max-pooling levels (4 in the study).
        stem: the first level's block, mapping the input to (B, features, H, W); default a :class:`DoubleConv`
            (the depth-5 network passes its 3D stem here).
        last_conv: end with the last level's double convolution (output ``features`` channels); False stops at
            the last upsampled map concatenated with its skip (``2 * features`` channels, the multi-task block's
            input in the study's Figure 2).

    Shapes:
        input (B, C, H, W) (or what ``stem`` takes) with H and W divisible by ``2**depth``; output
        (B, out_channels, H, W), the last decoder feature map. ``forward(x, levels=n)`` also returns the decoder's
        maps at the n coarser levels, [(B, features * 2, H/2, W/2), (B, features * 4, H/4, W/4), ...] (deep
        supervision; :meth:`level_channels` gives their widths).

    Raises:
        ValueError: H or W not divisible by ``2**depth``.
    """

    def __init__(self, in_channels: int, features: int = 64, depth: int = 4, stem: nn.Module | None = None,
                 last_conv: bool = True):
        super().__init__()
        if in_channels < 1 or features < 1 or depth < 1:
            raise ValueError(f"in_channels, features and depth must be >= 1, got {in_channels}, {features}, {depth}")
        self.depth = depth
        self.features = features
        self.last_conv = last_conv
        self.out_channels = features if last_conv else 2 * features
        widths = [features * 2**i for i in range(depth + 1)]
        self.inc = stem if stem is not None else DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))

    def level_channels(self, level: int) -> int:
        """Width of the decoder's map at ``level`` (0: full resolution, 1: half, ...)."""
        return self.features * 2**level

    def forward(self, x: torch.Tensor, levels: int = 0) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        m = 2**self.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"U-Net of depth {self.depth} needs H and W divisible by {m}, got {tuple(x.shape[-2:])}")
        if not 0 <= levels < self.depth:
            raise ValueError(f"a U-Net of depth {self.depth} has {self.depth - 1} coarser decoder levels, not {levels}")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        coarse = []
        for i, up in enumerate(self.ups):
            x = up(x, skips.pop(), conv=self.last_conv or i < len(self.ups) - 1)
            if len(self.ups) - 1 - i <= levels and i < len(self.ups) - 1:
                coarse.append(x)
        return (x, coarse[::-1]) if levels else x  # coarse: half resolution first


class UNet2d(FusionSegmenter):
    """Classic 2D U-Net (the study's Figure 1): trunk + 1x1 convolution head, one logit channel per organ, with
    optional landmark fusion (:class:`~landmark_unet.models.fusion.FusionSegmenter`).

    Args:
        in_channels: image channels (1 for fat or water, 2 for both).
        out_channels: output logit channels K (one per organ).
        features: first-level width (the study: 64).
        depth: pooling levels (the study: 4).
        fusion: ``none`` | ``early`` (maps as extra input channels) | ``late`` (maps concatenated before the head).
        map_channels: distance-map channels L.
        deep_supervision: auxiliary 1x1 heads on the decoder's n coarser levels (0: none; at most depth - 1);
            while training the network returns [logits, (B, K, H/2, W/2), ...] (:class:`FusionSegmenter`).

    Shapes:
        ``forward(image, distance=None)``: image (B, in_channels, H, W), H and W divisible by ``2**depth``;
        distance (B, L, H, W) when fused. Returns logits (B, K, H, W).

    The trunk is built before the head, so for one seed ``fusion=none`` and ``fusion=late`` start from identical
    trunk weights.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 64, depth: int = 4,
                 fusion: str = "none", map_channels: int = 1, deep_supervision: int = 0):
        trunk = UNet2dTrunk(fused_channels(in_channels, map_channels, fusion, "trunk"), features, depth)
        head = nn.Conv2d(fused_channels(features, map_channels, fusion, "head"), out_channels, kernel_size=1)
        super().__init__(trunk, head, fusion, auxiliary_heads(trunk, out_channels, deep_supervision))
        self.size_multiple = 2**depth
