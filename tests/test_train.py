"""Real training on a tiny phantom through the real Hydra config: run-directory files, TensorBoard tags, resume,
evaluate."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_PHANTOM, compose_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from landmark_unet.runinfo import summary_lines
from landmark_unet.train import train

TINY = TINY_PHANTOM + ["model.net.features=4", "data.num_workers=0", "data.batch_size=8", "data.split.rounds=3"]


def tensorboard_tags(tb_dir) -> dict[str, set]:
    """Scalar and image tags over every event file of a run (fit and test may write separate files)."""
    events = list(tb_dir.glob("events.out.tfevents.*"))
    assert events, f"no event file in {tb_dir}"
    tags = {"scalars": set(), "images": set()}
    for ev in events:
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
    return tags


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = compose_train(TINY + ["trainer.max_epochs=2"], tmp)
    metrics = train(cfg)
    return tmp, cfg, metrics


def test_run_directory(tiny_run):
    tmp, cfg, metrics = tiny_run
    run = tmp / "run"
    assert (run / "metrics.json").is_file() and (run / "splits.json").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["test"] == metrics["test"]
    liver = on_disk["test"]["liver"]
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(liver["per_body"]) == sorted(splits["test"])
    assert set(splits["test"]).isdisjoint(splits["train"] + splits["val"])
    for key in ("seconds_per_epoch", "peak_memory_gib", "overrides"):
        assert key in on_disk
    assert 0 < on_disk["data_wait_fraction"] < 1  # the loader's share of the training epochs' time
    assert on_disk["machine"]["cores"] >= 1 and on_disk["machine"]["gpu"] is None  # runs differ by CPU: say which
    assert 0 <= liver["dice_mean"] <= 1 and liver["dice_std"] >= 0
    history = on_disk["history"]  # the validation curves of the report, one value per epoch, in step
    assert history["epoch"] == [0, 1]
    assert all(0 <= v <= 1 for v in history["val/dice/liver"])
    assert all(v >= 0 for v in history["val/volume_ratio/liver"]) and on_disk["warnings"] == []
    assert on_disk["best_val_dice_mean"] == pytest.approx(max(history["val/dice_mean"]))


def test_tensorboard_tags(tiny_run):
    tmp, _, _ = tiny_run
    tags = tensorboard_tags(tmp / "run" / "tb")
    assert {"val/dice/liver", "val/dice_mean", "val/volume_ratio/liver", "train/loss", "val/loss",
            "test/dice/liver"} <= tags["scalars"]
    assert "val/panel" in tags["images"]


def test_panel_position_is_the_middle_organ_slice_in_loader_order(tiny_run):
    """The panel's (batch, sample) is found from the validation loader's fixed order, never by asking the device."""
    import numpy as np
    from hydra.utils import instantiate

    from landmark_unet.data.organs import organ_bit

    _, cfg, _ = tiny_run
    dm = instantiate(cfg.data)
    dm.setup("fit")
    first = next(n for n in dm.split["val"] if (dm.entries[n].slice_bits & organ_bit("liver")).any())
    ks = np.flatnonzero(dm.entries[first].slice_bits & organ_bit("liver"))
    batch_index, sample = divmod(dm.panel_position(), dm.eval_batch_size)
    batch = next(b for i, b in enumerate(dm.val_dataloader()) if i == batch_index)
    assert int(batch["subject"][sample]) == dm.subject_id(first)
    assert int(batch["slice"][sample]) == int(ks[len(ks) // 2])


def test_resume_from_last_checkpoint(tiny_run, tmp_path):
    tmp, _, _ = tiny_run
    last = tmp / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1
    cfg = compose_train(TINY + ["trainer.max_epochs=3", f"ckpt_path={last}",
                                f"paths.cache_dir={tmp / 'cache'}"], tmp_path)
    metrics = train(cfg)
    assert metrics["epochs"] == 3
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] > 0
    # only one epoch was trained in the resumed run: the timer saw one training epoch
    assert metrics["seconds_per_epoch"] > 0


def test_evaluate_rescores_the_checkpoint(tiny_run, tmp_path):
    tmp, _, metrics = tiny_run
    run = tmp / "run"
    # evaluate reads <run>/.hydra/config.yaml: write it as Hydra would
    (run / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf
    _, cfg, _ = tiny_run
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=False)
    best = metrics["checkpoint"]
    proc = subprocess.run([sys.executable, "-m", "landmark_unet.evaluate", f"ckpt={best}",
                           f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "LANDMARK_UNET_CACHE": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["test"]["liver"]["per_body"] == pytest.approx(metrics["test"]["liver"]["per_body"])
    assert "liver" in proc.stdout
    # whole-volume inference (inference.predict_volume) scores the same bodies with the same Dice as Lightning's test
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    per_case = {r["case"]: r["dice"] for r in summary["metric_per_case"] if r["organ"] == "liver"}
    assert per_case == pytest.approx(metrics["test"]["liver"]["per_body"], abs=1e-6)
    assert {"hd95_mm", "nsd", "volume_diff_ml"} <= set(summary["mean"]["liver"])


def test_a_network_that_predicts_nothing_is_warned_about(tmp_path):
    """A threshold no probability exceeds stands in for a network whose outputs never cross 0.5 (the trap the quick
    network fell into for one seed in 20): validation sees no predicted voxel, and the run says so."""
    cfg = compose_train(TINY + ["trainer.max_epochs=3", "model.threshold=1.0"], tmp_path)
    metrics = train(cfg)
    assert metrics["history"]["val/volume_ratio/liver"] == [0.0, 0.0, 0.0]
    assert len(metrics["warnings"]) == 1 and metrics["warnings"][0].startswith("liver: no voxel predicted")
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["warnings"] == metrics["warnings"]
    assert summary_lines(metrics)[-1] == f"warning: {metrics['warnings'][0]}"


@pytest.mark.parametrize("fusion,landmarks", [("early", "manhattan"), ("late", "gaussian")])
def test_fused_training_runs(tmp_path, fusion, landmarks):
    cfg = compose_train(TINY + ["trainer.max_epochs=1", f"fusion={fusion}", f"landmarks={landmarks}"], tmp_path)
    metrics = train(cfg)
    assert 0 <= metrics["test"]["liver"]["dice_mean"] <= 1
    cached = list((tmp_path / "cache" / "subjects").glob("*/distance-*.npy"))
    assert len(cached) == 6  # one map file per subject, computed once


@pytest.mark.parametrize("model,extra", [("unet2d_multitask", []), ("unet3d", ["data.crop=32", "fusion=early"])])
def test_other_networks_train(tmp_path, model, extra):
    cfg = compose_train(TINY + [f"model={model}", "trainer.max_epochs=1", "data.batch_size=4",
                                "model.net.features=4"] + extra, tmp_path)
    metrics = train(cfg)
    organs = set(metrics["test"])
    assert organs == ({"liver", "kidneys", "pancreas", "spleen", "bladder"} if model.endswith("multitask") else {"liver"})
    tags = tensorboard_tags(tmp_path / "run" / "tb")
    assert "val/panel" in tags["images"]
    assert all(f"val/dice/{o}" in tags["scalars"] for o in organs)


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path):
    cfg = compose_train(TINY + ["trainer.max_epochs=1", "trainer.precision=bf16-mixed", "model.channels_last=true"],
                        tmp_path)
    metrics = train(cfg)
    assert metrics["precision"] == "bf16-mixed"
    assert 0 <= metrics["test"]["liver"]["dice_mean"] <= 1


def test_training_loss_is_logged_once_an_epoch_as_the_sample_weighted_mean(monkeypatch):
    """No logging in the training step (it made synchronising copies every step on a GPU): ``train/loss`` is logged
    once an epoch, the mean of the steps' losses weighted by their batch sizes (batches of 3 and 1 here)."""
    import pytorch_lightning as pl

    from landmark_unet.lit.segmentation import SegmentationModule
    from landmark_unet.models.unet2d import UNet2d

    torch.manual_seed(0)
    batches = [{"image": torch.randn(n, 2, 16, 16), "mask": (torch.rand(n, 1, 16, 16) > 0.5).float()}
               for n in (3, 1, 3)]
    module = SegmentationModule(UNet2d(2, 1, features=4, depth=2), ["liver"], torch.optim.SGD)
    logged, losses = [], []
    real_log = SegmentationModule.log
    monkeypatch.setattr(SegmentationModule, "log",
                        lambda self, name, value, *a, **k: (logged.append((name, float(value))),
                                                            real_log(self, name, value, *a, **k)))

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(outputs["loss"]), len(batch["image"])))

    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Losses()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    train_logs = [v for name, v in logged if name == "train/loss"]
    assert len(train_logs) == 2 and len(losses) == 6
    for epoch, value in enumerate(train_logs):
        steps = losses[3 * epoch:3 * epoch + 3]
        assert value == pytest.approx(sum(loss * n for loss, n in steps) / 7, rel=1e-6)
