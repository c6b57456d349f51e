"""Does bf16-mixed change the result? Quick-phantom liver Dice, fp32 against bf16-mixed, over the 5 rounds.

    python -m benchmarks.bench_precision [--rounds 5] [--seeds 2]

Runs ``python -m landmark_unet.train -m experiment=quick organ=liver data.split.round=0..4
trainer.precision=32-true,bf16-mixed seed=0,1`` (the same data and splits) and reports, per seed, the mean per-body
test Dice of each precision over every test body of every round, their difference (target: within 0.01), and the
difference fp32 shows between the two seeds alone: the training noise the precision's effect must be told from. At quick size the network is 8 channels wide: too small for bf16 to be faster, so no speed is
claimed here (bench_train measures speed at the study's size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def run(rounds: int = 5, seeds: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sweep = ["experiment=quick", "organ=liver", f"data.split.round={','.join(str(r) for r in range(rounds))}",
                 "trainer.precision=32-true,bf16-mixed", f"seed={','.join(str(s) for s in range(seeds))}"]
        cmd = [sys.executable, "-m", "landmark_unet.train", "-m", *sweep, f"hydra.sweep.dir={tmp}/sweep",
               f"paths.cache_dir={Path('.cache').resolve()}"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        dice: dict[tuple[str, int], list[float]] = {}
        for path in sorted(Path(tmp, "sweep").rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            overrides = dict(o.split("=", 1) for o in metrics["overrides"])
            key = (metrics["precision"], int(overrides["seed"]))
            dice.setdefault(key, []).extend(metrics["test"]["liver"]["per_body"].values())
    mean = {key: float(np.mean(v)) for key, v in dice.items()}
    out = {"command": "python -m landmark_unet.train -m " + " ".join(sweep), "bodies": len(dice[("32-true", 0)])}
    for seed in range(seeds):
        out[f"quick_liver_dice_fp32_seed{seed}"] = mean[("32-true", seed)]
        out[f"quick_liver_dice_bf16_seed{seed}"] = mean[("bf16-mixed", seed)]
    diffs = [mean[("bf16-mixed", s)] - mean[("32-true", s)] for s in range(seeds)]
    out["bf16_dice_difference"] = float(np.mean(diffs))  # bf16 - fp32, mean over seeds
    out["bf16_dice_difference_per_seed"] = diffs
    if seeds > 1:  # what changing only the seed does, in fp32: the noise the precision's difference sits in
        out["fp32_seed_to_seed_difference"] = mean[("32-true", 1)] - mean[("32-true", 0)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(run(args.rounds, args.seeds), indent=2))


if __name__ == "__main__":
    main()
