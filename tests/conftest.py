"""Shared fixtures: a toy folder-layout dataset for reader tests, and helpers to compose the real Hydra config."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from landmark_unet.data.nifti import save_nifti
from landmark_unet.data.organs import ORGANS
from landmark_unet.landmarks.io import write_landmarks

REPO_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_DIR / "conf")
REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def write_toy_subject(root: Path, name: str, shape=(20, 18, 16), seed: int = 0, affine=None) -> Path:
    """A small subject in the folder layout: random images, one box per organ, two landmarks."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    d = root / name
    fat = rng.uniform(0, 100, shape).astype(np.float32)
    water = rng.uniform(0, 100, shape).astype(np.float32)
    save_nifti(d / "fat.nii.gz", fat, affine)
    save_nifti(d / "water.nii.gz", water, affine)
    for i, organ in enumerate(ORGANS):
        m = np.zeros(shape, np.uint8)
        x0 = 1 + 3 * i
        m[x0:x0 + 3, 4:10, 3 + i:8 + i] = 1
        save_nifti(d / "masks" / f"{organ}.nii.gz", m, affine)
    write_landmarks(d / "landmarks.txt", np.array([[4.0, 5.0, 2.0], [15.0, 5.0, 2.0]]))
    return d


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    for i in range(6):
        write_toy_subject(root, f"s{i:02d}", seed=i)
    return root


def compose_train(overrides: list[str], tmp_path: Path):
    """The real train config with run outputs and the cache under ``tmp_path``."""
    base = [f"paths.output_dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "~callbacks.progress", "trainer.enable_progress_bar=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=base + overrides)


def save_run_config(cfg, run_dir: Path) -> None:
    """Write ``<run>/.hydra/config.yaml`` as a Hydra run would (evaluate and predict read it beside a checkpoint)."""
    from omegaconf import OmegaConf

    (Path(run_dir) / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(run_dir) / ".hydra" / "config.yaml", resolve=False)


os.environ.setdefault("LANDMARK_UNET_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "landmark_unet_test_cache"))


# label values of the toy nnU-Net datasets (kidneys split into right and left, as in real datasets)
# the tiny phantom the training tests run on (6 bodies of 48^3 voxels, generated once per test folder)
TINY_PHANTOM = ["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1"]
# one epoch of a width-4 network on it, in the main process, 3 rounds (2 test bodies each)
TINY = TINY_PHANTOM + ["model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3",
                       "trainer.max_epochs=1"]

TOY_LABELS = {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "pancreas": 4, "spleen": 5,
              "urinary_bladder": 6}
TOY_LABEL_NAMES = {"liver": ["liver"], "kidneys": ["kidney_right", "kidney_left"], "pancreas": ["pancreas"],
                   "spleen": ["spleen"], "bladder": ["urinary_bladder"]}


def toy_label_map(subject_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The folder subject's five masks as one label map of :data:`TOY_LABELS` (the kidney box split at x = 5) and
    its affine."""
    import nibabel as nib

    label = None
    for organ, names in TOY_LABEL_NAMES.items():
        img = nib.load(subject_dir / "masks" / f"{organ}.nii.gz")
        m = np.asanyarray(img.dataobj) > 0
        label = np.zeros(m.shape, np.uint8) if label is None else label
        if organ == "kidneys":
            right = m.copy()
            right[5:] = False
            label[right] = TOY_LABELS["kidney_right"]
            label[m & ~right] = TOY_LABELS["kidney_left"]
        else:
            label[m] = TOY_LABELS[names[0]]
    return label, img.affine


def write_toy_nnunet(root: Path, folder_root: Path, channels=("fat", "water")) -> Path:
    """An nnU-Net v2 dataset holding the subjects of a toy folder dataset: <case>_0000 fat, _0001 water."""
    import json
    import shutil

    for d in sorted(p for p in folder_root.iterdir() if p.is_dir()):
        for i, c in enumerate(channels):
            (root / "imagesTr").mkdir(parents=True, exist_ok=True)
            shutil.copy(d / f"{c}.nii.gz", root / "imagesTr" / f"{d.name}_{i:04d}.nii.gz")
        label, affine = toy_label_map(d)
        save_nifti(root / "labelsTr" / f"{d.name}.nii.gz", label, affine)
    meta = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": TOY_LABELS,
            "numTraining": 6, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# -- the command line on bad input (tests/test_cli_errors.py, tests/test_bad_input.py) ------------------------------
TRAIN_OUTPUTS = ("run/metrics.json", "run/checkpoints", "run/splits.json")


def run_cli(module: str, args: Sequence[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``tmp_path``, importing ``landmark_unet`` from this checkout, with the cache
    under ``tmp_path / "cache"`` and without the debug switches that turn a bad-input line into a stack trace."""
    env = {**os.environ, "LANDMARK_UNET_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_DIR), os.environ.get("PYTHONPATH", "")) if p)}
    for key in ("LANDMARK_UNET_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout)


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str, tmp_path: Path,
                         forbidden: Sequence[str] = TRAIN_OUTPUTS) -> None:
    """Bad input stopped the command cleanly: exit code 2, one stderr line ``error: ...`` holding every needle,
    no stack trace, nothing matching the ``forbidden`` glob patterns (relative to ``tmp_path``), no temporary or
    hidden file left anywhere below ``tmp_path`` (``.hydra`` folders aside) and no incomplete cache entry."""
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in proc.stderr + proc.stdout
    for pattern in forbidden:
        assert not list(tmp_path.glob(pattern)), f"{pattern} was written: {list(tmp_path.glob(pattern))}"
    leftovers = [p for p in tmp_path.rglob("*") if (p.name.startswith(".") and p.name != ".hydra")
                 or p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    cache = tmp_path / "cache" / "subjects"
    if cache.exists():
        assert all((p / "meta.json").exists() for p in cache.iterdir()), list(cache.iterdir())
