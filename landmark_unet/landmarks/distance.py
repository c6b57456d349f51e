"""Landmark distance maps (the study's section 3.6; DESIGN.md "Distance map").

For landmarks p_1..p_n and a voxel v the study's map is ``m(v) = sum_i 1 / (1 + d(v, p_i))`` with ``d`` the
Manhattan distance in voxels, divided by the value it takes at a landmark, so that ``m = 1`` there and
``0 < m <= 1`` everywhere. Here ``d`` may also be Euclidean, and measured in mm (``spacing``); a Gaussian heatmap
``max_i exp(-|v - p_i|^2 / (2 sigma^2))`` (Euclidean, mm when ``spacing`` is given) is the further encoding of the
study's reference [8]. The heatmap takes the maximum over landmarks rather than the sum: a sum of close Gaussians
peaks between them, the maximum is exactly 1 at every landmark.

Maps are separable sums of per-axis distances, so a 256 x 256 x 252 map costs a few full-volume operations per
landmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("manhattan", "euclidean", "gaussian")
GAUSSIAN_FLOOR = 1e-6  # keeps a Gaussian map strictly positive far from the landmarks


def _axis_distances(shape: Sequence[int], point: np.ndarray, spacing: np.ndarray, squared: bool) -> list[np.ndarray]:
    """Per-axis |i - p| * spacing (or its square), each broadcastable to ``shape``, float32."""
    out = []
    for axis, (n, p, s) in enumerate(zip(shape, point, spacing)):
        d = np.abs(np.arange(n, dtype=np.float64) - p) * s
        d = (d * d if squared else d).astype(np.float32)
        view = [1] * len(shape)
        view[axis] = n
        out.append(d.reshape(view))
    return out


def _term(shape: Sequence[int], point: np.ndarray, spacing: np.ndarray, metric: str, sigma: float) -> np.ndarray:
    """One landmark's un-normalised contribution over the grid, float32 of ``shape`` (one or two full passes)."""
    if metric == "gaussian":  # separable: a product of 1D Gaussians
        parts = _axis_distances(shape, point, spacing, squared=True)
        factors = [np.exp(np.float32(-0.5 / sigma**2) * p) for p in parts]
        acc = factors[0]
        for f in factors[1:]:
            acc = acc * f
        return acc
    parts = _axis_distances(shape, point, spacing, squared=metric == "euclidean")
    acc = parts[0]
    for part in parts[1:]:
        acc = acc + part  # only the last sum has the full shape
    if metric == "euclidean":
        np.sqrt(acc, out=acc)
    acc += np.float32(1.0)
    return np.reciprocal(acc, out=acc)


def distance_map(
    shape: Sequence[int],
    points: np.ndarray,
    metric: str = "manhattan",
    spacing: Sequence[float] | None = None,
    sigma_mm: float = 20.0,
) -> np.ndarray:
    """Normalised landmark distance map.

    Args:
        shape: grid shape, 2D (X, Y) or 3D (X, Y, Z).
        points: (n, ndim) landmark voxel coordinates (0-based, may be fractional, may lie outside the grid), n >= 1.
        metric: ``manhattan`` (the study), ``euclidean`` or ``gaussian``.
        spacing: voxel size per axis in mm; given, distances are in mm, otherwise in voxels.
        sigma_mm: width of the Gaussian (in mm with ``spacing``, else voxels); ``gaussian`` only.

    Returns:
        float32 array of ``shape`` in (0, 1], divided by its maximum: exactly 1 at the landmark voxel where the
        sum peaks (for landmarks on voxel centres this is the study's normalisation by the value at the landmarks:
        the sum of the convex terms 1/(1+d) peaks at a landmark). Gaussian maps are floored at 1e-6.

    Raises:
        ValueError: unknown metric, no point, or points of the wrong dimension.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    shape = tuple(int(s) for s in shape)
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if points.ndim != 2 or points.shape[1] != len(shape):
        raise ValueError(f"points must be (n, {len(shape)}) for a {len(shape)}D grid, got {points.shape}")
    if len(points) == 0:
        raise ValueError("distance_map needs at least one landmark")
    spacing_arr = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    acc = None
    for p in points:
        term = _term(shape, p, spacing_arr, metric, sigma_mm)
        if acc is None:
            acc = term
        elif metric == "gaussian":
            np.maximum(acc, term, out=acc)  # a heatmap: the nearest landmark's Gaussian, 1 at every landmark
        else:
            np.add(acc, term, out=acc)
    np.divide(acc, acc.max(), out=acc)  # division, not a reciprocal product: the peak is exactly 1
    if metric == "gaussian":
        np.maximum(acc, np.float32(GAUSSIAN_FLOOR), out=acc)
    return acc


ENCODINGS = METRICS
SPACES = ("volume", "plane")
COMBINES = ("sum", "channels")
UNITS = ("voxel", "mm")
MAP_KEYS = ("encoding", "units", "space", "combine", "pairs", "sigma_mm")  # the settings that define a run's maps


def map_channels(combine: str, pairs: int) -> int:
    """Number of distance-map channels a model receives: one per landmark pair, or one for all."""
    return int(pairs) if combine == "channels" else 1


def subject_maps(
    landmarks: np.ndarray,
    shape: Sequence[int],
    spacing: Sequence[float],
    encoding: str = "manhattan",
    units: str = "voxel",
    space: str = "volume",
    combine: str = "sum",
    pairs: int = 1,
    sigma_mm: float = 20.0,
) -> np.ndarray:
    """The distance maps of one subject, laid out like the cache: float32 (Z', L, X, Y).

    Args:
        landmarks: (n, 3) canonical voxel coordinates; pairs are consecutive rows (hip joints: one pair).
        shape: canonical (X, Y, Z).
        spacing: voxel size in mm (used when ``units == "mm"``; the Gaussian always needs a length scale:
            ``sigma_mm`` is in mm with ``units=mm`` and in voxels otherwise).
        encoding: ``manhattan`` | ``euclidean`` | ``gaussian``.
        units: ``voxel`` (the study) or ``mm``.
        space: ``volume``: the 3D map, an axial slice takes its slice (so it also encodes the distance along the
            body), Z' = Z; ``plane``: one in-plane map of the landmarks projected onto the axial plane, the same for
            every slice, Z' = 1.
        combine: ``sum``: one map of all landmarks (L = 1); ``channels``: one map per pair (L = pairs).
        pairs: number of landmark pairs expected.

    Raises:
        ValueError: fewer than ``2 * pairs`` landmarks, or an unknown option.
    """
    for value, allowed, key in ((encoding, ENCODINGS, "encoding"), (units, UNITS, "units"), (space, SPACES, "space"),
                                (combine, COMBINES, "combine")):
        if value not in allowed:
            raise ValueError(f"landmarks.{key}: unknown value {value!r} (choose from {', '.join(allowed)})")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if len(landmarks) < 2 * pairs:
        raise ValueError(f"expected {pairs} landmark pair(s), found {len(landmarks)} landmark(s)")
    groups = [landmarks[2 * i: 2 * i + 2] for i in range(pairs)] if combine == "channels" else [landmarks]
    sp = np.asarray(spacing, dtype=np.float64) if units == "mm" else None
    maps = []
    for pts in groups:
        if space == "volume":
            m = distance_map(tuple(shape), pts, encoding, spacing=sp, sigma_mm=sigma_mm)  # (X, Y, Z)
            maps.append(np.moveaxis(m, 2, 0))  # (Z, X, Y)
        else:
            m = distance_map(tuple(shape[:2]), pts[:, :2], encoding, spacing=None if sp is None else sp[:2],
                             sigma_mm=sigma_mm)
            maps.append(m[None])  # (1, X, Y)
    return np.ascontiguousarray(np.stack(maps, axis=1))
