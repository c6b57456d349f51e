"""Losses against hand-worked values and MONAI's DiceCELoss; the recipe's config options compose and train."""

import math

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from monai.losses import DiceCELoss

from landmark_unet.losses import BCELoss, DiceBCELoss


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
    monai = DiceCELoss(sigmoid=True, batch=True)
    expected = sum(monai(logits[:, k:k + 1], target[:, k:k + 1]) for k in range(4))
    assert DiceBCELoss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


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

    cfg = compose_train(["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
                         "model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3",
                         "trainer.max_epochs=1", *overrides], tmp_path)
    assert cfg.model.loss._target_.endswith("DiceBCELoss")
    metrics = train(cfg)
    assert math.isfinite(metrics["history"]["val/loss"][0])
