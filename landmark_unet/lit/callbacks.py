"""Small Lightning callbacks of our own."""

from __future__ import annotations

import random
import time

import numpy as np
import pytorch_lightning as pl
import torch

from landmark_unet.checkpoint import SIGNATURE_KEY
from landmark_unet.data.datamodule import training_epoch
from landmark_unet.data.slices import epoch_seed


class EpochTimer(pl.Callback):
    """Measures wall seconds of each training epoch (training batches only) and of each whole epoch with its
    validation, and the seconds the training loop spent between steps: fetching the next batch from the loader,
    moving it to the device and augmenting it (from the end of one training step to the start of the next, and
    from the epoch's start to its first step). On a GPU that host time is an upper bound of the time the device
    waited for data, since the host queues work ahead of the device."""

    def __init__(self):
        self.train_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self.wait_seconds: list[float] = []
        self._t0 = 0.0
        self._last = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._begin()

    def _begin(self) -> None:
        self._t0 = self._last = time.perf_counter()
        self.wait_seconds.append(0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.wait_seconds) == len(self.epoch_seconds):  # a run resumed mid-epoch skips on_train_epoch_start
            self._begin()
        self.wait_seconds[-1] += time.perf_counter() - self._last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning runs validation before on_train_epoch_end; on_validation_start marks the split below.
        self.epoch_seconds.append(time.perf_counter() - self._t0)
        if len(self.train_seconds) < len(self.epoch_seconds):
            self.train_seconds.append(self.epoch_seconds[-1])

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._t0:
            self.train_seconds.append(time.perf_counter() - self._t0)

    @property
    def seconds_per_epoch(self) -> float:
        """Mean training seconds per epoch, first epoch excluded when there are several (warm-up)."""
        xs = self._steady(self.train_seconds)
        return float(sum(xs) / len(xs)) if xs else float("nan")

    @property
    def data_wait_fraction(self) -> float:
        """Share of the training epochs' time spent between steps (see the class), first epoch excluded when there
        are several (it starts the loader workers)."""
        n = min(len(self.train_seconds), len(self.wait_seconds))
        train, wait = self._steady(self.train_seconds[:n]), self._steady(self.wait_seconds[:n])
        return float(sum(wait) / sum(train)) if train and sum(train) > 0 else float("nan")

    @staticmethod
    def _steady(xs: list[float]) -> list[float]:
        return xs[1:] if len(xs) > 1 else xs


class MetricHistory(pl.Callback):
    """Keeps every epoch's validation metrics (``val/...``) for metrics.json: the Dice-vs-epoch curves of the
    report (the study's Figure 7). One host read per validation epoch, none in the training step.

    Read in ``on_validation_end``: Lightning calls the callbacks' ``on_validation_epoch_end`` before the module's,
    where the Dice is logged, so reading there would give the previous epoch's values."""

    def __init__(self):
        self.history: dict[str, list[float]] = {"epoch": []}

    def state_dict(self) -> dict:  # saved in every checkpoint, so that a resumed run keeps the earlier epochs
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {k: list(v) for k, v in state_dict["history"].items()}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history["epoch"].append(trainer.current_epoch)
        for key, value in values.items():
            self.history.setdefault(key, [float("nan")] * (len(self.history["epoch"]) - 1)).append(value)
        for series in self.history.values():  # a metric missing this epoch keeps the series aligned
            if len(series) < len(self.history["epoch"]):
                series.append(float("nan"))


class EpochSeed(pl.Callback):
    """Reseeds Python's, numpy's and torch's global generators (CUDA's too) and the training loader's own generator
    (the seeds of its worker processes) at the start of every training epoch from (seed, epoch, rank), so that an
    epoch's random draws do not depend on what ran before it. The project's own training draws do not use them: the
    loader's sampler, with the crop origins, is seeded by (seed, epoch) itself
    (:class:`~landmark_unet.data.slices.EpochSampler`), the augmentation by (seed, epoch, rank, batch)
    (:meth:`~landmark_unet.lit.segmentation.SegmentationModule.augmentation_generator`), and the DataModule seeds
    the loader's generator (its workers' seeds) the same way when it builds it at a resumed epoch (before this hook
    runs); a run continued mid-epoch, which skips this hook, draws them all as the uninterrupted run."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        s = epoch_seed(self.seed, training_epoch(trainer), trainer.global_rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # every CUDA device too
        generator = getattr(trainer.train_dataloader, "generator", None)
        if generator is not None:
            generator.manual_seed(s)


class SignatureCallback(pl.Callback):
    """Writes the run's :func:`~landmark_unet.checkpoint.signature` into every checkpoint under :data:`SIGNATURE_KEY`."""

    def __init__(self, signature: dict):
        self.signature = dict(signature)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[SIGNATURE_KEY] = dict(self.signature)
