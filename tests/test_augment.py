import pytest
import torch

from landmark_unet.data.augment import AffineAugment


def pattern(stack=False):
    """An off-centre L-shaped mask; the image and the map carry the same shape (plus a gradient in the map)."""
    mask = torch.zeros(2, 1, 48, 64)
    mask[:, :, 10:30, 12:18] = 1
    mask[:, :, 24:30, 12:40] = 1
    image = torch.cat([mask, 2 * mask], dim=1)
    distance = mask * 0.5 + 0.5
    if stack:
        image = image[:, :, None].repeat(1, 1, 5, 1, 1)
        distance = distance[:, :, None].repeat(1, 1, 5, 1, 1)
    return {"image": image, "mask": mask, "distance": distance}


@pytest.mark.parametrize("stack", [False, True])
@pytest.mark.parametrize("kind", [{"rotation": (20, 30)}, {"scale": (1.2, 1.3)}, {"shear": (15, 20)},
                                  {"rotation": (-10, 10), "scale": (1, 1.05), "shear": (-5, 5)}])
def test_image_mask_and_map_stay_aligned(stack, kind):
    batch = pattern(stack)
    g = torch.Generator().manual_seed(0)
    out = AffineAugment(**kind)(batch, generator=g)
    mask = out["mask"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}  # nearest: still binary
    assert not torch.equal(mask, batch["mask"])  # something moved
    img = out["image"]
    if stack:
        for j in range(1, 5):  # the same transform for all five slices
            assert torch.allclose(img[:, :, j], img[:, :, 0])
            assert torch.allclose(out["distance"][:, :, j], out["distance"][:, :, 0])
        img, dist = img[:, :, 2], out["distance"][:, :, 2]
    else:
        dist = out["distance"]
    for ch, scale in ((0, 1.0), (1, 2.0)):
        warped = img[:, ch:ch + 1] > 0.5 * scale
        inter = (warped & (mask > 0)).sum()
        union = (warped | (mask > 0)).sum()
        assert inter / union > 0.85, float(inter / union)
    assert (((dist > 0.75) & (mask > 0)).sum() / ((dist > 0.75) | (mask > 0)).sum()) > 0.85
    assert float(dist.min()) >= 0.5 - 1e-6  # border padding keeps the map's floor


def test_rotation_turns_the_pattern_the_right_way_round():
    """A 90-degree rotation of a square grid is exact: compare with torch.rot90."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = AffineAugment(rotation=(90, 90))({"image": x, "mask": x}, generator=torch.Generator().manual_seed(0))
    assert any(torch.allclose(out["mask"], torch.rot90(x, k, dims=(2, 3))) for k in (1, 3))


def test_identity_when_off():
    batch = pattern()
    assert AffineAugment()(batch) is batch


def test_bad_range():
    with pytest.raises(ValueError, match="rotation"):
        AffineAugment(rotation=(5, -5))


def test_module_augments_training_batches_only():
    from landmark_unet.lit.segmentation import SegmentationModule
    from landmark_unet.models.unet2d import UNet2d

    module = SegmentationModule(UNet2d(2, 1, features=4, depth=2), ["liver"], torch.optim.Adam,
                                augmentation={"rotation": [20, 30]})

    class FakeTrainer:
        training = True

    batch = pattern()
    module._trainer = FakeTrainer()
    assert not torch.equal(module.on_after_batch_transfer(batch, 0)["mask"], batch["mask"])
    FakeTrainer.training = False
    assert module.on_after_batch_transfer(batch, 0) is batch
