import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from landmark_unet.data.organs import organ_bit
from landmark_unet.data.patches import PatchDataset, crop_patch, foreground_coordinates
from landmark_unet.data.slices import collate


class Entry:
    """A stand-in CacheEntry: image (Z, C, X, Y), packed labels (Z, X, Y), distance maps (Z', L, X, Y)."""

    def __init__(self, image, labels, distance=None):
        self.image, self.labels, self.distance = image, labels, distance

    def image_volume(self):
        return self.image

    def label_volume(self):
        return self.labels

    def distance_volume(self, key):
        return self.distance


SHAPE, PATCH = (20, 24, 24), (8, 8, 8)
ORGAN = (slice(3, 5), slice(10, 12), slice(18, 20))  # a 2 x 2 x 2 liver


def small_organ_entry():
    labels = np.zeros(SHAPE, np.uint8)
    labels[ORGAN] = organ_bit("liver")
    image = np.random.default_rng(0).normal(size=(SHAPE[0], 2, *SHAPE[1:])).astype(np.float16)
    return Entry(image, labels)


def hit_chance_of_a_random_patch() -> float:
    """P(a uniformly placed patch inside the volume overlaps ORGAN): a product over axes, the origins being
    independent per axis; along an axis, origin o overlaps [a, b] iff a - p + 1 <= o <= b, o in [0, n - p]."""
    q = 1.0
    for n, p, s in zip(SHAPE, PATCH, ORGAN):
        a, b = s.start, s.stop - 1
        q *= (min(b, n - p) - max(a - p + 1, 0) + 1) / (n - p + 1)
    return q


def foreground_share(fraction: float, draws: int = 600) -> tuple[float, float]:
    ds = PatchDataset([small_organ_entry()], ["liver"], [0, 1], PATCH, fraction, draws, seed=3)
    items = [ds[i] for i in range(draws)]
    hits = np.mean([item["mask"].sum().item() > 0 for item in items])
    forced = np.mean([item["forced"] for item in items])
    return float(hits), float(forced)


@pytest.mark.parametrize("fraction", [1 / 3, 0.0])
def test_foreground_share_matches_its_expected_value(fraction):
    q = hit_chance_of_a_random_patch()
    assert 0.05 < q < 0.1  # small enough that oversampling shows
    expected = fraction + (1 - fraction) * q  # forced patches always hold it; the others by chance
    hits, forced = foreground_share(fraction)
    tolerance = 4 * math.sqrt(expected * (1 - expected) / 600)  # 4 binomial standard deviations
    assert abs(hits - expected) < tolerance, (hits, expected)
    assert abs(forced - fraction) < 4 * math.sqrt(max(fraction * (1 - fraction), 1e-12) / 600) + 1e-9


def test_fraction_one_always_holds_foreground_and_small_organs_get_their_share():
    labels = np.zeros(SHAPE, np.uint8)
    labels[ORGAN] = organ_bit("pancreas")
    labels[:, :12, :12] |= organ_bit("liver")  # a big organ
    image = np.zeros((SHAPE[0], 1, *SHAPE[1:]), np.float32)
    ds = PatchDataset([Entry(image, labels)], ["liver", "pancreas"], [0], PATCH, 1.0, 200, seed=1)
    masks = torch.stack([ds[i]["mask"] for i in range(200)])  # (N, K, D, H, W)
    assert (masks.flatten(1).sum(1) > 0).all()
    pancreas = (masks[:, 1].flatten(1).sum(1) > 0).float().mean().item()
    assert pancreas > 0.4  # the organ is chosen uniformly, not by voxel count (it has 8 voxels of 5768)


def test_items_are_a_function_of_seed_epoch_and_index():
    entries = [small_organ_entry(), small_organ_entry()]

    def dataset(seed=0, epoch=0):
        ds = PatchDataset(entries, ["liver"], [1], PATCH, 0.5, 20, seed=seed, subject_ids=[7, 9])
        ds.set_epoch(epoch)
        return ds

    a, b = dataset(), dataset()
    order = [5, 3, 19, 0]
    for i, j in zip(order, reversed(order)):  # any order, any instance (DataLoader workers)
        b[j]
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["origin"], y["origin"]) and x["subject"] == y["subject"] in (7, 9)

    def draws(ds):
        return [(ds[i]["subject"], tuple(ds[i]["origin"].tolist())) for i in range(20)]

    assert draws(dataset(epoch=0)) == draws(dataset(epoch=0))
    assert draws(dataset(epoch=1)) != draws(dataset(epoch=0))
    assert draws(dataset(seed=1)) != draws(dataset(seed=0))


def test_a_volume_smaller_than_the_patch_is_padded_and_stays_aligned():
    z, x, y = 3, 5, 6
    image = np.zeros((z, 1, x, y), np.float16)
    image[:, 0] = 1.0
    image[2, 0, 4, 1] = 7.0  # the planted voxel
    labels = np.zeros((z, x, y), np.uint8)
    labels[2, 4, 1] = organ_bit("kidneys")
    distance = np.full((1, 2, x, y), 0.5, np.float32)  # in-plane maps (Z' = 1)
    entry = Entry(image, labels, distance)
    for fraction in (0.0, 1.0):
        ds = PatchDataset([entry], ["kidneys"], [0], (4, 8, 8), fraction, 3, distance_key="k")
        for i in range(3):
            item = ds[i]
            assert item["image"].shape == (1, 4, 8, 8) and item["image"].dtype == torch.float32
            assert item["mask"].shape == (1, 4, 8, 8) and item["distance"].shape == (2, 4, 8, 8)
            assert item["origin"].tolist() == [0, 0, 0]  # padded at the high end only, like the 2D slices
            assert item["size"].tolist() == [z, x, y]
            assert item["image"][0, 2, 4, 1] == 7.0 and item["mask"][0, 2, 4, 1] == 1
            assert item["mask"].sum() == 1
            assert item["image"][0, :z, :x, :y].min() == 1.0 and item["image"].sum() == z * x * y - 1 + 7
            assert (item["distance"][:, :z, :x, :y] == 0.5).all() and item["distance"].sum() == 2 * z * x * y * 0.5


def test_crop_patch_pads_with_zeros_at_any_origin():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(5, 3, 6, 7)).astype(np.float16)
    origin, size = (-2, 3, -1), (4, 5, 9)
    padded = np.pad(vol.astype(np.float32), ((4, 4), (0, 0), (4, 4), (4, 4)))  # a reference by np.pad
    o = [v + 4 for v in origin]
    want = padded[o[0]:o[0] + 4, :, o[1]:o[1] + 5, o[2]:o[2] + 9].transpose(1, 0, 2, 3)
    got = crop_patch(vol, origin, size)
    assert got.dtype == np.float32 and got.shape == (3, 4, 5, 9)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(crop_patch(vol, origin, size, channels=[2, 0]), want[[2, 0]])
    np.testing.assert_array_equal(crop_patch(vol[:, 0], origin, size), want[0])
    assert not crop_patch(vol, (10, 0, 0), size).any()  # wholly outside


def test_foreground_coordinates_are_subsampled_evenly():
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[:, 1:3, 1:3] = 1
    all_ = foreground_coordinates(labels, 1)
    few = foreground_coordinates(labels, 1, max_points=10)
    assert len(all_) == 40 and len(few) == 10
    assert sorted(set(few[:, 0].tolist())) == list(range(10))  # every slice of the organ kept
    assert len(foreground_coordinates(labels, 2)) == 0


def test_batches_collate():
    image = np.ones((4, 2, 6, 6), np.float16)
    labels = np.zeros((4, 6, 6), np.uint8)
    distance = np.ones((4, 3, 6, 6), np.float32)
    ds = PatchDataset([Entry(image, labels, distance)], ["liver", "spleen"], [1], (4, 8, 8), 1 / 3, 5,
                      distance_key="k")
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 1, 4, 8, 8) and batch["mask"].shape == (2, 2, 4, 8, 8)
    assert batch["distance"].shape == (2, 3, 4, 8, 8) and batch["size"].shape == (2, 3)
    assert batch["subject"].tolist() == [0, 0] and batch["forced"].tolist() == [False, False]  # no foreground


def test_memory_mapped_cache_entries_give_the_same_patches(tmp_path):
    from landmark_unet.data.cache import load_entry

    entry = small_organ_entry()
    entry.distance = np.random.default_rng(1).uniform(size=(SHAPE[0], 2, *SHAPE[1:])).astype(np.float32)
    np.save(tmp_path / "image.npy", entry.image)
    np.save(tmp_path / "labels.npy", entry.labels)
    np.save(tmp_path / "distance-k.npy", entry.distance)
    (tmp_path / "meta.json").write_text('{"name": "s0"}')
    cached = load_entry(tmp_path)
    a, b = (PatchDataset([e], ["liver"], [1, 0], PATCH, 0.5, 4, seed=2, distance_key="k") for e in (entry, cached))
    for i in range(4):
        x, y = a[i], b[i]
        for key in ("image", "mask", "distance", "origin", "size"):
            assert torch.equal(x[key], y[key]), key
