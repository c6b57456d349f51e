"""NIfTI writing that is atomic and byte-reproducible.

``save_nifti`` writes to a temporary name in the target folder and renames it into place, so a reader never
sees a half-written file. The gzip stream carries no timestamp and a fixed compression level, so the same array
and affine always give the same bytes.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np


def gzip_bytes(raw: bytes, level: int = 1, huffman_only: bool = True) -> bytes:
    """A gzip member of ``raw`` with no timestamp (byte-reproducible).

    ``huffman_only`` (zlib's Z_HUFFMAN_ONLY strategy) skips the match search: about twice as fast as level 1 on
    noisy image data, which LZ77 matching barely shrinks anyway; any gzip reader decompresses it.
    """
    strategy = zlib.Z_HUFFMAN_ONLY if huffman_only else zlib.Z_DEFAULT_STRATEGY
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, strategy)
    body = comp.compress(raw) + comp.flush()
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
    trailer = struct.pack("<II", zlib.crc32(raw) & 0xFFFFFFFF, len(raw) & 0xFFFFFFFF)
    return header + body + trailer


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compresslevel: int = 1) -> bytes:
    """Serialise ``array`` (indexed [x, y, z]) with ``affine`` (4 x 4, mm) to gzip-compressed NIfTI-1 bytes.

    Images (more than one byte per voxel: noisy, hardly any repeats) are Huffman-coded only, which is fast; masks
    and label maps (one byte per voxel, long runs of zeros) get the full LZ77 search, which shrinks them ~100x.
    """
    array = np.asarray(array)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return gzip_bytes(img.to_bytes(), level=compresslevel, huffman_only=array.dtype.itemsize > 1)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode of a new file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, compresslevel: int = 1) -> None:
    """Atomically write ``array`` with ``affine`` to ``path`` (.nii.gz)."""
    atomic_write_bytes(path, nifti_bytes(array, affine, compresslevel))
