"""The Subject record: one body's images, masks and landmarks in canonical RAS voxel space.

Everything downstream of the readers works on Subjects, never on files. Arrays are indexed ``[x, y, z]`` after
reorientation to the closest canonical (RAS+) orientation: x from the patient's left to right
(+x = Right), y posterior to anterior, z inferior to superior (the longitudinal axis). An axial slice is
``array[..., k]``. The original file grid is kept (``source_affine``, ``source_shape``) so that predictions can be
written back voxel for voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from landmark_unet.data.organs import ORGANS


@dataclass
class Subject:
    """One body, validated and in canonical orientation.

    Attributes:
        name: subject identifier (folder or case name).
        image: float32 array (C, X, Y, Z), one channel per entry of ``channels``.
        channels: channel names, e.g. ``("fat", "water")``.
        masks: uint8 array (K, X, Y, Z) of 0/1, one per entry of ``organs``; an organ the body lacks is all 0.
        organs: organ names, a subset of :data:`ORGANS` in that order.
        spacing: voxel size (3,) in mm along x, y, z.
        affine: (4, 4) voxel-to-world (mm) affine of the canonical arrays.
        landmarks: (n, 3) float64 landmark positions in canonical voxel coordinates, or None. For hip joints,
            row 0 is the subject's right femoral head, row 1 the left.
        source_affine: (4, 4) affine of the files as read.
        source_shape: spatial shape of the files as read.
        files: paths the subject was read from (for fingerprints and messages).
    """

    name: str
    image: np.ndarray
    channels: tuple[str, ...]
    masks: np.ndarray
    organs: tuple[str, ...]
    spacing: np.ndarray
    affine: np.ndarray
    landmarks: np.ndarray | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, int, int] | None = None
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.image.ndim == 4 and self.image.shape[0] == len(self.channels)
        assert self.masks.ndim == 4 and self.masks.shape[0] == len(self.organs)
        assert self.masks.shape[1:] == self.image.shape[1:]
        assert all(o in ORGANS for o in self.organs)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z) of the canonical arrays."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def mask(self, organ: str) -> np.ndarray:
        """Binary uint8 mask (X, Y, Z) of ``organ``."""
        return self.masks[self.organs.index(organ)]
