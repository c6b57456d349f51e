"""Train and evaluate a segmentation model: ``python -m landmark_unet.train [overrides]``.

Builds data, model, callbacks, logger and trainer from the Hydra config, fits, tests the best checkpoint on the
held-out bodies and writes ``metrics.json`` into the run directory (with ``checkpoints/``, ``tb/`` and
``splits.json`` beside it). Returns the best validation Dice (a sweeper's objective: never the test bodies).

Interrupted runs continue with ``ckpt_path=last`` or ``resume=auto``; a re-launched sweep skips finished runs with
``skip_done=true`` (:mod:`landmark_unet.resume`). Inside a multirun a failing job is recorded in its folder and the
sweep goes on (:func:`landmark_unet.launch.job_guard`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from landmark_unet import host_memory
from landmark_unet.config import instantiate_setting, quiet_third_party, resolve_precision, validate
from landmark_unet.errors import run_hydra_main
from landmark_unet.launch import check_ddp_launch, in_multirun, job_guard, pin_local_job_gpu, set_cpu_threads
from landmark_unet.resume import is_done, resolve_start

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Run one experiment from a composed config and return its metrics (also written to metrics.json by rank 0)."""
    t0 = time.perf_counter()
    validate(cfg)
    # Lightning and torch only once the config is known to be good: importing them takes 4-6 s, which a typo in
    # an override should not wait for (tests/test_cli_errors.py)
    import pytorch_lightning as pl

    from landmark_unet.checkpoint import check_checkpoint, read_checkpoint, signature
    from landmark_unet.lit.callbacks import (
        EpochSeed,
        EpochTimer,
        MetricHistory,
        SignatureCallback,
    )
    from landmark_unet.lit.optimizer import check_optimisation
    from landmark_unet.lit.preemption import PreemptionCheckpoint
    from landmark_unet.postprocess import choose_on_validation
    from landmark_unet.runinfo import (
        checkpoint_callback,
        nothing_predicted,
        run_overrides,
        summary_lines,
        write_metrics,
    )

    host_memory.apply_config(cfg)  # before the loader workers fork: they inherit it
    check_ddp_launch(cfg)
    pin_local_job_gpu(cfg)
    cpu_threads = set_cpu_threads(cfg)
    out = Path(cfg.paths.output_dir)
    if cfg.get("skip_done") and is_done(out):
        log.info("skip_done: %s is finished, not training it again", out)
        return json.loads((out / "metrics.json").read_text())
    start = resolve_start(out, cfg.get("ckpt_path"), cfg.get("resume"), run_overrides(), look_beside=not in_multirun())
    if start.run_dir != out:  # continue the unfinished run in its own folder
        cfg.paths.output_dir = str(start.run_dir)
        out = start.run_dir
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    model = instantiate_setting(cfg.model)
    check_optimisation(model)
    run_signature = signature(cfg)
    if start.checkpoint is not None:  # refuse a bad or another model's checkpoint before anything is written
        check_checkpoint(start.checkpoint, read_checkpoint(start.checkpoint), run_signature, model)
    datamodule = instantiate_setting(cfg.data)
    timer, history = EpochTimer(), MetricHistory()
    callbacks = [instantiate_setting(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    callbacks += [timer, history, EpochSeed(cfg.seed), SignatureCallback(run_signature), PreemptionCheckpoint()]
    logger = instantiate_setting(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate_setting(
        cfg.trainer, callbacks=callbacks, logger=logger, precision=resolve_precision(cfg.trainer.precision)
    )
    datamodule.setup("fit")  # every setting accepted: read and validate the data before the run writes anything
    trainer.fit(model, datamodule=datamodule, ckpt_path=start.checkpoint, weights_only=True)
    curves = history.history  # testing the best checkpoint below restores that epoch's callback states
    warnings = nothing_predicted(curves)
    for warning in warnings if trainer.is_global_zero else []:
        log.warning(warning)

    ckpt = checkpoint_callback(trainer)
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
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
            "cpu_threads": cpu_threads,
            "history": curves,
            "warnings": warnings,
            "postprocess": postprocess,
            "resumed_from": None if start.checkpoint is None else str(start.checkpoint),
            "data_fingerprint": datamodule.data_fingerprint(),
        },
    )
    if trainer.is_global_zero:
        for line in summary_lines(metrics):
            print(line, flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    quiet_third_party()
    with job_guard(cfg.paths.output_dir):
        metrics = train(cfg)
        best = metrics["best_val_dice_mean"]
        return float("nan") if best is None else float(best)


if __name__ == "__main__":
    run_hydra_main(main)

