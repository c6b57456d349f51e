"""Read and write ``landmarks.txt``.

Format (DESIGN.md): one landmark per line, ``x y z`` voxel coordinates (0-based, may be fractional) in the
subject's own file grid; ``#`` starts a comment; blank lines are ignored. For hip joints, line 1 is the subject's
right femoral head and line 2 the left.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.errors import InputError


def format_landmarks(points: np.ndarray, comment: str | None = None) -> str:
    """Text of a landmarks.txt for ``points`` (n, 3) voxel coordinates."""
    points = np.asarray(points, dtype=np.float64)
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    lines += [" ".join(f"{v:.3f}" for v in p) for p in points]
    return "\n".join(lines) + "\n"


def write_landmarks(path: str | os.PathLike, points: np.ndarray, comment: str | None = None) -> None:
    """Atomically write ``points`` (n, 3), voxel coordinates, to ``path``."""
    atomic_write_bytes(path, format_landmarks(points, comment).encode())


def read_landmarks(path: str | os.PathLike, shape: tuple[int, ...] | None = None, min_points: int = 1) -> np.ndarray:
    """Read landmarks.txt into a float64 array (n, 3) of voxel coordinates in the file grid.

    Raises:
        InputError: the file is missing or unreadable, a line does not hold exactly three finite numbers, there
            are fewer than ``min_points`` landmarks, or (when ``shape`` is given) a landmark lies outside the volume.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "landmarks file is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read landmarks file ({err.__class__.__name__})") from None
    points = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.replace(",", " ").split()
        if len(fields) != 3:
            raise InputError(path, f"line {lineno}: expected 3 numbers 'x y z', found {len(fields)} fields")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise InputError(path, f"line {lineno}: not a number in {line!r}") from None
        if not np.all(np.isfinite(values)):
            raise InputError(path, f"line {lineno}: non-finite coordinate in {line!r}")
        points.append(values)
    if len(points) < min_points:
        raise InputError(path, f"expected at least {min_points} landmark(s), found {len(points)}")
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if shape is not None:
        upper = np.asarray(shape[:3], dtype=np.float64) - 1
        for i, p in enumerate(arr):
            if np.any(p < 0) or np.any(p > upper):
                at = ", ".join(f"{v:g}" for v in np.round(p, 2))
                raise InputError(path, f"landmark {i + 1} at ({at}) lies outside the volume "
                                       f"of shape {tuple(int(s) for s in shape[:3])}")
    return arr
