"""Readers from the files of a :class:`~landmark_unet.data.layouts.Case` to a validated :class:`Subject`.

Every layout (the study's folders, nnU-Net, TotalSegmentator: :mod:`landmark_unet.data.layouts`) is read by the same
:func:`read_case`: images, masks and landmarks are checked, brought to canonical RAS+ (:mod:`geometry`) and
optionally resampled to a target spacing. Every problem is raised as :class:`~landmark_unet.errors.InputError`
naming the file and what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from landmark_unet.data import geometry
from landmark_unet.data.layouts import FOLDER_CHANNEL_FILES, Case, LabelPart, folder_case, list_cases
from landmark_unet.data.organs import ORGANS
from landmark_unet.data.subject import Subject
from landmark_unet.errors import InputError, MissingLandmarksError
from landmark_unet.landmarks.io import read_landmarks

log = logging.getLogger(__name__)
LANDMARK_SOURCES = ("file", "optional", "detect", "auto", "none")
MODALITIES = ("mri", "ct")
HEAD_SEARCH_MM = 60.0  # the femoral head lies within this distance below the top of a femur mask


def detect_modality(channel: str, modality: str) -> str:
    """The hip detector's modality for a channel: fat / water of a Dixon MRI, or the single channel of a CT or of
    another MRI sequence (read like a fat image: T1-weighted marrow is bright)."""
    if channel in ("fat", "water"):
        return f"mri-{channel}"
    return "ct" if modality == "ct" else "mri-fat"


def as_volume(data: np.ndarray, where: object) -> np.ndarray:
    """``data`` as a 3D array (trailing axes of length 1 dropped).

    Raises:
        InputError: not 3D, or an empty axis; the message names ``where``.
    """
    data = np.asanyarray(data)
    return data.reshape(volume_shape(data.shape, where))


def volume_shape(shape: Sequence[int], where: object, what: str = "shape") -> tuple[int, int, int]:
    """The 3D shape of ``shape`` (trailing axes of length 1 dropped: 4D files with one volume are common).

    Raises:
        InputError: an empty axis, or not 3D; the message names ``where``.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or 0 in shape:
        raise InputError(where, f"volume holds no voxels ({what} {shape})")
    core = shape
    while len(core) > 3 and core[-1] == 1:
        core = core[:-1]
    if len(core) != 3:
        raise InputError(where, f"expected a 3D volume, found {what} {shape}")
    return core  # type: ignore[return-value]


# deflate (gzip) cannot shrink data by more than about 1032:1: a header that declares more voxels than that is
# corrupted, and is refused before anything that large is allocated
MAX_DEFLATE_RATIO = 1032


def open_nifti(path: str | Path) -> nib.spatialimages.SpatialImage:
    """A NIfTI image with its header checked and its voxels not yet read (nibabel's lazy image).

    Checked: the file exists and is not empty; nibabel can parse its header (nibabel's own messages about header
    fields it repairs are silenced); the voxels are integers or floats; the header declares a 3D shape (trailing
    axes of length 1 allowed) without an empty axis, and no more bytes than the file can hold (at most
    :data:`MAX_DEFLATE_RATIO` times its size when gzipped, its size when not); the affine is finite and
    invertible.

    Raises:
        InputError: any of the above, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file is missing")
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = nib.load(str(path))
            dtype, shape, affine = img.get_data_dtype(), img.shape, img.affine
    except Exception as err:  # noqa: BLE001 - whatever nibabel fails on, the file is not a readable image
        raise InputError(path, f"cannot read NIfTI header ({_reason(err)})") from None
    if dtype.kind not in "biuf":
        raise InputError(path, f"voxel type {dtype} is not real-valued (expected integers or floats)")
    volume_shape(shape, path, "header shape")
    nbytes = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
    name = path.name.lower()
    capacity = size * MAX_DEFLATE_RATIO if name.endswith(".nii.gz") else size if name.endswith(".nii") else None
    if capacity is not None and nbytes > capacity:
        dims = " x ".join(str(int(s)) for s in shape)
        raise InputError(path, f"header declares {dims} voxels of {dtype} ({nbytes / 1e6:.3g} MB), more than the "
                               f"{size}-byte file can hold (corrupted header or truncated file)")
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "affine is missing or not invertible")
    return img


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Load a 3D NIfTI image fully into memory: :func:`open_nifti`'s header checks, then the voxels, which must
    decompress and read completely. Values (NaN, Inf, binary masks) are checked by the callers.

    Raises:
        InputError: naming the file and what is wrong.
    """
    img = open_nifti(path)
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            data = np.asanyarray(img.dataobj)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupted stream, in whatever form nibabel reports it
        raise InputError(path, f"cannot read NIfTI data, truncated or corrupted file ({_reason(err)})") from None
    return nib.Nifti1Image(as_volume(data, path), img.affine, img.header)


def _reason(err: BaseException) -> str:
    """``Class: first line of the message`` of an exception, at most 120 characters of it."""
    lines = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {lines[0][:120]}" if lines else err.__class__.__name__


def _check_same_grid(ref: nib.spatialimages.SpatialImage, ref_path: Path, img: nib.spatialimages.SpatialImage,
                     path: Path) -> None:
    """``img`` (read from ``path``) shares the grid of ``ref``: shape (trailing axes of length 1 aside) and affine."""
    shape, ref_shape = volume_shape(img.shape, path), volume_shape(ref.shape, ref_path)
    if shape != ref_shape:
        raise InputError(path, f"shape {shape} differs from {ref_path.name} {ref_shape}")
    if not geometry.same_grid(shape, img.affine, ref_shape, ref.affine):
        raise InputError(path, f"affine differs from that of {ref_path.name}")


def _case_channel_files(case: Case, channels: Sequence[str]) -> list[Path]:
    missing = [c for c in channels if c not in case.images]
    if missing:
        raise InputError(case.name, f"case lacks channel(s) {', '.join(missing)} (has {', '.join(case.images)})")
    return [case.images[c] for c in channels]


def check_case_headers(case: Case, channels: Sequence[str]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Check the image channels of a case without reading their voxels (a quick pass over many cases before any
    output is written): every file exists and passes :func:`open_nifti`, and all share the first one's grid.

    Returns:
        The file grid: (3D shape, affine) of the first channel.

    Raises:
        InputError: naming the file and what is wrong.
    """
    ref, ref_path = None, None
    for path in _case_channel_files(case, channels):
        img = open_nifti(path)
        if ref is None:
            ref, ref_path = img, path
        else:
            _check_same_grid(ref, ref_path, img, path)
    assert ref is not None
    return volume_shape(ref.shape, ref_path), ref.affine


class CaseImages:
    """The image channels of a case in canonical orientation, with both grids.

    Attributes:
        channels: channel names, in the order of ``image``.
        image: float32 (C, X, Y, Z) canonical.
        affine: canonical (4, 4) affine.
        source_affine, source_shape: the files' own grid.
        ref: the first channel's image as read (the grid every other file must share), and its path.
    """

    def __init__(self, case: Case, channels: Sequence[str]):
        paths = _case_channel_files(case, channels)
        arrays = []
        self.channels = list(channels)
        self.ref: nib.Nifti1Image | None = None
        for path in paths:
            img = load_nifti(path)
            if self.ref is None:
                self.ref, self.ref_path = img, path
            else:
                _check_same_grid(self.ref, self.ref_path, img, path)
            data, self.affine = geometry.to_canonical(img.dataobj, img.affine)
            data = np.asarray(data, dtype=np.float32)
            if not np.isfinite(data).all():
                raise InputError(path, f"{int((~np.isfinite(data)).sum())} voxel(s) are NaN or Inf")
            arrays.append(data)
        assert self.ref is not None
        self.image = np.stack(arrays)
        self.source_affine = self.ref.affine
        self.source_shape = tuple(int(s) for s in self.ref.shape)

    def on_grid(self, path: Path) -> np.ndarray:
        """A file that must share the image grid, as a canonical array (one clear line when it does not)."""
        img = load_nifti(path)
        _check_same_grid(self.ref, self.ref_path, img, path)
        return np.asanyarray(geometry.to_canonical(img.dataobj, img.affine)[0])


def _part_mask(images: CaseImages, part: LabelPart, loaded: dict) -> np.ndarray:
    """Boolean canonical mask of one label part (a binary mask file, or some values of a label map)."""
    if part.path not in loaded:
        loaded[part.path] = images.on_grid(part.path)
    return label_part_mask(loaded[part.path], part)


def label_part_mask(data: np.ndarray, part: LabelPart) -> np.ndarray:
    """The voxels of ``data`` (read from ``part.path``) that belong to the part: a checked binary mask, or the
    part's values of a label map."""
    if part.values is None:
        values = np.unique(data)
        if not np.all(np.isin(values, (0, 1))):
            shown = ", ".join(f"{v:g}" for v in values[:6])
            raise InputError(part.path, f"mask is not binary (values {shown}{', ...' if len(values) > 6 else ''})")
        return data.astype(bool)
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        raise InputError(part.path, "label map holds non-integer values")
    return np.isin(data, part.values)


def femoral_head_centres(right: np.ndarray, left: np.ndarray, spacing: np.ndarray, where: object) -> np.ndarray:
    """(2, 3) canonical voxel centres of the right and left femoral heads from femur masks (X, Y, Z).

    The head is the thickest part of the top of the femur: the centre is the deepest voxel (largest distance to
    the mask's surface, in mm) within :data:`HEAD_SEARCH_MM` below the mask's most superior voxel.

    Raises:
        MissingLandmarksError: a femur mask is empty.
    """
    centres = []
    for side, mask in (("right", right), ("left", left)):
        mask = mask.astype(bool)
        if not mask.any():
            raise MissingLandmarksError(where, f"femur_{side} mask is empty: no hip landmark")
        zs = np.flatnonzero(mask.any(axis=(0, 1)))
        lo = max(int(zs[-1] - np.ceil(HEAD_SEARCH_MM / spacing[2])), 0)
        box = [slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(mask[:, :, lo:])]
        box[2] = slice(lo + box[2].start, lo + box[2].stop)
        depth = ndi.distance_transform_edt(np.pad(mask[tuple(box)], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        centres.append(np.array(np.unravel_index(np.argmax(depth), depth.shape)) + [b.start for b in box])
    return np.asarray(centres, dtype=np.float64)


def resample_subject(subject: Subject, target: Sequence[float]) -> Subject:
    """``subject`` on a grid of ``target`` spacing (mm along canonical x, y, z) over the same field of view.

    Images are interpolated trilinearly; each mask is interpolated as a fraction and cut at 0.5; landmarks move
    with the grid. The file grid (``source_affine``, ``source_shape``) is kept.
    """
    target = np.asarray(target, dtype=np.float64)
    shape = geometry.target_shape(subject.shape, subject.spacing, target)
    image = geometry.resample_to(subject.image, subject.spacing, target, shape)
    masks = (geometry.resample_to(subject.masks.astype(np.float32), subject.spacing, target, shape) > 0.5)
    landmarks = None if subject.landmarks is None else geometry.resample_points(subject.landmarks, subject.spacing,
                                                                                target)
    return Subject(name=subject.name, image=image.astype(np.float32), channels=subject.channels,
                   masks=masks.astype(np.uint8), organs=subject.organs, spacing=target,
                   affine=geometry.resampled_affine(subject.affine, subject.spacing, target), landmarks=landmarks,
                   source_affine=subject.source_affine, source_shape=subject.source_shape, files=subject.files)


def case_landmarks(case: Case, images: CaseImages, source: str, modality: str = "mri") -> np.ndarray | None:
    """(n, 3) canonical voxel landmarks of a case, or None.

    ``source``: ``file`` (landmarks.txt, else the femoral heads of femur masks; one of them required),
    ``optional`` (those when present, else none), ``detect`` (the hip detector on the first channel), ``auto``
    (file or femurs when present, else detection; logged), ``none``.
    """
    if source not in LANDMARK_SOURCES:
        raise InputError("landmarks.source", f"unknown source {source!r} (choose from file, detect, auto)")
    if source == "none":
        return None
    if source != "detect":
        if case.landmarks is not None and case.landmarks.exists():
            points = read_landmarks(case.landmarks, shape=images.source_shape)
            return geometry.file_to_canonical_voxels(points, images.source_affine, images.affine)
        if case.femurs is not None:
            right, left = (images.on_grid(p) for p in case.femurs)
            return femoral_head_centres(right, left, geometry.spacing_of(images.affine), case.femurs[0].parent)
        if source == "file":
            raise MissingLandmarksError(case.landmarks or case.name,
                                        "landmarks file is missing (landmarks.source=auto detects the hips)")
        if source == "optional":
            return None
    from landmark_unet.landmarks.detect import detect_hips

    channel = images.channels[0]
    first = case.images[channel]
    try:
        found = detect_hips(np.asanyarray(images.ref.dataobj), images.source_affine,
                            modality=detect_modality(channel, modality), source=str(first))
    except MissingLandmarksError:
        raise
    except InputError as err:
        raise MissingLandmarksError(err.where, err.problem) from None
    log.info("%s: hip joints detected (confidence %.2f)%s", case.name, found.confidence,
             " because it has no landmarks file" if source == "auto" else "")
    return geometry.file_to_canonical_voxels(found.voxels, images.source_affine, images.affine)


def read_case(
    case: Case,
    channels: Sequence[str],
    organs: Sequence[str] = ORGANS,
    landmarks: str = "file",
    modality: str = "mri",
    spacing: Sequence[float] | None = None,
) -> Subject:
    """Read one case into a validated :class:`Subject` in canonical RAS orientation.

    Args:
        case: its files (:func:`~landmark_unet.data.layouts.list_cases`).
        channels: image channels to read, in channel order.
        organs: organs whose masks to read (each the union of its label parts).
        landmarks: see :func:`case_landmarks`.
        modality: ``mri`` or ``ct`` (for the hip detector on a single channel).
        spacing: resample to this spacing (mm along canonical x, y, z); None keeps the file's grid.

    Raises:
        InputError: a file is missing or unreadable, images and labels differ in shape or affine, an image holds
            NaN or Inf, a mask holds values other than 0 and 1, a label map non-integer values, or a landmark is
            malformed or outside the volume.
    """
    for organ in organs:
        if organ not in ORGANS:
            raise InputError("organ", f"unknown organ {organ!r} (choose from {', '.join(ORGANS)})")
    images = CaseImages(case, channels)
    loaded: dict = {}
    masks = []
    for organ in organs:
        parts = case.labels.get(organ, ())
        mask = np.zeros(images.image.shape[1:], bool)
        for part in parts:
            mask |= _part_mask(images, part, loaded)
        masks.append(mask.astype(np.uint8))
    points = case_landmarks(case, images, landmarks, modality)
    files = list(case.files())
    subject = Subject(
        name=case.name,
        image=images.image,
        channels=tuple(channels),
        masks=np.stack(masks) if masks else np.zeros((0, *images.image.shape[1:]), np.uint8),
        organs=tuple(organs),
        spacing=geometry.spacing_of(images.affine),
        affine=images.affine,
        landmarks=points,
        source_affine=images.source_affine,
        source_shape=images.source_shape,
        files=files,
    )
    return subject if spacing is None else resample_subject(subject, spacing)


def reference_mask(case: Case, organ: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """The reference mask of ``organ`` on its label file's own grid: (bool array, affine, first label file).

    Raises:
        InputError: no label for the organ, an unreadable file, parts on different grids, a bad mask.
    """
    parts = case.labels.get(organ)
    if not parts:
        raise InputError(case.name, f"has no reference for {organ}")
    mask, ref, ref_path = None, None, parts[0].path
    for part in parts:
        img = load_nifti(part.path)
        if ref is None:
            ref = img
        else:
            _check_same_grid(ref, ref_path, img, part.path)
        m = label_part_mask(np.asanyarray(img.dataobj), part)
        mask = m if mask is None else mask | m
    assert ref is not None
    return mask, ref.affine, ref_path


# -- the study's folder layout, by folder --------------------------------------------------------------------------
def read_folder_subject(subject_dir: str | Path, channels: Sequence[str] = ("fat", "water"),
                        organs: Sequence[str] = ORGANS, landmarks: str = "file") -> Subject:
    """Read one subject folder of the study's layout (see :func:`read_case`)."""
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise InputError(subject_dir, "subject folder is missing")
    for channel in channels:
        if channel not in FOLDER_CHANNEL_FILES:
            raise InputError("content", f"unknown channel {channel!r} for the folder layout "
                                        f"(choose from {', '.join(FOLDER_CHANNEL_FILES)})")
    return read_case(folder_case(subject_dir, organs), channels, organs, landmarks)


def list_folder_subjects(root: str | Path) -> list[Path]:
    """Subject folders of a dataset root in the study's layout, sorted by name (hidden folders skipped)."""
    return [Path(root) / c.name for c in list_cases("folder", root, ())]
