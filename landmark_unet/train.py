"""Train and evaluate a segmentation model: ``python -m landmark_unet.train [overrides]``.

Builds data, model, callbacks, logger and trainer from the Hydra config, fits, tests the best checkpoint on the
held-out bodies and writes ``metrics.json`` into the run directory (with ``checkpoints/``, ``tb/`` and
``splits.json`` beside it). Returns the best validation Dice (a sweeper's objective: never the test bodies).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from landmark_unet.config import quiet_third_party, resolve_precision, validate
from landmark_unet.errors import exit_on_input_error
from landmark_unet.launch import check_ddp_launch, pin_local_job_gpu
from landmark_unet.lit.callbacks import EpochTimer, MetricHistory
from landmark_unet.postprocess import choose_on_validation
from landmark_unet.runinfo import checkpoint_callback, run_overrides, summary_lines, write_metrics

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Run one experiment from a composed config and return its metrics (also written to metrics.json by rank 0)."""
    t0 = time.perf_counter()
    validate(cfg)
    check_ddp_launch(cfg)
    pin_local_job_gpu(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # read and validate the data before anything is written to the run
    model = instantiate(cfg.model)
    timer, history = EpochTimer(), MetricHistory()
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None] + [timer, history]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, precision=resolve_precision(cfg.trainer.precision)
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    ckpt = checkpoint_callback(trainer)
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    postprocess = None
    if cfg.get("postprocess") and trainer.is_global_zero:  # the model now holds the tested (best) weights
        postprocess = choose_on_validation(model, datamodule, trainer.strategy.root_device, str(trainer.precision))
    metrics = write_metrics(
        out / "metrics.json" if trainer.is_global_zero else None,
        model=model,
        datamodule=datamodule,
        extra={
            "seconds_per_epoch": timer.seconds_per_epoch,
            "data_wait_fraction": timer.data_wait_fraction,
            "epochs": trainer.current_epoch,
            "checkpoint": best,
            "best_val_dice_mean": float(ckpt.best_model_score) if best and ckpt.best_model_score is not None else None,
            "wall_seconds": time.perf_counter() - t0,
            "overrides": run_overrides(),
            "precision": str(trainer.precision),
            "history": history.history,
            "postprocess": postprocess,
        },
    )
    if trainer.is_global_zero:
        for line in summary_lines(metrics):
            print(line, flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    with exit_on_input_error():
        metrics = train(cfg)
        best = metrics["best_val_dice_mean"]
        return float("nan") if best is None else float(best)


if __name__ == "__main__":
    main()

