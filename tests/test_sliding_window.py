import numpy as np
import pytest
import torch

from landmark_unet.inference import fold_batchnorm
from landmark_unet.models.unet3d_full import UNet3dFull
from landmark_unet.sliding_window import predict_volume_3d


class Pointwise(torch.nn.Module):
    """A 1x1x1 convolution of the image (and the maps, when given): a voxel's output depends on that voxel only,
    so any tiling with normalised weights must give the whole-volume answer."""

    def __init__(self, channels, out, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv3d(channels, out, 1)

    def forward(self, image, distance=None):
        return self.conv(image if distance is None else torch.cat([image, distance], dim=1))


def volumes(shape, c=2, maps=None, seed=0):
    """A random (Z, C, X, Y) float16 image (the cache's layout) and maps: None, (Z, maps, X, Y) for maps > 0,
    in-plane (1, -maps, X, Y) for maps < 0."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(shape[0], c, *shape[1:])).astype(np.float16)
    if maps is None:
        return image, None
    depth = shape[0] if maps > 0 else 1
    return image, rng.uniform(size=(depth, abs(maps), *shape[1:])).astype(np.float32)


def whole(model, image, distance=None):
    """The model on the whole (Z, C, X, Y) volume at once: (K, X, Y, Z) logits."""
    x = torch.from_numpy(image.astype(np.float32)).permute(1, 0, 2, 3)[None]
    d = None
    if distance is not None:
        d = torch.from_numpy(distance).permute(1, 0, 2, 3)[None].expand(-1, -1, image.shape[0], -1, -1)
    with torch.no_grad():
        out = model(x) if d is None else model(x, d)
    return out[0].permute(0, 2, 3, 1)


def test_stitching_equals_one_full_volume_pass_where_the_volume_fits():
    torch.manual_seed(0)
    net = UNet3dFull(2, 3, features=4, depth=2, pool_kernels=[(1, 2, 2), (2, 2, 2)]).eval()
    image, _ = volumes((6, 16, 12))  # exactly the patch
    got = predict_volume_3d(net, image, None, (6, 16, 12), size_multiple=net.size_multiple)
    assert got.shape == (3, 16, 12, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch.sigmoid(whole(net, image)).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("maps", [None, 2, -2])  # no maps, 3D maps (Z, 2, X, Y), in-plane maps (1, 2, X, Y)
def test_any_tiling_of_a_pointwise_model_equals_the_whole_volume(maps):
    image, distance = volumes((21, 37, 29), maps=maps)
    model = Pointwise(2 + (0 if maps is None else 2), 3).eval()
    got = predict_volume_3d(model, image, distance, (8, 16, 16), size_multiple=(4, 8, 8), overlap=0.5, batch_size=3)
    assert got.shape == (3, 37, 29, 21)
    np.testing.assert_allclose(got, torch.sigmoid(whole(model, image, distance)).numpy(), atol=1e-5, rtol=0)


def test_softmax_head_drops_the_background():
    image, _ = volumes((10, 20, 18))
    model = Pointwise(2, 3).eval()  # background + 2 organs
    got = predict_volume_3d(model, image, None, (8, 8, 8), overlap=0.25, head="softmax")
    assert got.shape == (2, 20, 18, 10)
    want = torch.softmax(whole(model, image), dim=0)[1:].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert got.min() >= 0 and got.sum(axis=0).max() <= 1 + 1e-6


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fusion_end_to_end(fusion):
    torch.manual_seed(0)
    net = UNet3dFull(1, 2, features=4, depth=2, fusion=fusion, map_channels=2).eval()
    image, distance = volumes((9, 13, 11), c=1, maps=2)
    got = predict_volume_3d(net, image, distance, (4, 8, 8), size_multiple=net.size_multiple)
    assert got.shape == (2, 13, 11, 9)
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
    shifted = predict_volume_3d(net, image, distance[:, ::-1].copy(), (4, 8, 8), size_multiple=net.size_multiple)
    assert not np.allclose(got, shifted)  # the maps are used


def test_bf16_is_close_to_fp32_and_batchnorm_folds():
    torch.manual_seed(0)
    net = UNet3dFull(2, 2, features=4, depth=2, norm="batch").eval()
    image, _ = volumes((8, 12, 12))
    fp32 = predict_volume_3d(net, image, None, (8, 8, 8), size_multiple=(4, 4, 4))
    bf16 = predict_volume_3d(net, image, None, (8, 8, 8), size_multiple=(4, 4, 4), precision="bf16-mixed")
    assert np.abs(fp32 - bf16).max() < 0.05
    folded = predict_volume_3d(fold_batchnorm(net), image, None, (8, 8, 8), size_multiple=(4, 4, 4))
    np.testing.assert_allclose(folded, fp32, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"size_multiple": (4, 4, 3)}, "not divisible"),
    ({"head": "argmax"}, "unknown head"),
    ({"overlap": 1.0}, "overlap"),
])
def test_bad_arguments(kwargs, match):
    image, _ = volumes((8, 8, 8))
    with pytest.raises(ValueError, match=match):
        predict_volume_3d(Pointwise(2, 1), image, None, (8, 8, 8), **kwargs)
