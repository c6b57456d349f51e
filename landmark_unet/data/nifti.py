"""NIfTI writing that is atomic and byte-reproducible.

``save_nifti`` writes to a temporary name in the target folder and renames it into place, so a reader never
sees a half-written file. The gzip stream carries no timestamp and a fixed compression level, so the same array
and affine always give the same bytes.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compresslevel: int = 1) -> bytes:
    """Serialise ``array`` (indexed [x, y, z]) with ``affine`` (4 x 4, mm) to gzip-compressed NIfTI-1 bytes."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=compresslevel, mtime=0)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with_suppressed_unlink(tmp)
        raise


def with_suppressed_unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, compresslevel: int = 1) -> None:
    """Atomically write ``array`` with ``affine`` to ``path`` (.nii.gz)."""
    atomic_write_bytes(path, nifti_bytes(array, affine, compresslevel))
