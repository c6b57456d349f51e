"""Losses against hand-worked values and MONAI's DiceCELoss; the recipe's config options compose and train."""

import math

import pytest
import torch
from conftest import TINY, compose_train
from hydra.utils import instantiate
from monai.losses import DiceCELoss as MonaiDiceCELoss

from landmark_unet.heads import class_map, organ_masks, probabilities
from landmark_unet.losses import (
    BCELoss,
    DiceBCELoss,
    DiceCELoss,
    deep_supervision_loss,
    deep_supervision_weights,
)


def test_bce_is_summed_over_organs():
    logits, target = torch.zeros(2, 3, 4, 4), torch.randint(0, 2, (2, 3, 4, 4)).float()
    assert BCELoss()(logits, target).item() == pytest.approx(3 * math.log(2))  # -log(sigmoid(0)) per pixel


def test_dice_bce_by_hand():
    target = torch.zeros(1, 1, 2, 4)
    target[..., :2] = 1  # 4 of 8 pixels
    logits = torch.zeros_like(target)  # p = 0.5 everywhere
    s = 1e-5
    dice = (2 * 0.5 * 4 + s) / (0.5 * 8 + 4 + s)
    assert DiceBCELoss(smooth=s)(logits, target).item() == pytest.approx(math.log(2) + 1 - dice, rel=1e-6)
    sure = torch.where(target > 0, 30.0, -30.0)  # confident and right: both terms ~0
    assert DiceBCELoss()(sure, target).item() == pytest.approx(0, abs=1e-6)
    absent = torch.full_like(target, -30.0)  # an organ absent from the whole batch and not predicted
    assert DiceBCELoss()(absent, torch.zeros_like(target)).item() == pytest.approx(0, abs=1e-5)


def test_dice_bce_equals_monai_dice_ce_per_organ():
    """MONAI's DiceCELoss on one sigmoid channel is soft Dice (batch=True: over the whole batch) + BCE; ours sums
    that over the organ channels."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, generator=g) * 3
    target = (torch.rand(3, 4, 16, 16, generator=g) > 0.7).float()
    target[:, 2] = 0  # one organ absent from the batch
    monai = MonaiDiceCELoss(sigmoid=True, batch=True)
    expected = sum(monai(logits[:, k:k + 1], target[:, k:k + 1]) for k in range(4))
    assert DiceBCELoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_map_resolves_overlaps_by_priority():
    organs = ["liver", "kidneys", "pancreas"]
    mask = torch.zeros(1, 3, 1, 5)
    mask[0, 0, 0, :3] = 1  # liver on 0..2
    mask[0, 2, 0, 2:4] = 1  # pancreas on 2..3: overlaps the liver at 2
    mask[0, 1, 0, 0] = 1  # kidneys overlap the liver at 0
    assert class_map(mask, organs).tolist() == [[[2, 1, 3, 3, 0]]]  # kidneys and pancreas beat the liver


def test_dice_ce_by_hand():
    """Two classes (background, liver), logits 0: p = 0.5 everywhere; CE = log 2; the liver covers 4 of 8 pixels."""
    target = torch.zeros(1, 1, 2, 4)
    target[..., :2] = 1
    s = 1e-5
    dice = (2 * 0.5 * 4 + s) / (0.5 * 8 + 4 + s)
    loss = DiceCELoss(["liver"], smooth=s)(torch.zeros(1, 2, 2, 4), target)
    assert loss.item() == pytest.approx(math.log(2) + 1 - dice, rel=1e-6)
    sure = torch.cat([torch.where(target > 0, -30.0, 30.0), torch.where(target > 0, 30.0, -30.0)], dim=1)
    assert DiceCELoss(["liver"])(sure, target).item() == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="2 logit channels"):
        DiceCELoss(["liver"])(torch.zeros(1, 1, 2, 4), target)


@pytest.mark.parametrize("spatial", [(16, 16), (4, 8, 8)])
def test_dice_ce_equals_monai(spatial):
    """MONAI's DiceCELoss with a softmax over background + organs, Dice over the organs only (nnU-Net), whole-batch
    Dice; the same on 2D slices and 3D patches."""
    organs = ["liver", "kidneys", "pancreas", "spleen", "bladder"]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, *spatial, generator=g) * 3
    target = (torch.rand(3, 5, *spatial, generator=g) > 0.8).float()  # overlapping masks, as separate files give
    target[:, 3] = 0  # the spleen absent from the batch
    labels = class_map(target, organs)[:, None]
    monai = MonaiDiceCELoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)(logits, labels)
    assert DiceCELoss(organs)(logits, target).item() == pytest.approx(monai.item(), rel=1e-5)


def test_softmax_masks_are_the_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 8, 8, generator=g) * 2
    prob = probabilities(logits, "softmax")  # (B, 3, H, W): the organs' classes only
    assert prob.shape == (2, 3, 8, 8) and bool((prob.sum(dim=1) <= 1 + 1e-6).all())
    masks = organ_masks(prob, "softmax")
    argmax = logits.argmax(dim=1)
    for k in range(3):
        assert torch.equal(masks[:, k], argmax == k + 1)
    assert torch.equal(torch.from_numpy(organ_masks(prob[0].numpy(), "softmax", dim=0)), masks[0])
    assert torch.equal(organ_masks(prob, "sigmoid", 0.3), prob > 0.3)


def test_sgd_poly_decays_to_zero_over_the_run(tmp_path):
    cfg = compose_train(["optim=sgd_poly", "trainer.max_epochs=10"], tmp_path)
    net = torch.nn.Linear(2, 2)
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    scheduler = instantiate(cfg.model.scheduler)(optimizer=optimizer)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-2 * (1 - e / 10) ** 0.9 for e in range(10)])


@pytest.mark.parametrize("overrides", [["loss=dice_bce", "optim=sgd_poly"], ["loss=dice_bce", "model=unet3d"]])
def test_recipe_options_train(tmp_path, overrides):
    from landmark_unet.train import train

    cfg = compose_train(TINY + overrides, tmp_path)
    assert cfg.model.loss._target_.endswith("DiceBCELoss")
    metrics = train(cfg)
    assert math.isfinite(metrics["history"]["val/loss"][0])


def test_softmax_head_trains_and_predicts_without_overlaps(tmp_path):
    """head=softmax loss=dice_ce organ=all: six output channels, training and test run, and the whole-volume
    probabilities of the five organs and the background sum to one, with masks that never overlap."""
    from landmark_unet.inference import inference_network, predict_cached
    from landmark_unet.train import train

    cfg = compose_train(TINY + ["head=softmax", "loss=dice_ce", "organ=all"], tmp_path)
    assert cfg.model.net.out_channels == 6 and cfg.model.head == "softmax"
    metrics = train(cfg)
    assert math.isfinite(metrics["history"]["val/loss"][0]) and set(metrics["test"]) == set(cfg.data.organs)
    model = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("test")
    name, prob, _, _ = next(predict_cached(inference_network(model, torch.device("cpu")), dm, "test",
                                           torch.device("cpu")))
    assert prob.shape[0] == 5 and float(prob.sum(axis=0).max()) <= 1 + 1e-5
    assert int(organ_masks(prob, "softmax", dim=0).sum(axis=0).max()) <= 1


@pytest.mark.parametrize("overrides, key", [(["head=softmax"], "head"), (["loss=dice_ce"], "loss"),
                                            (["head=argmax"], "head")])
def test_head_and_loss_must_agree(tmp_path, overrides, key):
    from landmark_unet.config import validate
    from landmark_unet.errors import InputError

    with pytest.raises(InputError, match=f"^{key}:"):
        validate(compose_train(overrides, tmp_path))


def test_deep_supervision_weights_halve_and_sum_to_one():
    assert deep_supervision_weights(0) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])


def test_deep_supervision_loss_by_hand():
    """Each output against the target resized by nearest neighbour, weighted 2/3 and 1/3."""
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    full, half = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 2, 2), 3.0)
    bce = BCELoss()
    small = torch.nn.functional.interpolate(target, size=(2, 2), mode="nearest")
    assert small.flatten().tolist() == [1, 0, 0, 0]
    expected = 2 / 3 * bce(full, target) + 1 / 3 * bce(half, small)
    assert deep_supervision_loss(bce, [full, half], target).item() == pytest.approx(expected.item())


@pytest.mark.parametrize("model", ["unet2d", "unet2d_multitask", "unet3d"])
def test_deep_supervision_outputs_only_while_training(tmp_path, model):
    cfg = compose_train([f"model={model}", "model.net.features=4", "model.net.deep_supervision=2"], tmp_path)
    net = instantiate(cfg.model.net)
    k = cfg.model.net.out_channels
    x = torch.randn(2, cfg.model.net.in_channels, *((5,) if model == "unet3d" else ()), 32, 32)
    outputs = net.train()(x)
    assert [tuple(o.shape) for o in outputs] == [(2, k, 32, 32), (2, k, 16, 16), (2, k, 8, 8)]
    assert tuple(net.eval()(x).shape) == (2, k, 32, 32)
    plain = instantiate(compose_train([f"model={model}", "model.net.features=4"], tmp_path).model.net)
    assert set(plain.state_dict()) < set(net.state_dict())  # the weights of networks without it keep their names


def test_deep_supervision_trains_and_is_checked(tmp_path):
    from landmark_unet.config import validate
    from landmark_unet.errors import InputError
    from landmark_unet.train import train

    metrics = train(compose_train(TINY + ["model.net.deep_supervision=2", "loss=dice_bce"], tmp_path))
    assert math.isfinite(metrics["history"]["val/loss"][0])
    with pytest.raises(InputError, match="^model.net.deep_supervision: must be a whole number from 0 to 3"):
        validate(compose_train(["model.net.deep_supervision=4"], tmp_path))
