"""The bf16 Dice benchmark's statistics (benchmarks/bench_precision.summarize): runs combine across sweeps by
their (precision, seed, round) keys and pair by seed."""

import numpy as np
import pytest

from benchmarks.bench_precision import summarize


def runs(seeds, rounds=(0, 1), shift=0.0):
    """Per-body Dice of fabricated runs: fp32 bodies score 0.9 + seed / 100, bf16 the same plus ``shift`` and a
    round-dependent wobble that averages out over the rounds."""
    out = {}
    for s in seeds:
        for r in rounds:
            out[f"32-true seed {s} round {r}"] = {"a": 0.9 + s / 100, "b": 0.9 + s / 100}
            wobble = 0.01 * (-1) ** r
            out[f"bf16-mixed seed {s} round {r}"] = {"a": 0.9 + s / 100 + shift + wobble,
                                                      "b": 0.9 + s / 100 + shift + wobble + 0.002 * s}
    return out


def test_summarize_pairs_runs_by_seed_across_combined_sweeps():
    first, later = runs([0, 1, 2]), runs([3, 4, 5])
    out = summarize(first | later)
    assert out["seeds"] == [0, 1, 2, 3, 4, 5] and out["rounds"] == [0, 1] and out["runs_with_per_body_dice"] == 24
    per_seed = np.array(out["bf16_dice_difference_per_seed"])
    np.testing.assert_allclose(per_seed, 0.001 * np.arange(6), atol=1e-12)  # the wobble cancels over the rounds
    assert out["bf16_dice_difference"] == pytest.approx(per_seed.mean())
    lo, hi = out["bf16_dice_difference_ci95"]
    assert lo < per_seed.mean() < hi and hi - lo == pytest.approx(2 * 2.5706 * per_seed.std(ddof=1) / np.sqrt(6),
                                                                 rel=1e-3)
    assert out["quick_liver_dice_fp32_seed4"] == pytest.approx(0.94)
    assert out["fp32_seed_sd"] == pytest.approx(np.std(0.9 + np.arange(6) / 100, ddof=1))


def test_summarize_refuses_an_unpaired_run():
    incomplete = runs([0, 1])
    del incomplete["bf16-mixed seed 1 round 1"]
    with pytest.raises(ValueError, match="bf16-mixed', 1, 1"):
        summarize(incomplete)


def test_summarize_adds_seeds_known_only_by_their_means():
    """Seeds from an output that kept only each seed's mean join the interval; the per-run SD uses runs alone."""
    earlier = {("32-true", 0): 0.90, ("bf16-mixed", 0): 0.89, ("32-true", 1): 0.92, ("bf16-mixed", 1): 0.93,
               ("32-true", 2): 0.5}  # no bf16 mean for seed 2: left out
    out = summarize(runs([3, 4]), earlier)
    assert out["seeds"] == [0, 1, 3, 4] and out["rounds"] == [0, 1] and out["runs_with_per_body_dice"] == 8
    np.testing.assert_allclose(out["bf16_dice_difference_per_seed"], [-0.01, 0.01, 0.003, 0.004], atol=1e-12)
    assert out["bf16_dice_difference_sd_per_run"] == pytest.approx(
        np.std([0.01 + 0.003, -0.01 + 0.003, 0.01 + 0.004, -0.01 + 0.004], ddof=1))
