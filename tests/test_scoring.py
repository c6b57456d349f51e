"""Dice, HD95, normalised surface Dice and volumes: cross-checked against MONAI and an independent computation on
the real label maps; the folder mode of evaluate end to end."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REAL_DIR, TOY_LABEL_NAMES
from scipy import ndimage as ndi

from landmark_unet.data.nifti import save_nifti
from landmark_unet.scoring import score_masks, summarise

needs_real = pytest.mark.skipif(not (REAL_DIR / "example_seg_mr.nii.gz").exists(),
                                reason=f"real fixtures not found in {REAL_DIR}")
MR_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7}


def oracle_hd95(a, b, spacing):
    """The symmetric 95th-percentile Hausdorff distance from scipy: the larger of the two directed 95th
    percentiles of the distances from one surface's voxels to the other surface."""
    sa = a & ~ndi.binary_erosion(a)
    sb = b & ~ndi.binary_erosion(b)
    d_ab = ndi.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndi.distance_transform_edt(~sa, sampling=spacing)[sb]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def real_masks():
    if not (REAL_DIR / "example_seg_mr.nii.gz").exists():
        pytest.skip(f"real fixtures not found in {REAL_DIR}")
    img = nib.load(REAL_DIR / "example_seg_mr.nii.gz")
    label = np.asanyarray(img.dataobj)
    return {name: label == v for name, v in MR_LABELS.items()}, img


def shifted(m, voxels, axis):
    out = np.zeros_like(m)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, m.shape[axis] - voxels), slice(voxels, None)
    out[tuple(dst)] = m[tuple(src)]
    return out


@needs_real
@pytest.mark.parametrize("organ", ["liver", "kidney_right", "spleen", "pancreas"])
@pytest.mark.parametrize("change", ["erode", "shift_x2", "dilate"])
def test_dice_and_hd95_against_monai_and_scipy(organ, change):
    from monai.metrics import compute_dice

    masks, img = real_masks()
    ref = masks[organ]
    pred = {"erode": lambda m: ndi.binary_erosion(m), "dilate": lambda m: ndi.binary_dilation(m),
            "shift_x2": lambda m: shifted(m, 2, 0)}[change](ref)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    s = score_masks(pred, ref, spacing, tolerance_mm=3.0)
    monai_dice = float(compute_dice(torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]))
    assert s["dice"] == pytest.approx(monai_dice, abs=1e-6)
    assert s["hd95_mm"] == pytest.approx(oracle_hd95(pred, ref, spacing), abs=1e-3)
    if change == "shift_x2":
        assert s["hd95_mm"] == pytest.approx(6.0)  # two 3 mm voxels
        assert score_masks(pred, ref, spacing, tolerance_mm=6.0)["nsd"] == pytest.approx(1.0)
    assert 0 < s["nsd"] <= 1
    voxel_ml = np.prod(spacing) / 1000
    assert s["volume_diff_ml"] == pytest.approx((int(pred.sum()) - int(ref.sum())) * voxel_ml)


def test_anisotropic_spacing_and_empty_masks():
    ref = np.zeros((30, 30, 20), bool)
    ref[10:20, 8:22, 5:12] = True
    s = score_masks(shifted(ref, 2, 2), ref, (1.0, 1.0, 3.0), tolerance_mm=2.0)
    assert s["hd95_mm"] == pytest.approx(6.0)  # two slices of 3 mm
    assert s["volume_ref_ml"] == pytest.approx(10 * 14 * 7 * 3 / 1000)
    none = np.zeros_like(ref)
    assert score_masks(none, none, (1, 1, 3)) == {"dice": 1.0, "hd95_mm": 0.0, "nsd": 1.0, "volume_pred_ml": 0.0,
                                                  "volume_ref_ml": 0.0, "volume_diff_ml": 0.0}
    missed = score_masks(none, ref, (1, 1, 3))
    assert missed["dice"] == 0.0 and missed["hd95_mm"] is None and missed["nsd"] == 0.0
    mean = summarise([{"case": "a", "organ": "liver", **missed}, {"case": "b", "organ": "liver", **s}])["liver"]
    assert mean["hd95_mm"] == pytest.approx(6.0) and mean["hd95_undefined"] == 1 and mean["n"] == 2


def run_evaluate(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "landmark_unet.evaluate", *args,
                           f"hydra.run.dir={tmp_path / 'eval'}", "progress=false"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})


@needs_real
def test_evaluate_folder_of_predictions(tmp_path):
    """References in the nnU-Net layout (the real MRI and its label map, and a second case); predictions: an eroded
    liver and shifted kidneys for case mr0, nothing for case mr1."""
    root = tmp_path / "nn"
    for case in ("mr0", "mr1"):
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL_DIR / "example_mr_sm.nii.gz", root / "imagesTr" / f"{case}_0000.nii.gz")
        (root / "labelsTr").mkdir(exist_ok=True)
        shutil.copy(REAL_DIR / "example_seg_mr.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                   "labels": {"background": 0, **MR_LABELS}}))
    masks, img = real_masks()
    liver = ndi.binary_erosion(masks["liver"])
    kidneys = shifted(masks["kidney_right"] | masks["kidney_left"], 2, 0)
    save_nifti(tmp_path / "pred" / "mr0_liver.nii.gz", liver.astype(np.uint8), img.affine)
    save_nifti(tmp_path / "pred" / "mr0_kidneys.nii.gz", kidneys.astype(np.uint8), img.affine)
    labels = "{liver:[liver],kidneys:[kidney_right,kidney_left],spleen:[spleen]}"
    proc = run_evaluate(tmp_path, f"predictions={tmp_path / 'pred'}", f"references={root}", "data=nnunet",
                        f"data.labels={labels}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["missing"] == ["mr1"]
    spacing = (3.0, 3.0, 3.0)
    assert summary["mean"]["liver"]["dice"] == pytest.approx(score_masks(liver, masks["liver"], spacing)["dice"])
    assert summary["mean"]["kidneys"]["hd95_mm"] == pytest.approx(6.0)
    assert set(summary["mean"]) == {"liver", "kidneys"}  # spleen: no prediction file
    rows = (tmp_path / "eval" / "scores.csv").read_text().splitlines()
    assert rows[0] == "case,organ,dice,hd95_mm,nsd,volume_pred_ml,volume_ref_ml,volume_diff_ml" and len(rows) == 3
    assert "liver" in proc.stdout and "HD95" in proc.stdout
    # a prediction on another grid is refused with one line
    save_nifti(tmp_path / "pred" / "mr0_liver.nii.gz", liver[:, :, 1:].astype(np.uint8), img.affine)
    proc = run_evaluate(tmp_path, f"predictions={tmp_path / 'pred'}", f"references={root}", "data=nnunet",
                        f"data.labels={labels}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "mr0_liver.nii.gz: is not on the grid" in lines[0]


def test_evaluate_on_the_folder_layout_with_toy_references(tmp_path):
    from conftest import write_toy_subject

    for i in range(2):
        write_toy_subject(tmp_path / "ref", f"s{i}", seed=i)
    for organ in TOY_LABEL_NAMES:
        src = nib.load(tmp_path / "ref" / "s0" / "masks" / f"{organ}.nii.gz")
        save_nifti(tmp_path / "pred" / f"s0_{organ}.nii.gz", np.asanyarray(src.dataobj), src.affine)
    proc = run_evaluate(tmp_path, f"predictions={tmp_path / 'pred'}", f"references={tmp_path / 'ref'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert all(m["dice"] == 1.0 and m["hd95_mm"] == 0.0 and m["nsd"] == 1.0 for m in summary["mean"].values())
    assert summary["missing"] == ["s1"]
