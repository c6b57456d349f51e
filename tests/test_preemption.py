"""The SLURM pre-emption checkpoint (Lightning's ``hpc_ckpt_<n>.ckpt``, written when the job receives SIGUSR1) is
written only where the run continues from it exactly (:class:`~landmark_unet.lit.preemption.PreemptionCheckpoint`),
wherever the signal lands: inside an optimizer step, between an epoch's last batch and its validation, during
validation, after the last epoch. In-process runs with a fake SLURM environment and a fake ``scontrol``; the
command-line version (SIGUSR1, then SIGTERM, then the requeued job) is in test_interrupt.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_PHANTOM, compose_train
from omegaconf import OmegaConf

from landmark_unet.lit.segmentation import SegmentationModule
from landmark_unet.train import train

RUN = TINY_PHANTOM + [
       "model.net.features=4", "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=8",
       "data.split.rounds=3", "data.sampling=oversample", "trainer.max_epochs=3", "trainer.deterministic=true",
       "optim=adam", "model.optimizer.lr=3e-3", "augmentation=all", "data.crop=32", "data.foreground_fraction=0.3"]
EPOCH = 1  # the epoch the signal arrives in (0-based, of 3)


def signal_me() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)  # delivered before the next Python instruction of this (main) thread


class SignalInOptimizerStep(pl.Callback):
    """SIGUSR1 from inside the optimizer step of one training batch of epoch 1 (the first or the last), after the
    weights are updated and before Lightning counts the step."""

    def __init__(self, batch: str):
        self.batch, self.sent, self.batch_idx = batch, False, -1

    def on_train_start(self, trainer, pl_module):
        def post_step(optimizer, args, kwargs):
            last = trainer.num_training_batches - 1
            target = {"first": 0, "last": last}[self.batch]
            if not self.sent and trainer.current_epoch == EPOCH and self.batch_idx == target:
                self.sent = True
                signal_me()
        trainer.optimizers[0].register_step_post_hook(post_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_idx = batch_idx


class SignalDuringValidation(pl.Callback):
    """SIGUSR1 after the first validation batch of epoch 1: between two validation batches."""

    def __init__(self):
        self.sent = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not (self.sent or trainer.sanity_checking) and trainer.current_epoch == EPOCH and batch_idx == 0:
            self.sent = True
            signal_me()


class SignalAfterTheLastEpoch(pl.Callback):
    """SIGUSR1 at the end of the last training epoch, after its validation: nothing but ``on_train_end`` follows."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == trainer.max_epochs - 1:
            signal_me()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run and its last checkpoint."""
    tmp = tmp_path_factory.mktemp("reference")
    metrics = train(compose_train(RUN, tmp))
    return metrics, torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A SLURM job's environment (Lightning's SLURM plugin with auto-requeue) and an ``scontrol`` that logs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    for key, value in dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="landmark", SLURM_NTASKS="1", SLURM_PROCID="0",
                           SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1",
                           PATH=f"{bin_dir}:{os.environ['PATH']}").items():
        monkeypatch.setenv(key, value)
    return log


def adam_steps(ckpt: dict) -> set[int]:
    """Adam's step count of every parameter in a checkpoint."""
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


def signalled_run(tmp_path, sender: dict | None = None) -> tuple[dict, Path]:
    cfg = compose_train(RUN, tmp_path / "signalled")
    if sender is not None:
        OmegaConf.set_struct(cfg, False)
        cfg.callbacks.pre_emption = sender
    train(cfg)  # saves hpc_ckpt_1.ckpt, asks scontrol to requeue, and (no SIGTERM here) runs on to the end
    hpc = tmp_path / "signalled" / "run" / "hpc_ckpt_1.ckpt"
    return torch.load(hpc, map_location="cpu", weights_only=True), hpc


def resume(tmp_path, hpc: Path) -> dict:
    return train(compose_train(RUN + [f"ckpt_path={hpc}"], tmp_path / "resumed"))


def same_run(resumed: dict, reference: dict) -> None:
    assert resumed["history"]["epoch"] == [0, 1, 2]
    assert resumed["history"] == reference["history"]
    assert Path(resumed["checkpoint"]).name == Path(reference["checkpoint"]).name
    assert resumed["test"] == reference["test"]


@pytest.mark.parametrize("batch", ["first", "last"])
def test_a_signal_inside_an_optimizer_step_saves_at_the_end_of_the_batch(reference, fake_slurm, tmp_path, batch):
    """Lightning alone saved the updated weights with the step not yet counted: the continued run applied that
    batch twice (Adam's step count ended one above the trainer's). Saved at the batch end, the counts agree and the
    continued run equals the uninterrupted one (from the epoch's first batch: the rest of the epoch; from its
    last: that epoch's validation, then the later epochs)."""
    ref_metrics, ref_last = reference
    target = f"{__name__}.SignalInOptimizerStep"
    saved, hpc = signalled_run(tmp_path, {"_target_": target, "batch": batch})
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    assert saved["epoch"] == EPOCH
    assert adam_steps(saved) == {saved["global_step"]}  # the batch's update is in the weights and counted

    metrics = resume(tmp_path, hpc)
    last = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert last["global_step"] == ref_last["global_step"]
    assert adam_steps(last) == {ref_last["global_step"]}  # no batch applied twice
    # the continued epoch trains on the draws it had not reached (RankShare), with their crops and augmentation:
    # exactly the uninterrupted run
    same_run(metrics, ref_metrics)


def test_a_signal_before_validation_starts_runs_that_validation(reference, fake_slurm, tmp_path, monkeypatch):
    """Between an epoch's last training batch and its validation (here where Lightning zeroes the gradients before
    validating; on a cluster, while the validation loader starts its workers) Lightning alone wrote a checkpoint it
    then took for one written after validation: the continued run skipped that validation, and the epoch was
    missing from the curves and from the choice of the best checkpoint."""
    original = SegmentationModule.on_validation_model_zero_grad
    sent = []

    def zero_grad_then_signal(self):
        original(self)
        if not sent and not self.trainer.sanity_checking and self.trainer.current_epoch == EPOCH:
            sent.append(True)
            signal_me()

    monkeypatch.setattr(SegmentationModule, "on_validation_model_zero_grad", zero_grad_then_signal)
    saved, hpc = signalled_run(tmp_path)
    monkeypatch.undo()
    assert sent and saved["callbacks"]["MetricHistory"]["history"]["epoch"] == [0]
    same_run(resume(tmp_path, hpc), reference[0])


def test_a_signal_during_validation_runs_that_validation_again(reference, fake_slurm, tmp_path):
    """Written between two validation batches, the checkpoint continues by validating that epoch again from its
    first batch (Lightning alone continued after the validation, and the epoch was missing from the curves)."""
    saved, hpc = signalled_run(tmp_path, {"_target_": f"{__name__}.SignalDuringValidation"})
    assert saved["callbacks"]["MetricHistory"]["history"]["epoch"] == [0]  # written during epoch 1's validation
    same_run(resume(tmp_path, hpc), reference[0])


def test_a_signal_after_the_last_epoch_saves_a_finished_fit(reference, fake_slurm, tmp_path):
    """After the last epoch's validation the checkpoint waits for the end of training; continued from it, the run
    trains nothing more and tests the same best checkpoint."""
    saved, hpc = signalled_run(tmp_path, {"_target_": f"{__name__}.SignalAfterTheLastEpoch"})
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    assert saved["callbacks"]["MetricHistory"]["history"]["epoch"] == [0, 1, 2]
    assert saved["global_step"] == reference[1]["global_step"]
    resumed = resume(tmp_path, hpc)
    same_run(resumed, reference[0])
    assert not (tmp_path / "resumed" / "run" / "checkpoints").exists()  # it trained nothing more


def test_without_slurm_the_signal_handler_is_left_alone(tmp_path):
    """Outside SLURM there is no requeue handler to move: a SIGUSR1 handler of the process's own stays in place."""
    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, own)
    try:
        cfg = compose_train(RUN + ["trainer.max_epochs=1"], tmp_path)
        OmegaConf.set_struct(cfg, False)
        cfg.callbacks.probe = {"_target_": f"{__name__}.HandlerProbe"}
        HandlerProbe.seen = []
        train(cfg)
        assert HandlerProbe.seen == [own]
        assert signal.getsignal(signal.SIGUSR1) == own
    finally:
        signal.signal(signal.SIGUSR1, previous)


class HandlerProbe(pl.Callback):
    """Records the SIGUSR1 handler in place during the first training batch."""

    seen: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            HandlerProbe.seen.append(signal.getsignal(signal.SIGUSR1))


DDP_RUN = ["data.phantom.n_subjects=6", "data.phantom.shape=[48,48,48]", "data.phantom.workers=1",
           "model.net.features=4", "data.num_workers=0", "data.batch_size=2", "data.split.rounds=3",
           "data.sampling=oversample", "data.foreground_fraction=0.3", "augmentation=all", "data.crop=32",
           "trainer.deterministic=true", "trainer.max_epochs=4", "optim=adam", "trainer=ddp",
           "trainer.accelerator=cpu", "~callbacks.progress", "trainer.enable_progress_bar=false"]


COUNT_BROADCASTS = """
import atexit, json, os, runpy, sys
import torch.distributed as dist
callers, broadcast = [], dist.broadcast
def counted(*args, **kwargs):
    callers.append(sys._getframe(1).f_code.co_name)
    return broadcast(*args, **kwargs)
dist.broadcast = counted
log = os.environ["BROADCAST_LOG"] + os.environ["SLURM_PROCID"]
atexit.register(lambda: open(log, "w").write(json.dumps(callers)))
runpy.run_module("landmark_unet.train", run_name="__main__", alter_sys=True)
"""


def start_ranks(tmp_path: Path, run: Path, command: list[str], *extra: str,
                wait: bool = True) -> tuple[list[subprocess.Popen], Path]:
    """Two ranks started as SLURM starts them (srun: one process per task, SLURM_PROCID), with a fake
    ``scontrol`` that logs its arguments; returns the processes, once epoch 0 is over (the ranks are training)
    unless not ``wait``, and that log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "landmark", "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "LANDMARK_UNET_CACHE": str(tmp_path / "cache"), "BROADCAST_LOG": str(tmp_path / "broadcasts")}
    command = [*command, *DDP_RUN, f"hydra.run.dir={run}", "cpu_threads=1", *extra]
    ranks = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}) for r in (0, 1)]
    try:
        t0 = time.monotonic()
        while wait and not (run / "checkpoints" / "last.ckpt").exists():
            assert all(p.poll() is None for p in ranks), ranks[0].stderr.read()[-3000:]
            assert time.monotonic() - t0 < 300
            time.sleep(0.05)
    except BaseException:
        stop(ranks)
        raise
    return ranks, log


def run_ranks(tmp_path: Path, run: Path, *extra: str) -> dict:
    """A 2-rank run to its end; its metrics.json."""
    ranks, _ = start_ranks(tmp_path, run, [sys.executable, "-m", "landmark_unet.train"], *extra, wait=False)
    try:
        codes = [p.wait(timeout=300) for p in ranks]
    finally:
        stop(ranks)
    assert codes == [0, 0], ranks[0].stderr.read()[-3000:] + ranks[1].stderr.read()[-3000:]
    return json.loads((run / "metrics.json").read_text())


def stop(ranks: list[subprocess.Popen]) -> None:
    for p in ranks:
        if p.poll() is None:
            p.kill()


@pytest.mark.slow  # three 2-process runs of four epochs: 30-60 s
def test_under_ddp_a_signal_to_one_rank_saves_once_with_every_rank(tmp_path):
    """The pre-emption signal sent to rank 1 only. The ranks agree on it at a training batch end and write one
    consistent checkpoint together (saving ends with a barrier: Lightning alone had rank 1 wait in it while rank 0
    trained on), rank 0 requeues the job once, and both finish. A run continued from that checkpoint equals an
    uninterrupted one."""
    run = tmp_path / "run"
    ranks, log = start_ranks(tmp_path, run, [sys.executable, "-m", "landmark_unet.train"])
    try:
        ranks[1].send_signal(signal.SIGUSR1)
        codes = [p.wait(timeout=120) for p in ranks]
    finally:
        stop(ranks)
    assert codes == [0, 0], ranks[0].stderr.read()[-3000:] + ranks[1].stderr.read()[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    saved = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert adam_steps(saved) == {saved["global_step"]}
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 4
    # continued from that checkpoint (each rank the rest of its share of the epoch, RankShare), the 2-rank run
    # trains exactly as an uninterrupted one
    reference = run_ranks(tmp_path, tmp_path / "reference")
    resumed = run_ranks(tmp_path, tmp_path / "resumed", f"ckpt_path={run / 'hpc_ckpt_1.ckpt'}")
    assert resumed["history"]["epoch"] == [0, 1, 2, 3]
    assert resumed["history"] == reference["history"]
    assert resumed["test"] == reference["test"]


@pytest.mark.slow  # two processes, one to two epochs: 10-20 s
def test_under_ddp_sigterm_to_one_rank_stops_every_rank_without_a_broadcast_per_step(tmp_path):
    """SIGTERM sent to rank 1 only stops both ranks after the same batch (each exits with 143 and says how to
    continue). Lightning alone broadcast a device tensor from rank 0 before every training batch and read it back
    (a host-device synchronisation in every step); its SIGTERM handler broadcast too, paired with the other rank's
    per-step broadcast, so rank 1 stopped and rank 0 trained on into a broken process group. No training step
    broadcasts now: ``torch.distributed.broadcast`` is counted in both processes."""
    run = tmp_path / "run"
    ranks, log = start_ranks(tmp_path, run, [sys.executable, "-c", COUNT_BROADCASTS])
    try:
        ranks[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in ranks]
    finally:
        stop(ranks)
    errors = [p.stderr.read() for p in ranks]
    assert codes == [143, 143], errors[0][-3000:] + errors[1][-3000:]
    assert all("stopped by SIGTERM" in e for e in errors)
    assert not (run / "metrics.json").exists()  # stopped before its fourth epoch
    assert not log.exists()  # SIGTERM alone does not requeue
    for rank in (0, 1):
        assert json.loads((tmp_path / f"broadcasts{rank}").read_text()) == []
