"""Hip-joint detector (landmarks/detect.py): phantom accuracy, the real CT fixture, bad input, the command line.

Whole file: ~30 s on one core. Errors are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from landmark_unet.data.nifti import save_nifti
from landmark_unet.data.phantom import PhantomConfig, generate_subject, write_subject
from landmark_unet.errors import InputError
from landmark_unet.landmarks.detect import HipDetection, detect_hips, detect_hips_file
from landmark_unet.landmarks.io import read_landmarks

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"real fixtures not found at {REAL_DIR}")
PHANTOM_SHAPE = (128, 128, 126)  # 3.75 x 3.75 x 8 mm over the default 480 x 480 x 1008 mm field of view
REPO = Path(__file__).resolve().parents[1]


def world(voxels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (np.c_[voxels, np.ones(len(voxels))] @ affine.T)[:, :3]


def errors_mm(det: HipDetection, truth_mm: np.ndarray) -> np.ndarray:
    """Euclidean error of (right, left), in mm."""
    return np.linalg.norm(np.stack([det.right_mm, det.left_mm]) - truth_mm, axis=1)


def flipped(arr: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``arr`` flipped along ``axis`` with the affine that keeps every voxel at the same world position."""
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = arr.shape[axis] - 1
    return np.flip(arr, axis), affine @ flip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LANDMARK_UNET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "landmark_unet.landmarks.detect", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------------- phantom


@pytest.mark.parametrize("subjects", [8, pytest.param(20, marks=pytest.mark.slow)])
def test_phantom_fat_channel_subjects(subjects):
    cfg = PhantomConfig(shape=PHANTOM_SHAPE)
    errs, conf = [], []
    for i in range(subjects):
        s = generate_subject(0, i, cfg)
        det = detect_hips(s.fat, s.affine, modality="mri-fat")
        errs.append(errors_mm(det, world(s.landmarks, s.affine)))
        conf.append(det.confidence)
        assert det.voxels.shape == (2, 3) and det.candidates >= 2
        np.testing.assert_allclose(world(det.voxels, s.affine), np.stack([det.right_mm, det.left_mm]), atol=1e-6)
    errs = np.array(errs)
    print(f"\nphantom fat {PHANTOM_SHAPE}: errors (right, left) mm\n{np.round(errs, 2)}\n"
          f"mean {errs.mean():.2f} mm, max {errs.max():.2f} mm; confidence {min(conf):.2f}..{max(conf):.2f}")
    assert errs.mean() <= 3.0
    assert errs.max() <= 6.0  # also: right and left are never swapped (the heads are ~180 mm apart)
    assert all(0.5 <= c <= 1.0 for c in conf)


def test_phantom_water_channel_at_the_study_resolution():
    """The water channel alone: the femoral head is water-dark like fat, with a thin joint space, so it is checked
    at the study's 256 x 256 x 252 grid (1.9 x 1.9 x 4 mm), where it finds the pair to within a millimetre."""
    cfg = PhantomConfig()
    for i in (0, 1):
        s = generate_subject(0, i, cfg)
        det = detect_hips(s.water, s.affine, modality="mri-water")
        err = errors_mm(det, world(s.landmarks, s.affine))
        print(f"\nphantom water subject {i} (256 x 256 x 252): errors {np.round(err, 2)} mm, "
              f"confidence {det.confidence:.2f}")
        assert err.max() <= 3.0
        assert 0.0 <= det.confidence <= 1.0


def test_any_orientation_same_world_position():
    """An LPS, z-flipped and axis-permuted copy of a phantom gives the same world centres, and voxel coordinates
    in its own grid."""
    s = generate_subject(0, 3, PhantomConfig(shape=PHANTOM_SHAPE))
    ref = detect_hips(s.fat, s.affine)
    arr, aff = flipped(*flipped(*flipped(s.fat, s.affine, 0), 1), 2)
    arr = np.ascontiguousarray(np.transpose(arr, (2, 0, 1)))
    aff = aff[:, [2, 0, 1, 3]]
    det = detect_hips(arr, aff)
    np.testing.assert_allclose(det.right_mm, ref.right_mm, atol=1e-3)
    np.testing.assert_allclose(det.left_mm, ref.left_mm, atol=1e-3)
    np.testing.assert_allclose(world(det.voxels, aff), np.stack([ref.right_mm, ref.left_mm]), atol=1e-3)
    assert errors_mm(det, world(s.landmarks, s.affine)).max() <= 3.0


def test_input_array_is_not_modified():
    s = generate_subject(0, 0, PhantomConfig(shape=(96, 96, 96)))
    hu = (s.fat * 400.0 - 300.0).astype(np.float32)  # a "CT" with metal-like values: must stay untouched
    hu[40:44, 40:44, 40:44] = 3000.0
    before = hu.copy()
    try:
        detect_hips(hu, s.affine, modality="ct")
    except InputError:
        pass
    np.testing.assert_array_equal(hu, before)


@pytest.mark.parametrize(
    "image, affine, modality, message",
    [
        (np.zeros((10, 10)), np.eye(4), "mri-fat", "expected a 3D volume"),
        (np.zeros((40, 40, 40)), np.zeros((4, 4)), "mri-fat", "affine"),
        (np.full((40, 40, 40), np.nan), np.eye(4), "mri-fat", "NaN"),
        (np.zeros((40, 40, 40)), np.eye(4), "mri-t1", "unknown modality"),
        (np.zeros((80, 80, 80)), np.diag([3.0, 3.0, 3.0, 1.0]), "ct", "does not look like a CT"),
        (np.zeros((80, 80, 80)), np.diag([3.0, 3.0, 3.0, 1.0]), "mri-fat", "no plausible pair"),
        (np.zeros((30, 80, 80)), np.diag([3.0, 3.0, 3.0, 1.0]), "mri-fat", "field of view is only 90 mm wide"),
    ],
)
def test_bad_input_raises_input_error(image, affine, modality, message):
    with pytest.raises(InputError, match=message):
        detect_hips(image, affine, modality=modality, source="vol.nii.gz")


# -------------------------------------------------------------------------------------------- real CT fixture


def inscribed_sphere_centres_mm(seg_path: Path) -> dict[str, np.ndarray]:
    """Centre (world mm) of the largest inscribed sphere of each femur mask (75 femur_left, 76 femur_right)."""
    seg = nib.load(str(seg_path))
    labels = np.asarray(seg.dataobj)
    spacing = np.sqrt((seg.affine[:3, :3] ** 2).sum(axis=0))
    out = {}
    for label, side in ((76, "right"), (75, "left")):
        dist = ndi.distance_transform_edt(labels == label, sampling=spacing)
        centre = np.array(np.unravel_index(int(np.argmax(dist)), dist.shape), dtype=float)
        out[side] = world(centre[None], seg.affine)[0]
    return out


@needs_real
def test_real_ct_with_implant_any_orientation(tmp_path):
    """Both heads within 10 mm of the femur masks' inscribed-sphere centres, although the left proximal femur
    holds a metal implant (> 2000 HU); the same after reorienting the volume to LPS and flipping z."""
    ref = inscribed_sphere_centres_mm(REAL_DIR / "example_seg_fast_force_split.nii.gz")
    img = nib.load(str(REAL_DIR / "example_ct.nii.gz"))
    data = np.asarray(img.dataobj)
    assert data.max() > 2000  # the implant
    lps = flipped(*flipped(data, img.affine, 0), 1)
    lpi = flipped(*lps, 2)
    results = {}
    for name, (arr, aff) in {"ras": (data, img.affine), "lps": lps, "lps_flip_z": lpi}.items():
        path = tmp_path / f"ct_{name}.nii.gz"
        save_nifti(path, np.ascontiguousarray(arr), aff)
        assert nib.aff2axcodes(nib.load(str(path)).affine) == {"ras": ("R", "A", "S"), "lps": ("L", "P", "S"),
                                                                  "lps_flip_z": ("L", "P", "I")}[name]
        det = detect_hips_file(path, modality="ct")
        err = errors_mm(det, np.stack([ref["right"], ref["left"]]))
        results[name] = err
        print(f"\nreal CT {name}: error right {err[0]:.1f} mm, left {err[1]:.1f} mm, confidence {det.confidence:.2f}")
        assert err.max() <= 10.0
        np.testing.assert_allclose(world(det.voxels, aff), np.stack([det.right_mm, det.left_mm]), atol=1e-4)
    np.testing.assert_allclose(results["lps"], results["ras"], atol=0.05)


@needs_real
@pytest.mark.parametrize("modality", ["mri-fat", "mri-water"])
def test_upper_abdomen_has_no_hips(modality):
    path = REAL_DIR / "example_mr_sm.nii.gz"
    with pytest.raises(InputError, match="no plausible pair of femoral heads") as info:
        detect_hips_file(path, modality=modality)
    assert info.value.where == str(path)


# ---------------------------------------------------------------------------------------------- command line


@needs_real
def test_cli_no_pair_exit_2_one_line(tmp_path):
    out = tmp_path / "landmarks.txt"
    res = run_cli(str(REAL_DIR / "example_mr_sm.nii.gz"), "--out", str(out))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "example_mr_sm.nii.gz" in lines[0]
    assert "no plausible pair" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_missing_file_exit_2(tmp_path):
    res = run_cli(str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "lm.txt"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.nii.gz'}: file is missing"]


def test_cli_end_to_end_on_phantom_files(tmp_path):
    s = generate_subject(0, 7, PhantomConfig(shape=PHANTOM_SHAPE))
    write_subject(s, tmp_path / "sub007")
    out = tmp_path / "detected" / "landmarks.txt"
    res = run_cli(str(tmp_path / "sub007" / "fat.nii.gz"), "--out", str(out), "--modality", "mri-fat")
    assert res.returncode == 0, res.stderr
    assert "confidence" in res.stdout and "right femoral head" in res.stdout
    text = out.read_text()
    assert text.startswith("#") and "confidence" in text
    points = read_landmarks(out, shape=PHANTOM_SHAPE, min_points=2)
    assert points.shape == (2, 3)
    truth = read_landmarks(tmp_path / "sub007" / "landmarks.txt")
    err = np.linalg.norm(world(points, s.affine) - world(truth, s.affine), axis=1)
    print(f"\nCLI phantom subject 7: errors {np.round(err, 2)} mm")
    assert err.max() <= 3.0
    assert not [p for p in out.parent.iterdir() if p.name != "landmarks.txt"]  # no temporary file left
