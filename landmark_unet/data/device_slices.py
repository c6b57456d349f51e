"""2D slices and depth-5 stacks gathered on the accelerator from subjects held in its memory (``data.on_device``).

With ``data.on_device=true`` the DataLoader carries only the rows ``[entry, k]`` its sampler chose
(:class:`SliceRows`); when Lightning moves a batch of rows to the device, the DataModule's
``transfer_batch_to_device`` hook turns it into the batch :class:`~landmark_unet.data.slices.SliceDataset` would have
built, by one indexed gather from :class:`DeviceSlices`: every slice of the part's bodies, zero-padded to the
common (H, W), in the device's memory. No worker reads, no host-to-device copy of images per step, no pinning:
the main process, which receives and pins the batches of the workers, is the loader's limit on a GPU
(benchmarks/README.md), and this takes it out.

Memory: the cache's float16 images (C channels), packed uint8 labels and float32 distance maps of the part's bodies,
padded to (H, W): 66 MB of images and 17 MB of labels per full-size two-channel body (256 x 256 x 252), 4.1 GB for
the study's 50, plus 0.26 MB per map channel of in-plane maps or 66 MB of a 3D map.
On a CPU it copies the memory-mapped cache into RAM, which the data-side memory target (2 GiB for 50 bodies) does
not allow: it is for GPUs, and off by default. Random training crops (``data.crop``) are cut on the device from the
corners :class:`SliceRows` computes from each draw's origin, as the host dataset places them; 3D patches
(``data.stack=0``) stay on the host path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from landmark_unet.data.organs import unpack_labels
from landmark_unet.data.slices import SliceDataset, crop_corner, split_draws


def _starts(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 start of each of consecutive blocks of ``lengths``: 0, l0, l0 + l1, ..."""
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)[:-1]]), dtype=torch.int64, device=device)


class SliceRows(Dataset):
    """The rows ``[entry, k]`` of a :class:`~landmark_unet.data.slices.SliceDataset`, batched as
    ``{"rows": int64 (B, 2), "part": part}`` (``__getitems__``: one batch per fetch, like the dataset it stands for).

    With ``crop``, each row also carries the corner of its sample's crop window, ``[entry, k, x0, y0]`` (B, 4),
    placed by the draw's origin (a position ``(position, u, v)`` from
    :class:`~landmark_unet.data.slices.EpochSampler`) exactly as the host dataset places it
    (:func:`~landmark_unet.data.slices.crop_corner`); ``shapes`` are the entries' (X, Y).
    """

    def __init__(self, index: np.ndarray, part: str, crop: int | None = None,
                 shapes: Sequence[tuple[int, int]] | None = None):
        if crop is not None and shapes is None:
            raise ValueError("SliceRows with a crop needs the entries' shapes")
        self.index = np.asarray(index, dtype=np.int64)
        self.part = part
        self.crop = crop
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])

    def __getitems__(self, positions: Sequence) -> dict:
        positions, origins = split_draws(positions)
        rows = self.index[positions]
        if self.crop is not None:
            corners = [crop_corner(*self.shapes[e], self.crop, o) for e, o in zip(rows[:, 0], origins)]
            rows = np.concatenate([rows, np.asarray(corners, dtype=np.int64).reshape(-1, 2)], axis=1)
        return {"rows": torch.from_numpy(rows), "part": self.part}


class DeviceSlices:
    """The slices of a :class:`~landmark_unet.data.slices.SliceDataset`'s bodies in one device's memory.

    Layout: the bodies' axial slices one after the other, body ``e`` at ``offset[e] .. offset[e] + Z_e``:
    images (N, C, H, W) in the cache's float16, packed labels (N, H, W) uint8, distance maps (N', L, H, W) (a body
    with in-plane maps holds one slice of them), all zero beyond a body's (X, Y).

    Args:
        dataset: the host-side dataset (its entries, channels, organs, padded size, stack, distance key and crop).
        device: where to hold the slices.
    """

    def __init__(self, dataset: SliceDataset, device: torch.device | str):
        self.device = torch.device(device)
        self.stack = dataset.stack
        self.crop = dataset.crop
        entries = dataset.entries
        h, w = dataset.size
        depths = [int(e.shape[2]) for e in entries]
        self.depth = torch.tensor(depths, dtype=torch.int64, device=self.device)
        self.offset = _starts(depths, self.device)
        self.sizes = torch.tensor([[int(e.shape[0]), int(e.shape[1])] for e in entries], dtype=torch.int64,
                                  device=self.device)
        self.subject_ids = torch.tensor(list(dataset.subject_ids), dtype=torch.int64, device=self.device)
        self.bits = torch.from_numpy(dataset.bits).to(self.device)
        n, c = sum(depths), len(dataset.channels)
        self.image = torch.zeros((n, c, h, w), dtype=torch.float16, device=self.device)
        self.labels = torch.zeros((n, h, w), dtype=torch.uint8, device=self.device)
        for e, entry in enumerate(entries):
            x, y, z = (int(s) for s in entry.shape)
            at = slice(int(self.offset[e]), int(self.offset[e]) + z)
            self.image[at, :, :x, :y] = torch.from_numpy(
                np.ascontiguousarray(entry.image_volume()[:, dataset.channels])).to(self.device)
            self.labels[at, :x, :y] = torch.from_numpy(np.array(entry.label_volume())).to(self.device)
        self.maps = None
        if dataset.distance_key is not None:
            volumes = [entry.distance_volume(dataset.distance_key) for entry in entries]  # (Z', L, X, Y)
            map_depths = [int(v.shape[0]) for v in volumes]
            self.map_offset = _starts(map_depths, self.device)
            self.map_per_slice = torch.tensor([d > 1 for d in map_depths], device=self.device)
            self.maps = torch.zeros((sum(map_depths), volumes[0].shape[1], h, w), dtype=torch.float32,
                                    device=self.device)
            for e, volume in enumerate(volumes):
                _, _, x, y = volume.shape
                at = slice(int(self.map_offset[e]), int(self.map_offset[e]) + map_depths[e])
                self.maps[at, :, :x, :y] = torch.from_numpy(np.array(volume)).to(self.device)

    def nbytes(self) -> int:
        """Device memory the slices take."""
        tensors = [self.image, self.labels] + ([] if self.maps is None else [self.maps])
        return sum(t.numel() * t.element_size() for t in tensors)

    def gather(self, rows: torch.Tensor) -> dict:
        """The batch of :meth:`SliceDataset.__getitems__ <landmark_unet.data.slices.SliceDataset.__getitems__>`
        for ``rows`` int64 (B, 2) ``[entry, k]`` (on this device; with a crop (B, 4) ``[entry, k, x0, y0]``,
        :class:`SliceRows`): image float16 (B, C, H, W) or (B, C, S, H, W), mask uint8 (B, K, H, W), subject,
        slice and size int64, distance float32 (B, L, [S,] H, W); H = W = the crop with one
        (:func:`~landmark_unet.data.slices.widen` makes image and mask float32)."""
        e, k = rows[:, 0], rows[:, 1]
        half = self.stack // 2
        steps = torch.arange(-half, half + 1, device=rows.device)
        ks = torch.minimum((k[:, None] + steps).clamp(min=0), self.depth[e][:, None] - 1)  # (B, S)
        window = (lambda t: t) if self.crop is None else self._window(rows)
        image = window(self.image[self.offset[e][:, None] + ks]).transpose(1, 2)  # (B, C, S, H, W)
        packed = window(self.labels[self.offset[e] + k])  # (B, H, W)
        mask = unpack_labels(packed, self.bits, axis=1).to(torch.uint8)  # (B, K, H, W)
        size = self.sizes[e]
        if self.crop is not None:  # the part of the window inside the body's (X, Y) (x0 = 0 where X < crop)
            size = size.clamp(max=self.crop)
        batch = {"image": image[:, :, 0] if self.stack == 1 else image, "mask": mask, "subject": self.subject_ids[e],
                 "slice": k, "size": size}
        if self.maps is not None:
            at = self.map_offset[e][:, None] + torch.where(self.map_per_slice[e][:, None], ks, 0)
            maps = window(self.maps[at]).float().transpose(1, 2)  # (B, L, S, H, W)
            batch["distance"] = maps[:, :, 0] if self.stack == 1 else maps
        return batch

    def _window(self, rows: torch.Tensor):
        """A function cutting each sample's ``crop x crop`` window, corner ``rows[:, 2:]``, out of (B, ..., H, W)
        (any dtype); zero where the window leaves the body's (X, Y), as the host dataset pads it."""
        b = torch.arange(len(rows), device=rows.device)
        offsets = torch.arange(self.crop, device=rows.device)
        xs, ys = rows[:, 2, None] + offsets, rows[:, 3, None] + offsets  # (B, crop) voxel indices
        sizes = self.sizes[rows[:, 0]]
        inside = (xs < sizes[:, :1])[:, :, None] & (ys < sizes[:, 1:])[:, None, :]  # (B, crop, crop)
        h, w = self.image.shape[-2:]
        xs, ys = xs.clamp(max=h - 1), ys.clamp(max=w - 1)  # a crop larger than the padded slice: masked above

        def cut(t: torch.Tensor) -> torch.Tensor:
            out = t.movedim((-2, -1), (1, 2))[b[:, None, None], xs[:, :, None], ys[:, None, :]]  # (B, h, w, ...)
            out = out.movedim((1, 2), (-2, -1))
            return out.masked_fill(~inside.view(len(rows), *(1,) * (out.dim() - 3), *inside.shape[1:]), 0)

        return cut
