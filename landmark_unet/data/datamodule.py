"""LightningDataModule of 2D axial slices (or 3D patches): data source -> cache -> split -> datasets.

Training visits only the slices that hold the organ(s) being learned (the study's section 3.4.2); validation and
test visit every slice of their bodies, in order, so that predictions can be scored per body in 3D. With
``stack=0`` (the volumetric ``model=unet3d_full``) training draws 3D patches with foreground oversampling
(:class:`~landmark_unet.data.patches.PatchDataset`) and validation and test take whole bodies, one per batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from landmark_unet.data.cache import (
    CT_WINDOW,
    CacheEntry,
    CacheJob,
    build_cache,
    ensure_distance_maps,
    mark_used,
    resolve_normalisation,
)
from landmark_unet.data.device_slices import DeviceSlices, SliceRows
from landmark_unet.data.layouts import (
    CHANNELS,
    LAYOUTS,
    Case,
    check_dataset_root,
    labelled_organs,
    list_cases,
)
from landmark_unet.data.organs import ORGANS, organ_bit
from landmark_unet.data.patches import BodyDataset, PatchDataset
from landmark_unet.data.slices import (
    EpochShuffle,
    EvalShardSampler,
    ForegroundOversampler,
    RankShare,
    SliceDataset,
    collate,
    epoch_seed,
    padded_size,
    slice_index,
    widen,
)
from landmark_unet.data.sources import read_case
from landmark_unet.data.splits import load_split, make_split, save_split
from landmark_unet.errors import InputError, MissingLandmarksError
from landmark_unet.landmarks.distance import MAP_KEYS
from landmark_unet.models.fusion import FUSIONS

log = logging.getLogger(__name__)
SOURCES = ("phantom", *LAYOUTS)
SAMPLINGS = ("organ_only", "oversample")
LANDMARK_DEFAULTS = {"source": "file", "on_missing": "error", "encoding": "manhattan", "units": "voxel",
                     "space": "volume", "combine": "sum", "pairs": 1, "sigma_mm": 20.0}


def phantom_root(cache_dir: str | Path, phantom: dict) -> Path:
    """Folder of the built-in phantom with these settings: ``<cache_dir>/phantom/<hash of the settings>``."""
    from landmark_unet.data.phantom import PHANTOM_VERSION

    settings = {k: v for k, v in phantom.items() if k != "workers"} | {"version": PHANTOM_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "phantom" / key


def ensure_phantom(root: Path, phantom: dict) -> Path:
    """Generate the phantom into ``root`` unless a complete one (``phantom.json`` present) is already there."""
    if (root / "phantom.json").exists():
        mark_used(root)
        return root
    from landmark_unet.data.phantom import PhantomConfig, generate_dataset

    settings = dict(phantom)
    n_subjects = int(settings.pop("n_subjects"))
    seed = int(settings.pop("seed"))
    workers = int(settings.pop("workers", 1))
    cfg = PhantomConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()})
    log.info("generating the phantom (%d subjects, shape %s) into %s", n_subjects, list(cfg.shape), root)
    generate_dataset(root, n_subjects=n_subjects, seed=seed, cfg=cfg, workers=workers)
    return root


def training_epoch(trainer: pl.Trainer) -> int:
    """The training epoch the trainer runs or is about to run: the number Lightning gives the samplers'
    ``set_epoch``. (``trainer.current_epoch`` still counts the last finished epoch while a run resumed from an
    epoch-end checkpoint builds its loaders.)"""
    return int(trainer.fit_loop.epoch_progress.current.processed)


def samples_trained_this_epoch(trainer: pl.Trainer | None, batch_size: int, draws: int) -> int:
    """How many of its share of an epoch's ``draws`` (its sampler's pass, over all ranks) this rank has trained on
    already in a run continued from a mid-epoch checkpoint: its completed batches x ``batch_size``. 0 when the run
    starts an epoch (a new run, or one continued from an epoch-end checkpoint)."""
    if trainer is None:
        return 0
    progress, ranks = trainer.fit_loop.epoch_loop.batch_progress, int(trainer.world_size)
    batches = math.ceil(math.ceil(draws / ranks) / batch_size)  # per rank (Lightning's DDP wrapper pads)
    done = int(progress.current.processed)
    return done * batch_size if 0 < done < batches and not progress.is_last_batch else 0


def training_share(sampler: torch.utils.data.Sampler, trainer: pl.Trainer | None, batch_size: int):
    """The training loader's sampler: under DDP, or in a run continued from a mid-epoch checkpoint, this rank's
    share of ``sampler`` less the draws the epoch has trained on (:class:`~landmark_unet.data.slices.RankShare`);
    otherwise ``sampler`` itself."""
    ranks = int(trainer.world_size) if trainer is not None else 1
    skip = samples_trained_this_epoch(trainer, batch_size, len(sampler))
    if ranks == 1 and not skip:
        return sampler
    return RankShare(sampler, num_replicas=ranks, rank=trainer.global_rank, skip=skip)


class SliceDataModule(pl.LightningDataModule):
    """2D slices of one dataset for one split round.

    Args:
        source: ``phantom`` (generated on first use into the cache folder, in the ``folder`` layout), ``folder``
            (the study's layout), ``nnunet`` or ``totalseg`` (:mod:`landmark_unet.data.layouts`).
        root: dataset folder (``data.root``); for ``phantom`` it defaults to a folder in ``cache_dir``.
        labels: organ -> label names of the dataset (nnunet: names in dataset.json; totalseg: structure names).
        channel_names: nnunet: the channel (fat, water, single) of each file index ``_0000``, ``_0001``, ...
        image_file: totalseg: the image of each case (``ct.nii.gz`` or ``mri.nii.gz``).
        modality: ``mri`` or ``ct``: the ``auto`` normalisation and the hip detector of a single channel.
        spacing: resample every case to this spacing (mm along canonical x, y, z) before caching; None keeps each
            file's grid.
        ct_window: Hounsfield window of the ``ct`` normalisation.
        cases: use only the cases whose names match one of these fnmatch patterns.
        cache_dir: where the phantom and the preprocessed cache live.
        organs: organs to segment, one output channel each.
        channels: image channels, e.g. ``["fat", "water"]``.
        phantom: phantom settings (``n_subjects``, ``seed``, ``shape``, ... see ``conf/data/phantom.yaml``).
        split: ``rounds``, ``round``, ``val_fraction``, ``seed`` and optionally ``file`` (a splits.json to reuse).
        batch_size: slices per training batch.
        eval_batch_size: slices per validation / test batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        normalisation: intensity normalisation of the cache: ``percentile``, ``zscore``, ``ct``, ``none``, or
            ``auto`` (``zscore`` for an MRI, ``ct`` for a CT); the distance maps are never normalised.
        pad_multiple: slices are zero-padded so that H and W are divisible by this (16 for a 4-level U-Net).
        cache_workers: processes used to build the cache (0: in this process).
        splits_out: where to save the split (the run's splits.json); None to not save.
        sampling: training slices: ``organ_only`` (the study, section 3.4.2: only slices holding the organ) or
            ``oversample`` (every slice of the training bodies, with ``foreground_fraction`` of the samples forced
            to hold the organ).
        foreground_fraction: share of organ slices when ``sampling=oversample``.
        seed: seed of the oversampling draws.
        fusion: ``none``, ``early`` or ``late``; anything but ``none`` adds the landmark distance maps to each
            sample as ``distance`` (L, H, W).
        landmarks: the ``landmarks`` config: ``source`` (file | detect | auto), ``on_missing`` (error | skip) and
            the map settings of :func:`~landmark_unet.landmarks.distance.subject_maps` (``encoding``, ``units``,
            ``space``, ``combine``, ``pairs``, ``sigma_mm``).
        stack: slices per sample: 1 (2D networks) or 5 (the depth-5 network: slices k-2 .. k+2, edges repeated);
            0: volumetric, 3D training patches of ``patch_size`` and whole bodies for evaluation.
        patch_size: (D, H, W) voxels (z, x, y) of a training patch, with ``stack=0``; ``foreground_fraction`` of
            the patches are forced to hold an organ (nnU-Net: 1/3).
        samples_per_epoch: training patches per epoch, with ``stack=0``.
        crop: random in-plane ``crop x crop`` window of each training sample (the study's depth-5 runs: 256 or 208;
            divisible by ``pad_multiple``); evaluation always sees the whole slice.
        on_device: hold the bodies' slices in the accelerator's memory and gather each batch there
            (:mod:`landmark_unet.data.device_slices`): the loaders carry only slice indices. For GPUs (it copies the
            cache into the device's memory); 2D slices and depth-5 stacks, random crops cut there too.
    """

    def __init__(
        self,
        source: str = "phantom",
        root: str | None = None,
        cache_dir: str = ".cache",
        organs: Sequence[str] = ("liver",),
        channels: Sequence[str] = ("fat", "water"),
        phantom: dict | None = None,
        split: dict | None = None,
        batch_size: int = 10,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        normalisation: str = "percentile",
        pad_multiple: int = 16,
        cache_workers: int = 0,
        splits_out: str | None = None,
        sampling: str = "organ_only",
        foreground_fraction: float = 0.5,
        seed: int = 0,
        fusion: str = "none",
        landmarks: dict | None = None,
        stack: int = 1,
        crop: int | None = None,
        patch_size: Sequence[int] | None = None,
        samples_per_epoch: int = 250,
        labels: dict | None = None,
        channel_names: Sequence[str] | None = None,
        image_file: str = "ct.nii.gz",
        modality: str = "mri",
        spacing: Sequence[float] | None = None,
        ct_window: Sequence[float] = CT_WINDOW,
        cases: Sequence[str] | None = None,
        on_device: bool = False,
    ):
        super().__init__()
        if source not in SOURCES:
            raise InputError("data.source", f"unknown source {source!r} (choose from {', '.join(SOURCES)})")
        for organ in organs:
            if organ not in ORGANS:
                raise InputError("organ", f"unknown organ {organ!r} (choose from {', '.join(ORGANS)}, all)")
        for channel in channels:
            if channel not in CHANNELS:
                raise InputError("content", f"unknown channel {channel!r} (choose from {', '.join(CHANNELS)})")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise InputError("data.spacing", f"must be three positive mm values [x, y, z], got {list(spacing)}")
        if sampling not in SAMPLINGS:
            raise InputError("data.sampling", f"unknown sampling {sampling!r} (choose from {', '.join(SAMPLINGS)})")
        if not 0 < foreground_fraction <= 1:
            raise InputError("data.foreground_fraction", f"must be in (0, 1], got {foreground_fraction}")
        if batch_size < 1:
            raise InputError("data.batch_size", f"must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise InputError("data.eval_batch_size", f"must be >= 1 (or null: data.batch_size), got {eval_batch_size}")
        if num_workers < 0:
            raise InputError("data.num_workers", f"must be >= 0 (0: load in the training process), got {num_workers}")
        self.source = source
        self.root = root
        self.cache_dir = Path(cache_dir)
        self.organs = list(organs)
        self.channels = list(channels)
        self.phantom = dict(phantom or {})
        self.split_cfg = dict(split or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.normalisation = resolve_normalisation(normalisation, modality)
        self.modality = modality
        self.labels = {k: list(v) for k, v in (labels or {}).items()}
        self.channel_names = list(channel_names) if channel_names else None
        self.image_file = image_file
        self.spacing = None if spacing is None else [float(v) for v in spacing]
        self.ct_window = [float(v) for v in ct_window]
        self.include = list(cases) if cases else None
        self.pad_multiple = pad_multiple
        self.cache_workers = cache_workers
        self.splits_out = splits_out
        self.sampling = sampling
        self.foreground_fraction = foreground_fraction
        self.seed = seed
        if fusion not in FUSIONS:
            raise InputError("fusion", f"unknown fusion {fusion!r} (choose from {', '.join(FUSIONS)})")
        self.fusion = fusion
        if stack not in (0, 1, 5):
            raise InputError("data.stack", f"must be 1 (2D slices), 5 (depth-5 stacks) or 0 (3D patches), got {stack}")
        if stack == 0 and (patch_size is None or len(patch_size) != 3 or min(patch_size) < 1):
            raise InputError("data.patch_size", f"must be three positive sizes [D, H, W] with data.stack=0, got "
                                                f"{None if patch_size is None else list(patch_size)}")
        if samples_per_epoch < 1:
            raise InputError("data.samples_per_epoch", f"must be >= 1, got {samples_per_epoch}")
        self.patch_size = None if patch_size is None else [int(p) for p in patch_size]
        self.samples_per_epoch = int(samples_per_epoch)
        if crop is not None and (crop < pad_multiple or crop % pad_multiple):
            raise InputError("data.crop", f"must be a positive multiple of {pad_multiple}, got {crop}")
        self.stack = stack
        self.crop = crop
        if on_device and stack == 0:
            raise InputError("data.on_device", "gathers 2D slices and depth-5 stacks only: not with data.stack=0 "
                                               "(3D patches)")
        self.on_device = bool(on_device)
        self._device_slices: dict[tuple[str, torch.device], DeviceSlices] = {}
        self._device_datasets: dict[str, SliceDataset] = {}
        self.landmarks = {**LANDMARK_DEFAULTS, **(landmarks or {})}
        if self.landmarks["source"] not in ("file", "detect", "auto"):
            raise InputError("landmarks.source", f"unknown source {self.landmarks['source']!r} (choose from file, detect, auto)")
        if self.landmarks["on_missing"] not in ("error", "skip"):
            raise InputError("landmarks.on_missing", f"must be error or skip, got {self.landmarks['on_missing']!r}")
        self.map_settings = {k: self.landmarks[k] for k in MAP_KEYS}
        self.distance_key: str | None = None
        self.skipped: dict[str, str] = {}
        self.subject_names: list[str] = []
        self.split: dict[str, list[str]] = {}
        self.entries: dict[str, CacheEntry] = {}
        self._ready = False

    # -- data on disk -------------------------------------------------------------------------------------------
    def dataset_root(self) -> Path:
        if self.source != "phantom":
            return check_dataset_root(self.root)
        return Path(self.root) if self.root is not None else phantom_root(self.cache_dir, self.phantom)

    def list_cases(self, root: Path) -> list[Case]:
        """The cases of the dataset, with the label files of every organ the layout names (all five for the
        study's layout, those in ``labels`` for the others)."""
        layout, organs = labelled_organs(self.source, self.labels)
        missing = [o for o in self.organs if o not in organs]
        if missing:
            raise InputError(f"data.labels.{missing[0]}", f"no label name for {missing[0]} in this dataset's config")
        return list_cases(layout, root, organs, labels=self.labels or None, channel_names=self.channel_names,
                          image_file=self.image_file, include=self.include)

    def prepare_data(self) -> None:
        if self.source == "phantom" and self.root is None:
            ensure_phantom(self.dataset_root(), self.phantom)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.prepare_data()
        root = self.dataset_root()
        cases = {c.name: c for c in self.list_cases(root)}
        if self.split_cfg.get("file"):
            self.split = load_split(self.split_cfg["file"])
            missing = sorted(set(sum((self.split[k] for k in ("train", "val", "test")), [])) - set(cases))
            if missing:
                raise InputError(self.split_cfg["file"], f"names subjects not in {root}: {', '.join(missing[:5])}")
        else:
            params = {k: self.split_cfg[k] for k in ("rounds", "round", "val_fraction", "seed") if k in self.split_cfg}
            self.split = make_split(list(cases), **params)
        names = sorted(set(self.split["train"]) | set(self.split["val"]) | set(self.split["test"]))
        first = cases[names[0]].images  # read every channel the dataset has, so that contents share a cache
        read_channels = tuple(c for c in CHANNELS if c in first and first[c].exists())
        if not set(self.channels) <= set(read_channels):
            raise InputError(cases[names[0]].name, f"case lacks channel(s) {sorted(set(self.channels) - set(read_channels))} "
                                                   f"(has {', '.join(read_channels)}; see content=)")
        read_organs = tuple(o for o in ORGANS if o in cases[names[0]].labels)
        need_maps = self.fusion != "none"
        source = self.landmarks["source"] if need_maps else "optional"
        skip = (MissingLandmarksError,) if self.landmarks["on_missing"] == "skip" else ()
        settings = {"spacing": self.spacing} if self.spacing else {}
        jobs = [
            CacheJob(
                name=name,
                files=cases[name].files(),
                read=functools.partial(read_case, cases[name], read_channels, read_organs, source, self.modality,
                                       self.spacing),
                settings=settings | ({"landmarks": source} if source in ("detect", "auto") else {}),
            )
            for name in names
        ]
        log.info("caching %d subjects in %s", len(jobs), self.cache_dir / "subjects")
        results = build_cache(jobs, self.cache_dir / "subjects", self.normalisation, workers=self.cache_workers,
                              skip=skip, ct_window=self.ct_window)
        entries = {}
        for name, result in zip(names, results):
            if isinstance(result, Exception):
                self.skipped[name] = str(result)
                continue
            if need_maps:
                try:
                    self.distance_key = ensure_distance_maps(result, self.map_settings)
                except skip as err:
                    self.skipped[name] = str(err)
                    continue
            entries[name] = result
        for name, why in self.skipped.items():
            log.warning("skipping subject %s: %s", name, why)
        self.split = {part: [n for n in names_ if n in entries] for part, names_ in self.split.items()
                      if isinstance(names_, list)}
        if not self.split["train"] or not self.split["test"]:
            raise InputError("landmarks.on_missing", "skipping subjects without landmarks left no training or test subject")
        if self.splits_out:
            save_split(self.splits_out, self.split, root=str(root), skipped=self.skipped,
                       **{k: v for k, v in self.split_cfg.items() if k != "file"})
        absent = [o for o in self.organs if not any(e.meta["organ_voxels"].get(o, 0) for e in entries.values())]
        if absent and len(absent) == len(self.organs):
            raise InputError("organ", f"{', '.join(absent)} is empty in every case of {root} (check data.labels)")
        for organ in absent:  # multi-task: the other organs still train
            log.warning("%s is empty in every case of %s: its output will learn only background", organ, root)
        self.subject_names = sorted(entries)
        self.entries = entries
        first = next(iter(entries.values()))
        self.channel_index = [first.channels.index(c) for c in self.channels]
        self.size = padded_size(list(entries.values()), self.pad_multiple)
        self._ready = True

    # -- datasets -----------------------------------------------------------------------------------------------
    def data_fingerprint(self) -> str:
        """One digest of the data this run sees: every subject of its split by name and cached content (images,
        labels, geometry, landmarks; see :mod:`landmark_unet.data.cache`) and the split itself."""
        h = hashlib.sha256()
        for part in ("train", "val", "test"):
            for name in sorted(self.split.get(part, [])):
                h.update(f"{part}|{name}|{self.entries[name].meta.get('content', '')}\n".encode())
        return h.hexdigest()[:16]

    def subject_id(self, name: str) -> int:
        return self.subject_names.index(name)

    def dataset(self, part: str, organ_slices_only: bool) -> SliceDataset:
        names = self.split[part]
        entries = [self.entries[n] for n in names]
        index = slice_index(entries, self.organs, organ_slices_only)
        return SliceDataset(entries, [self.subject_id(n) for n in names], index, self.channel_index, self.organs,
                            self.size, distance_key=self.distance_key if self.fusion != "none" else None,
                            stack=self.stack, crop=self.crop if part == "train" else None)

    def _loader(self, dataset: SliceDataset, batch_size: int, part: str, sampler=None,
                generator=None) -> DataLoader:
        if self.on_device:  # slice indices only: transfer_batch_to_device gathers the slices on the device
            self._device_datasets[part] = dataset
            rows = SliceRows(dataset.index, part, dataset.crop, [e.shape[:2] for e in dataset.entries])
            return DataLoader(rows, batch_size=batch_size, sampler=sampler,
                              generator=generator, num_workers=0, collate_fn=collate)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Training slices in an order drawn from (seed, epoch) alone (:class:`~landmark_unet.data.slices.EpochSampler`):
        the organ slices shuffled (``sampling=organ_only``) or foreground-oversampled draws (``oversample``), each
        with the origin of its random crop (``data.crop``), so that what a batch holds does not depend on the
        loader's workers (they persist across epochs). The loader has a generator of its own (seeded from (seed,
        epoch, rank); the seeds of its workers), so that building and iterating it never draws from torch's global
        generator. Under DDP each rank takes its share (:func:`training_share`); a run continued from a mid-epoch
        checkpoint leaves out the draws that epoch has trained on."""
        trainer = self.trainer
        epoch = training_epoch(trainer) if trainer is not None else 0  # a resumed run starts at its epoch
        rank = trainer.global_rank if trainer else 0
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, rank))
        if self.stack == 0:  # 3D patches, each a function of (seed, epoch, rank, index)
            names = self.split["train"]
            ds = PatchDataset([self.entries[n] for n in names], self.organs, self.channel_index, self.patch_size,
                              self.foreground_fraction, self.samples_per_epoch, seed=epoch_seed(self.seed, 0, rank),
                              distance_key=self.distance_key if self.fusion != "none" else None,
                              subject_ids=[self.subject_id(n) for n in names], epoch=epoch)
            sampler = training_share(torch.utils.data.SequentialSampler(ds), trainer, self.batch_size)
            return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers, sampler=sampler,
                              pin_memory=torch.cuda.is_available(), generator=generator)
        if self.sampling == "organ_only":
            ds = self.dataset("train", organ_slices_only=True)
            if len(ds) == 0:
                raise InputError("organ", f"no training slice holds {'/'.join(self.organs)}")
            sampler = EpochShuffle(len(ds), seed=self.seed, epoch=epoch, crop_origins=self.crop is not None)
        else:
            ds = self.dataset("train", organ_slices_only=False)
            bits = sum(organ_bit(o) for o in self.organs)
            holds = np.array([ds.entries[e].slice_bits[k] & bits for e, k in ds.index]) > 0
            if not holds.any():
                raise InputError("organ", f"no training slice holds {'/'.join(self.organs)}")
            sampler = ForegroundOversampler(np.flatnonzero(holds), len(ds), self.foreground_fraction,
                                            seed=self.seed, epoch=epoch, crop_origins=self.crop is not None)
        sampler = training_share(sampler, trainer, self.batch_size)  # continued mid-epoch: the rest of its draws
        return self._loader(ds, self.batch_size, "train", sampler=sampler, generator=generator)

    def _eval_loader(self, part: str) -> DataLoader:
        """Every slice of the bodies of ``part``; under DDP each rank a share, unpadded (EvalShardSampler). With
        ``stack=0``, the whole bodies, one per batch (on one rank)."""
        if self.stack == 0:
            names = self.split[part]
            return DataLoader(BodyDataset([self.entries[n] for n in names], self.organs, self.channel_index,
                                          [self.subject_id(n) for n in names],
                                          self.distance_key if self.fusion != "none" else None),
                              batch_size=1, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        ds = self.dataset(part, organ_slices_only=False)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = EvalShardSampler(ds) if distributed and torch.distributed.get_world_size() > 1 else None
        return self._loader(ds, self.eval_batch_size, part, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val" if self.split["val"] else "test")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """With ``on_device``: a batch of slice indices ``{"rows", "part"}`` becomes, on ``device``, the batch of
        slices :class:`~landmark_unet.data.slices.SliceDataset` would have built, gathered from the part's bodies
        held in the device's memory (copied there at the part's first batch). Any other batch is moved as usual.
        Either way a slice batch's float16 image and uint8 mask become float32 on the device
        (:func:`~landmark_unet.data.slices.widen`). (Not ``on_after_batch_transfer``: the LightningModule's, its
        augmentation, must still run after this.)"""
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if not (isinstance(batch, dict) and "rows" in batch):
            return widen(batch) if isinstance(batch, dict) else batch
        rows = batch["rows"]
        key = (batch["part"], rows.device)
        if key not in self._device_slices:
            self._device_slices[key] = DeviceSlices(self._device_datasets[batch["part"]], rows.device)
            log.info("data.on_device: %s slices on %s, %.2f GiB", batch["part"], rows.device,
                     self._device_slices[key].nbytes() / 2**30)
        return widen(self._device_slices[key].gather(rows))

    def panel_position(self) -> int | None:
        """Position, in the validation loader's order, of the slice shown in the TensorBoard image panel: the
        middle organ slice of the first validation body that holds the organ(s) (else its middle slice); None for
        whole-body validation (``stack=0``), which shows no panel."""
        if self.stack == 0:
            return None
        bits = sum(organ_bit(o) for o in self.organs)
        names = self.split["val"] or self.split["test"]
        before = 0  # the evaluation loader visits every slice of each body in order
        for name in names:
            entry = self.entries[name]
            ks = np.flatnonzero(entry.slice_bits & bits)
            if len(ks):
                return before + int(ks[len(ks) // 2])
            before += entry.shape[2]
        return self.entries[names[0]].shape[2] // 2
