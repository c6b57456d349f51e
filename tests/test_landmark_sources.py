"""landmarks.source=file|detect|auto and landmarks.on_missing in the data pipeline."""

import logging

import numpy as np
import pytest
from conftest import compose_train
from hydra.utils import instantiate

from landmark_unet.data.nifti import save_nifti
from landmark_unet.data.phantom import PhantomConfig, generate_dataset
from landmark_unet.errors import InputError, MissingLandmarksError
from landmark_unet.landmarks.io import read_landmarks


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm") / "data"
    generate_dataset(root, n_subjects=5, seed=3, cfg=PhantomConfig(shape=(96, 96, 80)), progress=False)
    return root


def datamodule(tmp_path, root, *overrides):
    cfg = compose_train(["data=folder", f"data.root={root}", "fusion=early", "data.num_workers=0",
                         "data.split.rounds=5", *overrides], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


def test_auto_detects_where_the_file_is_missing(tmp_path, phantom_root, caplog):
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(phantom_root, root)
    truth = read_landmarks(root / "sub002" / "landmarks.txt")
    (root / "sub002" / "landmarks.txt").unlink()
    with caplog.at_level(logging.INFO):
        dm = datamodule(tmp_path, root, "landmarks.source=auto")
    assert any("sub002: hip joints detected" in r.getMessage() for r in caplog.records)
    assert sum("hip joints detected" in r.getMessage() for r in caplog.records) == 1  # the others read the file
    found = dm.entries["sub002"].landmarks  # canonical voxels; the phantom is written in RAS, so the same grid
    spacing = np.asarray(dm.entries["sub002"].meta["spacing"])
    assert np.linalg.norm((found - truth) * spacing, axis=1).max() < 3.0
    with pytest.raises(MissingLandmarksError, match="landmarks.txt"):
        datamodule(tmp_path / "f", root, "landmarks.source=file")


def test_detect_source_matches_the_files(tmp_path, phantom_root):
    dm = datamodule(tmp_path, phantom_root, "landmarks.source=detect")
    for name, entry in dm.entries.items():
        truth = read_landmarks(phantom_root / name / "landmarks.txt")
        err = np.linalg.norm((entry.landmarks - truth) * np.asarray(entry.meta["spacing"]), axis=1)
        assert err.max() < 3.0, (name, err)


def test_on_missing_skip_reports_and_drops_the_subject(tmp_path, phantom_root):
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(phantom_root, root)
    (root / "sub004" / "landmarks.txt").unlink()
    rng = np.random.default_rng(0)
    save_nifti(root / "sub004" / "fat.nii.gz", rng.uniform(0, 10, (96, 96, 80)).astype(np.int16),
               PhantomConfig(shape=(96, 96, 80)).affine)
    with pytest.raises(InputError, match="sub004.*no plausible pair"):
        datamodule(tmp_path / "a", root, "landmarks.source=auto")
    dm = datamodule(tmp_path / "b", root, "landmarks.source=auto", "landmarks.on_missing=skip")
    assert "sub004" in dm.skipped and "sub004" not in dm.subject_names
    assert all("sub004" not in dm.split[p] for p in ("train", "val", "test"))
    import json

    saved = json.loads((tmp_path / "b" / "run" / "splits.json").read_text())
    assert "sub004" in saved["skipped"]
