"""One LightningModule for segmentation: loss, optimiser, per-body Dice, TensorBoard curves and image panels."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from landmark_unet.data.augment import AffineAugment
from landmark_unet.errors import InputError
from landmark_unet.heads import check_head, organ_masks, probabilities
from landmark_unet.lit.optimizer import compile_step
from landmark_unet.losses import BCELoss, deep_supervision_loss
from landmark_unet.metrics import PerBodyDice, SampleMean, VolumeRatio
from landmark_unet.models.blocks import norms_in_fp32

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def valid_region(size: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Boolean (B, 1, H, W): True inside each sample's unpadded (X, Y) = ``size[b]``."""
    h, w = shape[-2:]
    rows = torch.arange(h, device=size.device)[None, :, None] < size[:, 0, None, None]
    cols = torch.arange(w, device=size.device)[None, None, :] < size[:, 1, None, None]
    return (rows & cols)[:, None]


def display_slice(x: torch.Tensor) -> torch.Tensor:
    """(X, Y) canonical axial slice -> (rows, cols) in radiological view (anterior up, patient right on the left)."""
    return x.flip(0).flip(1).T


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def compile_options(compile: bool | str) -> dict:
    """``torch.compile`` keyword arguments for ``model.compile`` (True or one of :data:`COMPILE_MODES`).

    Raises:
        InputError: an unknown mode (names ``model.compile``).
    """
    if compile is True:
        return {}
    if compile not in COMPILE_MODES:
        raise InputError("model.compile", f"expected true, false or one of {', '.join(COMPILE_MODES)}; "
                                          f"got {compile!r}")
    return {"mode": compile}


class SegmentationModule(pl.LightningModule):
    """Trains a network that maps images (B, C, H, W) to logit maps (B, K, H, W) (one per organ; K + 1 with a
    softmax head, background first: :mod:`landmark_unet.heads`).

    The loss is ``loss`` (:mod:`landmark_unet.losses`), by default the sum over organs of the mean binary
    cross-entropy with logits (the study's joint-learning loss, section 3.4.3; for one organ it is plain BCE). Validation and test predict every slice of their bodies, cut the
    probabilities at ``threshold`` and score Dice per body in 3D (:class:`~landmark_unet.metrics.PerBodyDice`).

    Logged: ``train/loss``, ``val/loss``, ``val/dice/<organ>`` (mean over bodies), ``val/dice_mean`` (mean over
    organs, the checkpoint monitor), and at test ``test/dice/<organ>``; with a TensorBoard logger also an image
    panel ``val/panel`` (fat slice, probability, cut-off mask, ground truth; the study's Figures 8-10).

    Args:
        net: the network.
        organs: organ names, one per output channel.
        optimizer: factory taking the parameters (a Hydra ``_partial_`` optimizer).
        scheduler: optional factory taking the optimizer; stepped once per epoch.
        loss: maps logits (B, K, H, W) and targets (B, K, H, W) to a scalar; default
            :class:`~landmark_unet.losses.BCELoss`.
        threshold: probability cut-off for the binary masks (sigmoid head; a softmax head takes the argmax).
        head: ``sigmoid`` (one independent map per organ, the study's) or ``softmax`` (background + organs).
        sliding_window: for a volumetric patch network (``model=unet3d_full``: trained on 3D patches, validated and
            tested on whole bodies): ``patch_size`` (D, H, W), ``overlap`` and ``batch_size`` of the Gaussian
            sliding-window inference (:func:`landmark_unet.sliding_window.stitch`); None for slice networks.
        augmentation: ranges for :class:`~landmark_unet.data.augment.AffineAugment` (``rotation``, ``scale``,
            ``shear``, ``p``), applied to training batches on the device; never in validation or test. Each
            batch's draws come from a generator seeded by (seed, epoch, rank, batch index) alone
            (:meth:`augmentation_generator`), so that a run continued mid-epoch augments as the uninterrupted run.
        channels_last: keep the 2D convolutions' weights and inputs in channels-last memory format (faster on
            tensor-core GPUs and on CPUs with oneDNN: see benchmarks/README.md).
        compile: compile the network with ``torch.compile`` (``nn.Module.compile``: parameter names and
            checkpoints stay those of the plain network): True for torch's default mode, or a mode by name
            (:data:`COMPILE_MODES`; ``reduce-overhead`` also replays the compiled forward and backward as CUDA
            graphs on a GPU, where the compiled step is otherwise limited by the host launching its kernels: see
            benchmarks/README.md). Costs a minute or so of compilation at the first step.
        norm_fp32: under bf16 / fp16 mixed precision, compute every BatchNorm / InstanceNorm (and the ReLU after
            it) in fp32 (:func:`~landmark_unet.models.blocks.norms_in_fp32`); no effect in fp32.
        compile_optimizer: run the optimiser's update as code compiled by ``torch.compile``
            (:func:`~landmark_unet.lit.optimizer.compile_step`: fused passes over the parameters instead of one per
            operation; its learning rates become tensors). Compiles at the first step.
    """

    def __init__(
        self,
        net: nn.Module,
        organs: Sequence[str],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        threshold: float = 0.5,
        augmentation: dict | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        loss: nn.Module | None = None,
        head: str = "sigmoid",
        sliding_window: dict | None = None,
        norm_fp32: bool = False,
        compile_optimizer: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "loss"])
        self.net = net
        self.organs = list(organs)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.threshold = threshold
        self.head = check_head(head)
        self.sliding_window = dict(sliding_window) if sliding_window else None
        self.loss_fn = loss if loss is not None else BCELoss()
        self.augment = AffineAugment(**(augmentation or {}))
        self.channels_last = channels_last
        self.compile_optimizer = compile_optimizer
        if channels_last:
            for m in self.net.modules():  # 4D weights only: a depth-5 stem's 3D convolutions stay as they are
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    m.to(memory_format=torch.channels_last)
        if norm_fp32:
            norms_in_fp32(self.net)
        if compile:
            self.net.compile(**compile_options(compile))
        self.val_dice = PerBodyDice()
        self.val_volume = VolumeRatio(len(self.organs))  # predicted / true voxels: 0 = nothing crosses the threshold
        self.test_dice = PerBodyDice()
        self.train_loss = SampleMean()  # logged once an epoch: no per-step logging
        self.val_loss = SampleMean()
        self.panel_at: tuple[int, int] | None = None  # (validation batch, sample) of the panel slice on this rank
        self._panel: dict | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self.test_result: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, image: torch.Tensor, distance: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, C, H, W) or (B, C, 5, H, W) [and landmark maps (B, L, ...)] -> logits (B, K, H, W)."""
        if self.channels_last and image.ndim == 4:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image) if distance is None else self.net(image, distance)

    def loss(self, logits: torch.Tensor | list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The loss of logits (B, K, H, W), or of a deep-supervised network's outputs (a list while training)."""
        if isinstance(logits, (list, tuple)):
            return deep_supervision_loss(self.loss_fn, logits, mask)
        return self.loss_fn(logits, mask)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "panel_position"):
            # found from the loader's fixed order, so that validation never asks the device where the slice is
            rank, ranks = self.trainer.global_rank, self.trainer.world_size
            position = dm.panel_position()
            batch = dm.eval_batch_size
            self.panel_at = None if position is None or position % ranks != rank else (
                position // ranks // batch, position // ranks % batch)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._trainer is not None and self.trainer.training and self.augment.active:
            batch = self.augment(batch, self.augmentation_generator(batch["image"].device))
        return batch

    def augmentation_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator on ``device`` seeded for the training batch being transferred: from the run's seed
        (``seed_everything``'s, which every rank and a continued run share), the epoch, the rank and the batch's
        index in the epoch (Lightning counts the batch after its transfer). None (torch's global generator)
        without a run seed or outside a fit. Seeding is host-side only (no device synchronisation)."""
        run_seed = os.environ.get("PL_GLOBAL_SEED")
        loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        if run_seed is None or loop is None:
            return None
        batch_idx = loop.batch_progress.current.ready
        seed = np.random.SeedSequence([int(run_seed), self.current_epoch, self.global_rank, batch_idx])
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(int(seed.generate_state(1)[0]))

    # -- steps --------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"], batch.get("distance")), batch["mask"])
        self.train_loss.update(loss, len(batch["image"]))  # on the device; logged at the epoch's end
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_loss.update_called:
            self.log("train/loss", self.train_loss.compute(), prog_bar=True)  # reduced across processes
        self.train_loss.reset()

    def _evaluate_body(self, batch: dict, metric: PerBodyDice) -> None:
        """One whole body (batch of 1: image (1, Z, C, X, Y)) by Gaussian sliding windows, scored as Z slices."""
        from landmark_unet.sliding_window import stitch, window_settings

        distance = batch.get("distance")
        precision = self.trainer.precision if self._trainer is not None else "32-true"
        prob = stitch(self, batch["image"][0], None if distance is None else distance[0], precision=precision,
                      head=self.head, **window_settings(self))  # (K, Z, X, Y)
        masks = organ_masks(prob, self.head, self.threshold, dim=0).transpose(0, 1)  # (Z, K, X, Y)
        mask = batch["mask"][0] > 0.5
        self._score(metric, masks, mask, batch["subject"].expand(len(mask)))

    def _evaluate(self, batch: dict, metric: PerBodyDice) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"], batch.get("distance"))
        valid = valid_region(batch["size"], logits.shape)
        prob = probabilities(logits, self.head) * valid  # (B, K, H, W)
        self._score(metric, organ_masks(prob, self.head, self.threshold), batch["mask"] > 0.5, batch["subject"])
        return logits, prob

    def _score(self, metric: PerBodyDice, masks: torch.Tensor, target: torch.Tensor, subject: torch.Tensor) -> None:
        """Add binary masks and targets (N, K, ...) of bodies ``subject`` (N,) to ``metric``; in validation also
        to the predicted-volume ratio."""
        metric.update(masks, target, subject)
        if metric is self.val_dice:
            self.val_volume.update(masks, target)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.sliding_window:
            return self._evaluate_body(batch, self.val_dice)  # no validation loss: there are no whole-body logits
        logits, prob = self._evaluate(batch, self.val_dice)
        self.val_loss.update(self.loss(logits, batch["mask"]), len(batch["image"]))
        if self.panel_at is not None and batch_idx == self.panel_at[0]:
            i = self.panel_at[1]
            if i < len(batch["image"]):
                image = batch["image"][i, 0]
                if image.ndim == 3:  # a stack: show its middle slice
                    image = image[image.shape[0] // 2]
                self._panel = {"image": image, "prob": prob[i], "mask": batch["mask"][i],
                               "size": batch["size"][i]}

    def on_validation_epoch_end(self) -> None:
        _, dice = self.val_dice.per_body()
        self.val_dice.reset()
        if not self.sliding_window:  # whole-body validation has no loss (and every process must reduce alike)
            self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        means = dice.mean(dim=0)
        volume = self.val_volume.compute().reshape(-1)  # (K,): torchmetrics squeezes a one-organ result
        self.val_volume.reset()
        for organ, value, ratio in zip(self.organs, means, volume):
            self.log(f"val/dice/{organ}", value.float())
            self.log(f"val/volume_ratio/{organ}", ratio)
        self.log("val/dice_mean", means.mean().float(), prog_bar=True)
        self._log_panel()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.sliding_window:
            return self._evaluate_body(batch, self.test_dice)
        self._evaluate(batch, self.test_dice)

    def on_test_epoch_end(self) -> None:
        ids, dice = self.test_dice.per_body()
        self.test_dice.reset()
        self.test_result = (ids.cpu(), dice.cpu())
        for organ, value in zip(self.organs, dice.mean(dim=0)):
            self.log(f"test/dice/{organ}", value.float())

    # -- panels -------------------------------------------------------------------------------------------------
    def _log_panel(self) -> None:
        panel, self._panel = self._panel, None
        writer = getattr(self.logger, "experiment", None)
        if panel is None or not hasattr(writer, "add_image"):
            return
        x, y = (int(v) for v in panel["size"])
        image = panel["image"][:x, :y].float()
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
        rows = []
        masks = organ_masks(panel["prob"], self.head, self.threshold, dim=0)
        for k in range(len(self.organs)):
            prob = panel["prob"][k, :x, :y].float()
            cols = [image, prob, masks[k, :x, :y].float(), panel["mask"][k, :x, :y].float()]
            rows.append(torch.cat([display_slice(c) for c in cols], dim=1))
        grid = torch.cat(rows, dim=0).clamp(0, 1).cpu()
        writer.add_image("val/panel", grid[None], global_step=self.current_epoch)

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.compile_optimizer:
            compile_step(optimizer)  # before the scheduler, which wraps the step it finds
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "epoch"}}
