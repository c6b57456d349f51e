"""Depth-5 stacks and random crops from the slice dataset."""

import numpy as np
import pytest
import torch
from conftest import write_toy_subject

from landmark_unet.data.cache import CacheJob, build_cache, ensure_distance_maps
from landmark_unet.data.slices import SliceDataset, slice_index
from landmark_unet.data.sources import read_folder_subject


@pytest.fixture
def entry(tmp_path):
    d = write_toy_subject(tmp_path / "data", "a", shape=(20, 18, 16))
    files = tuple(str(p) for p in sorted(d.rglob("*")) if p.is_file())
    (e,) = build_cache([CacheJob("a", files, lambda: read_folder_subject(d))], tmp_path / "cache")
    return e


def dataset(entry, **kw):
    index = slice_index([entry], ["liver"], organ_slices_only=False)
    key = ensure_distance_maps(entry, {"encoding": "manhattan", "units": "voxel", "space": "volume",
                                       "combine": "sum", "pairs": 1, "sigma_mm": 20.0})
    return SliceDataset([entry], [0], index, [0, 1], ["liver", "kidneys"], (32, 32), distance_key=key, **kw)


@pytest.mark.parametrize("k,expected", [(0, [0, 0, 0, 1, 2]), (1, [0, 0, 1, 2, 3]), (7, [5, 6, 7, 8, 9]),
                                        (15, [13, 14, 15, 15, 15])])
def test_stack_assembly_repeats_the_edge_slices(entry, k, expected):
    ds = dataset(entry, stack=5)
    item = ds[k]
    assert item["image"].shape == (2, 5, 32, 32) and item["distance"].shape == (1, 5, 32, 32)
    assert item["mask"].shape == (2, 32, 32)
    vol = entry.image_volume()
    for j, src in enumerate(expected):
        np.testing.assert_array_equal(item["image"][:, j, :20, :18].numpy(), vol[src].astype(np.float32))
    labels = entry.label_volume()[k]
    np.testing.assert_array_equal(item["mask"][0, :20, :18].numpy(), (labels & 1) > 0)  # the middle slice's mask


def test_random_crop_keeps_image_mask_and_map_aligned(entry):
    torch.manual_seed(0)
    ds = dataset(entry, stack=5, crop=16)
    full = dataset(entry, stack=5)
    offsets = set()
    for _ in range(6):
        item = ds[7]
        assert item["image"].shape == (2, 5, 16, 16) and item["mask"].shape == (2, 16, 16)
        ref = full[7]
        # find the crop offset from the image and check mask and map follow it
        found = [(x0, y0) for x0 in range(5) for y0 in range(3)
                 if torch.equal(ref["image"][:, :, x0:x0 + 16, y0:y0 + 16], item["image"])]
        assert len(found) >= 1
        x0, y0 = found[0]
        offsets.add(found[0])
        assert torch.equal(ref["mask"][:, x0:x0 + 16, y0:y0 + 16], item["mask"])
        assert torch.equal(ref["distance"][:, :, x0:x0 + 16, y0:y0 + 16], item["distance"])
    assert len(offsets) > 1  # the crop is random


def test_2d_items_keep_their_shapes(entry):
    item = dataset(entry)[3]
    assert item["image"].shape == (2, 32, 32) and item["distance"].shape == (1, 32, 32)


def test_batched_fetch_gathers_several_bodies_in_order(tmp_path):
    """The DataLoader's batched fetch (``__getitems__``: one memory-mapped gather per body) returns what collating
    the items one by one returns, for positions from several bodies of different sizes in any order, and each
    sample holds its own slice of its own body."""
    from landmark_unet.data.slices import collate

    entries = []
    for name, shape in (("a", (20, 18, 16)), ("b", (24, 14, 12))):
        d = write_toy_subject(tmp_path / "data", name, shape=shape)
        files = tuple(str(p) for p in sorted(d.rglob("*")) if p.is_file())
        entries += build_cache([CacheJob(name, files, lambda d=d: read_folder_subject(d))], tmp_path / "cache")
    index = slice_index(entries, ["liver"], organ_slices_only=False)
    ds = SliceDataset(entries, [3, 7], index, [1, 0], ["liver", "kidneys"], (32, 32), stack=5)
    positions = [20, 2, 27, 0, 15, 16]  # b, a, b, a, a (last slice), b (first slice)
    loader = torch.utils.data.DataLoader(ds, batch_size=len(positions), sampler=positions, collate_fn=collate)
    batch = next(iter(loader))
    expected = torch.utils.data.default_collate([ds[i] for i in positions])
    assert batch.keys() == expected.keys()
    for key in batch:
        assert torch.equal(batch[key], expected[key]), key
    for i, p in enumerate(positions):
        e, k = index[p]
        entry = entries[e]
        x, y, z = entry.shape
        assert int(batch["subject"][i]) == [3, 7][e] and int(batch["slice"][i]) == k
        assert batch["size"][i].tolist() == [x, y]
        middle = entry.image_volume()[k][[1, 0]].astype(np.float32)  # channels in the order asked for
        np.testing.assert_array_equal(batch["image"][i, :, 2, :x, :y].numpy(), middle)
        assert not batch["image"][i, :, :, x:].any() and not batch["image"][i, :, :, :, y:].any()
        below = entry.image_volume()[max(k - 2, 0)][[1, 0]].astype(np.float32)
        np.testing.assert_array_equal(batch["image"][i, :, 0, :x, :y].numpy(), below)
        labels = entry.label_volume()[k]
        np.testing.assert_array_equal(batch["mask"][i, 0, :x, :y].numpy(), (labels & 1) > 0)
