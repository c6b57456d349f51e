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
