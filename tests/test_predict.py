"""Prediction to NIfTI: back on the input's own grid voxel for voxel, in any orientation; outputs and bad input."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import CONF_DIR, REAL_DIR, compose_train, save_run_config
from hydra import compose, initialize_config_dir
from test_geometry import ORIENTATIONS, reoriented

from landmark_unet.data.nifti import save_nifti
from landmark_unet.data.phantom import PhantomConfig, generate_dataset
from landmark_unet.errors import InputError
from landmark_unet.predict import predict
from landmark_unet.train import train

needs_real = pytest.mark.skipif(not (REAL_DIR / "example_mr_sm.nii.gz").exists(),
                                reason=f"real fixtures not found in {REAL_DIR}")
MR_LIVER = 5  # total_mr label value (PROVENANCE.md)


def compose_predict(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="predict", overrides=["progress=false"] + overrides)


def dice(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def mr_run(tmp_path_factory):
    """A small 2D U-Net overfitted to the real MRI's liver: five copies of the case in five orientations (same body,
    other file grids) in an nnU-Net dataset."""
    if not (REAL_DIR / "example_mr_sm.nii.gz").exists():
        pytest.skip(f"real fixtures not found in {REAL_DIR}")
    tmp = tmp_path_factory.mktemp("mr")
    root = tmp / "nn"
    image = nib.load(REAL_DIR / "example_mr_sm.nii.gz")
    label = nib.load(REAL_DIR / "example_seg_mr.nii.gz")
    for i, (perm, flips) in enumerate(ORIENTATIONS):
        data, affine = reoriented(np.asanyarray(image.dataobj), image.affine, perm, flips)
        save_nifti(root / "imagesTr" / f"mr{i}_0000.nii.gz", data, affine)
        data, affine = reoriented(np.asanyarray(label.dataobj), label.affine, perm, flips)
        save_nifti(root / "labelsTr" / f"mr{i}.nii.gz", data, affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7,
                   "urinary_bladder": 16}}))
    cfg = compose_train(["data=nnunet", f"data.root={root}", "content=single", "organ=liver",
                         "data.labels={liver:[liver],kidneys:[kidney_right,kidney_left]}",
                         "model.net.features=8", "optim=adam_step", "model.optimizer.lr=3e-3", "data.num_workers=0",
                         "data.batch_size=8", "trainer.max_epochs=12", "data.split.rounds=5"], tmp)
    metrics = train(cfg)
    save_run_config(cfg, tmp / "run")
    return tmp, metrics


@needs_real
def test_prediction_lands_on_the_input_grid_in_any_orientation(mr_run, tmp_path):
    run, metrics = mr_run
    ckpt = run / "run" / "checkpoints" / "last.ckpt"
    predict(compose_predict([f"ckpt={ckpt}", f"input={REAL_DIR / 'example_mr_sm.nii.gz'}", f"output={tmp_path / 'a'}"]))
    ref_img = nib.load(REAL_DIR / "example_mr_sm.nii.gz")
    ref_label = np.asanyarray(nib.load(REAL_DIR / "example_seg_mr.nii.gz").dataobj)
    liver = nib.load(tmp_path / "a" / "example_mr_sm_liver.nii.gz")
    assert liver.shape == ref_img.shape and np.array_equal(liver.affine, ref_img.affine)
    assert nib.aff2axcodes(liver.affine) == ("L", "P", "S")
    pred = np.asanyarray(liver.dataobj)
    # overfitted to this very body: a wrong orientation would put the liver elsewhere
    assert dice(pred, ref_label == MR_LIVER) > 0.8
    assert dice(pred, np.flip(ref_label == MR_LIVER, 0)) < 0.5
    # reoriented copies: the prediction is the same body's, written in each copy's own grid
    raw = np.asanyarray(ref_img.dataobj)
    for i, (perm, flips) in enumerate(ORIENTATIONS[1:]):
        data, affine = reoriented(raw, ref_img.affine, perm, flips)
        save_nifti(tmp_path / "in" / f"copy{i}.nii.gz", data, affine)
    predict(compose_predict([f"ckpt={ckpt}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'b'}"]))
    for i, (perm, flips) in enumerate(ORIENTATIONS[1:]):
        out = nib.load(tmp_path / "b" / f"copy{i}_liver.nii.gz")
        expected, _ = reoriented(pred, ref_img.affine, perm, flips)
        assert np.array_equal(out.affine, nib.load(tmp_path / "in" / f"copy{i}.nii.gz").affine)
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), expected)


@needs_real
def test_labelmap_probabilities_tta_and_resampling(mr_run, tmp_path):
    run, _ = mr_run
    ckpt = run / "run" / "checkpoints" / "last.ckpt"
    image = REAL_DIR / "example_mr_sm.nii.gz"
    predict(compose_predict([f"ckpt={ckpt}", f"input={image}", f"output={tmp_path}", "labelmap=true",
                             "probabilities=true", "tta=true"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example_mr_sm.nii.gz", "example_mr_sm_liver_prob.nii.gz"]
    label = np.asanyarray(nib.load(tmp_path / "example_mr_sm.nii.gz").dataobj)
    prob = np.asanyarray(nib.load(tmp_path / "example_mr_sm_liver_prob.nii.gz").dataobj)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 5} and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1
    ref = np.asanyarray(nib.load(REAL_DIR / "example_seg_mr.nii.gz").dataobj)
    assert dice(label == 1, ref == MR_LIVER) > 0.8  # label 1 = liver
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary file left


def test_predict_bad_input(tmp_path):
    with pytest.raises(InputError, match="^ckpt: required"):
        predict(compose_predict([f"input={tmp_path}", f"output={tmp_path}"]))
    with pytest.raises(InputError, match="checkpoint file is missing"):
        predict(compose_predict([f"ckpt={tmp_path / 'x.ckpt'}", f"input={tmp_path}", f"output={tmp_path}"]))
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"not a checkpoint")
    save_run_config(compose_train([], tmp_path), tmp_path / "run")
    # the command line is checked before the checkpoint is read (and before torch is imported)
    with pytest.raises(InputError, match="holds no NIfTI image to predict"):
        predict(compose_predict([f"ckpt={run / 'last.ckpt'}", f"input={tmp_path}", f"output={tmp_path / 'o'}"]))
    for channel in ("fat", "water"):
        save_nifti(tmp_path / "case" / f"{channel}.nii.gz", np.ones((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match="cannot read checkpoint"):
        predict(compose_predict([f"ckpt={run / 'last.ckpt'}", f"input={tmp_path / 'case'}",
                                 f"output={tmp_path / 'o'}"]))
    assert not (tmp_path / "o").exists()


@needs_real
def test_resampled_run_predicts_on_the_input_grid(mr_run, tmp_path):
    run, _ = mr_run
    root = run / "nn"
    cfg = compose_train(["data=nnunet", f"data.root={root}", "content=single", "organ=liver",
                         "data.labels={liver:[liver]}", "data.spacing=[4.5,4.5,4.5]", "model.net.features=8",
                         "optim=adam_step", "model.optimizer.lr=3e-3", "data.num_workers=0", "data.batch_size=8",
                         "trainer.max_epochs=12", "data.split.rounds=5"], tmp_path)
    train(cfg)
    save_run_config(cfg, tmp_path / "run")
    predict(compose_predict([f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}",
                             f"input={REAL_DIR / 'example_mr_sm.nii.gz'}", f"output={tmp_path / 'out'}"]))
    ref = nib.load(REAL_DIR / "example_mr_sm.nii.gz")
    out = nib.load(tmp_path / "out" / "example_mr_sm_liver.nii.gz")
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
    label = np.asanyarray(nib.load(REAL_DIR / "example_seg_mr.nii.gz").dataobj)
    assert dice(np.asanyarray(out.dataobj), label == MR_LIVER) > 0.8


TINY = ["data.phantom.n_subjects=6", "data.phantom.shape=[64,64,64]", "data.phantom.workers=1",
        "model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3",
        "trainer.max_epochs=1"]


def test_fused_model_on_a_subject_folder_and_its_reoriented_copy(tmp_path):
    """A fused model reads the subject's landmarks.txt; a reoriented copy of the subject gets the same prediction,
    written on the copy's grid; without landmarks the hips are detected."""
    from test_sources import reorient_copy

    cfg = compose_train(TINY + ["fusion=early"], tmp_path)
    train(cfg)
    save_run_config(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    subject = sorted((tmp_path / "cache" / "phantom").glob("*/*/fat.nii.gz"))[0].parent
    reorient_copy(subject, tmp_path / "copy" / "s")
    predict(compose_predict([f"ckpt={ckpt}", f"input={subject}", f"output={tmp_path / 'a'}", "probabilities=true"]))
    predict(compose_predict([f"ckpt={ckpt}", f"input={tmp_path / 'copy'}", f"output={tmp_path / 'b'}",
                             "probabilities=true"]))
    a = np.asanyarray(nib.load(tmp_path / "a" / f"{subject.name}_liver_prob.nii.gz").dataobj)
    b = nib.load(tmp_path / "b" / "s_liver_prob.nii.gz")
    assert b.shape == nib.load(tmp_path / "copy" / "s" / "fat.nii.gz").shape
    np.testing.assert_allclose(np.asanyarray(b.dataobj), a[::-1].transpose(0, 2, 1), atol=1e-5)
    # nnU-Net-named channels without landmarks: the hip detector finds them (on a finer body: 3.75 mm voxels)
    generate_dataset(tmp_path / "fine", n_subjects=1, seed=3, cfg=PhantomConfig(shape=(128, 128, 126)), workers=1)
    fine = next((tmp_path / "fine").glob("*/fat.nii.gz")).parent
    for i, c in enumerate(("fat", "water")):
        (tmp_path / "nn").mkdir(exist_ok=True)
        shutil.copy(fine / f"{c}.nii.gz", tmp_path / "nn" / f"case_{i:04d}.nii.gz")
    predict(compose_predict([f"ckpt={ckpt}", f"input={tmp_path / 'nn' / 'case_0000.nii.gz'}",
                             f"output={tmp_path / 'c'}"]))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["case_liver.nii.gz"]
    # bad input: one line naming the file, exit code 2, nothing written
    save_nifti(tmp_path / "bad" / "x_0000.nii.gz", np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    save_nifti(tmp_path / "bad" / "x_0001.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    for bad, needle in ((tmp_path / "nope.nii.gz", "input file or folder is missing"),
                        (tmp_path / "bad" / "x_0000.nii.gz", "expected a 3D volume")):
        proc = subprocess.run([sys.executable, "-m", "landmark_unet.predict", f"ckpt={ckpt}", f"input={bad}",
                               f"output={tmp_path / 'never'}", f"hydra.run.dir={tmp_path / 'h'}", "progress=false"],
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0] and str(bad) in lines[0], proc.stderr
        assert not (tmp_path / "never").exists()


def test_an_ensemble_averages_its_models_probabilities(tmp_path):
    """Two runs (other seeds) predicted as an ensemble (``ckpt`` a glob over both) give the mean of their
    probabilities; a run with other preprocessing cannot join."""
    ckpts = []
    for seed in (0, 1):
        cfg = compose_train(TINY + [f"seed={seed}"], tmp_path / f"r{seed}")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        train(cfg)
        save_run_config(cfg, tmp_path / f"r{seed}" / "run")
        ckpts.append(tmp_path / f"r{seed}" / "run" / "checkpoints" / "last.ckpt")
    subject = sorted((tmp_path / "cache" / "phantom").glob("*/*/fat.nii.gz"))[0].parent

    def prob(ckpt, out):
        predict(compose_predict([f"ckpt={ckpt}", f"input={subject}", f"output={tmp_path / out}", "probabilities=true"]))
        return np.asanyarray(nib.load(tmp_path / out / f"{subject.name}_liver_prob.nii.gz").dataobj)

    a, b = prob(ckpts[0], "a"), prob(ckpts[1], "b")
    assert not np.allclose(a, b)
    both = prob(str(tmp_path / "r*" / "run" / "checkpoints" / "last.ckpt"), "ab")
    np.testing.assert_allclose(both, (a + b) / 2, atol=1e-6)
    other = compose_train(TINY + ["data.normalisation=zscore"], tmp_path / "r2")  # same model, other inputs
    save_run_config(other, tmp_path / "r2" / "run")
    (tmp_path / "r2" / "run" / "checkpoints").mkdir()
    shutil.copy(ckpts[0], tmp_path / "r2" / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(InputError, match="cannot join an ensemble"):
        predict(compose_predict([f"ckpt=[{ckpts[0]},{tmp_path / 'r2' / 'run' / 'checkpoints' / 'last.ckpt'}]",
                                 f"input={subject}", f"output={tmp_path / 'x'}"]))
    with pytest.raises(InputError, match="no checkpoint matches"):
        predict(compose_predict([f"ckpt={tmp_path / 'none*.ckpt'}", f"input={subject}", f"output={tmp_path / 'x'}"]))
