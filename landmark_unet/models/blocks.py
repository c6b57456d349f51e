"""Building blocks of the classic U-Net (Ronneberger et al. 2015; the study's Figure 1)."""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) x 2, zero padding: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max pooling then :class:`DoubleConv`: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed-conv upsampling, concatenation with the skip, :class:`DoubleConv`.

    ``forward(x, skip)``: x (B, C_in, H, W), skip (B, C_in/2, 2H, 2W) -> (B, C_out, 2H, 2W);
    ``forward(x, skip, conv=False)`` stops after the concatenation: (B, C_in, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, conv: bool = True) -> torch.Tensor:
        merged = torch.cat([skip, self.up(x)], dim=1)
        return self.conv(merged) if conv else merged
