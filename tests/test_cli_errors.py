"""Bad input through the real command line: exit code 2, one line naming the file or key, nothing half-written.

The table of malformed files, keys and checkpoints is tests/test_bad_input.py; here are the data folder itself,
the debug switch, and how :func:`~landmark_unet.errors.exit_on_input_error` reports an error raised inside Hydra's
``instantiate``.
"""

import os
import subprocess
import sys

import pytest
from conftest import assert_clean_failure, run_cli

from landmark_unet.errors import EXIT_BAD_INPUT, InputError, exit_on_input_error, input_error_of

TRAIN = ("trainer.max_epochs=1", "model.net.features=4", "data.num_workers=0")


def run_train(tmp_path, *overrides):
    return run_cli("landmark_unet.train", [f"hydra.run.dir={tmp_path / 'run'}", *TRAIN, *overrides], tmp_path)


def test_missing_and_empty_data_folder(tmp_path):
    proc = run_train(tmp_path, "data=folder", f"data.root={tmp_path / 'nowhere'}")
    assert_clean_failure(proc, "nowhere", "missing", tmp_path=tmp_path)
    (tmp_path / "empty").mkdir()
    proc = run_train(tmp_path, "data=folder", f"data.root={tmp_path / 'empty'}")
    assert_clean_failure(proc, "empty", "no subject", tmp_path=tmp_path)
    proc = run_train(tmp_path, "data=folder")
    assert_clean_failure(proc, "data.root", tmp_path=tmp_path)


def test_debug_env_shows_the_traceback(tmp_path):
    env_proc = subprocess.run(
        [sys.executable, "-m", "landmark_unet.train", f"hydra.run.dir={tmp_path / 'run'}", "organ=heart"],
        capture_output=True, text=True, env={**os.environ, "LANDMARK_UNET_DEBUG": "1", "HYDRA_FULL_ERROR": "1"},
        timeout=300)
    assert env_proc.returncode != 0 and "Traceback" in env_proc.stderr


def test_an_input_error_wrapped_by_instantiate_is_reported_as_bad_input(capsys, monkeypatch):
    """Hydra's instantiate raises InstantiationException from the constructor's InputError: still one line, code 2."""
    from hydra.utils import instantiate

    monkeypatch.delenv("LANDMARK_UNET_DEBUG", raising=False)
    cfg = {"_target_": "landmark_unet.data.datamodule.SliceDataModule", "crop": 100}
    with pytest.raises(Exception) as wrapped:
        instantiate(cfg)
    assert not isinstance(wrapped.value, InputError) and input_error_of(wrapped.value).where == "data.crop"
    with pytest.raises(SystemExit) as stop, exit_on_input_error():
        instantiate(cfg)
    assert stop.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: data.crop: must be a positive multiple of 16, got 100\n"


def test_a_constructor_rejecting_its_arguments_is_bad_input_named_by_its_key():
    """instantiate_setting: a ValueError or TypeError of the constructor becomes an InputError naming the key Hydra
    was instantiating (and the argument, where the message names just one), with the constructor's message; any
    other error stays what it is."""
    from omegaconf import OmegaConf

    from landmark_unet.config import instantiate_setting

    cfg = OmegaConf.create({"model": {"net": {"_target_": "landmark_unet.models.unet2d.UNet2d", "in_channels": 2,
                                              "features": 0}}})
    with pytest.raises(InputError) as bad:
        instantiate_setting(cfg.model)
    assert str(bad.value) == "model.net: in_channels, features and depth must be >= 1, got 2, 0, 4"
    cfg.model.net.features = 4
    cfg.model.net.featurs = 3
    with pytest.raises(InputError, match=r"^model.net.featurs: .*unexpected keyword argument 'featurs'"):
        instantiate_setting(cfg.model)
    # the one argument the message names, by its key or by its value (a string)
    trainer = OmegaConf.create({"trainer": {"_target_": "pytorch_lightning.Trainer", "precision": "fp13",
                                            "logger": False}})
    with pytest.raises(InputError, match=r"^trainer.precision: Precision 'fp13' is invalid"):
        instantiate_setting(trainer.trainer)
    with pytest.raises(InputError, match=r"^data.dtype: data type 'bogus' not understood"):
        instantiate_setting(OmegaConf.create({"data": {"_target_": "numpy.dtype", "dtype": "bogus",
                                                       "align": False}}).data)
    with pytest.raises(Exception) as bug:
        instantiate_setting(OmegaConf.create({"_target_": "builtins.open", "file": "/nonexistent/x"}))
    assert input_error_of(bug.value) is None  # FileNotFoundError: not a rejected argument


def test_other_errors_are_not_taken_for_bad_input():
    """A bug stays a stack trace: only an InputError (or an exception raised from one) becomes exit code 2."""
    with pytest.raises(ValueError), exit_on_input_error():
        try:
            raise KeyError("x")
        except KeyError as err:
            raise ValueError("a bug") from err


@pytest.mark.parametrize("module, arguments, needles", [
    ("landmark_unet.train", ["model=unet9"], ["error: model: no option 'unet9'", "unet3d_full"]),
    ("landmark_unet.train", ["model.net.featurs=3"], ["model.net.featurs", "+model.net.featurs=3"]),
    ("landmark_unet.train", ["trainer.max_epochs=[1"], ["trainer.max_epochs=[1", "cannot parse"]),
    pytest.param("landmark_unet.train", ["hydra/launcher=nope"], ["hydra/launcher", "'nope'", "slurm"],
                 marks=pytest.mark.slow),
    ("landmark_unet.evaluate", ["ckptt=x"], ["ckptt"]),
    pytest.param("landmark_unet.predict", ["~outputt"], ["outputt", "does not exist"], marks=pytest.mark.slow),
    pytest.param("landmark_unet.data.phantom", ["+seed=3"], ["seed", "++seed=3"], marks=pytest.mark.slow),
    pytest.param("landmark_unet.prune_cache", ["keep_dayz=3"], ["keep_dayz"], marks=pytest.mark.slow),
])
def test_hydra_command_line_errors_are_one_line(tmp_path, module, arguments, needles):
    """What Hydra itself rejects (a key the config lacks, a config group option that does not exist, an override
    that does not parse) is one line and exit code 2 as well (Hydra alone: several lines, exit code 1)."""
    proc = run_cli(module, [f"hydra.run.dir={tmp_path / 'run'}", *arguments], tmp_path)
    assert_clean_failure(proc, *needles, tmp_path=tmp_path)


def test_run_hydra_main_leaves_other_errors_alone(monkeypatch):
    from landmark_unet.errors import run_hydra_main

    monkeypatch.delenv("LANDMARK_UNET_DEBUG", raising=False)

    def broken():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_hydra_main(broken)


@pytest.mark.parametrize("entry, arguments, message", [
    ("train", ["organ=livr"], "error: organ: unknown organ 'livr'"),
    ("train", ["data=folder", "data.root={tmp}/nowhere"], "nowhere: data folder is missing"),
    ("predict", ["ckpt={tmp}/nope.ckpt", "input={tmp}", "output={tmp}/out"], "nope.ckpt: checkpoint file is missing"),
    ("predict", ["ckpt={tmp}/run/checkpoints/best.ckpt", "input={tmp}/nowhere", "output={tmp}/out"], "nowhere"),
    ("evaluate", ["ckpt={tmp}/nope.ckpt"], "nope.ckpt: checkpoint file is missing"),
    ("evaluate", ["predictions={tmp}/nowhere", "references={tmp}"], "nowhere: predictions folder is missing"),
])
def test_a_bad_command_line_is_reported_before_torch_is_imported(tmp_path, entry, arguments, message):
    """Each entry point checks its config and paths before Lightning and torch are imported (4-6 s on 2 cores),
    so a typo in an override or a path comes back at once: no import of either module in the failed command's
    import log."""
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"  # a checkpoint with its run config, for the input check
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("data:\n  channels: [fat, water]\n")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    env.pop("LANDMARK_UNET_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", f"landmark_unet.{entry}", f"hydra.run.dir={tmp_path / 'hydra'}",
                           *(a.format(tmp=tmp_path) for a in arguments)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
    assert message in proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "landmark_unet.config" in imported  # the import log is there
    assert not {"torch", "pytorch_lightning"} & imported
