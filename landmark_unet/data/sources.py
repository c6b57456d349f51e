"""Readers from dataset layouts on disk to validated :class:`Subject` records.

Only the study's folder layout is read here so far (DESIGN.md)::

    <root>/<subject>/fat.nii.gz, water.nii.gz, masks/<organ>.nii.gz, landmarks.txt

Every problem is raised as :class:`~landmark_unet.errors.InputError` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from landmark_unet.data.organs import ORGANS
from landmark_unet.data.subject import Subject
from landmark_unet.errors import InputError, MissingLandmarksError
from landmark_unet.landmarks.io import read_landmarks

log = logging.getLogger(__name__)
AFFINE_TOLERANCE_MM = 1e-3
LANDMARK_SOURCES = ("file", "optional", "detect", "auto", "none")
DETECT_MODALITY = {"fat": "mri-fat", "water": "mri-water"}
CHANNEL_FILES = {"fat": "fat.nii.gz", "water": "water.nii.gz"}


def as_volume(data: np.ndarray, where: object) -> np.ndarray:
    """``data`` as a 3D array (trailing axes of length 1 dropped).

    Raises:
        InputError: not 3D, or an empty axis; the message names ``where``.
    """
    data = np.asanyarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(where, f"expected a 3D volume, found shape {tuple(data.shape)}")
    if 0 in data.shape:
        raise InputError(where, f"volume has an empty axis, shape {tuple(data.shape)}")
    return data


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a 3D NIfTI image fully into memory, with its header checked.

    Raises:
        InputError: missing, unreadable or truncated file; not 3D (a trailing axis of length 1 is dropped);
            an empty axis; a non-invertible affine.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file is missing")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as err:
        raise InputError(path, f"cannot read NIfTI ({err.__class__.__name__}: {str(err).splitlines()[0][:120]})") from None
    data = as_volume(data, path)
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "affine is missing or not invertible")
    return nib.Nifti1Image(data, affine, img.header)


def _check_same_grid(ref: nib.Nifti1Image, ref_path: Path, img: nib.Nifti1Image, path: Path) -> None:
    if img.shape != ref.shape:
        raise InputError(path, f"shape {img.shape} differs from {ref_path.name} {ref.shape}")
    if not np.allclose(img.affine, ref.affine, atol=AFFINE_TOLERANCE_MM):
        raise InputError(path, f"affine differs from that of {ref_path.name}")


def to_canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of ``img`` in the closest canonical (RAS+) orientation."""
    canon = nib.as_closest_canonical(img)
    return np.asanyarray(canon.dataobj), canon.affine


def file_to_canonical_voxels(points: np.ndarray, source_affine: np.ndarray, canonical_affine: np.ndarray) -> np.ndarray:
    """Map (n, 3) voxel coordinates of the file grid to voxel coordinates of the canonical grid."""
    homog = np.c_[points, np.ones(len(points))]
    world = homog @ source_affine.T
    return (world @ np.linalg.inv(canonical_affine).T)[:, :3]


def read_folder_subject(
    subject_dir: str | Path,
    channels: Sequence[str] = ("fat", "water"),
    organs: Sequence[str] = ORGANS,
    landmarks: str = "file",
) -> Subject:
    """Read one subject of the folder layout.

    Args:
        subject_dir: ``<root>/<subject>``.
        channels: which of ``fat``, ``water`` to read, in channel order.
        organs: which masks to read (``masks/<organ>.nii.gz``).
        landmarks: where the landmarks come from: ``file`` (``landmarks.txt``, required), ``optional`` (the file
            when present, else none), ``detect`` (the automatic hip-joint detector on the first channel), ``auto``
            (the file when present, else detection; logged per subject), ``none``.

    Returns:
        A validated :class:`Subject` in canonical RAS orientation.

    Raises:
        InputError: a file is missing or unreadable, channels and masks differ in shape or affine, an image holds
            NaN or Inf, a mask holds values other than 0 and 1, or a landmark is malformed or outside the volume.
    """
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise InputError(subject_dir, "subject folder is missing")
    ref_path: Path | None = None
    ref: nib.Nifti1Image | None = None
    arrays, files = [], []
    canon_affine = None
    for channel in channels:
        if channel not in CHANNEL_FILES:
            raise InputError("content", f"unknown channel {channel!r} (choose from {', '.join(CHANNEL_FILES)})")
        path = subject_dir / CHANNEL_FILES[channel]
        img = load_nifti(path)
        if ref is None:
            ref, ref_path = img, path
        else:
            _check_same_grid(ref, ref_path, img, path)
        data, canon_affine = to_canonical(img)
        data = np.asarray(data, dtype=np.float32)
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise InputError(path, f"{bad} voxel(s) are NaN or Inf")
        arrays.append(data)
        files.append(str(path))
    assert ref is not None and ref_path is not None and canon_affine is not None
    masks = []
    for organ in organs:
        if organ not in ORGANS:
            raise InputError("organ", f"unknown organ {organ!r} (choose from {', '.join(ORGANS)})")
        path = subject_dir / "masks" / f"{organ}.nii.gz"
        img = load_nifti(path)
        _check_same_grid(ref, ref_path, img, path)
        data, _ = to_canonical(img)
        values = np.unique(np.asarray(data))
        if not np.all(np.isin(values, (0, 1))):
            shown = ", ".join(f"{v:g}" for v in values[:6])
            raise InputError(path, f"mask is not binary (values {shown}{', ...' if len(values) > 6 else ''})")
        masks.append(np.asarray(data, dtype=np.uint8))
        files.append(str(path))
    if landmarks not in LANDMARK_SOURCES:
        raise InputError("landmarks.source", f"unknown source {landmarks!r} (choose from file, detect, auto)")
    lm_path = subject_dir / "landmarks.txt"
    use_file = landmarks == "file" or (landmarks in ("optional", "auto") and lm_path.exists())
    file_points = None
    if landmarks == "file" and not lm_path.exists():
        raise MissingLandmarksError(lm_path, "landmarks file is missing (landmarks.source=auto detects the hips)")
    if use_file:
        file_points = read_landmarks(lm_path, shape=ref.shape)
        files.append(str(lm_path))
    elif landmarks in ("detect", "auto"):
        from landmark_unet.landmarks.detect import detect_hips

        first = subject_dir / CHANNEL_FILES[channels[0]]
        try:
            found = detect_hips(np.asanyarray(load_nifti(first).dataobj), ref.affine,
                                modality=DETECT_MODALITY[channels[0]], source=str(first))
        except MissingLandmarksError:
            raise
        except InputError as err:
            raise MissingLandmarksError(err.where, err.problem) from None
        file_points = found.voxels
        log.info("%s: hip joints detected (confidence %.2f)%s", subject_dir.name, found.confidence,
                 " because landmarks.txt is absent" if landmarks == "auto" else "")
    points = None if file_points is None else file_to_canonical_voxels(file_points, ref.affine, canon_affine)
    spacing = np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0))
    return Subject(
        name=subject_dir.name,
        image=np.stack(arrays),
        channels=tuple(channels),
        masks=np.stack(masks) if masks else np.zeros((0, *arrays[0].shape), np.uint8),
        organs=tuple(organs),
        spacing=spacing,
        affine=canon_affine,
        landmarks=points,
        source_affine=ref.affine,
        source_shape=tuple(int(s) for s in ref.shape),
        files=files,
    )


def list_folder_subjects(root: str | Path) -> list[Path]:
    """Subject folders of a dataset root in the folder layout, sorted by name.

    A subject folder is any sub-folder holding a ``fat.nii.gz`` or ``water.nii.gz``; hidden folders (temporary
    output of an interrupted writer) are skipped.

    Raises:
        InputError: the root is missing or holds no subject.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "data folder is missing (set data.root=DIR)")
    subjects = sorted(
        p for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / f).exists() for f in CHANNEL_FILES.values())
    )
    if not subjects:
        raise InputError(root, "data folder holds no subject (expected <subject>/fat.nii.gz, water.nii.gz, masks/)")
    return subjects
