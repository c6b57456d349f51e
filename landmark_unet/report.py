"""Tables from finished runs: ``python -m landmark_unet.report DIR [DIR ...] [--out DIR]``.

Reads every ``metrics.json`` below the given (multi)run directories and writes ``report.md`` and ``report.csv``:
one row per setting (a run's overrides without ``organ`` and the split round), one column per organ, each cell the
mean and standard deviation of the per-body test Dice pooled over the rounds and bodies of that setting, plus the
mean seconds per epoch. Runs without metrics.json (failed or unfinished) are listed by their overrides.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.data.organs import ORGANS
from landmark_unet.errors import InputError, exit_on_input_error

IGNORED_KEYS = ("organ", "data.split.round", "hydra.", "paths.", "trainer.enable_progress_bar", "callbacks.progress",
                "data.num_workers")


def setting_of(overrides: list[str]) -> str:
    """A run's setting: its overrides without the organ, the round and bookkeeping keys."""
    kept = [o for o in overrides if not o.lstrip("~+").startswith(IGNORED_KEYS)]
    return " ".join(sorted(kept)) or "(defaults)"


def collect(dirs: list[Path]) -> tuple[dict, list[str]]:
    """({setting: {organ: {"dice": [per-body values], "seconds": [...]}}}, [missing runs])."""
    table: dict = defaultdict(lambda: defaultdict(lambda: {"dice": [], "seconds": []}))
    missing = []
    for d in dirs:
        if not d.is_dir():
            raise InputError(d, "run directory is missing")
        for hydra_dir in sorted(d.rglob(".hydra")):
            run = hydra_dir.parent
            overrides = [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")] \
                if (hydra_dir / "overrides.yaml").exists() else []
            metrics_path = run / "metrics.json"
            if not metrics_path.exists():
                missing.append(" ".join(overrides) or str(run))
                continue
            metrics = json.loads(metrics_path.read_text())
            for organ, result in metrics["test"].items():
                cell = table[setting_of(overrides)][organ]
                cell["dice"] += list(result["per_body"].values())
                cell["seconds"].append(metrics.get("seconds_per_epoch", float("nan")))
    return table, missing


def render(table: dict, missing: list[str]) -> tuple[str, str]:
    organs = [o for o in ORGANS if any(o in row for row in table.values())]
    md = ["| setting | " + " | ".join(organs) + " | s/epoch |", "|---" * (len(organs) + 2) + "|"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["setting", *[f"{o}_{s}" for o in organs for s in ("mean", "std", "n")], "seconds_per_epoch"])
    for setting, row in sorted(table.items()):
        cells, flat, secs = [], [], []
        for organ in organs:
            values = np.asarray(row[organ]["dice"]) if organ in row else np.zeros(0)
            secs += row[organ]["seconds"] if organ in row else []
            if len(values):
                cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
                flat += [f"{values.mean():.4f}", f"{values.std():.4f}", str(len(values))]
            else:
                cells.append("–")
                flat += ["", "", "0"]
        spe = float(np.nanmean(secs)) if secs else float("nan")
        md.append(f"| {setting} | " + " | ".join(cells) + f" | {spe:.1f} |")
        writer.writerow([setting, *flat, f"{spe:.2f}"])
    if missing:
        md += ["", "Runs without metrics.json (failed or unfinished):", *[f"- `{m}`" for m in missing]]
    return "\n".join(md) + "\n", out.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m landmark_unet.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    ap.add_argument("--out", type=Path, default=None, help="where to write report.md / report.csv (default: first DIR)")
    args = ap.parse_args(argv)
    with exit_on_input_error():
        table, missing = collect(args.dirs)
        if not table and not missing:
            raise InputError(args.dirs[0], "no run (no .hydra folder) below this directory")
        md, csv_text = render(table, missing)
        out = args.out or args.dirs[0]
        atomic_write_bytes(out / "report.md", md.encode())
        atomic_write_bytes(out / "report.csv", csv_text.encode())
        sys.stdout.write(md)


if __name__ == "__main__":
    main()
