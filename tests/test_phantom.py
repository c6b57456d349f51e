"""Tests of the synthetic whole-body Dixon phantom (landmark_unet/data/phantom.py).

Small grids only (the geometry is in mm, the grid just coarser): the whole file takes well under a minute on two
CPU cores. The shared ``cohort`` fixture builds 24 subjects at 96 x 96 x 80 once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from landmark_unet.data.organs import ORGANS
from landmark_unet.data.phantom import (
    INTENSITY_SCALE,
    PHANTOM_VERSION,
    PhantomConfig,
    generate_dataset,
    generate_subject,
    write_subject,
)
from landmark_unet.errors import InputError
from landmark_unet.landmarks.io import read_landmarks

SMALL = PhantomConfig(shape=(96, 96, 80))
N_COHORT = 24
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort():
    return [generate_subject(11, i, SMALL) for i in range(N_COHORT)]


def world(subject, vox: np.ndarray) -> np.ndarray:
    vox = np.atleast_2d(vox)
    return vox @ subject.affine[:3, :3].T + subject.affine[:3, 3]


def centroid_world(subject, organ: str) -> np.ndarray | None:
    idx = np.argwhere(subject.masks[organ] > 0)
    return None if len(idx) == 0 else world(subject, idx.mean(0))[0]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = int(pred.sum()) + int(truth.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & truth).sum()) / s


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ 1. intensity is not enough

class HistogramClassifier:
    """Per-voxel classifier from (fat, water) alone: P(organ | 2D histogram bin), thresholded at the value that
    maximises the mean per-body Dice on the training subjects."""

    bins = 40
    top = 1.5
    thresholds = np.linspace(0.02, 0.9, 45)

    def __init__(self, organ_mask, subjects):
        self.organ_mask = organ_mask
        stats = [self.counts(s) for s in subjects]
        self.prob = sum(h for _, h in stats) / np.maximum(sum(c for c, _ in stats), 1)
        scores = [self.mean_dice(stats, t) for t in self.thresholds]
        self.threshold = float(self.thresholds[int(np.argmax(scores))])
        self.train_dice = float(np.max(scores))

    def counts(self, s) -> tuple[np.ndarray, np.ndarray]:
        """Voxels and organ voxels per (fat, water) bin."""
        f = np.clip((s.fat * (self.bins / self.top)).astype(np.int64), 0, self.bins - 1)
        w = np.clip((s.water * (self.bins / self.top)).astype(np.int64), 0, self.bins - 1)
        b = (f * self.bins + w).ravel()
        n = self.bins * self.bins
        return np.bincount(b, minlength=n), np.bincount(b[self.organ_mask(s).ravel()], minlength=n)

    def mean_dice(self, stats, threshold: float) -> float:
        chosen = self.prob > threshold  # predicted organ = every voxel in these bins
        out = []
        for count, hit in stats:
            pred, truth, both = count[chosen].sum(), hit.sum(), hit[chosen].sum()
            out.append(1.0 if pred + truth == 0 else 2.0 * both / (pred + truth))
        return float(np.mean(out))

    def test_dice(self, subjects) -> float:
        return self.mean_dice([self.counts(s) for s in subjects], self.threshold)


def test_intensity_alone_cannot_find_the_spleen(cohort):
    train, test = cohort[:12], cohort[12:]
    spleen = HistogramClassifier(lambda s: s.masks["spleen"] > 0, train)
    spleen_dice = spleen.test_dice(test)
    # the same classifier works where intensity does separate: the (water-bright) bladder
    has_bladder = [s.masks["bladder"].any() for s in cohort]
    bladder = HistogramClassifier(lambda s: s.masks["bladder"] > 0, [s for s, b in zip(train, has_bladder) if b])
    bladder_dice = bladder.test_dice([s for s, b in zip(test, has_bladder[12:]) if b])
    print(f"intensity-only Dice: spleen {spleen_dice:.3f} (train {spleen.train_dice:.3f}), "
          f"bladder {bladder_dice:.3f} (train {bladder.train_dice:.3f})")
    assert spleen_dice < 0.5
    assert bladder_dice > 0.55


# -------------------------------------------------------------------------------------- 2. organs follow the hips

def test_organ_heights_follow_the_hips(cohort):
    subjects = cohort[:20]
    hip_z = np.array([world(s, s.landmarks).mean(0)[2] for s in subjects])
    assert np.ptp(hip_z) > 100.0  # the subjects really are shifted along z
    for organ in ORGANS:
        pairs = [(h, c[2]) for h, s in zip(hip_z, subjects) if (c := centroid_world(s, organ)) is not None]
        assert len(pairs) >= (15 if organ == "bladder" else 20)
        h, z = np.array(pairs).T
        r = np.corrcoef(h, z)[0, 1]
        print(f"{organ}: r = {r:.3f}, offset {np.mean(z - h):.0f} +- {np.std(z - h):.0f} mm")
        assert r >= 0.8, organ


# ------------------------------------------------------------------------------------------ 3. reproducibility

def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = PhantomConfig(shape=(48, 48, 48))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_dataset(a, 2, seed=3, cfg=cfg, progress=False)
    generate_dataset(b, 3, seed=3, cfg=cfg, workers=2, progress=False)  # more subjects, other processes
    generate_dataset(c, 2, seed=4, cfg=cfg, progress=False)
    ha, hb, hc = sha256_tree(a), sha256_tree(b), sha256_tree(c)
    expected = {"phantom.json"} | {f"sub00{i}/{f}" for i in range(2) for f in
                                   ["fat.nii.gz", "water.nii.gz", "landmarks.txt"]
                                   + [f"masks/{o}.nii.gz" for o in ORGANS]}
    assert set(ha) == expected
    for name in expected - {"phantom.json"}:
        assert ha[name] == hb[name], name  # subject i does not depend on n_subjects or the process
        if name.endswith(("fat.nii.gz", "water.nii.gz", "landmarks.txt")):
            assert ha[name] != hc[name], name
    meta = json.loads((a / "phantom.json").read_text())
    assert meta["version"] == PHANTOM_VERSION and meta["seed"] == 3 and meta["n_subjects"] == 2
    assert meta["config"]["shape"] == [48, 48, 48]
    # a re-run keeps complete subjects (no rewrite) and restores phantom.json
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*.nii.gz")}
    generate_dataset(a, 2, seed=3, cfg=cfg, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert sha256_tree(a) == ha


def test_written_files_match_the_subject(tmp_path):
    cfg = PhantomConfig(shape=(64, 64, 64))
    s = generate_subject(5, 1, cfg)
    write_subject(s, tmp_path / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temporary folder left behind
    fat = nib.load(tmp_path / "sub" / "fat.nii.gz")
    assert fat.get_data_dtype() == np.int16 and fat.shape == (64, 64, 64)
    assert nib.aff2axcodes(fat.affine) == ("R", "A", "S")
    np.testing.assert_allclose(fat.affine, s.affine)
    stored = np.asarray(fat.dataobj)
    np.testing.assert_allclose(stored, np.clip(np.rint(s.fat * INTENSITY_SCALE), 0, 32767), atol=1)
    for organ in ORGANS:
        m = nib.load(tmp_path / "sub" / "masks" / f"{organ}.nii.gz")
        assert m.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(m.dataobj), s.masks[organ])


# ------------------------------------------------------------------------------------------- 4. landmarks

def test_landmarks_are_the_femoral_head_centres(tmp_path):
    cfg = PhantomConfig(shape=(64, 64, 64))
    generate_dataset(tmp_path, 3, seed=8, cfg=cfg, progress=False)
    for i in range(3):
        s = generate_subject(8, i, cfg)
        sub = tmp_path / f"sub{i:03d}"
        pts = read_landmarks(sub / "landmarks.txt", shape=cfg.shape, min_points=2)
        assert pts.shape == (2, 3)
        np.testing.assert_allclose(pts, s.landmarks, atol=1e-3)
        fat = np.asarray(nib.load(sub / "fat.nii.gz").dataobj).astype(float)
        water = np.asarray(nib.load(sub / "water.nii.gz").dataobj).astype(float)
        for p in np.rint(pts).astype(int):
            centre_fat = fat[tuple(p)]
            assert centre_fat > 0.5 * INTENSITY_SCALE  # fatty marrow
            assert centre_fat > 2.5 * water[tuple(p)]
            # sphere-like: a bright core surrounded by a darker rim in every direction (about 30 mm out)
            for axis in range(3):
                step = int(np.ceil(30.0 / cfg.spacing[axis]))
                for sgn in (-1, 1):
                    q = p.copy()
                    q[axis] += sgn * step
                    assert fat[tuple(q)] < centre_fat, (i, axis, sgn)
        right, left = world(s, pts)
        assert right[0] > left[0] + 120.0  # RAS+: x grows towards the patient's right
        assert 160.0 < np.linalg.norm(right - left) < 210.0
        assert all(20 <= r <= 26 for r in s.params["head_radius_mm"])


# ------------------------------------------------------------------------------------------- 5. organ sanity

def test_organ_sanity(cohort):
    bladder_volumes = []
    for s in cohort:
        total = np.zeros(s.fat.shape, dtype=np.int32)
        for organ in ORGANS:
            assert s.masks[organ].dtype == np.uint8 and set(np.unique(s.masks[organ])) <= {0, 1}
            total += s.masks[organ]
            if organ != "bladder":
                assert s.masks[organ].any(), organ
        assert total.max() <= 1  # no overlaps by default
        hips = world(s, s.landmarks).mean(0)
        assert centroid_world(s, "liver")[0] > hips[0] + 10  # liver on the right
        assert centroid_world(s, "spleen")[0] < hips[0] - 40  # spleen on the left
        assert centroid_world(s, "kidneys")[1] < centroid_world(s, "pancreas")[1]  # kidneys behind the pancreas
        for organ in ORGANS:  # abdominal organs well above the hips, the bladder about level with them
            c = centroid_world(s, organ)
            if c is not None:
                assert c[2] > hips[2] + (-30.0 if organ == "bladder" else 150.0), organ
        if s.masks["bladder"].any():
            bladder_volumes.append(s.params["volumes_ml"]["bladder"])
        json.dumps(s.params)  # serialisable
    assert max(bladder_volumes) >= 10 * min(bladder_volumes)


def test_bladder_can_be_absent():
    cfg = PhantomConfig(shape=(48, 48, 48), bladder_absent_prob=1.0)
    s = generate_subject(0, 0, cfg)
    assert not s.masks["bladder"].any() and s.params["bladder"]["present"] is False
    assert all(s.masks[o].any() for o in ORGANS if o != "bladder")


def test_annotation_defect_makes_the_liver_overlap_the_kidney():
    for i in range(2):
        clean = generate_subject(2, i, SMALL)
        bad = generate_subject(2, i, PhantomConfig(shape=SMALL.shape, annotation_defects=True))
        assert not (clean.masks["liver"] & clean.masks["kidneys"]).any()
        overlap = bad.masks["liver"] & bad.masks["kidneys"]
        assert overlap.any()
        np.testing.assert_array_equal(bad.fat, clean.fat)  # the image is the same, only the annotation is wrong
        for organ in ("kidneys", "spleen", "pancreas", "bladder"):
            np.testing.assert_array_equal(bad.masks[organ], clean.masks[organ])


def test_tiny_grids_still_hold_every_organ():
    for shape in ((64, 64, 64), (48, 48, 48)):
        s = generate_subject(1, 2, PhantomConfig(shape=shape, bladder_absent_prob=0.0))
        assert s.fat.shape == shape and s.fat.dtype == np.float32
        assert all(s.masks[o].any() for o in ORGANS), shape


@pytest.mark.parametrize("kwargs, key", [
    ({"shape": (0, 64, 64)}, "shape"),
    ({"shape": (64, 64)}, "shape"),
    ({"fov_mm": (480.0, -1.0, 1008.0)}, "fov_mm"),
    ({"bladder_absent_prob": 1.5}, "bladder_absent_prob"),
    ({"noise": -0.1}, "noise"),
])
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(InputError) as err:
        PhantomConfig(**kwargs)
    assert err.value.where == key


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(InputError) as err:
        generate_dataset(tmp_path / "x", 0, cfg=PhantomConfig(shape=(32, 32, 32)), progress=False)
    assert err.value.where == "n_subjects"
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------- 6. CLI

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "landmark_unet.data.phantom", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_layout(tmp_path):
    out = tmp_path / "ph"
    res = run_cli(f"out_dir={out}", "n_subjects=2", "shape=[48,48,48]", "seed=1", "progress=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for sub in ("sub000", "sub001"):
        for f in ["fat.nii.gz", "water.nii.gz", "landmarks.txt"] + [f"masks/{o}.nii.gz" for o in ORGANS]:
            assert (out / sub / f).is_file(), f
        assert nib.load(out / sub / "fat.nii.gz").shape == (48, 48, 48)
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["n_subjects"] == 2 and meta["seed"] == 1 and meta["subjects"] == ["sub000", "sub001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ph"]  # no outputs/, .hydra/ or log files


def test_cli_bad_value_exits_2_with_one_line(tmp_path):
    res = run_cli(f"out_dir={tmp_path / 'ph'}", "n_subjects=0", cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "n_subjects" in lines[0], res.stderr
    assert not (tmp_path / "ph").exists()
