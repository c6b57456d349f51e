"""Bad input through the real command line: exit code 2, one line naming the file or key, nothing half-written."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_toy_subject

from landmark_unet.data.nifti import save_nifti


def run_train(tmp_path, *overrides):
    env = {**os.environ, "LANDMARK_UNET_CACHE": str(tmp_path / "cache")}
    env.pop("LANDMARK_UNET_DEBUG", None)
    cmd = [sys.executable, "-m", "landmark_unet.train", f"hydra.run.dir={tmp_path / 'run'}",
           "trainer.max_epochs=1", "model.net.features=4", "data.num_workers=0", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def assert_clean_failure(proc, *needles, tmp_path):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    run = tmp_path / "run"
    if run.exists():
        assert not (run / "metrics.json").exists()
        assert not (run / "checkpoints").exists()
    cache = tmp_path / "cache" / "subjects"
    if cache.exists():
        assert all((p / "meta.json").exists() for p in cache.iterdir()), list(cache.iterdir())


def make_dataset(root, n=6):
    for i in range(n):
        write_toy_subject(root, f"s{i:02d}", shape=(32, 32, 16), seed=i)


BREAKS = {
    "nan": lambda d: save_nifti(d / "fat.nii.gz", np.full((32, 32, 16), np.nan, np.float32), np.diag([2, 2, 3, 1.0])),
    "non-binary": lambda d: save_nifti(d / "masks" / "kidneys.nii.gz", np.full((32, 32, 16), 3, np.uint8),
                                       np.diag([2, 2, 3, 1.0])),
    "landmarks": lambda d: (d / "landmarks.txt").write_text("1 2\n"),
    "outside": lambda d: (d / "landmarks.txt").write_text("1 2 3\n1 2 99\n"),
    "missing water": lambda d: (d / "water.nii.gz").unlink(),
    "shape": lambda d: save_nifti(d / "water.nii.gz", np.zeros((32, 30, 16), np.float32), np.diag([2, 2, 3, 1.0])),
}
NEEDLES = {"nan": ("fat.nii.gz", "NaN"), "non-binary": ("kidneys.nii.gz", "not binary"),
           "landmarks": ("landmarks.txt", "expected 3 numbers"), "outside": ("landmarks.txt", "outside"),
           "missing water": ("water.nii.gz", "missing"), "shape": ("water.nii.gz", "shape")}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_bad_subject(tmp_path, kind):
    root = tmp_path / "data"
    make_dataset(root)
    BREAKS[kind](root / "s03")
    proc = run_train(tmp_path, "data=folder", f"data.root={root}")
    assert_clean_failure(proc, "s03", *NEEDLES[kind], tmp_path=tmp_path)


def test_unknown_organ(tmp_path):
    proc = run_train(tmp_path, "organ=heart")
    assert_clean_failure(proc, "organ", "heart", tmp_path=tmp_path)


def test_missing_and_empty_data_folder(tmp_path):
    proc = run_train(tmp_path, "data=folder", f"data.root={tmp_path / 'nowhere'}")
    assert_clean_failure(proc, "nowhere", "missing", tmp_path=tmp_path)
    (tmp_path / "empty").mkdir()
    proc = run_train(tmp_path, "data=folder", f"data.root={tmp_path / 'empty'}")
    assert_clean_failure(proc, "empty", "no subject", tmp_path=tmp_path)
    proc = run_train(tmp_path, "data=folder")
    assert_clean_failure(proc, "data.root", tmp_path=tmp_path)


def test_debug_env_shows_the_traceback(tmp_path):
    env_proc = subprocess.run(
        [sys.executable, "-m", "landmark_unet.train", f"hydra.run.dir={tmp_path / 'run'}", "organ=heart"],
        capture_output=True, text=True, env={**os.environ, "LANDMARK_UNET_DEBUG": "1", "HYDRA_FULL_ERROR": "1"},
        timeout=300)
    assert env_proc.returncode != 0 and "Traceback" in env_proc.stderr
