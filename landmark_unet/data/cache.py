"""Preprocessed, memory-mapped, fingerprinted per-subject cache.

One folder per subject and fingerprint, ``<cache_dir>/<subject>-<fingerprint>/``:

- ``image.npy``  float16 (Z, C, X, Y): intensity-normalised channels, axial slice k contiguous at ``[k]``;
- ``labels.npy`` uint8 (Z, X, Y): organ masks packed as bits (bit i = ``ORGANS[i]``, see :func:`organ_bit`),
  so that overlapping annotations survive;
- ``meta.json``: geometry (spacing, affines, shapes), landmarks, channels, organs, per-slice organ bits,
  organ volumes, the normalisation used and ``content``, a digest of the cached arrays, geometry and landmarks
  (what a run's ``data_fingerprint`` is made of).

The fingerprint hashes the source files (path, size, modification time) and the preprocessing settings, so a
changed file or setting gives a new folder. Folders are written under a temporary hidden name and renamed into
place, so an interrupted build never leaves a folder that looks complete (a later build removes the temporary
folders of builds that were killed). Readers open the arrays memory-mapped
per access and copy out only what they need, so resident memory stays small however many subjects there are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from landmark_unet.data.organs import ORGANS, organ_bit
from landmark_unet.data.subject import Subject

CACHE_VERSION = 2  # 2: meta.json holds the content digest
NORMALISATIONS = ("percentile", "zscore", "ct", "none")
CT_WINDOW = (-200.0, 300.0)  # HU: fat, soft tissue and contrast-enhanced organs; bone and air saturate


def resolve_normalisation(method: str, modality: str) -> str:
    """``auto`` -> ``zscore`` for an MRI, ``ct`` for a CT; anything else unchanged (checked).

    Raises:
        InputError: unknown method or modality.
    """
    from landmark_unet.errors import InputError

    if modality not in ("mri", "ct"):
        raise InputError("data.modality", f"unknown modality {modality!r} (choose from mri, ct)")
    if method == "auto":
        return "ct" if modality == "ct" else "zscore"
    if method not in NORMALISATIONS:
        raise InputError("data.normalisation", f"unknown normalisation {method!r} "
                                               f"(choose from auto, {', '.join(NORMALISATIONS)})")
    return method


def normalise_channel(x: np.ndarray, method: str, ct_window: Sequence[float] = CT_WINDOW) -> tuple[np.ndarray, dict]:
    """Normalise one channel (X, Y, Z) float32 (never the landmark distance maps, which stay in [0, 1]).

    ``percentile``: divide by the 99.5th percentile of the non-zero voxels (MRI magnitudes, keeps 0 at 0 and the
    fat/water ratio per voxel: the phantom's and the study's Dixon default); ``zscore``: subtract the mean and
    divide by the standard deviation of the non-zero voxels (MRI of any sequence); ``ct``: clip Hounsfield units
    to ``ct_window`` and scale that window to [0, 1]; ``none``: unchanged.
    """
    if method == "none":
        return x, {"method": method}
    if method == "ct":
        lo, hi = (float(v) for v in ct_window)
        return (np.clip(x, lo, hi) - lo) / (hi - lo), {"method": method, "window": [lo, hi]}
    sample = x[::2, ::2, ::2]
    sample = sample[sample != 0]
    if sample.size == 0:
        return x, {"method": method, "empty": True}
    if method == "percentile":
        scale = float(np.percentile(sample, 99.5)) or 1.0
        return x / scale, {"method": method, "scale": scale}
    if method == "zscore":
        mean, std = float(sample.mean()), float(sample.std()) or 1.0
        return (x - mean) / std, {"method": method, "mean": mean, "std": std}
    raise ValueError(f"unknown normalisation {method!r}")


def normalise_image(image: np.ndarray, method: str, ct_window: Sequence[float] = CT_WINDOW) -> tuple[np.ndarray, list]:
    """Normalise each channel of (C, X, Y, Z) and store it as the cache does: float16 (C, X, Y, Z), with the
    per-channel settings used. Training (through the cache) and prediction see the same numbers."""
    out, infos = [], []
    for channel in image:
        x, info = normalise_channel(np.asarray(channel, np.float32), method, ct_window)
        out.append(x.astype(np.float16))
        infos.append(info)
    return np.stack(out), infos


@dataclass(frozen=True)
class CacheEntry:
    """A cached subject. Arrays are read lazily from ``path``; ``meta`` holds everything else."""

    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical spatial shape (X, Y, Z)."""
        return tuple(self.meta["shape"])  # type: ignore[return-value]

    @property
    def channels(self) -> list[str]:
        return self.meta["channels"]

    @property
    def slice_bits(self) -> np.ndarray:
        """(Z,) uint8: OR of the organ bits present in each axial slice."""
        return np.asarray(self.meta["slice_bits"], dtype=np.uint8)

    @property
    def landmarks(self) -> np.ndarray | None:
        lm = self.meta.get("landmarks")
        return None if lm is None else np.asarray(lm, dtype=np.float64)

    def _open(self, name: str) -> np.ndarray:
        return np.load(self.path / name, mmap_mode="r")

    def distance_volume(self, key: str) -> np.ndarray:
        """The distance maps cached under ``key``, float32 (Z', L, X, Y) (memory-mapped, read-only)."""
        return self._open(f"distance-{key}.npy")

    def image_volume(self) -> np.ndarray:
        """All slices, float16 (Z, C, X, Y) (memory-mapped, read-only)."""
        return self._open("image.npy")

    def label_volume(self) -> np.ndarray:
        """Packed labels, uint8 (Z, X, Y) (memory-mapped, read-only)."""
        return self._open("labels.npy")


def distance_key(settings: dict) -> str:
    """Short stable hash of distance-map settings, naming the cached file ``distance-<key>.npy``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ensure_distance_maps(entry: CacheEntry, settings: dict) -> str:
    """Compute the distance maps of ``entry`` for ``settings`` once and cache them beside its image; returns the
    key for :meth:`CacheEntry.distance_volume`.

    ``settings`` are the keyword arguments of :func:`landmark_unet.landmarks.distance.subject_maps`.

    Raises:
        MissingLandmarksError: the subject has no landmarks.
        InputError: not enough landmarks for the settings.
    """
    from landmark_unet.errors import InputError, MissingLandmarksError
    from landmark_unet.landmarks.distance import subject_maps

    key = distance_key(settings)
    path = entry.path / f"distance-{key}.npy"
    if path.exists():
        return key
    where = next((f for f in entry.meta.get("files", []) if f.endswith("landmarks.txt")), entry.name)
    if entry.landmarks is None:
        raise MissingLandmarksError(where, "no landmarks for this subject (landmarks.txt missing; try landmarks.source=auto)")
    try:
        maps = subject_maps(entry.landmarks, entry.shape, entry.meta["spacing"], **settings)
    except ValueError as err:
        raise InputError(where, str(err)) from None
    tmp = entry.path / f".distance-{key}.{os.getpid()}.npy"
    np.save(tmp, maps)
    os.replace(tmp, path)
    return key


def fingerprint(files: Sequence[str], settings: dict) -> str:
    """Hex digest of the source files' (path, size, mtime) and the preprocessing ``settings``."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def pack_labels(subject: Subject) -> np.ndarray:
    """Masks (K, X, Y, Z) -> packed uint8 (Z, X, Y), bit ``organ_bit(organ)`` set where the organ is."""
    packed = np.zeros(subject.shape, dtype=np.uint8)
    for organ, mask in zip(subject.organs, subject.masks):
        packed |= (mask.astype(bool) * np.uint8(organ_bit(organ))).astype(np.uint8)
    return np.ascontiguousarray(packed.transpose(2, 0, 1))


def temporary_name(final: Path) -> Path:
    """The hidden name a cache folder is built (or removed) under, ``.<name>.tmp-<pid>@<host>``: what
    :func:`remove_stale_builds` recognises once its process is gone."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}@{socket.gethostname()}"


def write_entry(subject: Subject, final: Path, normalisation: str, fp: str,
                ct_window: Sequence[float] = CT_WINDOW) -> CacheEntry:
    """Preprocess ``subject`` and write its cache folder atomically to ``final``."""
    tmp = temporary_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        normalised, norms = normalise_image(subject.image, normalisation, ct_window)
        image = np.ascontiguousarray(normalised.transpose(3, 0, 1, 2))  # (Z, C, X, Y)
        np.save(tmp / "image.npy", image)
        labels = pack_labels(subject)
        np.save(tmp / "labels.npy", labels)
        digest = hashlib.sha256(image.tobytes())
        digest.update(labels.tobytes())
        digest.update(json.dumps([subject.spacing.tolist(), subject.affine.tolist(),
                                  None if subject.landmarks is None else subject.landmarks.tolist()]).encode())
        slice_bits = np.bitwise_or.reduce(labels.reshape(labels.shape[0], -1), axis=1)
        meta = {
            "name": subject.name,
            "fingerprint": fp,
            "content": digest.hexdigest()[:16],
            "shape": list(subject.shape),
            "channels": list(subject.channels),
            "organs": list(subject.organs),
            "spacing": subject.spacing.tolist(),
            "affine": subject.affine.tolist(),
            "source_affine": None if subject.source_affine is None else subject.source_affine.tolist(),
            "source_shape": None if subject.source_shape is None else list(subject.source_shape),
            "landmarks": None if subject.landmarks is None else subject.landmarks.tolist(),
            "slice_bits": slice_bits.tolist(),
            "organ_voxels": {o: int(m.sum(dtype=np.int64)) for o, m in zip(subject.organs, subject.masks)},
            "normalisation": norms,
            "files": subject.files,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first
            if not (final / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_entry(final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_builds(cache_dir: Path) -> list[Path]:
    """Remove the temporary folders (``.<entry>.tmp-<pid>@<host>``) of builds on this host whose process is gone
    (killed half-way); returns them. Folders of live builds, and of other hosts sharing the cache, are left alone."""
    stale, host = [], socket.gethostname()
    for tmp in Path(cache_dir).glob(".*.tmp-*@*"):
        pid, _, where = tmp.name.rsplit(".tmp-", 1)[-1].partition("@")
        if tmp.is_dir() and where == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            stale.append(tmp)
    return stale


def mark_used(folder: Path) -> None:
    """Set a cache folder's modification time to now: when a run last used it, which ``python -m
    landmark_unet.prune_cache`` reads. Best effort: a cache shared read-only is left as it is."""
    try:
        os.utime(folder)
    except OSError:
        pass


def load_entry(path: Path) -> CacheEntry:
    entry = CacheEntry(path=path, meta=json.loads((path / "meta.json").read_text()))
    mark_used(path)
    return entry


@dataclass(frozen=True)
class CacheJob:
    """What it takes to cache one subject: a reader, the source files for the fingerprint, the settings."""

    name: str
    files: tuple[str, ...]
    read: Callable[[], Subject]
    settings: dict = field(default_factory=dict)  # what else the reader's output depends on (fingerprinted)


def _build_one(args: tuple[CacheJob, Path, str, tuple, tuple]) -> CacheEntry | Exception:
    job, cache_dir, normalisation, skip, ct_window = args
    window = {"ct_window": list(ct_window)} if normalisation == "ct" else {}
    fp = fingerprint(job.files, {"normalisation": normalisation, **window, **job.settings})
    final = cache_dir / f"{job.name}-{fp}"
    if (final / "meta.json").exists():
        return load_entry(final)
    try:
        return write_entry(job.read(), final, normalisation, fp, ct_window)
    except skip as err:
        return err


def build_cache(
    jobs: Sequence[CacheJob],
    cache_dir: str | Path,
    normalisation: str = "percentile",
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    skip: tuple[type[Exception], ...] = (),
    ct_window: Sequence[float] = CT_WINDOW,
) -> list[CacheEntry | Exception]:
    """Cache every subject of ``jobs`` (reusing complete entries) and return their entries in order.

    Args:
        jobs: one :class:`CacheJob` per subject.
        cache_dir: folder holding the entries.
        normalisation: one of :data:`NORMALISATIONS`.
        workers: processes for the subjects still to build (0: in this process).
        progress: called as ``progress(done, total)`` after each subject.
        skip: exception types that skip a subject instead of stopping: its place in the result holds the exception.
        ct_window: the Hounsfield window of ``normalisation="ct"``.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(cache_dir)
    args = [(job, cache_dir, normalisation, tuple(skip), tuple(ct_window)) for job in jobs]
    entries: list[CacheEntry] = []
    if workers > 0 and len(jobs) > 1:
        with get_context("spawn").Pool(workers) as pool:
            for entry in pool.imap(_build_one, args):
                entries.append(entry)
                if progress:
                    progress(len(entries), len(jobs))
    else:
        for a in args:
            entries.append(_build_one(a))
            if progress:
                progress(len(entries), len(jobs))
    return entries


__all__ = ["ORGANS", "CacheEntry", "CacheJob", "build_cache", "fingerprint", "normalise_channel"]
