"""The work behind ``python -m landmark_unet.evaluate`` (:mod:`landmark_unet.evaluate` describes the command and its
files): a checkpoint re-scored on a split of its run, or a folder of prediction files scored against references."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from landmark_unet.checkpoint import load_weights, signature
from landmark_unet.config import instantiate_setting, load_run_config, resolve_precision, saved_overrides
from landmark_unet.data import geometry
from landmark_unet.data.layouts import LabelPart, labelled_organs, list_cases
from landmark_unet.data.organs import organ_bit
from landmark_unet.data.sources import label_part_mask, load_nifti, reference_mask
from landmark_unet.errors import InputError
from landmark_unet.heads import organ_masks
from landmark_unet.inference import predict_cached
from landmark_unet.postprocess import largest_components
from landmark_unet.runinfo import (
    run_overrides,
    run_postprocess,
    summary_lines,
    write_metrics,
)
from landmark_unet.scoring import score_masks, summary_table, write_summary


def score_split(model: torch.nn.Module, datamodule, part: str, tolerance_mm: float, device: torch.device,
                precision: str, progress: bool = True, postprocess: dict | None = None,
                compile: bool = False) -> list[dict]:
    """Whole-volume inference of every body of ``part`` on its cached (canonical, possibly resampled) grid, scored
    against the cached reference masks; with the run's ``postprocess`` choices applied; ``compile``: the network
    compiled for inference (:func:`landmark_unet.inference.inference_network`)."""
    rows = []
    for name, prob, labels, spacing in predict_cached(model, datamodule, part, device, precision, progress,
                                                      compile):
        masks = organ_masks(prob, model.head, model.threshold, dim=0)
        for k, organ in enumerate(datamodule.organs):
            pred = masks[k]
            if (postprocess or {}).get(organ, {}).get("largest_component"):
                pred = largest_components(pred, organ)
            rows.append({"case": name, "organ": organ,
                         **score_masks(pred, (labels & organ_bit(organ)) > 0, spacing, tolerance_mm)})
    return rows


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Re-score ``cfg.ckpt`` on its run's test split (or ``cfg.split_file``): metrics.json, summary.json, scores.csv."""
    t0 = time.perf_counter()
    ckpt = Path(cfg.ckpt)
    run_cfg, run_dir = load_run_config(ckpt)
    split_file = Path(cfg.split_file) if cfg.get("split_file") else run_dir / "splits.json"
    run_cfg.data.split.file = str(split_file)
    run_cfg.data.splits_out = None
    model = instantiate_setting(run_cfg.model)
    load_weights(model, ckpt, signature(run_cfg))  # before the data: a bad checkpoint stops at once
    datamodule = instantiate_setting(run_cfg.data)
    datamodule.setup("test")
    precision = resolve_precision(cfg.precision)
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=bool(cfg.progress))
    trainer.test(model, datamodule=datamodule, verbose=False)
    out = Path(cfg.output_dir)
    metrics = write_metrics(out / "metrics.json", model=model, datamodule=datamodule, extra={
        "checkpoint": str(ckpt), "split_file": str(split_file), "wall_seconds": time.perf_counter() - t0,
        "overrides": run_overrides(), "train_overrides": saved_overrides(run_dir),
    })
    postprocess = run_postprocess(run_dir)
    rows = score_split(model, datamodule, "test", float(cfg.tolerance_mm), trainer.strategy.root_device,
                       str(precision), bool(cfg.progress), postprocess, bool(cfg.compile))
    summary = write_summary(out, rows, {"checkpoint": str(ckpt), "split_file": str(split_file),
                                        "tolerance_mm": float(cfg.tolerance_mm), "grid": "cache",
                                        "postprocess": postprocess})
    for line in summary_lines(metrics) + summary_table(summary):
        print(line, flush=True)
    return metrics


def evaluate_folder(cfg: DictConfig) -> dict:
    """Score the files of ``cfg.predictions`` against the references of ``cfg.references``: summary.json, scores.csv."""
    predictions, references = Path(cfg.predictions), Path(cfg.references)
    data = cfg.data
    labels = OmegaConf.to_container(data.labels) if data.get("labels") else None
    layout, organs = labelled_organs(data.source, labels)
    cases = list_cases(layout, references, organs, labels=labels, channel_names=data.get("channel_names"),
                       image_file=data.get("image_file", "ct.nii.gz"), include=data.get("cases"))
    rows, missing = [], []
    for case in tqdm(cases, desc="scoring", unit="body", disable=not cfg.progress, leave=False):
        found = False
        for organ in organs:
            path = predictions / f"{case.name}_{organ}.nii.gz"
            if not path.exists():
                continue
            found = True
            ref, affine, ref_path = reference_mask(case, organ)
            img = load_nifti(path)
            if not geometry.same_grid(img.shape, img.affine, ref.shape, affine):
                raise InputError(path, f"is not on the grid of its reference {ref_path} "
                                       f"(shape {img.shape} vs {ref.shape}, or another affine)")
            pred = label_part_mask(np.asanyarray(img.dataobj), LabelPart(path))  # checked binary
            rows.append({"case": case.name, "organ": organ,
                         **score_masks(pred, ref, geometry.spacing_of(affine), float(cfg.tolerance_mm))})
        if not found:
            missing.append(case.name)
    if not rows:
        raise InputError(predictions, f"holds no prediction <case>_<organ>.nii.gz for the cases of {references}")
    summary = write_summary(Path(cfg.output_dir), rows, {
        "predictions": str(predictions), "references": str(references), "layout": layout,
        "tolerance_mm": float(cfg.tolerance_mm), "missing": missing, "grid": "files"})
    for line in summary_table(summary):
        print(line, flush=True)
    if missing:
        print(f"no prediction for {len(missing)} of {len(cases)} bodies: {', '.join(missing[:5])}"
              f"{' ...' if len(missing) > 5 else ''}", flush=True)
    return summary
