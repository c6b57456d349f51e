"""Interruption and reproducibility through the real command line: a training killed with SIGKILL mid-run and
continued with ``ckpt_path=last`` ends with the metrics.json of an uninterrupted run; a SLURM pre-emption signal
saves a checkpoint and requeues; a killed cache build is detected and rebuilt; a run reruns from its own
``.hydra`` folder."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PHANTOM

# every source of randomness an epoch has: oversampled draws with their random crops, read by loader worker
# processes, on-device augmentation (the depth-5 model, cheap at this size); about 1 s training epochs, so that a kill
# lands inside a run
RUN = TINY_PHANTOM + ["model=unet3d",
       "model.net.features=4", "data.num_workers=2", "data.crop=32", "data.batch_size=2", "data.split.rounds=3",
       "data.sampling=oversample", "data.foreground_fraction=0.3", "augmentation=all", "trainer.max_epochs=3",
       "trainer.deterministic=true", "~callbacks.progress", "trainer.enable_progress_bar=false"]
# what may differ between two runs of the same computation: time, memory, where and how it was started
RUN_SPECIFIC = {"seconds_per_epoch", "data_wait_fraction", "wall_seconds", "peak_memory_gib", "peak_host_rss_gib",
                "peak_gpu_gib", "overrides", "checkpoint", "resumed_from"}


def comparable(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}
    out["checkpoint_name"] = Path(metrics["checkpoint"]).name
    return out


def command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "landmark_unet.train", *RUN, *overrides]


def env(tmp_path: Path, **extra: str) -> dict:
    return {**os.environ, "LANDMARK_UNET_CACHE": str(tmp_path.parent / "interrupt_cache"), **extra}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(f"hydra.run.dir={tmp / 'run'}"), capture_output=True, text=True, timeout=600,
                          env=env(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", json.loads((tmp / "run" / "metrics.json").read_text())


def test_same_seed_same_metrics_and_the_run_records_what_it_ran(reference, tmp_path):
    run, metrics = reference
    again = subprocess.run(command(f"hydra.run.dir={tmp_path / 'run'}"), capture_output=True, text=True, timeout=600,
                           env=env(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert comparable(json.loads((tmp_path / "run" / "metrics.json").read_text())) == comparable(metrics)
    # what it takes to reproduce the run: its config, the versions, the code and the data
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert {"python", "torch", "pytorch_lightning", "hydra-core", "numpy", "nibabel"} <= set(metrics["versions"])
    assert len(metrics["data_fingerprint"]) == 16


def test_rerun_from_the_run_folder_config(reference, tmp_path):
    """``--config-dir RUN/.hydra --config-name config`` composes exactly the saved config: same numbers."""
    run, metrics = reference
    proc = subprocess.run([sys.executable, "-m", "landmark_unet.train", "--config-dir", str(run / ".hydra"),
                           "--config-name", "config", f"hydra.run.dir={tmp_path / 'rerun'}"],
                          capture_output=True, text=True, timeout=600, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert comparable(json.loads((tmp_path / "rerun" / "metrics.json").read_text())) == comparable(metrics)


def test_sigkill_mid_run_then_ckpt_path_last_finishes_with_the_same_metrics(reference, tmp_path):
    """Hydra's default time-stamped run folders: the restarted command gets a new folder, finds the killed run
    beside it (same overrides, unfinished, has a checkpoint) and finishes it in its own folder."""
    _, metrics = reference
    base = tmp_path / "outputs"
    overrides = [f"hydra.run.dir={base}/" + "${now:%H-%M-%S-%f}"]
    proc = subprocess.Popen(command(*overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(tmp_path))
    try:
        t0 = time.monotonic()
        while not list(base.glob("*/checkpoints/last.ckpt")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() - t0 < 240
            time.sleep(0.05)
        time.sleep(0.7)  # into the second epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (first,) = base.iterdir()
    assert not (first / "metrics.json").exists()
    last = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] < 2  # killed before the end of training

    done = subprocess.run(command(*overrides, "ckpt_path=last"), capture_output=True, text=True, timeout=600,
                          env=env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((first / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(first / "checkpoints" / "last.ckpt")
    assert comparable(resumed) == comparable(metrics)
    second = [d for d in base.iterdir() if d != first]
    assert len(second) == 1 and not (second[0] / "metrics.json").exists()  # the second attempt's log only


def test_ckpt_path_last_with_nothing_to_continue_is_one_line(tmp_path):
    proc = subprocess.run(command(f"hydra.run.dir={tmp_path / 'run'}", "ckpt_path=last"), capture_output=True,
                          text=True, timeout=300, env={**env(tmp_path), "LANDMARK_UNET_DEBUG": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: ckpt_path: last: no checkpoint to continue from in {tmp_path / 'run'} or an unfinished run with the "
        f"same overrides in {tmp_path}"]


def test_slurm_preemption_saves_requeues_and_resume_auto_finishes(reference, tmp_path):
    """A fake SLURM job: SIGUSR1 (what conf/hydra/launcher/slurm.yaml asks SLURM to send before the time limit)
    makes Lightning save hpc_ckpt_1.ckpt and call ``scontrol requeue``; SLURM's SIGTERM then stops the job. The
    requeued job (same command, same folder) continues from that checkpoint with resume=auto."""
    _, metrics = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = env(tmp_path, SLURM_JOB_ID="4242", SLURM_JOB_NAME="landmark", SLURM_NTASKS="1", SLURM_PROCID="0",
                SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="1",
                PATH=f"{bin_dir}:{os.environ['PATH']}")
    run = tmp_path / "run"
    cmd = command(f"hydra.run.dir={run}", "resume=auto")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=slurm)
    try:
        wait_for(run / "checkpoints" / "last.ckpt", proc)
        time.sleep(0.7)
        proc.send_signal(signal.SIGUSR1)
        wait_for(run / "hpc_ckpt_1.ckpt", proc, timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143  # stopped, not finished
    assert proc.stderr.read().strip().splitlines()[-1] == (
        "stopped by SIGTERM: continue this run with the same command plus resume=auto")
    assert calls.read_text().split() == ["requeue", "4242"]
    assert not (run / "metrics.json").exists()
    saved = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    # SIGTERM stops the job after its current step, or after the epoch's end (and its last.ckpt) when it came
    # during the epoch's last step or validation: the requeued job continues from the newer of the two
    newest = max([run / "hpc_ckpt_1.ckpt", run / "checkpoints" / "last.ckpt"], key=lambda p: p.stat().st_mtime_ns)
    assert saved["landmark_unet"]["network"] == "UNet3d"  # the checkpoint carries the run's signature

    requeued = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=slurm)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(newest)
    assert resumed["epochs"] == metrics["epochs"] and resumed["history"]["epoch"][-1] == 2
    # the signal can land in the epoch's training steps or in its validation; a checkpoint saved during validation
    # runs that validation again (PreemptionCheckpoint, test_preemption.py), so no epoch is missing from the curves
    assert resumed["history"]["epoch"] == [0, 1, 2]
    # a mid-epoch checkpoint finishes its epoch on the draws it had not reached, with their random crops and
    # augmentation (this run has both): the uninterrupted run's numbers
    assert comparable(resumed) == comparable(metrics)


def test_slurm_launcher_asks_for_the_signal_lightning_requeues_on(tmp_path, monkeypatch):
    """hydra/launcher=slurm writes an sbatch script whose pre-emption signal is SIGUSR1 (Lightning saves and
    requeues on it; submitit's default USR2 would requeue without a checkpoint) and that allows requeueing."""
    import submitit
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit's executor looks for srun on the PATH
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # the parameter mapping of hydra_submitit_launcher's BaseSubmititLauncher.launch
    executor = submitit.AutoExecutor(folder=str(tmp_path / ".submitit"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m landmark_unet.train", "0")
    assert "#SBATCH --signal=USR1@120" in script and "USR2" not in script
    assert "#SBATCH --requeue" in script


KILL_AT = '''
import os, runpy, signal, sys
import {module} as target
real, calls = target.{name}, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
target.{name} = dying
sys.argv = [sys.argv[0], *sys.argv[1:]]
runpy.run_module("{entry}", run_name="__main__", alter_sys=True)
'''


def killed_at(tmp_path: Path, entry: str, module: str, name: str, at: int, args: list[str]) -> None:
    """Run ``python -m entry args`` with ``module.name`` replaced by a function that SIGKILLs the process on its
    ``at``-th call: a kill at a chosen point inside the real code path."""
    script = tmp_path / "kill.py"
    script.write_text(KILL_AT.format(module=module, name=name, at=at, entry=entry))
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
                          env=env(tmp_path, LANDMARK_UNET_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_a_cache_build_killed_half_way_is_detected_and_rebuilt(tmp_path):
    from conftest import write_toy_subject

    for i in range(6):
        write_toy_subject(tmp_path / "data", f"s{i}", shape=(32, 32, 16), seed=i)
    args = ["data=folder", f"data.root={tmp_path / 'data'}", "data.split.rounds=3", "model.net.features=4",
            "data.num_workers=0",
            "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}", "~callbacks.progress",
            "trainer.enable_progress_bar=false"]
    # numpy.save: image.npy of subject 0, image.npy and then (killed) labels.npy of subject 1
    killed_at(tmp_path, "landmark_unet.train", "numpy", "save", 4, args)
    subjects = tmp_path / "cache" / "subjects"
    visible = [p for p in subjects.iterdir() if not p.name.startswith(".")]
    assert len(visible) == 1 and (visible[0] / "meta.json").is_file()  # the finished subject only
    (partial,) = [p for p in subjects.iterdir() if p.name.startswith(".")]
    assert (partial / "image.npy").is_file() and not (partial / "labels.npy").exists()

    proc = subprocess.run([sys.executable, "-m", "landmark_unet.train", *args], capture_output=True, text=True,
                          timeout=600, env=env(tmp_path, LANDMARK_UNET_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not partial.exists()  # the killed build's leftovers are gone
    entries = list(subjects.iterdir())
    assert len(entries) == 6 and all((p / "meta.json").is_file() for p in entries)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_prediction_killed_half_way_leaves_only_complete_files(reference, tmp_path):
    """Killed while renaming the second of a case's files into place: every visible output is a whole NIfTI file;
    the next run writes all of them."""
    import nibabel as nib

    run, _ = reference
    phantom = next((tmp_path.parent / "interrupt_cache").glob("phantom/*/sub000"))
    cases = tmp_path / "cases"
    for name in ("a", "b"):
        shutil.copytree(phantom, cases / name)
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"input={cases}", f"output={tmp_path / 'out'}",
            "probabilities=true", "progress=false", f"hydra.run.dir={tmp_path / 'predict'}"]
    killed_at(tmp_path, "landmark_unet.predict", "os", "replace", 2, args)
    out = tmp_path / "out"
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["a_liver.nii.gz"]
    assert nib.load(out / "a_liver.nii.gz").get_fdata().shape == nib.load(cases / "a" / "fat.nii.gz").shape

    proc = subprocess.run([sys.executable, "-m", "landmark_unet.predict", *args], capture_output=True, text=True,
                          timeout=600, env=env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == ["a_liver.nii.gz", "a_liver_prob.nii.gz", "b_liver.nii.gz", "b_liver_prob.nii.gz"]
    assert all(np.isfinite(nib.load(out / n).get_fdata()).all() for n in written)


def test_continuing_from_another_models_checkpoint_is_refused(reference, tmp_path):
    run, _ = reference
    proc = subprocess.run(command(f"hydra.run.dir={tmp_path / 'run'}", "fusion=early",
                                  f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"),
                          capture_output=True, text=True, timeout=300, env={**env(tmp_path), "LANDMARK_UNET_DEBUG": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {run / 'checkpoints' / 'last.ckpt'}: checkpoint of another model: fusion 'none' (this run: 'early')"]
    assert not (tmp_path / "run" / "checkpoints").exists()


class _Payload:
    """Unpickling it would create a file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(reference, tmp_path, entry):
    run, _ = reference
    marker = tmp_path / "pwned"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["extra"] = _Payload(marker)
    evil = run / "checkpoints" / f"evil-{entry}.ckpt"  # beside the run's config, as evaluate expects
    torch.save(state, evil)
    args = command(f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={evil}") if entry == "train" else [
        sys.executable, "-m", "landmark_unet.evaluate", f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'eval'}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**env(tmp_path), "LANDMARK_UNET_DEBUG": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"error: {evil}: cannot read checkpoint: it holds objects other than tensors and plain data, "
                    "which could run code when loaded (refused)")
    assert not marker.exists()
    evil.unlink()
