"""DDP: evaluation shards without duplicates, per-body Dice over 2 CPU processes (gloo) equals 1 process, GPU
pinning of parallel local jobs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_PHANTOM
from omegaconf import OmegaConf

from landmark_unet.data.slices import EvalShardSampler
from landmark_unet.errors import InputError
from landmark_unet.launch import pin_local_job_gpu, set_cpu_threads


class FakeDataset:
    def __init__(self, n):
        self.index = [(i // 7, i % 7) for i in range(n)]

    def __len__(self):
        return len(self.index)


@pytest.mark.parametrize("n", [1, 13, 14, 100])
@pytest.mark.parametrize("world", [2, 3])
def test_eval_shards_cover_every_sample_exactly_once(n, world):
    shards = [list(EvalShardSampler(FakeDataset(n), num_replicas=world, rank=r)) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))  # no padding, no duplicate, nothing lost
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


TINY_DDP = TINY_PHANTOM + [
            "optim=adam", "model.optimizer.lr=3e-3", "data.sampling=oversample", "data.num_workers=0",
            "data.split.rounds=3", "data.split.val_fraction=0.5", "trainer.max_epochs=6", "~callbacks.progress",
            "trainer.enable_progress_bar=false"]
NETWORKS = {  # slices spread over the ranks; whole bodies (sliding windows) spread over the ranks
    "2d": ["model.net.features=8", "data.batch_size=8", "data.eval_batch_size=7"],
    # data.on_device: each rank gathers its share of the rows (training crops included) from its own copy
    "2d_on_device": ["model.net.features=8", "data.batch_size=8", "data.eval_batch_size=7", "data.on_device=true",
                     "data.crop=32"],
    "volumetric": ["model=unet3d_full", "model.net.features=8", "data.patch_size=[16,32,32]",
                   "model.net.pool_kernels=[[1,2,2],[2,2,2]]", "model.net.depth=2", "data.samples_per_epoch=8"],
}


def _evaluate_one_process(ckpt: str, split_file: Path, out: Path, cwd: Path) -> dict:
    command = [sys.executable, "-m", "landmark_unet.evaluate", f"ckpt={ckpt}", f"split_file={split_file}",
               "progress=false", f"hydra.run.dir={out}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=os.environ.copy())
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("network", [pytest.param(n, marks=pytest.mark.slow) if n == "2d_on_device" else n
                                     for n in sorted(NETWORKS)])
def test_ddp_two_processes_give_the_per_body_dice_of_one_process(tmp_path, network):
    """Train with trainer=ddp on 2 CPU processes (gloo), 2 validation and 2 test bodies: the test Dice it reports
    (each body's slices, or for the volumetric network each whole body, spread over both ranks) equals a 1-process
    evaluation of the best checkpoint on the same bodies, and so does the validation Dice of the best epoch, which
    picked that checkpoint (a rank scoring only its own share would give another mean). Lightning's hints to
    ``sync_dist`` the epoch metrics and to test on one device are not shown: the metrics are gathered from every
    rank already, and the evaluation shards pad nothing."""
    ddp = subprocess.run([sys.executable, "-m", "landmark_unet.train", "trainer=ddp", "trainer.devices=2",
                          *TINY_DDP, *NETWORKS[network], f"hydra.run.dir={tmp_path / 'ddp'}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ.copy())
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Starting with 2 processes" in ddp.stdout + ddp.stderr
    assert "sync_dist" not in ddp.stdout + ddp.stderr and "DistributedSampler" not in ddp.stdout + ddp.stderr
    if "data.on_device=true" in NETWORKS[network]:  # both ranks gathered every part they saw on their device
        gathered = re.findall(r"data.on_device: (\w+) slices", ddp.stdout + ddp.stderr)
        assert sorted(gathered) == sorted(["train", "val", "test"] * 2), gathered
    with_ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    splits = json.loads((tmp_path / "ddp" / "splits.json").read_text())
    assert len(splits["val"]) == 2 and len(splits["test"]) == 2
    both = tmp_path / "test_and_val.json"  # one 1-process evaluation scores the test and the validation bodies
    both.write_text(json.dumps({"train": splits["train"], "test": splits["test"] + splits["val"]}))
    single = _evaluate_one_process(with_ddp["checkpoint"], both, tmp_path / "one", tmp_path)["test"]["liver"]

    on_test = with_ddp["test"]["liver"]["per_body"]
    assert sorted(on_test) == sorted(splits["test"])
    assert max(on_test.values()) > 0.01  # a trained model: the comparison is not between two empty predictions
    for body, dice in on_test.items():
        assert dice == pytest.approx(single["per_body"][body], abs=1e-6)

    on_val = [single["per_body"][body] for body in splits["val"]]
    assert on_val[0] != on_val[1]  # so that the mean of one rank's body alone would differ
    history = with_ddp["history"]
    best = history["val/dice_mean"].index(max(history["val/dice_mean"]))
    assert with_ddp["checkpoint"].endswith(f"best-epoch{history['epoch'][best]:03d}.ckpt")
    assert history["val/dice/liver"][best] == pytest.approx(sum(on_val) / 2, abs=1e-6)


def test_local_submitit_jobs_are_pinned_to_their_own_gpu(monkeypatch):
    cfg = OmegaConf.create({"trainer": {"devices": 1}})
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert pin_local_job_gpu(cfg) is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "123")
    assert pin_local_job_gpu(cfg) == 0  # outside Hydra the job number is 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setattr("landmark_unet.launch._hydra_job", lambda: (True, 4))  # job 4 of a sweep on 3 GPUs
    assert pin_local_job_gpu(cfg) == 1 and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert pin_local_job_gpu(OmegaConf.create({"trainer": {"devices": 2}})) is None  # a DDP job keeps its GPUs


@pytest.fixture
def torch_threads():
    """Restore torch's CPU thread count after a test that sets it."""
    import torch

    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_cpu_threads_set_from_the_config_or_the_launcher(monkeypatch, caplog, torch_threads):
    import torch

    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    assert set_cpu_threads(OmegaConf.create({"cpu_threads": None})) == torch_threads  # outside a launcher: unchanged
    assert set_cpu_threads(OmegaConf.create({"cpu_threads": 1})) == 1 == torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    monkeypatch.setattr("landmark_unet.launch._launcher_cpus_per_task", lambda: 1)  # hydra.launcher.cpus_per_task=1
    assert set_cpu_threads(OmegaConf.create({"cpu_threads": None})) == 1
    torch.set_num_threads(torch_threads)
    # submitit_local without cpus_per_task: every job keeps all cores' threads, and a warning says so
    monkeypatch.setattr("landmark_unet.launch._launcher_cpus_per_task", lambda: None)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "123")
    with caplog.at_level("WARNING", logger="landmark_unet.launch"):
        assert set_cpu_threads(OmegaConf.create({})) == torch_threads
    assert "hydra.launcher.cpus_per_task" in caplog.text
    caplog.clear()
    for rank_variable in ("SUBMITIT_LOCAL_GLOBALID", "LOCAL_RANK"):  # the job's other processes stay quiet
        with monkeypatch.context() as env, caplog.at_level("WARNING", logger="landmark_unet.launch"):
            env.setenv(rank_variable, "1")
            assert set_cpu_threads(OmegaConf.create({})) == torch_threads
    assert caplog.text == ""
    for bad in (0, -2, 1.5, True, "four"):
        with pytest.raises(InputError, match=f"cpu_threads: must be null or a whole number >= 1, got {bad!r}"):
            set_cpu_threads(OmegaConf.create({"cpu_threads": bad}))
