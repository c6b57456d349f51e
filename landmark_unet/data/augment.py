"""In-plane affine augmentation of whole batches on the training device (the study's section 3.5.3, Table 4).

One random rotation, scale and shear per sample, in the axial plane, applied with ``affine_grid`` /
``grid_sample`` to everything of that sample alike: every channel and every slice of a depth-5 stack of the image
(bilinear), the distance maps (bilinear) and the masks (nearest neighbour, so they stay binary).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _range(values: Sequence[float], name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in values)
    if lo > hi:
        raise ValueError(f"augmentation.{name}: lower bound {lo} above upper bound {hi}")
    return lo, hi


class AffineAugment:
    """Random in-plane rotation, isotropic scale and shear.

    Args:
        rotation: range of the rotation angle in degrees, e.g. (-5, 5).
        scale: range of the zoom factor, e.g. (1, 1.05) (> 1 magnifies).
        shear: range of the shear angle in degrees, e.g. (-5, 5).
        p: probability that a sample is transformed at all.

    ``__call__(batch)`` transforms ``batch["image"]`` (B, C, H, W) or (B, C, D, H, W), ``batch["mask"]``
    (B, K, H, W) and, when present, ``batch["distance"]`` (B, L, H, W) or (B, L, D, H, W), and returns a new dict.
    """

    def __init__(self, rotation: Sequence[float] = (0, 0), scale: Sequence[float] = (1, 1),
                 shear: Sequence[float] = (0, 0), p: float = 1.0):
        self.rotation = _range(rotation, "rotation")
        self.scale = _range(scale, "scale")
        self.shear = _range(shear, "shear")
        self.p = float(p)
        if self.scale[0] <= 0:
            raise ValueError("augmentation.scale must be positive")

    @property
    def active(self) -> bool:
        return self.p > 0 and (self.rotation != (0, 0) or self.scale != (1, 1) or self.shear != (0, 0))

    def matrices(self, n: int, height: int, width: int, device, generator=None) -> torch.Tensor:
        """(n, 2, 3) ``affine_grid`` matrices: for each output pixel, where to sample the input."""

        def draw(lo, hi):
            return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)

        angle = torch.deg2rad(draw(*self.rotation))
        zoom = draw(*self.scale)
        shear = torch.tan(torch.deg2rad(draw(*self.shear)))
        keep = torch.rand(n, device=device, generator=generator) >= self.p
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shr = torch.eye(2, device=device).repeat(n, 1, 1)
        shr[:, 0, 1] = shear
        a = rot @ shr / zoom[:, None, None]  # in pixel units, (x = width, y = height)
        a[keep] = torch.eye(2, device=device)
        # normalised coordinates of affine_grid scale x by 2/W and y by 2/H: conjugate so the map is a true
        # rotation / shear of the pixel grid whatever the aspect ratio
        norm = torch.tensor([2.0 / width, 2.0 / height], device=device)
        a = norm[None, :, None] * a / norm[None, None, :]
        return torch.cat([a, torch.zeros(n, 2, 1, device=device)], dim=2)

    @staticmethod
    def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], -1, *shape[-2:])  # stacks: every slice gets the sample's transform
        grid = F.affine_grid(theta.to(flat.dtype), list(flat.shape), align_corners=False)
        out = F.grid_sample(flat, grid, mode=mode, padding_mode=padding, align_corners=False)
        return out.reshape(shape)

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        if not self.active:
            return batch
        image = batch["image"]
        theta = self.matrices(image.shape[0], image.shape[-2], image.shape[-1], image.device, generator)
        out = dict(batch)
        out["image"] = self._warp(image, theta, "bilinear", "zeros")
        out["mask"] = self._warp(batch["mask"], theta, "nearest", "zeros")
        if "distance" in batch:
            out["distance"] = self._warp(batch["distance"], theta, "bilinear", "border")
        return out


__all__ = ["AffineAugment"]
