import numpy as np
import pytest
import torch
from torchmetrics.functional.segmentation import dice_score

from landmark_unet.metrics import PerBodyDice, SampleMean, VolumeRatio, dice_volume, per_body_table
from landmark_unet.runinfo import nothing_predicted


def tm_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """torchmetrics' Dice of one binary volume (one sample, one class)."""
    p = torch.from_numpy(pred.astype(np.int64))[None, None]
    t = torch.from_numpy(true.astype(np.int64))[None, None]
    return float(dice_score(p, t, num_classes=1, include_background=True, input_format="one-hot"))


@pytest.mark.parametrize("seed", range(5))
def test_volume_dice_matches_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    true = rng.random((12, 10, 8)) < 0.3
    pred = rng.random((12, 10, 8)) < 0.2 + 0.1 * seed
    assert dice_volume(pred, true) == pytest.approx(tm_dice(pred, true), abs=1e-6)


def test_edge_cases():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert dice_volume(empty, empty) == 1.0  # the study: 1 when both are empty (torchmetrics gives nan here)
    assert np.isnan(tm_dice(empty, empty))
    assert dice_volume(empty, full) == 0.0
    assert dice_volume(full, empty) == 0.0
    assert dice_volume(full, full) == 1.0
    half = full.copy()
    half[:2] = False
    assert dice_volume(half, full) == pytest.approx(2 * 32 / (32 + 64))
    assert tm_dice(half, full) == pytest.approx(2 * 32 / (32 + 64))


def test_per_body_dice_over_shuffled_slices_equals_3d_dice():
    """Accumulating slice batches in any order gives each body's 3D Dice, not a mean of slice Dice."""
    rng = np.random.default_rng(0)
    bodies = {b: (rng.random((2, 16, 16, 9)) < 0.3, rng.random((2, 16, 16, 9)) < 0.3) for b in range(3)}
    bodies[3] = (np.zeros((2, 16, 16, 9), bool), np.zeros((2, 16, 16, 9), bool))  # organ absent and not predicted
    items = [(b, k) for b in bodies for k in range(9)]
    order = rng.permutation(len(items))
    metric = PerBodyDice()
    for chunk in np.array_split(order, 7):
        pred = torch.stack([torch.from_numpy(bodies[items[i][0]][0][..., items[i][1]]) for i in chunk])
        true = torch.stack([torch.from_numpy(bodies[items[i][0]][1][..., items[i][1]]) for i in chunk])
        metric.update(pred, true, torch.tensor([items[i][0] for i in chunk]))
    ids, dice = metric.per_body()
    assert ids.tolist() == [0, 1, 2, 3]
    for b, (pred, true) in bodies.items():
        for k in range(2):
            expected = dice_volume(pred[k], true[k])
            assert float(dice[b, k]) == pytest.approx(expected, abs=1e-12)
            if b < 3:
                assert expected == pytest.approx(tm_dice(pred[k], true[k]), abs=1e-6)
    assert float(dice[3, 0]) == 1.0


def test_per_body_table_mean_and_std():
    ids = torch.tensor([0, 1, 2])
    dice = torch.tensor([[0.9], [0.8], [1.0]], dtype=torch.float64)
    table = per_body_table(ids, dice, ["a", "b", "c"], ["liver"])
    assert table["liver"]["dice_mean"] == pytest.approx(0.9)
    assert table["liver"]["dice_std"] == pytest.approx(np.std([0.9, 0.8, 1.0]))
    assert table["liver"]["per_body"] == {"a": 0.9, "b": 0.8, "c": 1.0}


def test_sample_mean_weights_each_batch_by_its_size():
    mean = SampleMean()
    mean.update(torch.tensor(2.0), 3)
    mean.update(torch.tensor(5.0), 1)
    assert mean.compute().item() == pytest.approx((3 * 2.0 + 5.0) / 4)
    mean.reset()
    assert not mean.update_called
    mean.update(torch.tensor(1.5, requires_grad=True), 2)  # a loss with its graph: only its value is kept
    assert mean.compute().item() == 1.5 and not mean.total.requires_grad


def test_volume_ratio_is_predicted_over_true_voxels_per_organ_over_the_epoch():
    rng = np.random.default_rng(0)
    ratio = VolumeRatio(3)
    preds, trues = [], []
    for n in (4, 2):  # two batches of (B, 3, 6, 5, 4) volumes
        pred, true = rng.random((n, 3, 6, 5, 4)) > 0.7, rng.random((n, 3, 6, 5, 4)) > 0.6
        pred[:, 1] = False  # organ 1: nothing predicted
        true[:, 2] = False  # organ 2: absent
        ratio.update(torch.from_numpy(pred), torch.from_numpy(true))
        preds.append(pred)
        trues.append(true)
    pred, true = np.concatenate(preds), np.concatenate(trues)
    out = ratio.compute()
    assert out[0].item() == pytest.approx(pred[:, 0].sum() / true[:, 0].sum())
    assert out[1].item() == 0 and torch.isnan(out[2])
    ratio.reset()
    ratio.update(torch.ones(1, 3, 2, 2, dtype=torch.bool), torch.ones(1, 3, 2, 2, dtype=torch.bool))
    assert out.shape == (3,) and ratio.compute().tolist() == [1.0, 1.0, 1.0]  # reset empties the counts


def test_nothing_predicted_names_the_organs_empty_in_the_last_epochs():
    history = {"epoch": [0, 1, 2, 3], "val/loss": [0.5, 0.3, 0.2, 0.1],
               "val/volume_ratio/liver": [0.2, 0.0, 0.0, 0.0],  # the trap: empty from epoch 1 on
               "val/volume_ratio/spleen": [0.0, 0.0, 0.0, 0.4],  # empty early, then learnt
               "val/volume_ratio/bladder": [float("nan")] * 4}  # absent from the validation bodies
    warnings = nothing_predicted(history)
    assert len(warnings) == 1 and warnings[0].startswith("liver: no voxel predicted")
    assert "validation loss 0.5 -> 0.1" in warnings[0]
    assert nothing_predicted(history, epochs=4) == []  # liver predicted something in epoch 0
    assert nothing_predicted({"epoch": [0, 1], "val/volume_ratio/liver": [0.0, 0.0]}) == []  # too short to tell
