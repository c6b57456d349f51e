"""The model (or ensemble) behind ``python -m landmark_unet.predict``, with its run's preprocessing: one case's
images in, probabilities and masks on the input's own grid out, its files encoded and written whole
(:mod:`landmark_unet.predict` describes the command and its files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from landmark_unet.checkpoint import load_weights, signature
from landmark_unet.config import instantiate_setting, load_run_config, resolve_precision
from landmark_unet.data import geometry
from landmark_unet.data.cache import CT_WINDOW, normalise_image, resolve_normalisation
from landmark_unet.data.layouts import Case
from landmark_unet.data.nifti import atomic_write_bytes, nifti_bytes
from landmark_unet.data.organs import ORGANS
from landmark_unet.data.sources import CaseImages, case_landmarks, check_case_headers
from landmark_unet.errors import InputError
from landmark_unet.heads import organ_masks
from landmark_unet.inference import inference_network, predict_volume
from landmark_unet.landmarks.distance import MAP_KEYS, subject_maps
from landmark_unet.landmarks.io import read_landmarks
from landmark_unet.postprocess import largest_components
from landmark_unet.runinfo import run_postprocess

PREPROCESSING = ("channels", "organs", "normalisation", "ct_window", "modality", "spacing", "stack", "fusion",
                 "pad_multiple", "landmarks", "channel_names", "image_file")  # run data settings a model depends on


@dataclass
class Predictor:
    """One trained model, or an ensemble of models with the same preprocessing, with the preprocessing of its run.

    Attributes:
        models: the LightningModules as ``inference.inference_network`` prepares them (eval mode on ``device``,
            BatchNorm folded on the CPU); an ensemble averages their probabilities.
        organs: organ of each output channel.
        channels: image channels the model reads.
        run: the (first) run's data settings (``normalisation``, ``modality``, ``spacing``, ``stack``, ``fusion``...).
    """

    models: list[torch.nn.Module]
    organs: list[str]
    channels: list[str]
    run: dict
    device: torch.device
    precision: str
    threshold: float
    head: str
    batch_size: int = 16
    tta: bool = False
    postprocess: dict | None = None  # the run's choice per organ (metrics.json), see landmark_unet.postprocess

    @classmethod
    def from_checkpoint(cls, ckpt: Path | list[Path], accelerator: str = "auto", precision: str = "auto",
                        threshold: float | None = None, batch_size: int = 16, tta: bool = False,
                        compile: bool = False) -> Predictor:
        """The model of a checkpoint, or the ensemble of a list of checkpoints (the 5 rounds' models, say), each
        built from the run config beside it. The threshold and post-processing are the first run's.

        Raises:
            InputError: a checkpoint that cannot be read or does not fit its run, or runs whose preprocessing
                (:data:`PREPROCESSING`) differs from the first's.
        """
        ckpts = [Path(c) for c in (ckpt if isinstance(ckpt, (list, tuple)) else [ckpt])]
        cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
        device = torch.device("cuda" if cuda else "cpu")
        models, first = [], None
        for path in ckpts:
            run_cfg, run_dir = load_run_config(path)
            model = instantiate_setting(run_cfg.model)
            load_weights(model, path, signature(run_cfg))
            models.append(inference_network(model, device, compile))
            data = OmegaConf.to_container(run_cfg.data, resolve=True)
            if first is None:
                first = (run_cfg, run_dir, data)
                continue
            differs = [k for k in PREPROCESSING if data.get(k) != first[2].get(k)]
            if differs:
                raise InputError(path, f"cannot join an ensemble with {ckpts[0]}: its run's data.{differs[0]} is "
                                       f"{data.get(differs[0])!r}, not {first[2].get(differs[0])!r}")
        run_cfg, run_dir, data = first
        precision = "32-true" if device.type == "cpu" and precision == "auto" else str(resolve_precision(precision))
        return cls(models=models, organs=list(data["organs"]), channels=list(data["channels"]), run=data,
                   device=device, precision=precision,
                   threshold=float(threshold if threshold is not None else run_cfg.model.get("threshold", 0.5)),
                   head=str(run_cfg.model.get("head", "sigmoid")),
                   batch_size=batch_size, tta=tta, postprocess=run_postprocess(run_dir))

    @property
    def fused(self) -> bool:
        return self.run.get("fusion", "none") != "none"

    def check(self, case: Case) -> None:
        """Check a case's inputs without reading its voxels: the image channels (:func:`check_case_headers`) and,
        for a fused model, its landmarks file when it has one (well-formed, inside the volume, enough landmarks
        for the run's pairs). ``predict`` checks every case this way before it writes the first file; what only
        the voxels show (a truncated stream, NaN) is found when the case is predicted."""
        shape, _ = check_case_headers(case, self.channels)
        if self.fused and case.landmarks is not None and case.landmarks.exists():
            points = read_landmarks(case.landmarks, shape=shape)
            pairs = int(self.run.get("landmarks", {}).get("pairs", 1))
            if len(points) < 2 * pairs:
                raise InputError(case.landmarks, f"expected {pairs} landmark pair(s) (the run's landmarks.pairs), "
                                                 f"found {len(points)} landmark(s)")

    def probabilities(self, case: Case, progress=None) -> tuple[np.ndarray, CaseImages]:
        """Probabilities (K, *file shape) of one case on the grid of its first image file, and its images."""
        run = self.run
        images = CaseImages(case, self.channels)
        modality = run.get("modality", "mri")
        points = case_landmarks(case, images, "auto", modality) if self.fused else None
        image, spacing = images.image, geometry.spacing_of(images.affine)
        canonical_shape = image.shape[1:]
        target = run.get("spacing")
        if target:
            shape = geometry.target_shape(canonical_shape, spacing, target)
            image = geometry.resample_to(image, spacing, target, shape)
            points = None if points is None else geometry.resample_points(points, spacing, target)
            spacing = np.asarray(target, dtype=np.float64)
        method = resolve_normalisation(run.get("normalisation", "percentile"), modality)
        normalised, _ = normalise_image(image, method, run.get("ct_window", CT_WINDOW))
        distance = None
        if self.fused:
            settings = {k: run["landmarks"][k] for k in MAP_KEYS if k in run.get("landmarks", {})}
            try:
                distance = subject_maps(points, normalised.shape[1:], spacing, **settings)
            except ValueError as err:  # too few landmarks for the run's pairs
                raise InputError(case.landmarks or case.name, str(err)) from None
        volume = normalised.transpose(3, 0, 1, 2)
        prob = sum(predict_volume(model, volume, distance, stack=int(run.get("stack", 1)),
                                  pad_multiple=int(run.get("pad_multiple", 16)), device=self.device,
                                  precision=self.precision, progress=progress, batch_size=self.batch_size,
                                  tta=self.tta) for model in self.models) / len(self.models)
        if target:
            prob = np.clip(geometry.resample_to(prob, target, geometry.spacing_of(images.affine), canonical_shape), 0, 1)
        prob = geometry.from_canonical(prob, images.source_affine)
        assert prob.shape[1:] == images.source_shape
        return prob, images


    def masks(self, prob: np.ndarray) -> np.ndarray:
        """Binary masks (K, ...) of probabilities (K, ...), with the run's post-processing."""
        masks = organ_masks(prob, self.head, self.threshold, dim=0)
        for k, organ in enumerate(self.organs):
            if (self.postprocess or {}).get(organ, {}).get("largest_component"):
                masks[k] = largest_components(masks[k], organ)
        return masks


def outputs_of(case: str, prob: np.ndarray, masks: np.ndarray, organs: list[str], labelmap: bool,
               probabilities: bool) -> dict[str, np.ndarray]:
    """File name -> array of one case's predictions (the files :mod:`landmark_unet.predict` describes)."""
    files: dict[str, np.ndarray] = {}
    if labelmap:
        label = np.zeros(prob.shape[1:], np.uint8)
        best = np.argmax(np.where(masks, prob, -1.0), axis=0)
        for k, organ in enumerate(organs):
            label[(best == k) & masks[k]] = ORGANS.index(organ) + 1
        files[f"{case}.nii.gz"] = label
    else:
        files.update({f"{case}_{organ}.nii.gz": masks[k].astype(np.uint8) for k, organ in enumerate(organs)})
    if probabilities:
        files.update({f"{case}_{organ}_prob.nii.gz": prob[k].astype(np.float32) for k, organ in enumerate(organs)})
    return files


def write_case(predictor: Predictor, case: Case, out: Path, labelmap: bool, probabilities: bool,
               progress=None) -> tuple[list[Path], dict[str, float]]:
    """Predict one case into ``out``: every file of the case encoded first, then each written under a temporary
    name and renamed (a kill leaves whole cases). Returns the files written and each organ's predicted volume (ml)."""
    prob, images = predictor.probabilities(case, progress=progress)
    masks = predictor.masks(prob)
    files = {name: nifti_bytes(array, images.source_affine) for name, array in
             outputs_of(case.name, prob, masks, predictor.organs, labelmap, probabilities).items()}
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    voxel_ml = float(abs(np.linalg.det(images.source_affine[:3, :3]))) / 1000.0
    volumes = {organ: float(masks[k].sum()) * voxel_ml for k, organ in enumerate(predictor.organs)}
    return [out / name for name in files], volumes
