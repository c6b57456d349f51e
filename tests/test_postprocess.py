"""Largest-component post-processing: the filter itself, and its choice on the validation bodies of a real run."""

import json

import numpy as np
from conftest import compose_train

from landmark_unet.postprocess import largest_components
from landmark_unet.train import train


def test_keeps_the_largest_component_and_two_for_the_kidneys():
    m = np.zeros((20, 20, 20), bool)
    m[1:6, 1:6, 1:6] = True  # 125 voxels
    m[10:13, 10:13, 10:13] = True  # 27
    m[16:18, 16:18, 16:18] = True  # 8
    m[7, 7, 7] = True  # diagonal to nothing: its own component
    liver = largest_components(m, "liver")
    assert liver.sum() == 125 and liver[1:6, 1:6, 1:6].all()
    kidneys = largest_components(m, "kidneys")
    assert kidneys.sum() == 125 + 27
    touching = np.zeros((5, 5, 5), bool)
    touching[1, 1, 1] = touching[2, 2, 2] = True  # 26-connected: one component
    assert largest_components(touching, "liver").sum() == 2


def test_choice_on_validation_is_recorded(tmp_path):
    cfg = compose_train(["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
                         "model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3",
                         "trainer.max_epochs=1", "postprocess=true"], tmp_path)
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    choice = metrics["postprocess"]["liver"]
    assert 0 <= choice["val_dice"] <= 1 and 0 <= choice["val_dice_largest_component"] <= 1
    assert choice["largest_component"] == (choice["val_dice_largest_component"] > choice["val_dice"])


def test_predict_applies_the_runs_choice(tmp_path):
    import nibabel as nib
    from conftest import save_run_config
    from test_predict import compose_predict

    from landmark_unet.predict import predict

    cfg = compose_train(["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
                         "model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3",
                         "trainer.max_epochs=1", "model.threshold=0.3"], tmp_path)
    train(cfg)
    save_run_config(cfg, tmp_path / "run")
    subject = sorted((tmp_path / "cache" / "phantom").glob("*/*/fat.nii.gz"))[0].parent
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    predict(compose_predict([f"ckpt={ckpt}", f"input={subject}", f"output={tmp_path / 'raw'}"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics["postprocess"] = {"liver": {"largest_component": True}}
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    predict(compose_predict([f"ckpt={ckpt}", f"input={subject}", f"output={tmp_path / 'pp'}"]))
    raw = np.asanyarray(nib.load(tmp_path / "raw" / f"{subject.name}_liver.nii.gz").dataobj) > 0
    pp = np.asanyarray(nib.load(tmp_path / "pp" / f"{subject.name}_liver.nii.gz").dataobj) > 0
    assert np.array_equal(pp, largest_components(raw, "liver"))
    # the masks step itself, on probabilities with two blobs
    from landmark_unet.predictor import Predictor

    predictor = Predictor.from_checkpoint(ckpt)
    prob = np.zeros((1, 12, 12, 12), np.float32)
    prob[0, 1:5, 1:5, 1:5] = 0.9
    prob[0, 8:10, 8:10, 8:10] = 0.8
    assert predictor.masks(prob)[0].sum() == 64  # only the larger blob
    predictor.postprocess = {}
    assert predictor.masks(prob)[0].sum() == 64 + 8
