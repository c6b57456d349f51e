"""Predict organ masks for new images: ``python -m landmark_unet.predict ckpt=PATH input=IMAGE_OR_DIR output=DIR``.

``ckpt`` may also name several checkpoints (a list, or a glob such as the 5 rounds' best checkpoints): their
probabilities are averaged (an ensemble; their runs must share the preprocessing).

The model, its channels, normalisation, spacing and landmark maps come from the checkpoint's run
(``RUN/.hydra/config.yaml``), so an image goes through exactly the preprocessing the model was trained with. Each
case is read in its own orientation, brought to canonical RAS+ (and to the run's ``data.spacing`` if it set one),
predicted slice by slice (or stack by stack) in batches, and the probabilities brought back to the input's grid:
same shape, same affine, same orientation, voxel for voxel. A fused model gets its landmarks from the case's
landmarks.txt (or ``landmarks_file=FILE``), else TotalSegmentator femur masks, else the hip detector.

Writes ``<case>_<organ>.nii.gz`` (uint8 0/1) per organ, or with ``labelmap=true`` one ``<case>.nii.gz`` (1 liver,
2 kidneys, 3 pancreas, 4 spleen, 5 bladder; where organs overlap, the most probable wins), and with
``probabilities=true`` ``<case>_<organ>_prob.nii.gz`` (float32). A case's files are all encoded before the first is
written, and each is written under a temporary name and renamed into place: an interrupted run leaves complete
files of the cases it finished (and at most the renaming of one case's files half done), never a truncated file.
Bad input stops with one line naming the file (exit code 2): every case's headers and landmarks files are checked
before the first file is written, so such a stop leaves no prediction; a defect only the voxels show (a truncated
stream, NaN) stops at that case, with the complete files of the cases before it left in place.
"""

from __future__ import annotations

import glob
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from landmark_unet import host_memory
from landmark_unet.config import load_run_config, quiet_third_party
from landmark_unet.data.layouts import Case, input_cases
from landmark_unet.errors import InputError, exit_on_input_error, run_hydra_main


def checkpoints(value) -> list[Path]:
    """``ckpt=``: one checkpoint, a list of them, or glob patterns (``'multirun/x/*/checkpoints/best-*.ckpt'``),
    expanded and sorted.

    Raises:
        InputError: a pattern that matches no file.
    """
    found = []
    for item in (list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]):
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError("ckpt", f"no checkpoint matches {item!r}")
            found += [Path(m) for m in matches]
        else:
            found.append(Path(item))
    return found


def predict(cfg: DictConfig) -> list[Path]:
    """Predict every case of ``cfg.input`` into ``cfg.output``; returns the files written."""
    host_memory.apply_config(cfg)
    for key in ("ckpt", "input", "output"):
        if not cfg.get(key):
            raise InputError(key, f"required: {key}=PATH")
    ckpts = checkpoints(cfg.ckpt)
    runs = [load_run_config(ckpt)[0] for ckpt in ckpts]  # every checkpoint and the run config beside it exist
    run = OmegaConf.to_container(runs[0].data, resolve=True)  # the data settings the cases are read with
    channel_names = list(cfg.get("channel_names") or run.get("channel_names") or run["channels"])
    cases = input_cases(cfg.input, channel_names, run.get("image_file", "ct.nii.gz"))
    if cfg.get("landmarks_file"):
        if len(cases) != 1:
            raise InputError("landmarks_file", f"one landmarks file for {len(cases)} cases: give it with a single image")
        cases = [Case(cases[0].name, cases[0].images, landmarks=Path(cfg.landmarks_file))]
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output exists and is not a folder")
    # torch and the networks only once the command line is known to be good: importing them takes 2-3 s, which
    # a mistyped path should not wait for (tests/test_cli_errors.py)
    from landmark_unet.predictor import Predictor, write_case

    predictor = Predictor.from_checkpoint(ckpts, cfg.accelerator, cfg.precision, cfg.get("threshold"),
                                          batch_size=int(cfg.batch_size), tta=bool(cfg.tta), compile=bool(cfg.compile))
    for case in cases:  # every case's headers and landmarks before the first file is written
        predictor.check(case)
    written = []
    for case in cases:
        with tqdm(desc=case.name, unit="slice", disable=not cfg.progress, leave=False) as bar:
            files, volumes = write_case(predictor, case, out, bool(cfg.labelmap), bool(cfg.probabilities), bar.update)
        written += files
        print(f"{case.name}: " + ", ".join(f"{organ} {ml:.1f} ml" for organ, ml in volumes.items()), flush=True)
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    with exit_on_input_error():
        predict(cfg)


if __name__ == "__main__":
    run_hydra_main(main)
