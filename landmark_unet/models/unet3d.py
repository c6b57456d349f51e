"""The study's depth-5 "3D" U-Net (section 3.5.1, Figure 4): five consecutive axial slices in, the middle slice's
mask out. Two 3x3x3 convolutions without padding along the stack (5 -> 3 -> 1) and with zero padding in-plane
replace the first double convolution; the rest is the 2D U-Net."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from landmark_unet.models.blocks import ReLU
from landmark_unet.models.fusion import FusionSegmenter, auxiliary_heads, fused_channels
from landmark_unet.models.unet2d import UNet2dTrunk

STACK_DEPTH = 5


def conv3d_as_2d(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv`` applied to a depth-major stack, computed as one 2D convolution.

    A 3D convolution with no padding along depth gives output slice d from input slices d .. d + kd - 1. Stacking
    those slices along the channels and the output slices along the batch makes it a 2D convolution with the
    depth folded into the input channels (weight (F, C, kd, kh, kw) -> (F, kd * C, kh, kw)): the same values,
    but 2D convolutions have fast bf16 and channels-last kernels on CPUs and GPUs, which 3D ones lack on the CPU
    (benchmarks/README.md).

    Shapes: x (B, D, C, H, W) -> (B, D - kd + 1, F, H', W').
    """
    kd = conv.kernel_size[0]
    if conv.padding[0] != 0 or conv.stride[0] != 1 or conv.dilation[0] != 1 or conv.groups != 1:
        raise ValueError("conv3d_as_2d needs an unpadded, unstrided, undilated, ungrouped depth axis")
    b, d, c, h, w = x.shape
    out_d = d - kd + 1
    windows = x.permute(0, 1, 3, 4, 2).unfold(1, kd, 1)  # (B, D', H, W, C, kd)
    # one copy, straight into channels-last order: each pixel's (kd, C) values side by side
    windows = windows.permute(0, 1, 2, 3, 5, 4).reshape(b * out_d, h, w, kd * c).permute(0, 3, 1, 2)
    weight = conv.weight.transpose(1, 2).reshape(conv.out_channels, kd * c, *conv.kernel_size[1:])
    y = F.conv2d(windows, weight, conv.bias, conv.stride[1:], conv.padding[1:], conv.dilation[1:])
    return y.reshape(b, out_d, *y.shape[1:])


class Stem3d(nn.Sequential):
    """(3x3x3 conv, BatchNorm, ReLU) x 2, padding (0, 1, 1): (B, C, 5, H, W) -> (B, F, H, W).

    The convolutions are ``nn.Conv3d`` parameters run by :func:`conv3d_as_2d`; BatchNorm normalises each channel
    over the batch, the slices and the plane (BatchNorm3d's statistics, as a BatchNorm2d over the slices folded
    into the batch, whose parameter names and shapes are BatchNorm3d's: checkpoints load either way).

    Raises:
        ValueError: the stack is not 5 slices deep.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=(0, 1, 1), bias=False),
            nn.BatchNorm2d(out_channels),
            ReLU(),
            nn.Conv3d(out_channels, out_channels, 3, padding=(0, 1, 1), bias=False),
            nn.BatchNorm2d(out_channels),
            ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != STACK_DEPTH:
            raise ValueError(f"the depth-5 network takes (B, C, 5, H, W) stacks, got {tuple(x.shape)}")
        b = x.shape[0]
        x = x.transpose(1, 2)  # (B, D, C, H, W)
        for layer in self:
            if isinstance(layer, nn.Conv3d):
                x = conv3d_as_2d(x.reshape(b, -1, *x.shape[-3:]), layer)  # (B, D', F, H, W)
            else:  # BatchNorm and ReLU over (B * D', F, H, W)
                x = layer(x.reshape(-1, *x.shape[-3:]))
        return x  # D' = 1: (B, F, H, W)


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
        deep_supervision: auxiliary heads on the n coarser decoder levels (:class:`~.unet2d.UNet2d`).

    Shapes:
        ``forward(image, distance=None)``: image (B, C, 5, H, W), distance (B, L, 5, H, W) -> logits (B, K, H, W)
        of the middle slice.

    Raises:
        ValueError: a stack that is not 5 deep, or H, W not divisible by ``2**depth``.
    """

    stack_depth = STACK_DEPTH

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 64, depth: int = 4,
                 fusion: str = "none", map_channels: int = 1, deep_supervision: int = 0):
        trunk_in = fused_channels(in_channels, map_channels, fusion, "trunk")
        trunk = UNet2dTrunk(trunk_in, features, depth, stem=Stem3d(trunk_in, features))
        head = nn.Conv2d(fused_channels(features, map_channels, fusion, "head"), out_channels, kernel_size=1)
        super().__init__(trunk, head, fusion, auxiliary_heads(trunk, out_channels, deep_supervision))
        self.size_multiple = 2**depth
