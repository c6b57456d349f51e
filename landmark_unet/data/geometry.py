"""Grids: from a file's own orientation to canonical RAS+ and back, and resampling to a target spacing.

A volume read from disk may come in any orientation (RAS, LPS, any axis order). Everything downstream works on
the closest canonical RAS+ orientation (DESIGN.md: arrays ``[x, y, z]``, +x patient right, +y anterior, +z
superior), which is a pure permutation and flip of the file's voxels: no interpolation, so the way back is exact.
Optional resampling to a target spacing (``data.spacing``, mm along canonical x, y, z) interpolates; its way back
(:func:`resample_to`) lands on the canonical grid of the file again. Predictions thus go back to the input's own
grid voxel for voxel (:func:`from_canonical`).
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

AFFINE_TOLERANCE_MM = 1e-3


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 3D array of the file grid and its affine -> (array, affine) in the closest canonical RAS+ orientation."""
    canon = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)))
    return np.asanyarray(canon.dataobj), canon.affine


def from_canonical(data: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_canonical`: canonical (..., X, Y, Z) -> the file grid of ``source_affine``.

    Leading axes (channels, organs) are carried along. Pure flips and axis permutations, so the result equals the
    file's own voxels exactly.
    """
    source_ornt = nib.orientations.io_orientation(source_affine)
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), source_ornt)
    lead = data.ndim - 3
    ornt = np.concatenate([np.column_stack([np.arange(lead), np.ones(lead)]),
                           np.column_stack([to_source[:, 0] + lead, to_source[:, 1]])]) if lead else to_source
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size (3,) in mm along the array axes of ``affine``."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def file_to_canonical_voxels(points: np.ndarray, source_affine: np.ndarray, canonical_affine: np.ndarray) -> np.ndarray:
    """Map (n, 3) voxel coordinates of the file grid to voxel coordinates of the canonical grid."""
    homog = np.c_[points, np.ones(len(points))]
    world = homog @ np.asarray(source_affine).T
    return (world @ np.linalg.inv(canonical_affine).T)[:, :3]


def _index_map(in_spacing: np.ndarray, out_spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) with ``input index = scale * output index + offset``: voxel edges of both grids aligned at
    the start of the field of view."""
    scale = np.asarray(out_spacing, np.float64) / np.asarray(in_spacing, np.float64)
    return scale, 0.5 * scale - 0.5


def target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """Shape of the grid at ``target`` spacing covering the same field of view (at least one voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def resampled_affine(affine: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Affine of the grid at ``target`` spacing over the same field of view as (``affine``, ``spacing``)."""
    scale, offset = _index_map(np.asarray(spacing), np.asarray(target))
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = offset
    return np.asarray(affine) @ step


def resample_to(data: np.ndarray, spacing: Sequence[float], target: Sequence[float], shape: Sequence[int],
                order: int = 1) -> np.ndarray:
    """Resample a canonical (..., X, Y, Z) array from ``spacing`` to a grid of ``target`` spacing and ``shape``.

    Leading axes are resampled one by one. ``order`` 1 is trilinear, 0 nearest; values beyond the field of view
    repeat the edge. Both grids share the start of the field of view (voxel edges aligned), so resampling to a
    target and back with the original shape lands on the original grid.
    """
    scale, offset = _index_map(np.asarray(spacing), np.asarray(target))
    flat = data.reshape(-1, *data.shape[-3:])
    out = np.stack([
        ndi.affine_transform(np.asarray(v, dtype=np.float32), scale, offset=offset, output_shape=tuple(shape),
                             order=order, mode="nearest", prefilter=False)
        for v in flat
    ])
    return out.reshape(*data.shape[:-3], *shape)


def resample_points(points: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """(n, 3) voxel coordinates at ``spacing`` -> the same positions in voxels of the ``target`` grid."""
    scale, offset = _index_map(np.asarray(spacing), np.asarray(target))
    return (np.asarray(points, np.float64) - offset) / scale


def same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray) -> bool:
    """Whether two volumes share shape and affine (to :data:`AFFINE_TOLERANCE_MM`)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=AFFINE_TOLERANCE_MM)
