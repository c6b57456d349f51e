"""nnU-Net and TotalSegmentator layouts: label names to organs, channels, femur-derived landmarks, bad input."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL_DIR, TOY_LABEL_NAMES, TOY_LABELS, toy_label_map, write_toy_nnunet, write_toy_subject

from landmark_unet.data.layouts import list_cases
from landmark_unet.data.nifti import save_nifti
from landmark_unet.data.organs import ORGANS
from landmark_unet.data.sources import read_case, read_folder_subject
from landmark_unet.errors import InputError

needs_real = pytest.mark.skipif(not (REAL_DIR / "example_ct.nii.gz").exists(),
                                reason=f"real fixtures not found in {REAL_DIR}")
# label values of the real fixtures (PROVENANCE.md): TotalSegmentator's total_mr and total tasks
MR_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7, "urinary_bladder": 16}
CT_LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7, "urinary_bladder": 21,
             "femur_left": 75, "femur_right": 76}


@pytest.fixture
def toy_pair(tmp_path):
    """The same six toy subjects in the folder layout and in the nnU-Net layout."""
    folder = tmp_path / "folder"
    for i in range(6):
        write_toy_subject(folder, f"s{i:02d}", seed=i)
    return folder, write_toy_nnunet(tmp_path / "nnunet", folder)


def test_nnunet_reads_like_the_folder_layout(toy_pair):
    folder, nnunet = toy_pair
    cases = list_cases("nnunet", nnunet, ORGANS, labels=TOY_LABEL_NAMES, channel_names=["fat", "water"])
    assert [c.name for c in cases] == [f"s{i:02d}" for i in range(6)]
    a = read_case(cases[2], ("fat", "water"), ORGANS, landmarks="none")
    b = read_folder_subject(folder / "s02", ("fat", "water"), ORGANS, landmarks="none")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)  # kidneys: right + left labels united
    assert a.mask("kidneys").sum() == (toy_label_map(folder / "s02")[0] == TOY_LABELS["kidney_left"]).sum() + \
        (toy_label_map(folder / "s02")[0] == TOY_LABELS["kidney_right"]).sum()


def test_nnunet_single_channel_and_decathlon_json(toy_pair, tmp_path):
    _, nnunet = toy_pair
    msd = tmp_path / "msd"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    training = []
    for case in ("s00", "s01"):
        shutil.copy(nnunet / "imagesTr" / f"{case}_0000.nii.gz", msd / "imagesTr" / f"{case}.nii.gz")
        shutil.copy(nnunet / "labelsTr" / f"{case}.nii.gz", msd / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    shutil.copy(msd / "imagesTr" / "s00.nii.gz", msd / "imagesTr" / "._s00.nii.gz")  # macOS junk of the download
    meta = {"modality": {"0": "MRI"}, "labels": {str(v): k for k, v in TOY_LABELS.items()}, "training": training}
    (msd / "dataset.json").write_text(json.dumps(meta))
    cases = list_cases("nnunet", msd, ["liver"], labels={"liver": ["liver"]}, channel_names=["single"])
    assert [c.name for c in cases] == ["s00", "s01"]
    s = read_case(cases[1], ("single",), ["liver"], landmarks="none")
    ref = read_case(list_cases("nnunet", nnunet, ["liver"], labels={"liver": ["liver"]},
                               channel_names=["single"])[1], ("single",), ["liver"], landmarks="none")
    np.testing.assert_array_equal(s.image, ref.image)
    np.testing.assert_array_equal(s.masks, ref.masks)
    assert s.channels == ("single",)


def test_case_filter(toy_pair):
    _, nnunet = toy_pair
    cases = list_cases("nnunet", nnunet, ["liver"], labels={"liver": ["liver"]}, include=["s0[2-3]"])
    assert [c.name for c in cases] == ["s02", "s03"]


def _sphere(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius).astype(np.uint8)


def test_totalseg_layout_and_femoral_heads(tmp_path):
    shape, affine = (40, 30, 36), np.diag([-4.0, -4.0, 4.0, 1.0])  # LPS, 4 mm
    case = tmp_path / "ts" / "s0001"
    rng = np.random.default_rng(0)
    save_nifti(case / "ct.nii.gz", rng.normal(0, 50, shape).astype(np.float32), affine)
    seg = case / "segmentations"
    for name in ("liver", "kidney_right", "kidney_left", "pancreas", "spleen", "urinary_bladder"):
        m = np.zeros(shape, np.uint8)
        m[{"kidney_right": slice(5, 8), "kidney_left": slice(30, 33)}.get(name, slice(10, 12)), 10:14, 25:30] = 1
        save_nifti(seg / f"{name}.nii.gz", m, affine)
    # femurs: a head (radius 5 voxels = 20 mm) on top of a thin shaft; file x grows to the patient's left (LPS)
    heads = {"femur_right": (10, 15, 12), "femur_left": (30, 15, 12)}
    for name, (x, y, z) in heads.items():
        m = _sphere(shape, (x, y, z), 5)
        m[x - 2:x + 3, y - 2:y + 3, :z] = 1  # shaft, 20 mm across
        save_nifti(seg / f"{name}.nii.gz", m, affine)
    (case_files,) = list_cases("totalseg", tmp_path / "ts", ORGANS)
    s = read_case(case_files, ("single",), ORGANS, landmarks="file", modality="ct")
    assert s.mask("kidneys").sum() == 2 * 3 * 4 * 5
    world = (np.c_[s.landmarks, np.ones(2)] @ s.affine.T)[:, :3]
    expected = (np.c_[np.array([heads["femur_right"], heads["femur_left"]]), np.ones(2)] @ affine.T)[:, :3]
    np.testing.assert_allclose(world, expected, atol=1e-6)  # row 0 the right head, row 1 the left
    assert world[0, 0] > world[1, 0]  # RAS+: the right head has the larger world x


@needs_real
def test_real_totalseg_ct_case(tmp_path):
    """The real CT in the TotalSegmentator layout: organ masks from the label map, hips from the femur masks."""
    label_img = nib.load(REAL_DIR / "example_seg_fast_force_split.nii.gz")
    label = np.asanyarray(label_img.dataobj)
    case = tmp_path / "ts" / "ct01"
    case.mkdir(parents=True)
    shutil.copy(REAL_DIR / "example_ct.nii.gz", case / "ct.nii.gz")
    for name, value in CT_LABELS.items():
        save_nifti(case / "segmentations" / f"{name}.nii.gz", (label == value).astype(np.uint8), label_img.affine)
    (c,) = list_cases("totalseg", tmp_path / "ts", ORGANS)
    s = read_case(c, ("single",), ORGANS, landmarks="file", modality="ct")
    for organ, names in TOY_LABEL_NAMES.items():
        assert s.mask(organ).sum() == sum(int((label == CT_LABELS[n]).sum()) for n in names)
    world = (np.c_[s.landmarks, np.ones(2)] @ s.affine.T)[:, :3]
    assert world[0, 0] > world[1, 0]
    assert 140 < np.linalg.norm(world[0] - world[1]) < 220  # femoral heads of an adult
    for row, value in zip(s.landmarks.round().astype(int), (CT_LABELS["femur_right"], CT_LABELS["femur_left"])):
        file_voxel = np.round(np.linalg.inv(label_img.affine) @ s.affine @ [*row, 1])[:3].astype(int)
        assert label[tuple(file_voxel)] == value  # the centre lies inside its own femur


@needs_real
def test_real_mri_in_the_nnunet_layout(tmp_path):
    root = tmp_path / "nn"
    (root / "imagesTr").mkdir(parents=True)
    shutil.copy(REAL_DIR / "example_mr_sm.nii.gz", root / "imagesTr" / "mr01_0000.nii.gz")
    (root / "labelsTr").mkdir()
    shutil.copy(REAL_DIR / "example_seg_mr.nii.gz", root / "labelsTr" / "mr01.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, **MR_LABELS}}))
    (c,) = list_cases("nnunet", root, ORGANS, labels=TOY_LABEL_NAMES, channel_names=["single"])
    s = read_case(c, ("single",), ORGANS, landmarks="optional")
    label = np.asanyarray(nib.load(REAL_DIR / "example_seg_mr.nii.gz").dataobj)
    assert s.mask("kidneys").sum() == int(np.isin(label, (2, 3)).sum()) > 0
    assert s.mask("liver").sum() == int((label == 5).sum()) > 0
    assert s.mask("bladder").sum() == 0  # outside this field of view: an empty mask, not an error
    assert nib.aff2axcodes(s.affine) == ("R", "A", "S") and s.landmarks is None


# -- bad input: one line naming the file or key -------------------------------------------------------------------
def test_label_name_missing_from_dataset_json(toy_pair):
    _, nnunet = toy_pair
    with pytest.raises(InputError, match=r"dataset.json: label 'left kidney' \(data.labels.kidneys\) is not in"):
        list_cases("nnunet", nnunet, ["kidneys"], labels={"kidneys": ["left kidney"]})


def test_organ_without_label_names(toy_pair):
    _, nnunet = toy_pair
    with pytest.raises(InputError, match="data.labels.spleen: no label name"):
        list_cases("nnunet", nnunet, ["spleen"], labels={"liver": ["liver"]})


def test_missing_dataset_json_and_channel(toy_pair):
    _, nnunet = toy_pair
    with pytest.raises(InputError, match=r"has no channel 2 \(data.channel_names: single\)"):
        list_cases("nnunet", nnunet, ["liver"], labels={"liver": ["liver"]}, channel_names=["fat", "water", "single"])
    (nnunet / "dataset.json").unlink()
    with pytest.raises(InputError, match="dataset.json: file is missing"):
        list_cases("nnunet", nnunet, ["liver"], labels={"liver": ["liver"]})


@pytest.mark.parametrize("kind", ["grid", "4d", "truncated", "non-integer"])
def test_bad_label_map(toy_pair, kind):
    _, nnunet = toy_pair
    path = nnunet / "labelsTr" / "s01.nii.gz"
    img = nib.load(path)
    data, affine = np.asanyarray(img.dataobj), img.affine
    if kind == "grid":
        save_nifti(path, data, affine @ np.diag([1.0, 1.0, 1.2, 1.0]))
        expect = "affine differs from that of s01_0000.nii.gz"
    elif kind == "4d":
        save_nifti(path, np.stack([data, data], axis=-1), affine)
        expect = "expected a 3D volume"
    elif kind == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        expect = "cannot read NIfTI"
    else:
        save_nifti(path, data.astype(np.float32) + 0.5, affine)
        expect = "label map holds non-integer values"
    case = list_cases("nnunet", nnunet, ORGANS, labels=TOY_LABEL_NAMES, channel_names=["fat", "water"])[1]
    with pytest.raises(InputError) as err:
        read_case(case, ("fat", "water"), ORGANS, landmarks="none")
    assert str(err.value).startswith(str(path)) and expect in str(err.value)


# -- through the real config ---------------------------------------------------------------------------------------
def nnunet_overrides(root, labels="{liver:[liver],kidneys:[kidney_right,kidney_left]}"):
    return ["data=nnunet", f"data.root={root}", f"data.labels={labels}", "data.channel_names=[single]",
            "content=single", "model.net.features=4", "data.num_workers=0", "data.batch_size=8",
            "data.split.rounds=3", "trainer.max_epochs=1"]


def test_training_on_an_nnunet_dataset(toy_pair, tmp_path):
    from conftest import compose_train

    from landmark_unet.train import train

    _, nnunet = toy_pair
    cfg = compose_train(nnunet_overrides(nnunet) + ["organ=kidneys"], tmp_path)
    assert cfg.data.normalisation == "auto" and list(cfg.data.channels) == ["single"]
    metrics = train(cfg)
    assert set(metrics["test"]) == {"kidneys"} and len(metrics["test"]["kidneys"]["per_body"]) == 2


def test_organ_absent_from_the_whole_dataset(toy_pair, tmp_path):
    from conftest import compose_train
    from hydra.utils import instantiate

    _, nnunet = toy_pair
    for p in (nnunet / "labelsTr").iterdir():  # no case holds a liver any more
        img = nib.load(p)
        data = np.asanyarray(img.dataobj).copy()
        data[data == TOY_LABELS["liver"]] = 0
        save_nifti(p, data, img.affine)
    cfg = compose_train(nnunet_overrides(nnunet) + ["organ=liver"], tmp_path)
    with pytest.raises(InputError, match=r"^organ: liver is empty in every case of .*check data.labels"):
        instantiate(cfg.data).setup("fit")


def test_content_must_match_the_dataset(toy_pair, tmp_path):
    from conftest import compose_train
    from hydra.utils import instantiate

    _, nnunet = toy_pair
    cfg = compose_train(nnunet_overrides(nnunet)[:-4] + ["content=both"], tmp_path)
    with pytest.raises(InputError, match=r"lacks channel\(s\) \['fat', 'water'\] \(has single; see content=\)"):
        instantiate(cfg.data).setup("fit")


AMOS_LABELS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
               "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
               "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
               "15": "prostate/uterus"}


@pytest.mark.parametrize("config, picked", [("amos22_ct", ["amos_0001", "amos_0410"]),
                                            ("amos22_mri", ["amos_0507", "amos_0600"])])
def test_amos22_configs_pick_their_modality(tmp_path, config, picked):
    """AMOS22 as downloaded: CT and MRI cases share imagesTr; dataset.json in the Decathlon's form."""
    from conftest import compose_train
    from hydra.utils import instantiate

    root = tmp_path / "amos22"
    training = []
    for name in ("amos_0001", "amos_0410", "amos_0507", "amos_0600"):
        save_nifti(root / "imagesTr" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
        save_nifti(root / "labelsTr" / f"{name}.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": AMOS_LABELS,
                                                   "training": training}))
    cfg = compose_train([f"data={config}", f"data.root={root}", "content=single", "organ=all"], tmp_path)
    dm = instantiate(cfg.data)
    cases = dm.list_cases(root)
    assert [c.name for c in cases] == picked
    assert {o: [p.values for p in c] for o, c in cases[0].labels.items()} == {
        "liver": [(6,)], "kidneys": [(2, 3)], "pancreas": [(10,)], "spleen": [(1,)], "bladder": [(14,)]}


@pytest.mark.parametrize("config", ["totalseg_ct", "totalseg_mri", "msd_liver", "msd_pancreas", "msd_spleen"])
def test_ready_dataset_configs_compose(tmp_path, config):
    from conftest import compose_train

    cfg = compose_train([f"data={config}", "data.root=/nowhere", "content=single"], tmp_path)
    assert cfg.data.source in ("nnunet", "totalseg") and cfg.data.normalisation == "auto"
    assert cfg.data.modality == ("mri" if config.endswith("mri") else "ct")
