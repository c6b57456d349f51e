import numpy as np
import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from landmark_unet.models.fusion import FusionSegmenter
from landmark_unet.models.unet2d import UNet2d


def build(fusion, seed=0, **kw):
    torch.manual_seed(seed)
    return UNet2d(2, 3, features=4, depth=2, fusion=fusion, map_channels=kw.get("L", 1))


@pytest.mark.parametrize("fusion,L", [("none", 1), ("early", 1), ("late", 1), ("early", 3), ("late", 2)])
def test_shapes(fusion, L):
    net = build(fusion, L=L)
    x, d = torch.randn(2, 2, 16, 24), torch.rand(2, L, 16, 24)
    assert net(x, d).shape == (2, 3, 16, 24)
    assert net.trunk.inc[0].in_channels == 2 + (L if fusion == "early" else 0)
    assert net.head.in_channels == 4 + (L if fusion == "late" else 0)


def test_none_and_late_share_identical_initial_weights():
    none, late = build("none"), build("late")
    a, b = none.trunk.state_dict(), late.trunk.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert none.head.weight.shape != late.head.weight.shape


def test_the_map_changes_the_output_only_when_fused():
    x = torch.randn(1, 2, 16, 16)
    d1, d2 = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    for fusion in ("none", "early", "late"):
        net = build(fusion).eval()
        same = torch.allclose(net(x, d1), net(x, d2))
        assert same == (fusion == "none"), fusion


def test_fused_model_needs_the_map():
    with pytest.raises(ValueError, match="needs the distance maps"):
        build("late")(torch.randn(1, 2, 16, 16))


def test_late_fusion_resizes_and_uses_the_middle_slice_of_a_stack():
    class Squash(torch.nn.Module):  # a stand-in depth-5 trunk: (B, C, 5, H, W) -> (B, 4, H/2, W/2)
        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x.mean(2), 2).repeat(1, 2, 1, 1)[:, :4]

    seen = {}

    class Head(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x[:, :1]

    net = FusionSegmenter(Squash(), Head(), "late")
    image = torch.randn(2, 2, 5, 8, 8)
    dist = torch.zeros(2, 1, 5, 8, 8)
    dist[:, :, 2] = 1.0  # only the middle slice is ones
    net(image, dist)
    assert seen["x"].shape == (2, 5, 4, 4)
    assert torch.all(seen["x"][:, 4] == 1.0)


def test_datamodule_adds_maps_that_match_the_landmarks(tmp_path):
    cfg = compose_train(["data.phantom.n_subjects=5", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
                         "fusion=early", "data.num_workers=0", "data.split.rounds=5"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    ds = dm.dataset("test", organ_slices_only=False)
    entry = ds.entries[0]
    hips = entry.landmarks
    k = int(round(hips[0, 2]))
    item = ds[int(np.flatnonzero((ds.index[:, 0] == 0) & (ds.index[:, 1] == k))[0])]
    d = item["distance"]
    assert d.shape == (1, *item["image"].shape[1:]) and d.dtype == torch.float32
    assert 0 < float(d[:, :48, :48].min()) and float(d.max()) <= 1.0
    peak = np.unravel_index(int(d[0].argmax()), d.shape[1:])
    assert np.hypot(peak[0] - hips[:, 0], peak[1] - hips[:, 1]).min() <= 1.5
    model = instantiate(cfg.model)
    assert model.net.trunk.inc[0].in_channels == 3  # fat, water, map
    image = item["image"][None].float()  # the loader's float16, as the DataModule widens it on the device
    assert model(image, item["distance"][None]).shape == (1, 1, 48, 48)
