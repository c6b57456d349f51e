"""2D axial-slice datasets over cached subjects."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from landmark_unet.data.cache import CacheEntry
from landmark_unet.data.organs import organ_bit, unpack_labels


def slice_index(entries: Sequence[CacheEntry], organs: Sequence[str], organ_slices_only: bool) -> np.ndarray:
    """(N, 2) int64 rows ``[entry, k]`` of the axial slices to visit.

    With ``organ_slices_only`` (the study's training set, section 3.4.2) only slices holding at least one voxel of
    any of ``organs`` are kept; otherwise every slice of every entry, in order (whole-body evaluation).
    """
    bits = np.uint8(sum(organ_bit(o) for o in organs))
    rows = []
    for e, entry in enumerate(entries):
        ks = np.arange(entry.shape[2])
        if organ_slices_only:
            ks = ks[(entry.slice_bits & bits) > 0]
        rows.append(np.stack([np.full_like(ks, e), ks], axis=1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)


def padded_size(entries: Sequence[CacheEntry], multiple: int) -> tuple[int, int]:
    """Smallest (H, W) that holds every entry's axial slice (X, Y) and is divisible by ``multiple``."""
    x = max(e.shape[0] for e in entries)
    y = max(e.shape[1] for e in entries)
    return (-(-x // multiple) * multiple, -(-y // multiple) * multiple)


class SliceDataset(Dataset):
    """Axial slices of cached subjects, zero-padded at the high end to a common size.

    Each item is a dict:

    - ``image``: float16 (C, H, W), the cache's values of the chosen channels of slice ``k`` (H along x, W along
      y); with ``stack=5`` the depth-5 network's input (C, 5, H, W), slices k-2 .. k+2, the edge slice repeated
      beyond the volume;
    - ``mask``: uint8 (K, H, W), 0/1, one channel per organ of ``organs``;
    - ``subject``: int, the subject's position in ``subject_ids`` (the DataModule's global subject index);
    - ``slice``: int, the axial index k;
    - ``size``: int64 (2,), the unpadded (X, Y), so that predictions can be cropped back;
    - ``distance`` (with ``distance_key``): float32 (L, H, W), the landmark distance maps of the slice, zero-padded
      like the image, never intensity-normalised; (L, 5, H, W) for stacks;

    the mask is always that of slice ``k`` (the middle slice of a stack). Image and mask travel in these compact
    types (3.3 instead of 7.9 MB for a batch of ten 2 x 256 x 256 slices) through the loader's workers, pinning
    and the copy to the device; :func:`widen` makes them float32 there (the DataModule's
    ``transfer_batch_to_device``), the same values.

    Args:
        entries: cached subjects.
        subject_ids: global subject index of each entry.
        index: (N, 2) rows ``[entry, k]`` from :func:`slice_index`.
        channels: channel indices into the cached image to use.
        organs: organ names, one mask channel each.
        size: padded (H, W).
        distance_key: key of the cached distance maps to add (see :func:`~landmark_unet.data.cache.ensure_distance_maps`),
            or None.
        stack: slices per sample (1: 2D slices; 5: the depth-5 network's stacks).
        crop: a random ``crop x crop`` in-plane window per sample (training; the study used 256 and 208), zero-padded
            where the slice is smaller; None: the whole padded slice. Its origin is the draw's own when the sampler
            gives one (:class:`EpochSampler` with ``crop_origins``: ``(position, u, v)``, u and v in [0, 1) place
            the window along the slice's two axes), so that it does not depend on the loader's workers; else one
            drawn from torch's global generator.
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        subject_ids: Sequence[int],
        index: np.ndarray,
        channels: Sequence[int],
        organs: Sequence[str],
        size: tuple[int, int],
        distance_key: str | None = None,
        stack: int = 1,
        crop: int | None = None,
    ):
        if stack < 1 or stack % 2 == 0:
            raise ValueError(f"stack must be an odd number of slices, got {stack}")
        self.entries = list(entries)
        self.subject_ids = list(subject_ids)
        self.index = index
        self.channels = list(channels)
        self.bits = np.array([organ_bit(o) for o in organs], dtype=np.uint8)
        self.size = size
        self.distance_key = distance_key
        self.stack = stack
        self.crop = crop

    def __len__(self) -> int:
        return len(self.index)

    def _slices(self, k: int, depth: int) -> np.ndarray:
        """The ``stack`` slice indices centred on k, the edge slice repeated beyond the volume's ends."""
        half = self.stack // 2
        return np.clip(np.arange(k - half, k + half + 1), 0, depth - 1)

    def _window(self, x: int, y: int, origin: tuple[float, float] | None) -> tuple[int, int, int, int]:
        """(x0, y0, h, w): the region of the (padded) slice this sample shows; ``origin`` (u, v) in [0, 1) places
        a crop (None: drawn here)."""
        if self.crop is None:
            return 0, 0, *self.size
        return (*crop_corner(x, y, self.crop, origin), self.crop, self.crop)

    def __getitem__(self, i: int) -> dict:
        batch = self.__getitems__([i])
        item = {key: value[0] for key, value in batch.items()}
        item["subject"], item["slice"] = int(item["subject"]), int(item["slice"])
        return item

    def __getitems__(self, positions: Sequence[int]) -> dict:
        """The samples at ``positions``, already collated into one batch (the DataLoader's batched fetch; the
        DataModule's loaders pass it through :func:`collate`): the fields of :class:`SliceDataset`, each with a
        leading batch axis. Each body's slices are read with one gather from its memory-mapped cache files, so a
        batch costs one file open per body and array, not one per sample; equal to collating ``self[i]`` one by
        one. A position may come with its draw's crop origin, ``(position, u, v)`` (:class:`EpochSampler`)."""
        positions, origins = split_draws(positions)
        rows = self.index[positions]
        n, c, s, k = len(rows), len(self.channels), self.stack, len(self.bits)
        shapes = [self.entries[e].shape for e in rows[:, 0]]
        windows = [self._window(x, y, o) for (x, y, _), o in zip(shapes, origins)]
        h, w = windows[0][2:] if windows else self.size
        image = np.zeros((n, c, s, h, w), np.float16)
        mask = np.zeros((n, k, h, w), np.uint8)
        size = np.zeros((n, 2), np.int64)
        distance = None
        for e in np.unique(rows[:, 0]):
            at = np.flatnonzero(rows[:, 0] == e)
            entry = self.entries[e]
            ks = np.stack([self._slices(int(kk), entry.shape[2]) for kk in rows[at, 1]])  # (m, S)
            needed, where = np.unique(ks, return_inverse=True)
            where = where.reshape(ks.shape)
            slices = entry.image_volume()[needed][:, self.channels]  # (U, C, X, Y): one read per body
            labels = entry.label_volume()[rows[at, 1]]  # (m, X, Y)
            maps = None
            if self.distance_key is not None:
                volume = entry.distance_volume(self.distance_key)  # (Z', L, X, Y), Z' = 1 for in-plane maps
                maps = volume[needed] if volume.shape[0] > 1 else volume[np.zeros(len(needed), np.int64)]
                if distance is None:
                    distance = np.zeros((n, maps.shape[1], s, h, w), np.float32)
            for j, i in enumerate(at):
                x0, y0, _, _ = windows[i]
                vx, vy = min(shapes[i][0] - x0, h), min(shapes[i][1] - y0, w)
                region = (slice(x0, x0 + vx), slice(y0, y0 + vy))
                image[i, :, :, :vx, :vy] = slices[where[j]].transpose(1, 0, 2, 3)[(..., *region)]
                mask[i, :, :vx, :vy] = unpack_labels(labels[j][region], self.bits)
                if maps is not None:
                    distance[i, :, :, :vx, :vy] = maps[where[j]].transpose(1, 0, 2, 3)[(..., *region)]
                size[i] = vx, vy
        batch = {
            "image": torch.from_numpy(image[:, :, 0] if s == 1 else image),
            "mask": torch.from_numpy(mask),
            "subject": torch.as_tensor([self.subject_ids[e] for e in rows[:, 0]], dtype=torch.int64),
            "slice": torch.from_numpy(rows[:, 1].copy()),
            "size": torch.from_numpy(size),
        }
        if distance is not None:
            batch["distance"] = torch.from_numpy(distance[:, :, 0] if s == 1 else distance)
        return batch


def split_draws(draws: Sequence) -> tuple[np.ndarray, list[tuple[float, float] | None]]:
    """A batch of sampler draws, each a position or ``(position, u, v)`` (:class:`EpochSampler` with
    ``crop_origins``), as int64 positions and their crop origins (None where a draw has none)."""
    positions = np.asarray([d[0] if isinstance(d, tuple) else d for d in draws], dtype=np.int64)
    return positions, [tuple(d[1:]) if isinstance(d, tuple) else None for d in draws]


def crop_corner(x: int, y: int, crop: int, origin: tuple[float, float] | None) -> tuple[int, int]:
    """(x0, y0): the corner of a ``crop x crop`` window in a slice of (X, Y) = (``x``, ``y``) voxels, placed by
    ``origin`` (u, v) in [0, 1) uniformly over the positions that keep it inside the slice (0 along an axis shorter
    than the crop); None: (u, v) drawn from torch's global generator."""
    if origin is None:
        origin = torch.rand(2).tolist()
    x0 = min(int(origin[0] * (max(x - crop, 0) + 1)), max(x - crop, 0))
    y0 = min(int(origin[1] * (max(y - crop, 0) + 1)), max(y - crop, 0))
    return x0, y0


def widen(batch: dict) -> dict:
    """The float32 training batch of a :class:`SliceDataset` batch (or of
    :meth:`~landmark_unet.data.device_slices.DeviceSlices.gather`'s): ``image`` float16 -> float32, ``mask`` uint8 ->
    float32, on the batch's device; other batches and fields unchanged."""
    batch = dict(batch)
    for key, compact in (("image", torch.float16), ("mask", torch.uint8)):
        if torch.is_tensor(batch.get(key)) and batch[key].dtype == compact:
            batch[key] = batch[key].float()
    return batch


def collate(batch):
    """DataLoader ``collate_fn``: a :class:`SliceDataset` batch arrives collated (``__getitems__``); anything else
    goes through torch's default collation."""
    return batch if isinstance(batch, dict) else torch.utils.data.default_collate(batch)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one training epoch on one rank: a 32-bit hash of (seed, epoch, rank) (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler[int]):
    """A sampler whose draw is a function of (seed, epoch) only, so that a resumed run draws what the uninterrupted
    run drew. Lightning calls :meth:`set_epoch` before every training epoch; without it (a sampler wrapped for DDP)
    the epoch counts up by one per pass. Subclasses implement :meth:`draw`.

    With ``crop_origins`` every draw comes with the origin of its random crop, ``(position, u, v)`` with u, v
    uniform in [0, 1) (:class:`SliceDataset`), drawn from (seed, epoch) too: a draw's crop is then the same whichever
    loader worker reads it, however many there are, and in a continued run's pass (:class:`RankShare`)."""

    def __init__(self, num_samples: int, seed: int = 0, epoch: int = 0, crop_origins: bool = False):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.crop_origins = bool(crop_origins)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        picks = self.draw(np.random.default_rng([self.seed, self.epoch])).tolist()
        if self.crop_origins:
            origins = np.random.default_rng([self.seed, self.epoch, 1]).random((len(picks), 2)).tolist()
            picks = [(p, u, v) for p, (u, v) in zip(picks, origins)]
        self.epoch += 1
        return iter(picks)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class EpochShuffle(EpochSampler):
    """Every dataset position once per epoch, in the order of a permutation seeded by (seed, epoch)."""

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.num_samples)


class ForegroundOversampler(EpochSampler):
    """Draws ``num_samples`` slice indices per epoch: with probability ``fraction`` one of the slices holding the
    organ (``foreground``), otherwise any slice of the training bodies, uniformly (nnU-Net-style foreground
    oversampling). The network thus also meets the slices without the organ that whole-body evaluation will show
    it. Seeded: epoch e of seed s always gives the same draw.

    Args:
        foreground: dataset positions of the slices that hold the organ(s).
        total: dataset length (every slice of the training bodies).
        fraction: share of samples forced to be foreground, in [0, 1].
        num_samples: samples per epoch; default ``ceil(len(foreground) / fraction)``, so that an epoch holds about
            as many organ slices as an organ-only epoch.
        seed: base seed.
        epoch: the epoch of the first pass (a resumed run's).
        crop_origins: give every draw its crop origin (:class:`EpochSampler`).
    """

    def __init__(self, foreground: np.ndarray, total: int, fraction: float, num_samples: int | None = None,
                 seed: int = 0, epoch: int = 0, crop_origins: bool = False):
        if not 0 < fraction <= 1:
            raise ValueError(f"foreground fraction must be in (0, 1], got {fraction}")
        if len(foreground) == 0:
            raise ValueError("no foreground slice to oversample")
        self.foreground = np.asarray(foreground, dtype=np.int64)
        self.total = total
        self.fraction = fraction
        super().__init__(num_samples or int(np.ceil(len(self.foreground) / fraction)), seed, epoch, crop_origins)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        forced = rng.random(self.num_samples) < self.fraction
        return np.where(forced, self.foreground[rng.integers(0, len(self.foreground), self.num_samples)],
                        rng.integers(0, self.total, self.num_samples))


class EvalShardSampler(torch.utils.data.DistributedSampler):
    """Evaluation sampler under DDP: rank r takes samples r, r + W, r + 2W, ... (W ranks), in order, without the
    padding a plain DistributedSampler adds to even out the ranks (padding would count some slices twice).

    A body's slices are thus spread over the ranks; per-body Dice stays exact because
    :class:`~landmark_unet.metrics.PerBodyDice` gathers the voxel counts of every rank with their body ids before
    summing per body. (A DistributedSampler subclass, so Lightning keeps it instead of putting its own.)
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.positions = list(range(self.rank, len(dataset), self.num_replicas))
        self.num_samples = len(self.positions)
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


class RankShare(torch.utils.data.DistributedSampler):
    """One rank's share of every pass of the training ``sampler``, dealt as Lightning deals a sampler under DDP
    (``DistributedSamplerWrapper``: the pass padded to a multiple of ``num_replicas`` with its first draws again,
    then every ``num_replicas``-th draw from ``rank`` on), less the first ``skip`` draws of the first pass's share.

    Those are what a run continued from a mid-epoch checkpoint (a SLURM pre-emption) has trained on already, since
    the loader's position is not saved. The continued pass ends where the uninterrupted one did, so its batches are
    that epoch's remaining batches, the last, partial one included; Lightning ends the epoch when the loader runs
    out. ``len`` stays the whole share's: Lightning counts the epoch's batches from it. A ``DistributedSampler``,
    so that Lightning does not wrap it again; ``set_epoch`` reaches ``sampler``."""

    def __init__(self, sampler: torch.utils.data.Sampler, num_replicas: int = 1, rank: int = 0, skip: int = 0):
        super().__init__(sampler, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.sampler = sampler
        self.skip = int(skip)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        draws = list(self.sampler)
        padding = self.total_size - len(draws)
        if padding > 0:
            draws += (draws * math.ceil(padding / len(draws)))[:padding]
        share = draws[self.rank:self.total_size:self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(share[skip:])
