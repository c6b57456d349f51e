import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from landmark_unet.report import analyse, collect, main, render_table, setting_of
from landmark_unet.stats import bootstrap_ci, holm, paired, wilcoxon_p


def fake_run(root, name, overrides, per_body=None, seconds=10.0, table=None, baseline=None, history=None):
    """A run folder as train writes it: .hydra/overrides.yaml and config.yaml, and metrics.json unless failed."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    round_ = next((int(o.split("=")[1]) for o in overrides if o.startswith("data.split.round=")), 0)
    OmegaConf.save(OmegaConf.create({"report": {"table": table, "baseline": baseline},
                                     "data": {"split": {"round": round_}}}), run / ".hydra" / "config.yaml")
    if per_body is not None:
        organs = per_body if isinstance(next(iter(per_body.values())), dict) else {
            next(o.split("=")[1] for o in overrides if o.startswith("organ=")): per_body}
        (run / "metrics.json").write_text(json.dumps({
            "test": {o: {"dice_mean": 0, "dice_std": 0, "per_body": pb} for o, pb in organs.items()},
            "seconds_per_epoch": seconds, "history": history or {}}))


# -- statistics with known answers -------------------------------------------------------------------------------

def test_wilcoxon_exact_small_sample():
    # Six positive differences with distinct ranks: the exact two-sided p is 2 / 2^6.
    assert wilcoxon_p([0.01, 0.02, 0.03, 0.04, 0.05, 0.06]) == pytest.approx(2 / 64)
    # Signs balanced in rank: W+ = 1+4+5 = 10 = W- -> p = 1 (up to the exact distribution's symmetry).
    assert wilcoxon_p([-0.02, -0.03, -0.06, 0.01, 0.04, 0.05]) > 0.9
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert np.isnan(wilcoxon_p([]))


def test_bootstrap_ci_matches_normal_theory_and_degenerate_cases():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 0.1, size=400)
    low, high = bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_ci(x) == (low, high)  # seeded: a report is reproducible


def test_paired_uses_only_common_bodies():
    a = {(0, "s1"): 0.9, (0, "s2"): 0.8, (1, "s3"): 0.7, (1, "s9"): 0.1}
    b = {(0, "s1"): 0.8, (0, "s2"): 0.6, (1, "s3"): 0.6}
    c = paired(a, b)
    assert c.n == 3 and c.mean_diff == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert c.ci_low == pytest.approx(0.1) and c.ci_high == pytest.approx(0.2)  # the extremes of 3 resampled values


def test_holm_known_values():
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(adjusted[3])


# -- tables -------------------------------------------------------------------------------------------------------

def test_rows_pool_rounds_and_columns_are_organs(tmp_path):
    fake_run(tmp_path, "0", ["fusion=none", "organ=liver", "data.split.round=0"], {"a": 0.9, "b": 0.8})
    fake_run(tmp_path, "1", ["fusion=none", "organ=liver", "data.split.round=1"], {"c": 1.0, "d": 0.9}, 20.0)
    fake_run(tmp_path, "2", ["fusion=early", "organ=liver", "data.split.round=0"], {"a": 0.5, "b": 0.7})
    fake_run(tmp_path, "3", ["fusion=early", "organ=spleen", "data.split.round=0"], {"a": 0.6})
    fake_run(tmp_path, "4", ["fusion=late", "organ=liver", "data.split.round=0"], None)  # failed
    (table,) = collect([tmp_path]).values()
    assert set(table.dice) == {"fusion=none", "fusion=early"}
    assert list(table.dice["fusion=none"]["liver"].values()) == [0.9, 0.8, 1.0, 0.9]
    md = render_table(table, analyse(table))
    assert "| fusion=early | 0.600 ± 0.100 (2) | 0.600 ± 0.000 (1) | 10.0 |" in md
    assert "| fusion=none | 0.900 ± 0.071 (4) | – | 15.0 |" in md
    assert "fusion=late organ=liver" in md.split("Runs without results")[1]


def test_setting_ignores_bookkeeping_keys():
    assert setting_of(["organ=liver", "fusion=late", "~callbacks.progress", "trainer.enable_progress_bar=false",
                       "hydra.sweep.dir=x", "experiment=table3_quick"]) == "fusion=late"


def test_paired_comparison_against_baseline_and_multitask_row(tmp_path):
    """Table 1's shape: single-task runs per organ against one multi-task run scoring every organ."""
    bodies = [f"s{i}" for i in range(8)]
    base = {b: 0.80 + 0.01 * i for i, b in enumerate(bodies)}
    better = {b: v + 0.04 + 0.005 * i for i, (b, v) in enumerate(base.items())}  # +0.04 ... +0.075, all distinct
    for organ in ("liver", "spleen"):
        fake_run(tmp_path, f"single_{organ}", ["model=unet2d", f"organ={organ}"], base,
                 table="table1", baseline="model=unet2d")
    fake_run(tmp_path, "multi", ["model=unet2d_multitask", "organ=all"], {"liver": better, "spleen": base},
             table="table1", baseline="model=unet2d")
    tables = collect([tmp_path])
    assert list(tables) == ["table1"]
    recs = {(r["setting"], r["organ"]): r for r in analyse(tables["table1"])}
    liver = recs[("model=unet2d_multitask", "liver")]
    assert liver["n_pairs"] == 8 and liver["diff_mean"] == pytest.approx(0.0575)
    assert 0.04 < liver["diff_ci_low"] < 0.0575 < liver["diff_ci_high"] < 0.075
    assert liver["p_wilcoxon"] == pytest.approx(2 / 2**8)  # 8 distinct positive differences: exact p = 2 / 2^8
    spleen = recs[("model=unet2d_multitask", "spleen")]
    assert spleen["diff_mean"] == 0 and spleen["p_wilcoxon"] == 1.0
    assert recs[("model=unet2d", "liver")]["n_pairs"] == 0  # the baseline is not compared with itself


def test_report_cli_writes_tables_csv_plots_and_lists_never_started_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(OmegaConf.create({
        "report": {"table": "t3", "baseline": "fusion=none"},
        "hydra": {"overrides": {"task": ["experiment=table3_quick"]},
                  "sweeper": {"params": {"fusion": "none,early", "data.split.round": "0,1"}, "rows": []}}}),
        sweep / "multirun.yaml")
    curve = {"epoch": [0, 1, 2], "val/dice/liver": [0.2, 0.5, 0.7]}
    for i, (fusion, round_) in enumerate([("none", 0), ("none", 1), ("early", 0)]):
        per_body = {f"r{round_}b{j}": 0.7 + 0.02 * j + (0.01 * (j + 1) if fusion == "early" else 0) for j in range(5)}
        fake_run(sweep, str(i), ["experiment=table3_quick", f"fusion={fusion}", f"data.split.round={round_}"],
                 {"liver": per_body}, table="t3", baseline="fusion=none", history=curve)
    main([str(sweep), "--out", str(tmp_path)])
    md = (tmp_path / "report.md").read_text()
    assert "fusion=none (baseline)" in md
    assert "| fusion=early | +0.030 [+0.0" in md
    assert "p 0.062 (0.062), n 5" in md  # 5 distinct positive differences: exact p = 2 / 2^5
    assert "`fusion=early data.split.round=1 experiment=table3_quick (never ran)`" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())))
    early = next(r for r in rows if r["setting"] == "fusion=early")
    assert early["n_pairs"] == "5" and float(early["p_wilcoxon"]) == pytest.approx(0.0625)
    for png in ("t3_dice.png", "t3_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "landmark_unet.report", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "nope: run directory is missing" in proc.stderr


if __name__ == "__main__":
    pytest.main([__file__])
