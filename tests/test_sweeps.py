"""The study's tables as sweeps: experiment configs, the grid sweeper's rows, submitit_local, the report on real runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, TINY
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hydra_plugins.landmark_unet_sweeper.grid import expand
from landmark_unet.config import validate

# jobs per table: rows (or grid cells) x the study's 5 rounds
EXPECTED_JOBS = {"table1": 6 * 5, "table2": 3 * 5 * 5, "table3": 3 * 5 * 5, "table4": 8 * 5, "table5": 3 * 5 * 5}


def sweep_jobs(experiment: str) -> tuple[object, list[list[str]]]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
    return cfg, expand(params, [list(r) for r in sweeper.rows])


@pytest.mark.parametrize("table", sorted(EXPECTED_JOBS))
@pytest.mark.parametrize("quick", [False, True])
def test_table_experiments_plan_the_study_grid_and_every_job_composes(table, quick):
    experiment = f"{table}_quick" if quick else table
    cfg, jobs = sweep_jobs(experiment)
    assert cfg.hydra.sweeper._target_.endswith("GridSweeper")
    assert len(jobs) == EXPECTED_JOBS[table]
    assert sorted({o for job in jobs for o in job if o.startswith("data.split.round=")}) == [
        f"data.split.round={r}" for r in range(5)]
    assert cfg.report.table == experiment and cfg.report.baseline
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for job in jobs[:: 5]:  # one round of every setting
            job_cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *job])
            validate(job_cfg)
            assert job_cfg.data.split.rounds == 5
            if quick:
                assert job_cfg.data.phantom.shape == [64, 64, 64] and job_cfg.model.net.features == 8
            else:
                assert job_cfg.data.phantom.n_subjects == 50 and job_cfg.model.net.features == 64


def test_table_specifics():
    cfg, jobs = sweep_jobs("table1")
    multi = next(j for j in jobs if "model=unet2d_multitask" in j)
    assert "organ=all" in multi and cfg.content == "fat"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        job = compose(config_name="train", overrides=["experiment=table1", *multi])
        assert job.model.net._target_.endswith("UNet2dMultiTask") and len(job.data.organs) == 5
        assert job.model.optimizer._target_ == "torch.optim.RMSprop" and job.trainer.max_epochs == 20
        t4 = compose(config_name="train", overrides=["experiment=table4"])
        assert t4.data.stack == 5 and t4.trainer.max_epochs == 30 and t4.organ == "liver"
        t5 = compose(config_name="train", overrides=["experiment=table5"])
        assert t5.model.net._target_.endswith("UNet3d") and t5.trainer.max_epochs == 130
        assert t5.model.scheduler.step_size == 20
    _, t4_jobs = sweep_jobs("table4")
    rows = {tuple(j[:2]) for j in t4_jobs}
    assert ("data.crop=208", "augmentation=rotation10") in rows and ("data.crop=256", "augmentation=scale") not in rows


@pytest.mark.parametrize("experiment", ["recipe", "recipe_quick"])
def test_recipe_experiments_plan_40_jobs_that_compose(experiment):
    """4 recipe rows x fusion none/early x 5 rounds; every job composes, and the 3D rows are volumetric patch
    networks (the quick ones in batches of 2, 1600 steps in all); job folder names stay far below the 255-byte limit
    of a file name (the first quick 3D sweep's did not)."""
    _, jobs = sweep_jobs(experiment)
    assert len(jobs) == 40
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for job in jobs[::2]:  # every row and round without landmarks
            cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *job], return_hydra_config=True)
            validate(cfg)
            assert len(f"{len(jobs)}_{cfg.hydra.job.override_dirname}") < 200
            if cfg.data.stack == 0:
                assert cfg.model.net._target_.endswith("UNet3dFull")
                if experiment == "recipe_quick":
                    steps = cfg.data.samples_per_epoch // cfg.data.batch_size * cfg.trainer.max_epochs
                    assert cfg.data.batch_size == 2 and list(cfg.data.patch_size) == [32, 64, 64] and steps == 1600
                else:
                    assert list(cfg.data.patch_size) == [64, 160, 160] and cfg.data.phantom.n_subjects == 50


def test_quick_batches_are_8_slices_or_2_patches():
    """experiment=quick sets the batch after the model config: 8 for slice networks, 2 for a volumetric one."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for model, batch in (("unet2d", 8), ("unet3d", 8), ("unet3d_full_quick", 2)):
            cfg = compose(config_name="train", overrides=["experiment=quick", f"model={model}"])
            assert cfg.data.batch_size == batch, model
            validate(cfg)


def test_grid_rows_refuse_a_key_in_both():
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="organ"):
        expand(["organ=liver,spleen"], [["organ=all"]])


def _multirun(tmp_path: Path, *overrides: str, timeout: int = 600, base=tuple(TINY)) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "landmark_unet.train", "-m", *base, "~callbacks.progress",
           "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=os.environ.copy())


def test_rows_sweep_runs_and_reports(tmp_path):
    """A real 2-job sweep with rows through the basic launcher, then the report over it."""
    proc = _multirun(tmp_path, "hydra/sweeper=grid", 'hydra.sweeper.rows=[["fusion=none"],["fusion=late"]]',
                     "report.baseline='fusion=none'", "report.table=rows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    assert {tuple(json.loads(r.read_text())["overrides"][:1]) for r in runs} == {("fusion=none",), ("fusion=late",)}
    rep = subprocess.run([sys.executable, "-m", "landmark_unet.report", str(tmp_path / "sweep"), "--no-plots"],
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "## rows" in md and "fusion=none (baseline)" in md and "| fusion=late | " in md
    assert "never ran" not in md


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    proc = _multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                     "hydra.launcher.cpus_per_task=1", "data.split.round=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/metrics.json"))]
    assert len(metrics) == 2
    assert [m["cpu_threads"] for m in metrics] == [1, 1]  # the jobs run side by side: one core each
    assert {m["overrides"][-1] for m in metrics} == {"data.split.round=0", "data.split.round=1"}
    # rounds test different bodies
    assert set(metrics[0]["test"]["liver"]["per_body"]).isdisjoint(metrics[1]["test"]["liver"]["per_body"])
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))


def test_ddp_in_a_local_multirun_is_refused_with_one_line(tmp_path):
    proc = _multirun(tmp_path, "trainer=ddp", "seed=0,1", timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # every job failed, and the sweep says so
    assert "2 of 2 jobs failed" in proc.stderr
    assert proc.stderr.count("trainer.strategy: ddp on 2 devices inside a multirun") == 2
    assert "Traceback" not in proc.stderr
    for job in (tmp_path / "sweep").glob("*_seed=*"):
        assert "ddp on 2 devices" in json.loads((job / "failure.json").read_text())["error"]


def test_a_failed_job_does_not_stop_the_sweep_and_a_relaunch_skips_the_done_ones(tmp_path):
    """organ=heart fails (bad input) between two good jobs: the others still run, the failure is listed by the sweep
    and by the report; re-launched into the same folder with skip_done=true, the finished jobs are not trained again
    and the failure is still reported."""
    proc = _multirun(tmp_path, "organ=liver,heart,spleen")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 3 jobs failed" in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.strip().startswith("job 1 (1_"))
    assert "organ=heart" in line and line.endswith("): organ: unknown organ 'heart' (choose from liver, kidneys, "
                                                   "pancreas, spleen, bladder, all)")
    sweep = tmp_path / "sweep"
    done = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}
    assert sorted(n.split("_", 1)[0] for n in done) == ["0", "2"]
    failed = next(sweep.glob("1_*"))
    assert "unknown organ 'heart'" in json.loads((failed / "failure.json").read_text())["error"]

    again = _multirun(tmp_path, "organ=liver,heart,spleen", "skip_done=true")
    assert again.returncode == 1 and "1 of 3 jobs failed" in again.stderr
    assert {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")} == done  # not retrained
    assert again.stdout.count("skip_done") + again.stderr.count("skip_done") >= 2

    rep = subprocess.run([sys.executable, "-m", "landmark_unet.report", str(sweep), "--no-plots"],
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    md = (sweep / "report.md").read_text()
    listed = [ln for ln in md.splitlines() if "(failed: organ: unknown organ 'heart'" in ln]
    assert len(listed) == 1 and "organ=heart" in listed[0]


def test_optuna_search_config_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=optuna_2d"], return_hydra_config=True)
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "maximize"
    assert {"model.optimizer.lr", "data.batch_size", "trainer.max_epochs"} <= set(sweeper["params"])


def test_optuna_search_maximises_the_validation_dice(tmp_path):
    """Two real trials: the value Optuna records is a run's best validation Dice (never its test Dice)."""
    proc = _multirun(tmp_path, "hparams_search=optuna_2d", "hydra.sweeper.n_trials=2", "trainer.max_epochs=choice(1,2)",
                     base=[o for o in TINY if not o.startswith(("trainer.max_epochs", "data.batch_size"))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert len(runs) == 2
    assert result.best_value == pytest.approx(max(r["best_val_dice_mean"] for r in runs))
    assert set(result.best_params) == {"model.optimizer.lr", "data.batch_size", "trainer.max_epochs"}
