"""Does bf16-mixed change the result? Quick-phantom liver Dice, fp32 against bf16-mixed, over the 5 rounds.

    python -m benchmarks.bench_precision [--rounds 5] [--seeds 10] [--epochs 20]

Runs ``python -m landmark_unet.train -m experiment=quick organ=liver trainer.max_epochs=20
data.split.round=0..4 trainer.precision=32-true,bf16-mixed seed=0..9`` (the same data, splits and initial weights
for both precisions) and reports the mean per-body test Dice of each precision and seed over every test body of
every round; the bf16 - fp32 difference paired by run (seed and round: same initial weights, same test bodies),
its mean with a 95 % t-interval over the runs (target: within 0.01); and what changing only the seed does to fp32,
the training noise the precision's effect must be told from. That noise sets the seeds: 3 seeds (15 pairs) left the
interval +-0.012 wide, and 10 seeds (50 pairs, about an hour on 2 CPU cores) still +-0.013, the per-run differences
being heavy-tailed (an SD of 0.045, mostly one atypical test body that some models miss; benchmarks/README.md). ``experiment=quick`` trains 6 epochs, too few to
converge (its Dice moves by 0.05 between seeds); 20 epochs (the default here) converge. At quick size the network is
8 channels wide: too small for bf16 to be faster, so no speed is claimed here (bench_train measures speed at the
study's size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats


def run(rounds: int = 5, seeds: int = 10, epochs: int = 20) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sweep = ["experiment=quick", "organ=liver", f"trainer.max_epochs={epochs}",
                 f"data.split.round={','.join(str(r) for r in range(rounds))}",
                 "trainer.precision=32-true,bf16-mixed", f"seed={','.join(str(s) for s in range(seeds))}"]
        cmd = [sys.executable, "-m", "landmark_unet.train", "-m", *sweep, f"hydra.sweep.dir={tmp}/sweep",
               f"paths.cache_dir={Path('.cache').resolve()}"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs: dict[tuple[str, int, int], float] = {}  # (precision, seed, round) -> mean Dice of its test bodies
        bodies: dict[tuple[str, int, int], dict] = {}  # the same -> {body: Dice}
        for path in sorted(Path(tmp, "sweep").rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            overrides = dict(o.split("=", 1) for o in metrics["overrides"])
            key = (metrics["precision"], int(overrides["seed"]), int(overrides["data.split.round"]))
            bodies[key] = metrics["test"]["liver"]["per_body"]
            runs[key] = float(np.mean(list(bodies[key].values())))
    out = {"command": "python -m landmark_unet.train -m " + " ".join(sweep), "runs": len(runs)}
    # every run's per-body Dice, "<precision> seed <s> round <r>": {body: Dice} (a heavy tail is read from these)
    out["per_body_dice"] = {f"{p} seed {s} round {r}": {b: round(d, 4) for b, d in sorted(bodies[(p, s, r)].items())}
                            for p, s, r in sorted(bodies)}
    mean = {}
    for p, tag in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
        for seed in range(seeds):  # every round has the same number of test bodies: the mean of runs is of bodies
            mean[(p, seed)] = float(np.mean([runs[(p, seed, r)] for r in range(rounds)]))
            out[f"quick_liver_dice_{tag}_seed{seed}"] = mean[(p, seed)]
    paired = np.array([runs[("bf16-mixed", s, r)] - runs[("32-true", s, r)] for s in range(seeds)
                       for r in range(rounds)])
    half = float(stats.t.ppf(0.975, len(paired) - 1) * paired.std(ddof=1) / np.sqrt(len(paired)))
    out["bf16_dice_difference"] = float(paired.mean())  # bf16 - fp32, mean over runs
    out["bf16_dice_difference_ci95"] = [float(paired.mean()) - half, float(paired.mean()) + half]
    out["bf16_dice_difference_per_seed"] = [mean[("bf16-mixed", s)] - mean[("32-true", s)] for s in range(seeds)]
    out["bf16_dice_difference_sd_per_run"] = float(paired.std(ddof=1))
    if seeds > 1:  # what changing only the seed does, in fp32: the noise the precision's difference sits in
        out["fp32_seed_to_seed_difference"] = mean[("32-true", 1)] - mean[("32-true", 0)]
        out["fp32_seed_sd"] = float(np.std([mean[("32-true", s)] for s in range(seeds)], ddof=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    print(json.dumps(run(args.rounds, args.seeds, args.epochs), indent=2))


if __name__ == "__main__":
    main()
