"""Whole-volume inference: test-time augmentation never mirrors left and right, and undoes what it flips."""

import numpy as np
import pytest
import torch
from torch import nn

from landmark_unet.inference import predict_volume


class Spy(nn.Module):
    """Records every input; its logit map is the first channel (of the middle slice of a stack)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x[:, :1] if x.ndim == 4 else x[:, :1, x.shape[2] // 2]


@pytest.mark.parametrize("stack", [1, 5])
def test_tta_never_flips_left_right_and_undoes_its_flips(stack):
    """x (left-right, the H axis of a batch) is never flipped; y (anterior-posterior) and the order of a stack's
    slices are; each flip is undone, so that an equivariant model gives the same probabilities with and without."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(9, 1, 16, 16)).astype(np.float32)  # (Z, C, X, Y)
    spy = Spy()
    plain = predict_volume(spy, image, stack=stack, batch_size=9)
    spy.seen.clear()
    tta = predict_volume(spy, image, stack=stack, batch_size=9, tta=True)
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    batches = spy.seen
    assert len(batches) == (4 if stack > 1 else 2)
    reference = batches[0]
    for seen in batches:
        assert not torch.equal(seen, reference.flip(-2))  # a left-right mirror
        allowed = [(), (-1,)] + ([(2,), (2, -1)] if stack > 1 else [])
        assert any(torch.equal(seen, reference.flip(d) if d else reference) for d in allowed)
    assert any(torch.equal(seen, reference.flip(-1)) for seen in batches)  # the anterior-posterior flip is used


class RampVolume(nn.Module):
    """A volumetric patch network (stack 0) whose logit is the image plus a ramp along x (the H axis of a patch):
    equivariant under flips of z and y, not of x."""

    head = "sigmoid"
    sliding_window = {"patch_size": [8, 8, 8], "overlap": 0.5, "batch_size": 2}

    def __init__(self):
        super().__init__()
        self.net = type("Net", (), {"size_multiple": (1, 1, 1)})()

    def forward(self, x):
        return x[:, :1] + torch.linspace(-3, 3, x.shape[3]).view(1, 1, 1, -1, 1)


def test_volumetric_tta_never_flips_left_right():
    """One window covers the volume, so flips of z and y, undone, give the plain output exactly; a left-right flip
    would not (the ramp)."""
    image = np.random.default_rng(1).normal(size=(8, 1, 8, 8)).astype(np.float32)  # (Z, C, X, Y)
    plain = predict_volume(RampVolume(), image, stack=0)
    assert plain.shape == (1, 8, 8, 8)
    np.testing.assert_allclose(plain[0], 1 / (1 + np.exp(-(image[:, 0].transpose(1, 2, 0) + np.linspace(
        -3, 3, 8)[:, None, None]))), atol=1e-5)
    np.testing.assert_allclose(predict_volume(RampVolume(), image, stack=0, tta=True), plain, atol=1e-5)


def test_compiled_inference_network_predicts_as_the_plain_one_with_one_compilation():
    """predict.compile / evaluate.compile: the network compiled for inference (on the CPU with Inductor's freezing)
    gives the plain network's probabilities; a body whose depth is not a multiple of the batch gets its last batch
    filled, so the network compiles once for every depth (two bodies of 7 and 5 slices, batches of 4)."""
    from torch._dynamo.utils import counters

    from landmark_unet.inference import inference_network, predict_volume
    from landmark_unet.lit.segmentation import SegmentationModule
    from landmark_unet.models.unet2d import UNet2d

    torch.manual_seed(0)
    module = SegmentationModule(UNet2d(2, 1, features=4, depth=2), ["liver"], torch.optim.Adam, channels_last=True)
    plain = inference_network(module, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    compiled = inference_network(module, torch.device("cpu"), compile=True)
    rng = np.random.default_rng(0)
    for depth in (7, 5):
        image = rng.normal(size=(depth, 2, 12, 12)).astype(np.float32)
        expected = predict_volume(plain, image, batch_size=4, pad_multiple=4)
        got = predict_volume(compiled, image, batch_size=4, pad_multiple=4)
        assert got.shape == expected.shape == (1, 12, 12, depth)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
