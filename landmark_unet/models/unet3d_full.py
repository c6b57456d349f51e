"""A volumetric 3D U-Net trained on patches (nnU-Net style; ``model=unet3d_full``).

Unlike the depth-5 network (:mod:`landmark_unet.models.unet3d`), which predicts one axial slice from five, this
network maps a whole patch (B, C, D, H, W) = (B, C, z, x, y) to logits of every voxel of it (B, K, D, H, W).
Whole bodies are predicted by Gaussian-weighted sliding windows (:mod:`landmark_unet.sliding_window`).

Pooling may be anisotropic: :func:`pooling_plan` chooses, per level and axis, a kernel of 1 or 2 from the voxel
spacing and the patch size, so that a coarse axial spacing (e.g. 4 mm against 1.875 mm in-plane) is not pooled
until the in-plane resolution has caught up with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from landmark_unet.models.fusion import FusionSegmenter, auxiliary_heads, fused_channels

Kernel = tuple[int, int, int]
NORMS = ("instance", "batch")
POOLINGS = ("conv", "max")
MIN_POOL_SIZE = 8  # an axis is pooled only while its size is >= 8, so the bottleneck is >= 4 voxels along it


def pooling_plan(patch_size: Sequence[int], spacing: Sequence[float], depth: int) -> list[Kernel]:
    """Per level, the pooling kernel (1 or 2 per axis (D, H, W)) of a ``depth``-level 3D U-Net.

    The rule (nnU-Net's rule of thumb): at each level, with the sizes and spacings the feature map has there, an
    axis is pooled (kernel 2) when both

    - its spacing is <= 2 x the finest spacing of the three axes at that level (so an axis much coarser than the
      others waits until pooling the others has brought them within a factor 2 of it), and
    - its size is >= 8 (:data:`MIN_POOL_SIZE`), so that no axis of the bottleneck is smaller than 4 voxels;

    after pooling, the axis's size is halved (floor) and its spacing doubled. The depth axis may thus stop being
    pooled early; the in-plane axes (H, W) must satisfy the size rule at every level.

    Example: spacing (4, 1.875, 1.875) mm, patch 64 x 160 x 160, depth 5 gives
    ``[(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]`` (4 / 1.875 = 2.13 > 2 at the first level; 4 / 3.75
    <= 2 afterwards), so :func:`size_multiple` is (16, 32, 32).

    Args:
        patch_size: (D, H, W) voxels, D along z (the axial axis).
        spacing: (sz, sx, sy) mm, the spacing of the D, H and W axes (note: the cache's ``meta["spacing"]`` is
            (x, y, z): reorder it).
        depth: number of pooling levels, >= 1.

    Returns:
        ``depth`` kernels (kd, kh, kw).

    Raises:
        ValueError: ``depth`` < 1, a patch or spacing that is not three positive numbers, an in-plane axis too
            small to be pooled ``depth`` times, a level where no axis can be pooled, or a patch not divisible by
            the plan's :func:`size_multiple` (the message gives the nearest larger patch that works).
    """
    size = [int(s) for s in patch_size]
    space = [float(s) for s in spacing]
    if len(size) != 3 or len(space) != 3 or min(size) < 1 or min(space) <= 0:
        raise ValueError(f"patch_size and spacing must be three positive numbers (D, H, W), got {tuple(patch_size)} "
                         f"and {tuple(spacing)}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    plan: list[Kernel] = []
    for level in range(depth):
        finest = min(space)
        kernel = [2 if sp <= 2 * finest and n >= MIN_POOL_SIZE else 1 for n, sp in zip(size, space)]
        for axis, name in ((1, "H"), (2, "W")):
            if size[axis] < MIN_POOL_SIZE:
                raise ValueError(f"patch {tuple(patch_size)} cannot be pooled {depth} times in-plane: {name} is "
                                 f"{size[axis]} at level {level + 1} (< {MIN_POOL_SIZE}); use a larger patch or a "
                                 f"smaller depth")
        if max(kernel) == 1:
            raise ValueError(f"no axis of patch {tuple(patch_size)} (spacing {tuple(spacing)} mm) can be pooled at "
                             f"level {level + 1}")
        plan.append((kernel[0], kernel[1], kernel[2]))
        size = [n // k for n, k in zip(size, kernel)]
        space = [sp * k for sp, k in zip(space, kernel)]
    multiple = size_multiple(plan)
    if any(n % m for n, m in zip(patch_size, multiple)):
        fixed = tuple(-(-int(n) // m) * m for n, m in zip(patch_size, multiple))
        raise ValueError(f"patch {tuple(patch_size)} is not divisible by {multiple}, the product of the pooling "
                         f"kernels {plan}; use e.g. {fixed}")
    return plan


def size_multiple(plan: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """(D, H, W) multiple that a network of pooling kernels ``plan`` needs its input sizes to be divisible by."""
    out = [1, 1, 1]
    for kernel in plan:
        out = [m * int(k) for m, k in zip(out, kernel)]
    return (out[0], out[1], out[2])


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"unknown norm {norm!r} (choose from {', '.join(NORMS)})")


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that steps around a PyTorch CPU bug: under bf16 autocast, oneDNN's weight gradient of a
    3 x 3 x 3, stride-1, padding-1 convolution of an input only 2 voxels deep is wrong (relative error about 1 against
    fp32, sometimes inf or NaN, for every channel count and both memory formats; torch 2.13.0+cpu, measured in
    tests/test_unet3d_full.py). A U-Net level that deep gets there when a patch's depth runs out before its pools do.
    Such a convolution (small: it is at the bottom of the U-Net) runs in fp32 on a CPU while gradients are on;
    everything else, and every device other than the CPU, is ``nn.Conv3d``.

    Shapes: as ``nn.Conv3d``; its output is fp32 where it steps around the bug (the next layer casts as usual)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.shape[-3] == 2 and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and self.kernel_size[0] == 3 and self.stride[0] == 1 and self.padding[0] == 1):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ConvBlock3d(nn.Sequential):
    """(3x3x3 conv, norm, LeakyReLU(0.01)) x 2, zero padding; the first convolution may be strided (pooling).

    Shapes: (B, C_in, D, H, W) -> (B, C_out, D / sd, H / sh, W / sw), ``stride`` = (sd, sh, sw).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", stride: Kernel = (1, 1, 1)):
        super().__init__(
            Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3dFullTrunk(nn.Module):
    """Encoder-decoder of the volumetric U-Net, without its output convolution.

    Level 0 is a :class:`ConvBlock3d` at full resolution; level i (1..depth) pools with ``pool_kernels[i-1]``
    (a strided first convolution, ``pooling="conv"``, nnU-Net's choice; or ``MaxPool3d``, ``pooling="max"``) then
    convolves; each decoder level upsamples with ``ConvTranspose3d`` (kernel = stride = that level's pooling
    kernel), concatenates the skip (skip first) and applies a :class:`ConvBlock3d`.

    Shapes: (B, C, D, H, W) with D, H, W divisible by :attr:`size_multiple` -> (B, widths[0], D, H, W).

    Raises:
        ValueError: an input not divisible by :attr:`size_multiple`.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], pool_kernels: Sequence[Kernel],
                 norm: str = "instance", pooling: str = "conv"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} (choose from {', '.join(POOLINGS)})")
        if len(widths) != len(pool_kernels) + 1:
            raise ValueError("one width per level: len(widths) must be len(pool_kernels) + 1")
        self.pool_kernels = [tuple(int(k) for k in kernel) for kernel in pool_kernels]
        self.depth = len(self.pool_kernels)
        self.widths = list(widths)
        self.size_multiple = size_multiple(self.pool_kernels)
        self.out_channels = widths[0]
        self.inc = ConvBlock3d(in_channels, widths[0], norm)
        downs = []
        for i, kernel in enumerate(self.pool_kernels):
            if pooling == "conv":
                downs.append(ConvBlock3d(widths[i], widths[i + 1], norm, stride=kernel))
            else:
                downs.append(nn.Sequential(nn.MaxPool3d(kernel), ConvBlock3d(widths[i], widths[i + 1], norm)))
        self.downs = nn.ModuleList(downs)
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[i + 1], widths[i], kernel_size=kernel, stride=kernel, bias=False)
            for i, kernel in reversed(list(enumerate(self.pool_kernels))))
        self.up_convs = nn.ModuleList(
            ConvBlock3d(2 * widths[i], widths[i], norm) for i in reversed(range(len(self.pool_kernels))))

    def level_channels(self, level: int) -> int:
        """Width of the decoder's map at ``level`` (0: full resolution)."""
        return self.widths[level]

    def forward(self, x: torch.Tensor, levels: int = 0) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``levels=n`` also returns the decoder's maps at the n coarser levels (deep supervision), finest first."""
        if x.ndim != 5 or any(n % m for n, m in zip(x.shape[2:], self.size_multiple)):
            raise ValueError(f"the 3D U-Net takes (B, C, D, H, W) with D, H, W divisible by {self.size_multiple}, "
                             f"got {tuple(x.shape)}")
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        coarse = []
        for i, (up, conv) in enumerate(zip(self.ups, self.up_convs)):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
            if 1 <= self.depth - 1 - i <= levels:
                coarse.append(x)
        return (x, coarse[::-1]) if levels else x


class UNet3dFull(FusionSegmenter):
    """Volumetric 3D U-Net on patches (nnU-Net's 3d_fullres topology, simplified): trunk + 1x1x1 head, one logit
    channel per organ, with optional landmark fusion (:class:`~landmark_unet.models.fusion.FusionSegmenter`:
    ``early`` adds the 3D maps as input channels, ``late`` concatenates them to the last decoder features).

    Args:
        in_channels: image channels C.
        out_channels: logit channels K (one per organ; or K + 1 with a background channel for a softmax head).
        features: first-level width; doubled per level, capped at ``max_features``.
        depth: pooling levels; default ``len(pool_kernels)``, or 4 without ``pool_kernels``.
        fusion: ``none`` | ``early`` | ``late``.
        map_channels: distance-map channels L.
        pool_kernels: per level (kd, kh, kw), each 1 or 2 (from :func:`pooling_plan`); default isotropic 2s.
        norm: ``instance`` (InstanceNorm3d with affine parameters: nnU-Net's default, sound for batches of 2) or
            ``batch`` (BatchNorm3d).
        max_features: width cap (nnU-Net: 320).
        pooling: ``conv`` (strided first convolution of each level, nnU-Net) or ``max`` (MaxPool3d).
        deep_supervision: auxiliary 1x1x1 heads on the decoder's n coarser levels while training
            (:class:`~landmark_unet.models.fusion.FusionSegmenter`).

    Shapes:
        ``forward(image, distance=None)``: image (B, C, D, H, W) = (B, C, z, x, y) with D, H, W divisible by
        :attr:`size_multiple`; distance (B, L, D, H, W) when fused. Returns logits (B, K, D, H, W).

    Attributes:
        stack_depth: 0, the marker of a volumetric patch network (class attribute): it takes no stack of axial
            slices (``data.stack``) but whole patches; 2D networks have 1, the depth-5 network 5.
        size_multiple: (D, H, W) the input sizes must be divisible by (a tuple, where 2D networks have an int).
        pool_kernels: the pooling kernel of each level.

    Raises:
        ValueError: bad arguments (a kernel other than 1 or 2, ``depth`` disagreeing with ``pool_kernels``) or,
            in ``forward``, an input not divisible by :attr:`size_multiple`.
    """

    stack_depth = 0

    def __init__(self, in_channels: int, out_channels: int = 1, features: int = 32, depth: int | None = None,
                 fusion: str = "none", map_channels: int = 1, pool_kernels: Sequence[Sequence[int]] | None = None,
                 norm: str = "instance", max_features: int = 320, pooling: str = "conv", deep_supervision: int = 0):
        if pool_kernels is None:
            depth = 4 if depth is None else depth
            pool_kernels = [(2, 2, 2)] * depth
        kernels = [tuple(int(k) for k in kernel) for kernel in pool_kernels]
        if depth is not None and depth != len(kernels):
            raise ValueError(f"depth {depth} disagrees with the {len(kernels)} pool_kernels")
        if not kernels or any(len(k) != 3 or not set(k) <= {1, 2} for k in kernels):
            raise ValueError(f"pool_kernels must be one or more (kd, kh, kw) of 1s and 2s, got {pool_kernels}")
        if in_channels < 1 or out_channels < 1 or features < 1:
            raise ValueError(f"in_channels, out_channels and features must be >= 1, got {in_channels}, "
                             f"{out_channels}, {features}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r} (choose from {', '.join(NORMS)})")
        widths = [min(features * 2**i, max(max_features, features)) for i in range(len(kernels) + 1)]
        trunk = UNet3dFullTrunk(fused_channels(in_channels, map_channels, fusion, "trunk"), widths, kernels, norm,
                                pooling)
        head = nn.Conv3d(fused_channels(widths[0], map_channels, fusion, "head"), out_channels, kernel_size=1)
        super().__init__(trunk, head, fusion, auxiliary_heads(trunk, out_channels, deep_supervision, nn.Conv3d))
        self.pool_kernels = kernels
        self.size_multiple = trunk.size_multiple
