import pytest
import torch

from landmark_unet.models.unet2d import UNet2d, UNet2dTrunk


@pytest.mark.parametrize("in_ch,out_ch,features,depth,size", [
    (1, 1, 4, 4, (32, 48)),
    (2, 1, 8, 4, (16, 16)),
    (2, 5, 4, 3, (24, 40)),
    (3, 2, 4, 1, (6, 10)),
])
def test_unet2d_shapes(in_ch, out_ch, features, depth, size):
    net = UNet2d(in_ch, out_ch, features=features, depth=depth)
    x = torch.randn(2, in_ch, *size)
    assert net(x).shape == (2, out_ch, *size)
    assert net.trunk(x).shape == (2, features, *size)


def test_default_widths_are_the_classic_unet():
    trunk = UNet2dTrunk(2)
    bottom = trunk.downs[-1][1][3]  # last conv of the bottom level
    assert bottom.out_channels == 1024
    assert trunk.inc[0].out_channels == 64


def test_indivisible_input_is_refused():
    net = UNet2d(1, 1, features=4, depth=4)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 1, 40, 32))


def test_gradients_reach_every_parameter():
    net = UNet2d(2, 1, features=4, depth=2)
    net(torch.randn(2, 2, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


from landmark_unet.models.multitask import UNet2dMultiTask  # noqa: E402
from landmark_unet.models.unet3d import UNet3d  # noqa: E402

MODELS = {
    "unet2d": (UNet2d, (2, 2, 32, 48), 1),
    "multitask": (UNet2dMultiTask, (2, 2, 32, 48), 5),
    "unet3d": (UNet3d, (2, 2, 5, 32, 48), 1),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fusion", ["none", "early", "late"])
def test_every_model_with_every_fusion(name, fusion):
    cls, shape, k = MODELS[name]
    net = cls(2, k, features=4, depth=4, fusion=fusion, map_channels=1)
    distance = torch.rand(shape[0], 1, *shape[2:])
    assert net(torch.randn(shape), distance).shape == (2, k, 32, 48)


def test_multitask_heads_read_the_2f_channel_map():
    net = UNet2dMultiTask(2, 5, features=8, depth=4)
    assert net.trunk.out_channels == 16  # the study's 128 at features=64
    assert len(net.head.branches) == 5
    assert net.head.branches[0][0][0].in_channels == 16
    late = UNet2dMultiTask(2, 5, features=8, depth=4, fusion="late", map_channels=1)
    assert all(b[0][0].in_channels == 17 for b in late.head.branches)


def test_depth5_stem_reduces_the_stack_to_one_slice():
    net = UNet3d(2, 1, features=4)
    assert net.trunk.inc[0].padding == (0, 1, 1)
    with pytest.raises(ValueError, match=r"\(B, C, 5, H, W\)"):
        net(torch.randn(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 2, 5, 24, 16))
    assert net.eval()(torch.randn(1, 2, 5, 16, 16)).shape == (1, 1, 16, 16)  # the study's smallest input


def test_multitask_loss_is_the_sum_of_the_per_organ_losses():
    from landmark_unet.lit.segmentation import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(UNet2dMultiTask(1, 5, features=4, depth=2), ["liver", "kidneys", "pancreas",
                                                                              "spleen", "bladder"], torch.optim.Adam)
    logits = torch.randn(3, 5, 8, 8)
    mask = (torch.rand(3, 5, 8, 8) > 0.7).float()
    per_organ = [torch.nn.functional.binary_cross_entropy_with_logits(logits[:, k], mask[:, k]) for k in range(5)]
    assert torch.allclose(module.loss(logits, mask), sum(per_organ))
    single = SegmentationModule(UNet2d(1, 1, features=4, depth=2), ["liver"], torch.optim.Adam)
    assert torch.allclose(single.loss(logits[:, :1], mask[:, :1]), per_organ[0])


def test_depth5_stem_stays_fp32_under_cpu_bf16_autocast():
    """bf16 3D convolutions have no fast CPU kernel: under CPU autocast the stem runs in fp32 (same values), the rest
    of the network in bf16."""
    from landmark_unet.models.unet3d import Stem3d

    torch.manual_seed(0)
    stem = Stem3d(2, 8).eval()
    x = torch.randn(2, 2, 5, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = stem(x)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, stem(x))
