import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from landmark_unet.report import collect, render, setting_of


def fake_run(root, name, overrides, per_body=None, seconds=10.0):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    if per_body is not None:
        organ = next(o.split("=")[1] for o in overrides if o.startswith("organ="))
        (run / "metrics.json").write_text(json.dumps({
            "test": {organ: {"dice_mean": 0, "dice_std": 0, "per_body": per_body}}, "seconds_per_epoch": seconds}))


def test_rows_pool_rounds_and_columns_are_organs(tmp_path):
    fake_run(tmp_path, "0", ["fusion=none", "organ=liver", "data.split.round=0"], {"a": 0.9, "b": 0.8})
    fake_run(tmp_path, "1", ["fusion=none", "organ=liver", "data.split.round=1"], {"c": 1.0, "d": 0.9}, 20.0)
    fake_run(tmp_path, "2", ["fusion=early", "organ=liver", "data.split.round=0"], {"a": 0.5, "b": 0.7})
    fake_run(tmp_path, "3", ["fusion=early", "organ=spleen", "data.split.round=0"], {"a": 0.6})
    fake_run(tmp_path, "4", ["fusion=late", "organ=liver", "data.split.round=0"], None)  # failed
    table, missing = collect([tmp_path])
    assert set(table) == {"fusion=none", "fusion=early"}
    assert table["fusion=none"]["liver"]["dice"] == [0.9, 0.8, 1.0, 0.9]
    md, csv_text = render(table, missing)
    assert "| fusion=none | 0.900 ± 0.071 | – | 15.0 |" in md
    assert "| fusion=early | 0.600 ± 0.100 | 0.600 ± 0.000 | 10.0 |" in md
    assert "fusion=late organ=liver" in md.split("Runs without metrics.json")[1]
    assert csv_text.splitlines()[0].startswith("setting,liver_mean,liver_std,liver_n,spleen_mean")


def test_setting_ignores_bookkeeping_keys():
    assert setting_of(["organ=liver", "fusion=late", "~callbacks.progress", "trainer.enable_progress_bar=false",
                       "hydra.sweep.dir=x"]) == "fusion=late"


def test_cli_bad_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "landmark_unet.report", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope: run directory is missing" in proc.stderr


if __name__ == "__main__":
    pytest.main([__file__])
