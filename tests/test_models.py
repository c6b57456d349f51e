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


def _stem_and_reference(channels: int = 2, features: int = 8):
    """A Stem3d and the plain Conv3d / BatchNorm3d / ReLU sequence with the same weights."""
    from landmark_unet.models.unet3d import Stem3d

    stem = Stem3d(channels, features)
    ref = torch.nn.Sequential(
        torch.nn.Conv3d(channels, features, 3, padding=(0, 1, 1), bias=False), torch.nn.BatchNorm3d(features),
        torch.nn.ReLU(), torch.nn.Conv3d(features, features, 3, padding=(0, 1, 1), bias=False),
        torch.nn.BatchNorm3d(features), torch.nn.ReLU())
    with torch.no_grad():  # not the initial BatchNorm values, so that the affine part is exercised
        for bn in (stem[1], stem[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(stem.state_dict())  # same parameter names and shapes: old checkpoints load either way
    return stem, ref


@pytest.mark.parametrize("training", [True, False])
def test_depth5_stem_equals_3d_convolution_and_batchnorm(training):
    """The stem runs its 3x3x3 convolutions as 2D convolutions over depth windows and its BatchNorm over the slices
    folded into the batch: outputs, gradients and running statistics equal those of Conv3d + BatchNorm3d."""
    torch.manual_seed(0)
    stem, ref = _stem_and_reference()
    if not training:  # non-trivial running statistics first
        warm = torch.randn(4, 2, 5, 16, 16)
        for module in (stem, ref):
            module.train()(warm)
    stem.train(training)
    ref.train(training)
    x = torch.randn(3, 2, 5, 16, 12)
    out, expected = stem(x), ref(x).squeeze(2)
    assert out.shape == (3, 8, 16, 12)
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for p, q in zip(stem.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item())
    for (name, a), b in zip(stem.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_depth5_stem_runs_in_bf16_under_cpu_autocast():
    """As 2D convolutions the stem has fast bf16 CPU kernels, so it follows autocast like the rest of the network
    (as 3D convolutions it had to stay in fp32: benchmarks/README.md); the result is bf16-close to fp32."""
    torch.manual_seed(0)
    stem, _ = _stem_and_reference()
    stem.eval()
    x = torch.randn(2, 2, 5, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = stem(x)
    assert mixed.dtype == torch.bfloat16
    assert torch.allclose(mixed.float(), stem(x), atol=0.1)


@pytest.mark.parametrize("name", ["unet2d", "unet2d_multitask", "unet3d"])
def test_channels_last_and_folded_batchnorm_keep_the_function(name):
    """channels_last (the configs' default) changes the memory layout only, and inference's BatchNorm folding the
    number of passes only: both give the network's outputs up to rounding, and folding leaves the model as it was."""
    from landmark_unet.inference import fold_batchnorm
    from landmark_unet.lit.segmentation import SegmentationModule

    build, shape, k = {"unet2d": (lambda: UNet2d(2, 1, features=8, depth=2), (3, 2, 16, 16), 1),
                       "unet2d_multitask": (lambda: UNet2dMultiTask(2, 5, features=8, depth=2), (3, 2, 16, 16), 5),
                       "unet3d": (lambda: UNet3d(2, 1, features=8, depth=2), (3, 2, 5, 16, 16), 1)}[name]
    torch.manual_seed(0)
    x = torch.randn(shape)
    modules = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        module = SegmentationModule(build(), ["o"] * k, torch.optim.Adam, channels_last=channels_last)
        module.train()(x)  # running statistics
        modules.append(module.eval())
    plain, last = modules
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in last.parameters())
    reference = plain(x)
    assert torch.allclose(last(x), reference, atol=1e-5)
    folded = fold_batchnorm(last)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in last.modules())
    assert torch.allclose(folded(x), reference, atol=1e-5)
    assert fold_batchnorm(last.train()) is last  # batch statistics cannot be folded


@pytest.mark.slow
def test_compiled_network_keeps_its_parameter_names_and_outputs():
    """model.compile=true compiles the network in place: checkpoints keep the plain network's keys (so they load
    into an uncompiled model for prediction) and the outputs are the same up to rounding."""
    from landmark_unet.lit.segmentation import SegmentationModule

    modules = []
    for compile in (False, True):
        torch.manual_seed(0)
        modules.append(SegmentationModule(UNet2d(2, 1, features=4, depth=2), ["o"], torch.optim.Adam,
                                          channels_last=True, compile=compile).eval())
    plain, compiled = modules
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 2, 16, 16)
    assert torch.allclose(compiled(x), plain(x), atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_up_convolution_is_the_transposed_convolution_as_a_matrix_product(channels_last):
    """UpConv2x2 on the CPU (1x1 convolution + one copy) gives nn.ConvTranspose2d's output and gradients with the
    same parameters, and keeps the activations channels-last."""
    from landmark_unet.models.blocks import UpConv2x2

    torch.manual_seed(0)
    up = UpConv2x2(6, 3)
    reference = torch.nn.ConvTranspose2d(6, 3, kernel_size=2, stride=2)
    reference.load_state_dict(up.state_dict())  # the same keys and shapes: checkpoints are interchangeable
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=fmt)
    outputs, grads = [], []
    for m in (up, reference):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()  # a gradient that differs by pixel
        outputs.append(y)
        grads.append([xi.grad, m.weight.grad, m.bias.grad])
    assert outputs[0].shape == (2, 3, 10, 14)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_is_in_place_except_for_bf16_on_the_cpu(dtype):
    """blocks.ReLU: torch.relu's values and gradient; it overwrites its input, except bf16 on the CPU (where
    PyTorch's in-place kernels are slower), whose input stays as it was."""
    from landmark_unet.models.blocks import ReLU

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    inp = (x * 1).to(dtype)  # a non-leaf: autograd allows writing over it
    before = inp.detach().clone()
    y = ReLU()(inp)
    assert (y.data_ptr() == inp.data_ptr()) == (dtype == torch.float32)
    assert torch.equal(inp.detach(), y.detach() if dtype == torch.float32 else before)
    torch.testing.assert_close(y.float(), torch.relu(before).float())
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, (before > 0).float())


@pytest.mark.parametrize("model", ["unet2d", "unet3d", "unet2d_multitask"])
def test_norm_fp32_runs_every_batchnorm_in_fp32_under_bf16_autocast(model, tmp_path):
    """``model.norm_fp32=true`` reaches the module from the real config; under CPU bf16 autocast every BatchNorm
    then computes and returns fp32 (the default returns bf16), while the convolutions stay bf16 and the output keeps
    its shape."""
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    seen: dict[bool, set] = {}
    for norm_fp32 in (False, True):
        cfg = compose_train([f"model={model}", "model.net.features=8", f"model.norm_fp32={str(norm_fp32).lower()}"],
                            tmp_path)
        module = instantiate(cfg.model, optimizer=torch.optim.Adam)
        norms = [m for m in module.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        convs = [m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert norms and convs
        dtypes = {"norm": set(), "conv": set()}
        for kind, layers in (("norm", norms), ("conv", convs)):
            for m in layers:
                m.register_forward_hook(lambda m, a, out, found=dtypes[kind]: found.add(out.dtype))
        c = len(cfg.data.channels)
        x = torch.randn(2, c, 5, 32, 32) if model == "unet3d" else torch.randn(2, c, 32, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        assert out.shape[-2:] == (32, 32)
        assert dtypes["conv"] == {torch.bfloat16}
        seen[norm_fp32] = dtypes["norm"]
    assert seen == {False: {torch.bfloat16}, True: {torch.float32}}
