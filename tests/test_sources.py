"""Folder-layout reader: canonical orientation, geometry, and one clear error per kind of bad input."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL_DIR, write_toy_subject

from landmark_unet.data.geometry import to_canonical
from landmark_unet.data.nifti import save_nifti
from landmark_unet.data.organs import ORGANS
from landmark_unet.data.sources import list_folder_subjects, load_nifti, read_folder_subject
from landmark_unet.errors import InputError
from landmark_unet.landmarks.io import read_landmarks, write_landmarks


def test_reads_a_subject(tmp_path):
    d = write_toy_subject(tmp_path, "a", shape=(20, 18, 16))
    s = read_folder_subject(d)
    assert s.image.shape == (2, 20, 18, 16) and s.image.dtype == np.float32
    assert s.masks.shape == (5, 20, 18, 16) and s.masks.dtype == np.uint8
    assert s.channels == ("fat", "water") and s.organs == ORGANS
    np.testing.assert_allclose(s.spacing, [2, 2, 3])
    np.testing.assert_allclose(s.landmarks, [[4, 5, 2], [15, 5, 2]])
    assert s.source_shape == (20, 18, 16)


def reorient_copy(src, dst):
    """Write ``src`` again with x flipped and y/z swapped in the file grid (same world geometry)."""
    t = None
    for f in ["fat.nii.gz", "water.nii.gz"] + [f"masks/{o}.nii.gz" for o in ORGANS]:
        img = nib.load(src / f)
        a = np.asanyarray(img.dataobj)
        x = a.shape[0]
        t = np.array([[-1, 0, 0, x - 1], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
        save_nifti(dst / f, a[::-1].transpose(0, 2, 1), img.affine @ t)
    pts = read_landmarks(src / "landmarks.txt")
    moved = (np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(t).T)[:, :3]
    write_landmarks(dst / "landmarks.txt", moved)


def test_reoriented_copy_reads_identically(tmp_path):
    a = write_toy_subject(tmp_path, "a", shape=(20, 18, 16))
    reorient_copy(a, tmp_path / "b")
    assert nib.aff2axcodes(nib.load(tmp_path / "b" / "fat.nii.gz").affine) == ("L", "S", "A")
    sa, sb = read_folder_subject(a), read_folder_subject(tmp_path / "b")
    np.testing.assert_array_equal(sa.image, sb.image)
    np.testing.assert_array_equal(sa.masks, sb.masks)
    np.testing.assert_allclose(sa.affine, sb.affine)
    np.testing.assert_allclose(sa.landmarks, sb.landmarks, atol=1e-6)
    assert sb.source_shape == (20, 16, 18)


@pytest.mark.skipif(not (REAL_DIR / "example_mr_sm.nii.gz").exists(), reason=f"real fixtures not found in {REAL_DIR}")
def test_real_lps_mri_becomes_ras():
    img = load_nifti(REAL_DIR / "example_mr_sm.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data, affine = to_canonical(img.dataobj, img.affine)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    raw = np.asanyarray(img.dataobj)
    np.testing.assert_array_equal(data, raw[::-1, ::-1, :])
    # the same world point before and after
    i, j, k = 10, 20, 5
    x, y = raw.shape[0] - 1 - i, raw.shape[1] - 1 - j
    np.testing.assert_allclose(img.affine @ [i, j, k, 1], affine @ [x, y, k, 1])


# -- bad input: each names the file and the problem -------------------------------------------------------------
def _break(kind, d):
    shape = (20, 18, 16)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    if kind == "missing channel":
        (d / "water.nii.gz").unlink()
        return "water.nii.gz", "missing"
    if kind == "shape mismatch":
        save_nifti(d / "water.nii.gz", np.zeros((20, 18, 15), np.float32), aff)
        return "water.nii.gz", "shape"
    if kind == "affine mismatch":
        save_nifti(d / "masks" / "liver.nii.gz", np.zeros(shape, np.uint8), np.diag([2.0, 2.0, 2.5, 1.0]))
        return "liver.nii.gz", "affine"
    if kind in ("nan", "inf"):
        a = np.ones(shape, np.float32)
        a[3, 4, 5] = np.nan if kind == "nan" else np.inf
        save_nifti(d / "fat.nii.gz", a, aff)
        return "fat.nii.gz", "NaN or Inf"
    if kind == "non-binary mask":
        m = np.zeros(shape, np.uint8)
        m[2:4] = 2
        save_nifti(d / "masks" / "spleen.nii.gz", m, aff)
        return "spleen.nii.gz", "not binary"
    if kind == "landmark text":
        (d / "landmarks.txt").write_text("10 12 abc\n")
        return "landmarks.txt", "not a number"
    if kind == "landmark two values":
        (d / "landmarks.txt").write_text("10 12\n3 4 5\n")
        return "landmarks.txt", "expected 3 numbers"
    if kind == "landmark outside":
        (d / "landmarks.txt").write_text("4 5 2\n40 5 2\n")
        return "landmarks.txt", "outside the volume"
    if kind == "landmark nan":
        (d / "landmarks.txt").write_text("4 5 2\nnan 5 2\n")
        return "landmarks.txt", "non-finite"
    if kind == "missing landmarks":
        (d / "landmarks.txt").unlink()
        return "landmarks.txt", "missing"
    if kind == "truncated gzip":
        raw = (d / "fat.nii.gz").read_bytes()
        (d / "fat.nii.gz").write_bytes(raw[: len(raw) // 2])
        return "fat.nii.gz", "cannot read"
    if kind == "4D volume":
        save_nifti(d / "fat.nii.gz", np.zeros((*shape, 2), np.float32), aff)
        return "fat.nii.gz", "3D"
    if kind == "not gzip":
        (d / "fat.nii.gz").write_bytes(gzip.compress(b"hello"))
        return "fat.nii.gz", "cannot read"
    raise AssertionError(kind)


BAD = ["missing channel", "shape mismatch", "affine mismatch", "nan", "inf", "non-binary mask", "landmark text",
       "landmark two values", "landmark outside", "landmark nan", "missing landmarks", "truncated gzip", "4D volume",
       "not gzip"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_subject_is_refused_with_the_file_named(tmp_path, kind):
    d = write_toy_subject(tmp_path, "a", shape=(20, 18, 16))
    fname, problem = _break(kind, d)
    with pytest.raises(InputError) as err:
        read_folder_subject(d)
    msg = str(err.value)
    assert fname in msg and problem in msg, msg
    assert "\n" not in msg


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(InputError, match="missing"):
        list_folder_subjects(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no subject"):
        list_folder_subjects(tmp_path / "empty")


def test_hidden_temporary_folders_are_not_subjects(tmp_path):
    write_toy_subject(tmp_path, "a")
    shutil.copytree(tmp_path / "a", tmp_path / ".a.tmp-123")
    assert [p.name for p in list_folder_subjects(tmp_path)] == ["a"]


def test_empty_mask_is_an_absent_organ_not_an_error(tmp_path):
    d = write_toy_subject(tmp_path, "a", shape=(20, 18, 16))
    save_nifti(d / "masks" / "bladder.nii.gz", np.zeros((20, 18, 16), np.uint8), np.diag([2.0, 2.0, 3.0, 1.0]))
    s = read_folder_subject(d)
    assert s.mask("bladder").sum() == 0
