"""Building blocks of the classic U-Net (Ronneberger et al. 2015; the study's Figure 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReLU(nn.ReLU):
    """ReLU in place (no extra activation memory), except on bf16 CPU tensors: there PyTorch's element-wise kernels
    run at half speed when they write over their input (a (16, 64, 256, 256) bf16 ReLU: 35 ms in place, 15 ms out of
    place on this project's CPU; fp32 is the other way round, 14 against 21 ms), so it writes a new tensor. Same
    values and gradients either way; no parameters, so checkpoints do not see it."""

    in_place_on_cpu_bf16 = False  # True: in place there too (what ``benchmarks/bench_step.py`` compares)

    def __init__(self):
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not self.in_place_on_cpu_bf16:
            return torch.relu(x)
        return torch.relu_(x)


def _input_to_fp32(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    return (x.float(), *args[1:]) if x.dtype in (torch.bfloat16, torch.float16) else None


def norms_in_fp32(net: nn.Module) -> int:
    """Under bf16 / fp16 mixed precision, make every BatchNorm and InstanceNorm of ``net`` compute in fp32: a
    forward pre-hook casts its input to float32, so its statistics, its output and the ReLU after it are fp32 (the
    next convolution casts back, as autocast does for any fp32 input; Apex's ``keep_batchnorm_fp32``). Autocast
    leaves these layers in the input's precision. Measured on the CPU (benchmarks/README.md, ``bench_precision``'s
    gradient comparison): the forward is bit-identical to plain bf16 autocast (so PyTorch's bf16 BatchNorm computes
    in fp32 and rounds its output once) and the gradient's error against fp32 is unchanged, while the bf16 step
    takes 1.31x as long. Changes no parameter. Returns the number of layers hooked."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for m in norms:
        m.register_forward_pre_hook(_input_to_fp32)
    return len(norms)


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) x 2, zero padding: (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            ReLU(),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            ReLU(),
        )


class Down(nn.Sequential):
    """2x2 max pooling then :class:`DoubleConv`: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class UpConv2x2(nn.ConvTranspose2d):
    """2x2 transposed convolution with stride 2 (the U-Net's up-convolution): (B, C_in, H, W) -> (B, C_out, 2H, 2W).

    Parameters and function are ``nn.ConvTranspose2d``'s (weight (C_in, C_out, 2, 2), bias (C_out,); checkpoints
    are interchangeable). On the CPU it is computed as what it is, a 1x1 convolution to the four output pixels of
    each input pixel (C_in -> 4 C_out, one matrix product) and one copy that puts those pixels in place, which
    returns a channels-last tensor: the same numbers, and the forward and backward of the study's four
    up-convolutions with their concatenations 1.6x faster there in fp32 and 1.8x in bf16 (oneDNN's transposed
    convolution runs at 0.07-0.6 TFLOP/s and gets the concatenation's gradient as a strided slice). The whole bf16
    training step: 1.11-1.12x; fp32: within the noise (``benchmarks/bench_step.py --variants
    eager,eager_transposed_conv``). On a GPU it runs cuDNN's transposed convolution, as measured there so far.
    """

    as_matrix_product: bool | None = None  # None: on the CPU only; True / False: everywhere / nowhere (benchmarks)

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.device.type == "cpu" if self.as_matrix_product is None else self.as_matrix_product):
            return super().forward(x)
        c_in, c_out = self.weight.shape[:2]
        # rows ordered (dy, dx, c_out): each input pixel's 2 x 2 output block, channels last
        weight = self.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in, 1, 1)
        bias = None if self.bias is None else self.bias.repeat(4)
        y = F.conv2d(x, weight, bias)  # (B, 4 C_out, H, W)
        b, _, h, w = y.shape
        y = y.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, c_out)  # (B, H, W, dy, dx, C_out)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c_out)  # (B, 2H, 2W, C_out): the one copy
        return y.permute(0, 3, 1, 2)  # (B, C_out, 2H, 2W), channels-last in memory


class Up(nn.Module):
    """2x2 transposed-conv upsampling, concatenation with the skip, :class:`DoubleConv`.

    ``forward(x, skip)``: x (B, C_in, H, W), skip (B, C_in/2, 2H, 2W) -> (B, C_out, 2H, 2W);
    ``forward(x, skip, conv=False)`` stops after the concatenation: (B, C_in, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = UpConv2x2(in_channels, in_channels // 2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, conv: bool = True) -> torch.Tensor:
        merged = torch.cat([skip, self.up(x)], dim=1)
        return self.conv(merged) if conv else merged
