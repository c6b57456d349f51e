"""3D training patches of cached subjects, with nnU-Net-style foreground oversampling (``model=unet3d_full``).

Axes: the cache holds (Z, C, X, Y) images, (Z, X, Y) packed labels and (Z', L, X, Y) distance maps
(:mod:`landmark_unet.data.cache`); a patch is channel-first (C, D, H, W) = (C, z, x, y), depth along the axial
axis. A patch origin (z0, x0, y0) is the volume index of the patch's voxel (0, 0, 0).

Padding: where a patch reaches beyond the volume, the image, the masks and the distance maps are zero (as in the 2D
:class:`~landmark_unet.data.slices.SliceDataset` and in whole-volume inference: the normalised image is
zero-padded, and a distance map of 0 reads "far from every landmark", its values being in (0, 1]).

Placement: along an axis where the volume is at least as long as the patch, the patch stays inside the volume;
along an axis where it is shorter, the patch starts at 0 and the volume is zero-padded at the high end, as the 2D
slices are. So the unpadded part of every patch is the box ``[0, size)``, the 2D batches' convention
(``size``, :func:`landmark_unet.lit.segmentation.valid_region`), and forced-foreground patches carry no more
padding than random ones (padding cannot become a cue for foreground). :func:`crop_patch` itself takes any
origin, negative or beyond the volume.

Determinism: item i of epoch e is drawn by ``np.random.default_rng(np.random.SeedSequence([seed, e, i]))`` only
(its subject, its forced-foreground coin, its organ, its voxel and its origin), so a resumed run, any number of
DataLoader workers and any sampler order give the same patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from landmark_unet.data.organs import organ_bit, unpack_labels

MAX_FOREGROUND = 10_000  # foreground voxel coordinates kept per subject and organ


def foreground_coordinates(labels: np.ndarray, bit: int, max_points: int = MAX_FOREGROUND) -> np.ndarray:
    """(N, 3) int32 (z, x, y) of the voxels of packed ``labels`` (Z, X, Y) with ``bit`` set, N <= ``max_points``.

    Beyond ``max_points`` an evenly spaced subset (in z-major order, so every slice of the organ stays
    represented) is kept: deterministic, no random draw.
    """
    coords = np.argwhere((np.asarray(labels) & np.uint8(bit)) > 0)
    if len(coords) > max_points:
        coords = coords[np.linspace(0, len(coords) - 1, max_points).round().astype(np.int64)]
    return coords.astype(np.int32)


def _origin_range(n: int, p: int) -> tuple[int, int]:
    """Inclusive (lo, hi) of the origins along an axis of ``n`` voxels for a patch of ``p``: inside the volume
    when n >= p, else 0 (the volume at the low end, padded at the high end)."""
    return 0, max(n - p, 0)


def sample_origin(shape: Sequence[int], patch_size: Sequence[int], foreground: Sequence[np.ndarray],
                  foreground_fraction: float, rng: np.random.Generator) -> tuple[tuple[int, int, int], bool]:
    """A patch origin (z0, x0, y0) for a volume of ``shape`` (Z, X, Y), and whether foreground was forced.

    With probability ``foreground_fraction`` (one ``rng.random()`` draw, always made) the patch is forced to hold
    foreground: an organ is chosen uniformly among those of ``foreground`` with at least one voxel (so a small
    organ is forced as often as a large one), then one of its voxels, uniformly, then the origin uniformly among
    those that put the voxel inside the patch and keep the patch where :func:`_origin_range` allows (never
    empty: the voxel lies in the volume). Otherwise, or when the subject has no foreground at all, the origin is
    uniform over :func:`_origin_range` on each axis.

    Args:
        shape: volume (Z, X, Y).
        patch_size: (D, H, W).
        foreground: per organ, (N_k, 3) voxel coordinates (:func:`foreground_coordinates`).
        foreground_fraction: in [0, 1].
        rng: the item's generator.
    """
    forced = rng.random() < foreground_fraction
    organs = [c for c in foreground if len(c)]
    ranges = [_origin_range(int(n), int(p)) for n, p in zip(shape, patch_size)]
    if forced and organs:
        coords = organs[int(rng.integers(len(organs)))]
        voxel = coords[int(rng.integers(len(coords)))]
        ranges = [(max(lo, int(v) - p + 1), min(hi, int(v))) for (lo, hi), v, p in zip(ranges, voxel, patch_size)]
    origin = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in ranges)
    return (origin[0], origin[1], origin[2]), bool(forced and organs)


def crop_patch(volume: np.ndarray, origin: Sequence[int], patch_size: Sequence[int], dtype=np.float32,
               channels: Sequence[int] | None = None) -> np.ndarray:
    """A zero-padded copy of the patch at ``origin`` (z0, x0, y0) of ``patch_size`` (D, H, W), channel first.

    ``volume`` is (Z, X, Y) -> (D, H, W), or (Z, C, X, Y) -> (C, D, H, W) (``channels``: which of C, default all).
    Only the patch's region is read, so a memory-mapped volume costs what the patch costs. The origin may be
    negative or reach beyond the volume: those voxels are 0.
    """
    z, x, y = volume.shape[0], volume.shape[-2], volume.shape[-1]
    src, dst = [], []
    for o, p, n in zip(origin, patch_size, (z, x, y)):
        lo, hi = max(int(o), 0), min(int(o) + int(p), n)
        hi = max(hi, lo)
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(o), hi - int(o)))
    if volume.ndim == 3:
        out = np.zeros(tuple(int(p) for p in patch_size), dtype)
        out[tuple(dst)] = volume[tuple(src)]
        return out
    picked = list(range(volume.shape[1])) if channels is None else list(channels)
    out = np.zeros((len(picked), *(int(p) for p in patch_size)), dtype)
    region = volume[src[0], :, src[1], src[2]]  # (dz, C, dx, dy): the region only
    out[:, dst[0], dst[1], dst[2]] = np.moveaxis(np.asarray(region)[:, picked], 1, 0)
    return out


class PatchDataset(Dataset):
    """Random 3D training patches of cached subjects, ``samples_per_epoch`` per epoch.

    Item i of epoch e (:meth:`set_epoch`) is a function of (seed, e, i) only (module docstring): a subject drawn
    uniformly, then an origin by :func:`sample_origin`. Each item is a dict:

    - ``image``: float32 (C, D, H, W), the ``channel_index`` channels (zero-padded beyond the volume);
    - ``mask``: float32 (K, D, H, W), 0/1, one channel per organ of ``organs``;
    - ``distance`` (with ``distance_key``): float32 (L, D, H, W), the 3D landmark maps (in-plane maps, Z' = 1,
      are the same on every slice), zero-padded, never normalised;
    - ``subject``: int, the subject's global index (``subject_ids``);
    - ``origin``: int64 (3,), the patch origin (z0, x0, y0) in the volume;
    - ``size``: int64 (3,), the unpadded (D, H, W) extent of the patch: voxels ``[:size[0], :size[1], :size[2]]``
      lie in the volume, the rest is padding (the 2D batches' ``size``, one axis more);
    - ``forced``: bool, whether the patch was forced to hold foreground.

    Args:
        entries: cached subjects (:class:`~landmark_unet.data.cache.CacheEntry` or anything with
            ``image_volume()``, ``label_volume()`` and ``distance_volume(key)``).
        organs: organ names, one mask channel each (their foreground is oversampled).
        channel_index: channel indices into the cached image.
        patch_size: (D, H, W).
        foreground_fraction: share of patches forced to hold foreground, in [0, 1] (nnU-Net: 1/3).
        samples_per_epoch: items per epoch.
        seed: base seed.
        distance_key: key of the cached distance maps to add, or None.
        subject_ids: global subject index of each entry (default 0, 1, ...).
        epoch: the first epoch (a resumed run's).
        max_foreground: foreground coordinates kept per subject and organ (:func:`foreground_coordinates`),
            computed on first use of each subject, once per process.
    """

    def __init__(
        self,
        entries: Sequence,
        organs: Sequence[str],
        channel_index: Sequence[int],
        patch_size: Sequence[int],
        foreground_fraction: float = 1 / 3,
        samples_per_epoch: int = 250,
        seed: int = 0,
        distance_key: str | None = None,
        subject_ids: Sequence[int] | None = None,
        epoch: int = 0,
        max_foreground: int = MAX_FOREGROUND,
    ):
        if not entries:
            raise ValueError("PatchDataset needs at least one subject")
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"foreground fraction must be in [0, 1], got {foreground_fraction}")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes (D, H, W), got {tuple(patch_size)}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.entries = list(entries)
        self.subject_ids = list(range(len(self.entries)) if subject_ids is None else subject_ids)
        self.bits = np.array([organ_bit(o) for o in organs], dtype=np.uint8)
        self.channels = list(channel_index)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fraction = float(foreground_fraction)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.distance_key = distance_key
        self.epoch = int(epoch)
        self.max_foreground = int(max_foreground)
        self._foreground: dict[int, tuple[tuple[int, ...], list[np.ndarray]]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def foreground(self, e: int) -> tuple[tuple[int, ...], list[np.ndarray]]:
        """The (Z, X, Y) shape of entry ``e`` and, per organ, its (subsampled) foreground coordinates (read once
        per process)."""
        if e not in self._foreground:
            labels = np.asarray(self.entries[e].label_volume())
            coords = [foreground_coordinates(labels, int(b), self.max_foreground) for b in self.bits]
            self._foreground[e] = (labels.shape, coords)
        return self._foreground[e]

    def draw(self, i: int) -> tuple[int, tuple[int, int, int], bool]:
        """(entry, origin, forced) of item ``i`` of the current epoch."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(i)]))
        e = int(rng.integers(len(self.entries)))
        shape, coords = self.foreground(e)
        origin, forced = sample_origin(shape, self.patch_size, coords, self.fraction, rng)
        return e, origin, forced

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(i)
        e, origin, forced = self.draw(i)
        entry = self.entries[e]
        volume = entry.label_volume()  # (Z, X, Y)
        labels = crop_patch(volume, origin, self.patch_size, dtype=np.uint8)  # (D, H, W)
        item = {
            "image": torch.from_numpy(crop_patch(entry.image_volume(), origin, self.patch_size,
                                                 channels=self.channels)),
            "mask": torch.from_numpy(unpack_labels(labels, self.bits).astype(np.float32)),
            "subject": int(self.subject_ids[e]),
            "origin": torch.tensor(origin, dtype=torch.int64),
            "size": torch.tensor([max(0, min(p, n - o)) for o, p, n in zip(origin, self.patch_size, volume.shape)],
                                 dtype=torch.int64),
            "forced": forced,
        }
        if self.distance_key is not None:
            maps = entry.distance_volume(self.distance_key)  # (Z', L, X, Y)
            if maps.shape[0] == 1:  # in-plane maps: the same on every slice
                maps = np.broadcast_to(maps, (volume.shape[0], *maps.shape[1:]))  # a view: no copy
            item["distance"] = torch.from_numpy(crop_patch(maps, origin, self.patch_size))
        return item


class BodyDataset(Dataset):
    """Whole bodies, one per item, for validating and testing a patch network by sliding windows.

    Item ``i`` is a dict: ``image`` float32 (Z, C, X, Y) (the cache's layout, the ``channel_index`` channels);
    ``mask`` float32 (Z, K, X, Y), 0/1 per organ of ``organs``; ``distance`` float32 (Z', L, X, Y) with
    ``distance_key``; ``subject`` int. Bodies differ in size, so a loader takes them one at a time (batch 1).
    """

    def __init__(self, entries: Sequence, organs: Sequence[str], channel_index: Sequence[int],
                 subject_ids: Sequence[int], distance_key: str | None = None):
        self.entries = list(entries)
        self.subject_ids = list(subject_ids)
        self.bits = np.array([organ_bit(o) for o in organs], dtype=np.uint8)
        self.channels = list(channel_index)
        self.distance_key = distance_key

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        labels = np.asarray(entry.label_volume())  # (Z, X, Y)
        item = {"image": torch.from_numpy(np.ascontiguousarray(entry.image_volume()[:, self.channels],
                                                               dtype=np.float32)),
                "mask": torch.from_numpy(unpack_labels(labels, self.bits, axis=1).astype(np.float32)),
                "subject": int(self.subject_ids[i])}
        if self.distance_key is not None:
            item["distance"] = torch.from_numpy(np.array(entry.distance_volume(self.distance_key), dtype=np.float32))
        return item
