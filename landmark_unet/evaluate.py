"""Re-score a checkpoint: ``python -m landmark_unet.evaluate ckpt=RUN/checkpoints/best.ckpt [split_file=...]``.

The model and data settings come from the checkpoint's run (``RUN/.hydra/config.yaml``); the bodies scored are the
test split of that run (``RUN/splits.json``) unless ``split_file`` names another. Writes metrics.json in the same
format as training into this command's run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from landmark_unet.checkpoint import load_run_config, load_weights
from landmark_unet.config import quiet_third_party, resolve_precision
from landmark_unet.errors import InputError, exit_on_input_error
from landmark_unet.runinfo import run_overrides, saved_overrides, summary_lines, write_metrics


def evaluate(cfg: DictConfig) -> dict:
    t0 = time.perf_counter()
    if not cfg.get("ckpt"):
        raise InputError("ckpt", "required: ckpt=PATH to a checkpoint written by landmark_unet.train")
    ckpt = Path(cfg.ckpt)
    run_cfg, run_dir = load_run_config(ckpt)
    split_file = Path(cfg.split_file) if cfg.get("split_file") else run_dir / "splits.json"
    run_cfg.data.split.file = str(split_file)
    run_cfg.data.splits_out = None
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("test")
    model = instantiate(run_cfg.model)
    load_weights(model, ckpt)
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, precision=resolve_precision(cfg.precision),
                         logger=False, enable_checkpointing=False, enable_progress_bar=True)
    trainer.test(model, datamodule=datamodule, verbose=False)
    out = Path(cfg.output_dir)
    metrics = write_metrics(out / "metrics.json", model=model, datamodule=datamodule, extra={
        "checkpoint": str(ckpt), "split_file": str(split_file), "wall_seconds": time.perf_counter() - t0,
        "overrides": run_overrides(), "train_overrides": saved_overrides(run_dir),
    })
    for line in summary_lines(metrics):
        print(line, flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    with exit_on_input_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()
