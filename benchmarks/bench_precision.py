"""Does bf16-mixed change the result? Quick-phantom liver Dice, fp32 against bf16-mixed, over the 5 rounds.

    python -m benchmarks.bench_precision [--rounds 5]

Runs ``python -m landmark_unet.train -m experiment=quick organ=liver data.split.round=0..4
trainer.precision=32-true,bf16-mixed`` (the same seeds, data and splits; only the precision differs) and reports
the mean per-body test Dice of each precision over every test body of every round, and their difference (target:
within 0.01). At quick size the network is 8 channels wide: too small for bf16 to be faster, so no speed is
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


def run(rounds: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "landmark_unet.train", "-m", "experiment=quick", "organ=liver",
               f"data.split.round={','.join(str(r) for r in range(rounds))}",
               "trainer.precision=32-true,bf16-mixed", f"hydra.sweep.dir={tmp}/sweep",
               f"paths.cache_dir={Path('.cache').resolve()}"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        dice: dict[str, list[float]] = {}
        for path in sorted(Path(tmp, "sweep").rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            precision = metrics["precision"]
            dice.setdefault(precision, []).extend(metrics["test"]["liver"]["per_body"].values())
    fp32, bf16 = np.mean(dice["32-true"]), np.mean(dice["bf16-mixed"])
    return {"command": " ".join(cmd[1:3] + cmd[3:6]), "bodies": len(dice["32-true"]),
            "quick_liver_dice_fp32": float(fp32), "quick_liver_dice_bf16": float(bf16),
            "bf16_dice_difference": float(bf16 - fp32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    print(json.dumps(run(ap.parse_args().rounds), indent=2))


if __name__ == "__main__":
    main()
