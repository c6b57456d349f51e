"""Score a checkpoint on a split, or a folder of predictions against references.

``python -m landmark_unet.evaluate ckpt=RUN/checkpoints/best.ckpt [split_file=...]``: the model and data settings
come from the checkpoint's run (``RUN/.hydra/config.yaml``); the bodies scored are the test split of that run
(``RUN/splits.json``) unless ``split_file`` names another. Writes metrics.json (per-body Dice, as training does)
and, from whole-volume inference of the same bodies on the cached grid, summary.json and scores.csv with Dice,
HD95, normalised surface Dice and volume differences (:mod:`landmark_unet.scoring`).

``python -m landmark_unet.evaluate predictions=DIR references=DIR [data=LAYOUT]``: predictions named
``<case>_<organ>.nii.gz`` (as predict writes them) against the reference masks of a dataset root in any layout
(``data=folder`` default, ``data=nnunet`` / ``totalseg`` or a ready config such as ``data=amos22_mri``), on the
files' own grids. Writes summary.json and scores.csv. Bodies without a prediction are listed in the summary.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from landmark_unet import host_memory
from landmark_unet.config import load_run_config, quiet_third_party
from landmark_unet.errors import InputError, exit_on_input_error, run_hydra_main


def evaluate(cfg: DictConfig) -> dict:
    """Score a checkpoint (``ckpt=``) or a folder of predictions (``predictions=`` and ``references=``); returns
    metrics.json's contents for a checkpoint, summary.json's for a folder."""
    host_memory.apply_config(cfg)
    # torch, Lightning and MONAI are imported below only once the command line is known to be good: importing them
    # takes 4-5 s, which a mistyped path should not wait for (tests/test_cli_errors.py)
    if cfg.get("predictions") or cfg.get("references"):
        for key in ("predictions", "references"):
            if not cfg.get(key):
                raise InputError(key, "required with predictions= / references=: both folders")
        if not Path(cfg.predictions).is_dir():
            raise InputError(cfg.predictions, "predictions folder is missing")
        from landmark_unet.evaluation import evaluate_folder

        return evaluate_folder(cfg)
    if not cfg.get("ckpt"):
        raise InputError("ckpt", "required: ckpt=PATH to a checkpoint written by landmark_unet.train, "
                                 "or predictions=DIR references=DIR")
    load_run_config(cfg.ckpt)  # the checkpoint and its run config exist
    from landmark_unet.evaluation import evaluate_checkpoint

    return evaluate_checkpoint(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    with exit_on_input_error():
        evaluate(cfg)


if __name__ == "__main__":
    run_hydra_main(main)
