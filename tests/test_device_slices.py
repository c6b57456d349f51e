"""data.on_device: batches gathered from slices held in the device's memory equal the host loader's, and train alike."""

import math

import pytest
import torch
from conftest import TINY, compose_train, write_toy_subject

from landmark_unet.data.cache import CacheJob, build_cache, ensure_distance_maps
from landmark_unet.data.device_slices import DeviceSlices, SliceRows
from landmark_unet.data.slices import SliceDataset, collate, slice_index
from landmark_unet.data.sources import read_folder_subject
from landmark_unet.errors import InputError


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """Two cached bodies of different sizes, with a 3D and an in-plane distance map each."""
    tmp = tmp_path_factory.mktemp("device")
    out = []
    for name, shape in (("a", (20, 18, 16)), ("b", (24, 14, 12))):
        d = write_toy_subject(tmp / "data", name, shape=shape)
        files = tuple(str(p) for p in sorted(d.rglob("*")) if p.is_file())
        out += build_cache([CacheJob(name, files, lambda d=d: read_folder_subject(d))], tmp / "cache")
    return out


def map_key(entries, space):
    keys = {ensure_distance_maps(e, {"encoding": "manhattan", "units": "voxel", "space": space, "combine": "sum",
                                     "pairs": 1, "sigma_mm": 20.0}) for e in entries}
    return keys.pop()


@pytest.mark.parametrize("stack", [1, 5])
@pytest.mark.parametrize("space", [None, "volume", "plane"])
def test_gathered_batches_equal_the_host_datasets(entries, stack, space):
    """Every field, bit for bit, for positions from both bodies in any order, edge slices of stacks included; with
    no maps, 3D maps (one per slice) and in-plane maps (one per body)."""
    key = None if space is None else map_key(entries, space)
    index = slice_index(entries, ["liver", "kidneys"], organ_slices_only=False)
    ds = SliceDataset(entries, [3, 7], index, [1, 0], ["liver", "kidneys"], (32, 32), distance_key=key, stack=stack)
    positions = [20, 2, 27, 0, 15, 16, len(index) - 1]  # b, a, b, a (first), a (last), b (first), b (last)
    expected = ds.__getitems__(positions)
    rows = SliceRows(index, "train").__getitems__(positions)
    assert rows["part"] == "train" and torch.equal(rows["rows"], torch.from_numpy(index[positions]))
    store = DeviceSlices(ds, "cpu")
    got = store.gather(rows["rows"])
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
    if space == "plane":
        assert store.maps.shape[0] == 2  # one in-plane map per body, not per slice
    assert store.nbytes() == sum(t.numel() * t.element_size()
                                 for t in (store.image, store.labels, *([] if store.maps is None else [store.maps])))


def test_slice_batches_travel_compact_and_widen_to_the_same_float32_values(entries):
    """Through the loader a batch carries the cache's float16 image and a uint8 mask (2.4x fewer bytes for two
    channels and one organ); widen (the DataModule's transfer to the device) gives float32 of the same values, and
    leaves float32 distance maps and index fields alone."""
    from landmark_unet.data.slices import widen

    key = map_key(entries, "volume")
    index = slice_index(entries, ["liver"], organ_slices_only=False)
    ds = SliceDataset(entries, [0, 1], index, [0, 1], ["liver"], (32, 32), distance_key=key)
    batch = ds.__getitems__([3, 20, 7])
    assert (batch["image"].dtype, batch["mask"].dtype, batch["distance"].dtype) == (
        torch.float16, torch.uint8, torch.float32)
    assert set(batch["mask"].unique().tolist()) == {0, 1}
    wide = widen(batch)
    assert wide["image"].dtype == wide["mask"].dtype == torch.float32
    assert torch.equal(wide["image"], batch["image"].double().float()) and torch.equal(wide["mask"].long(),
                                                                                        batch["mask"].long())
    assert wide["distance"] is batch["distance"] and wide["slice"] is batch["slice"]
    assert widen(wide)["image"] is wide["image"]  # a float32 batch (3D patches, bodies) passes unchanged


def test_rows_loader_batches_through_collate(entries):
    index = slice_index(entries, ["liver"], organ_slices_only=False)
    loader = torch.utils.data.DataLoader(SliceRows(index, "val"), batch_size=4, sampler=[5, 1, 20, 2],
                                         collate_fn=collate)
    batch = next(iter(loader))
    assert batch["part"] == "val" and batch["rows"].tolist() == index[[5, 1, 20, 2]].tolist()


@pytest.mark.parametrize("stack", [1, 5])
@pytest.mark.parametrize("crop", [16, 32, 48])
def test_cropped_batches_equal_the_host_datasets(entries, stack, crop):
    """data.crop on the device: for the same draws (positions with their origins), every field equals the host
    dataset's, bit for bit: windows inside a body, windows longer than a body's side (16 > b's Y of 14) and longer
    than the padded slice (24, which b fills along x: 32, 48), with 3D distance maps; and SliceRows places the
    corners as SliceDataset does."""
    key = map_key(entries, "volume")
    index = slice_index(entries, ["liver", "kidneys"], organ_slices_only=False)
    ds = SliceDataset(entries, [3, 7], index, [1, 0], ["liver", "kidneys"], (24, 24), distance_key=key, stack=stack,
                      crop=crop)
    origins = torch.rand(7, 2, generator=torch.Generator().manual_seed(crop + stack)).tolist()
    positions = [(p, u, v) for p, (u, v) in zip([20, 2, 27, 0, 15, 16, len(index) - 1], origins)]
    positions[1] = (2, 0.999999, 0.999999)  # the last window along both axes
    expected = ds.__getitems__(positions)
    rows = SliceRows(index, "train", crop, [e.shape[:2] for e in entries]).__getitems__(positions)["rows"]
    assert rows.shape == (7, 4)
    assert rows[:, 2:].tolist() == [list(ds._window(*entries[e].shape[:2], o)[:2])
                                    for e, (_, *o) in zip(rows[:, 0].tolist(), positions)]
    got = DeviceSlices(ds, "cpu").gather(rows)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
    assert got["image"].shape[-2:] == (crop, crop)
    assert got["image"].abs().sum() > 0 and got["mask"].sum() > 0  # the windows hold the bodies, not only zeros


def test_on_device_refuses_patches(tmp_path):
    from landmark_unet.data.datamodule import SliceDataModule

    cfg = compose_train(TINY + ["data.on_device=true", "model=unet3d_full", "data.patch_size=[16,32,32]"],
                        tmp_path).data
    with pytest.raises(InputError, match="data.on_device") as err:
        SliceDataModule(on_device=True, stack=cfg.stack, crop=cfg.crop, patch_size=cfg.patch_size)
    assert "data.stack=0" in str(err.value)


@pytest.mark.parametrize("extra", [["fusion=early", "augmentation=all"], ["model=unet3d", "fusion=late"],
                                   ["model=unet3d", "fusion=early", "data.crop=32", "augmentation=rotation5"]])
def test_training_on_device_equals_training_from_the_host_loader(tmp_path, extra, caplog, monkeypatch):
    """The same run with data.on_device true and false: the same validation curve and test Dice, to the bit (the
    batches are identical, so is everything after them); the device run gathered every part on the device, and
    the LightningModule's augmentation still ran on every training batch."""
    from landmark_unet.data.augment import AffineAugment
    from landmark_unet.train import train

    augmented = []
    plain_call = AffineAugment.__call__
    monkeypatch.setattr(AffineAugment, "__call__", lambda self, batch, *a, **k: augmented.append(
        len(batch["image"])) or plain_call(self, batch, *a, **k))
    results = []
    caplog.set_level("INFO", logger="landmark_unet.data.datamodule")
    for on_device in ("false", "true"):
        cfg = compose_train(TINY + extra + ["data.sampling=oversample", f"data.on_device={on_device}"],
                            tmp_path / on_device)
        results.append(train(cfg))
    host, device = results
    assert math.isfinite(host["history"]["val/loss"][0])
    assert device["history"]["val/loss"] == host["history"]["val/loss"]
    assert device["test"] == host["test"]
    gathered = {r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("data.on_device")}
    assert gathered == {"train", "val", "test"}
    if "augmentation=all" in extra:  # both runs augment every training batch
        assert len(augmented) % 2 == 0 and len(augmented) > 0
        assert augmented[: len(augmented) // 2] == augmented[len(augmented) // 2:]
