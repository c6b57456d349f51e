"""Tables, statistics and plots from finished runs: ``python -m landmark_unet.report DIR [DIR ...] [--out DIR]``.

Reads every run (a folder with ``.hydra/``) below the given (multi)run directories and writes into ``--out``
(default: the first DIR):

- ``report.md``: per table, the study-shaped table (one row per setting, one column per organ, each cell the mean
  and standard deviation of the per-body test Dice pooled over rounds and bodies, plus seconds per epoch), then each
  setting against the table's baseline row: the mean per-body paired difference with its 95 % bootstrap confidence
  interval, the Wilcoxon signed-rank p-value and its Holm-adjusted value over the table (:mod:`landmark_unet.stats`);
- ``report.csv``: the same, one line per table x setting x organ;
- ``<table>_dice.png`` (grouped bars with 95 % confidence intervals) and ``<table>_curves.png`` (validation Dice per
  epoch and organ, the study's Figure 7).

A run's table and baseline come from its config (``report.table``, ``report.baseline``, set by the table
experiments; default: the sweep folder's name and no comparison; ``--baseline`` overrides). A setting is a run's
overrides that vary within its table, without the organ, the round and bookkeeping keys. Runs without metrics.json, and jobs a multirun planned
(its ``multirun.yaml``) that never produced a run folder, are listed by their overrides.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from landmark_unet.config import read_yaml, saved_overrides
from landmark_unet.data.nifti import atomic_write_bytes
from landmark_unet.data.organs import ORGANS
from landmark_unet.errors import InputError, exit_on_input_error
from landmark_unet.launch import read_failure
from landmark_unet.stats import bootstrap_ci, holm, paired

IGNORED_KEYS = ("organ", "data.split.round", "experiment", "hydra.", "paths.", "trainer.enable_progress_bar",
                "callbacks.progress", "data.num_workers", "resume", "ckpt_path", "skip_done")


def setting_of(overrides: list[str]) -> str:
    """A run's setting: its overrides without the organ, the round and bookkeeping keys, sorted."""
    kept = [o for o in overrides if not o.lstrip("~+").startswith(IGNORED_KEYS)]
    return " ".join(sorted(kept)) or "(defaults)"


@dataclass
class Table:
    """One study table: per setting and organ, the per-body Dice keyed by (round, body), and per setting the
    seconds per epoch and the validation curves of its runs."""

    name: str
    baseline: str | None = None
    dice: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(dict)))
    seconds: dict = field(default_factory=lambda: defaultdict(list))
    curves: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    missing: list = field(default_factory=list)

    def organs(self) -> list[str]:
        return [o for o in ORGANS if any(o in row for row in self.dice.values())]

    def baseline_setting(self) -> str | None:
        """The setting whose overrides include every override of ``baseline``."""
        if not self.baseline:
            return None
        want = set(self.baseline.split())
        matches = [s for s in self.dice if want <= set(s.split())]
        return min(matches, key=len) if matches else None


def read_metrics(path: Path) -> dict:
    """A run's metrics.json, checked for what the report uses: ``test`` maps each organ to a ``per_body`` mapping
    of body -> Dice (a number).

    Raises:
        InputError: not JSON, or a missing or malformed key (named).
    """
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(path, f"not a landmark_unet metrics file ({err.__class__.__name__}: {err})") from None
    test = metrics.get("test") if isinstance(metrics, dict) else None
    if not isinstance(test, dict):
        raise InputError(path, "not a landmark_unet metrics file (no 'test' mapping of organ results)")
    for organ, result in test.items():
        per_body = result.get("per_body") if isinstance(result, dict) else None
        if not isinstance(per_body, dict):
            raise InputError(path, f"test.{organ}.per_body is missing (expected body -> Dice)")
        for body, value in per_body.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(path, f"test.{organ}.per_body.{body}: {value!r} is not a number")
    return metrics


def _planned_jobs(multirun_yaml: Path) -> tuple[str | None, list[list[str]]]:
    """(table name, the jobs a multirun planned) from its multirun.yaml: params, command-line sweeps and rows."""
    from hydra_plugins.landmark_unet_sweeper.grid import expand

    cfg = read_yaml(multirun_yaml)
    sweeper = cfg.hydra.get("sweeper", {})
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = [str(o) for o in cfg.hydra.overrides.get("task", [])]
    rows = [[str(o) for o in row] for row in (sweeper.get("rows") or [])]
    return OmegaConf.select(cfg, "report.table", default=None), expand(params + task, rows)


def _varying(override_lists: list[list[str]]) -> set[str]:
    """The override keys whose value differs between runs (or that some runs lack): what tells settings apart."""
    runs = [{o.split("=", 1)[0]: o for o in overrides} for overrides in override_lists]
    keys = set().union(*runs)
    return {k for k in keys if len({run.get(k) for run in runs}) > 1}


def collect(dirs: list[Path], baseline: str | None = None) -> dict[str, Table]:
    """Every run below ``dirs``, grouped into tables. A run's setting is its overrides that vary within its table,
    without the organ, the round and bookkeeping keys (the settings every run shares are the table's)."""
    runs = []  # (table name, overrides, run dir, config)
    tables: dict[str, Table] = {}
    seen: set[frozenset] = set()
    for d in dirs:
        if not d.is_dir():
            raise InputError(d, "run directory is missing")
        for hydra_dir in sorted(d.rglob(".hydra")):
            overrides = saved_overrides(hydra_dir.parent)
            seen.add(frozenset(overrides))
            cfg = read_yaml(hydra_dir / "config.yaml") if (hydra_dir / "config.yaml").exists() else {}
            if not isinstance(cfg, dict) and not OmegaConf.is_dict(cfg):
                raise InputError(hydra_dir / "config.yaml", "is not a run config (expected a mapping of keys)")
            report = cfg.get("report") or {}
            name = report.get("table") or d.name
            table = tables.setdefault(name, Table(name))
            table.baseline = baseline or table.baseline or report.get("baseline")
            runs.append((name, overrides, hydra_dir.parent, cfg))
        for multirun in sorted(d.rglob("multirun.yaml")):
            name, jobs = _planned_jobs(multirun)
            lost = [job for job in jobs if frozenset(job) not in seen]
            if lost:
                tables.setdefault(name or d.name, Table(name or d.name)).missing += [
                    " ".join(job) + " (never ran)" for job in lost]
    varying = {name: _varying([ov for n, ov, _, _ in runs if n == name]) for name in tables}
    for name, overrides, run, cfg in runs:
        table = tables[name]
        metrics_path = run / "metrics.json"
        if not metrics_path.exists():
            failure = read_failure(run)
            table.missing.append((" ".join(overrides) or str(run)) + (f" (failed: {failure})" if failure else ""))
            continue
        metrics = read_metrics(metrics_path)
        test = metrics["test"]
        round_ = OmegaConf.select(cfg, "data.split.round", default=0) if cfg else 0
        setting = setting_of([o for o in overrides if o.split("=", 1)[0] in varying[name]])
        for organ, result in test.items():
            for body, value in result["per_body"].items():
                table.dice[setting][organ][(round_, body)] = float(value)
        table.seconds[setting].append(metrics.get("seconds_per_epoch", float("nan")))
        history = metrics.get("history") or {}
        for organ in test:
            series = history.get(f"val/dice/{organ}")
            if series:
                table.curves[setting][organ].append(series)
    return tables


def _fmt(x: float, signed: bool = False) -> str:
    return "nan" if x != x else (f"{x:+.3f}" if signed else f"{x:.3f}")


def _p(p: float) -> str:
    return "–" if p != p else ("<0.001" if p < 0.001 else f"{p:.3f}")


def analyse(table: Table) -> list[dict]:
    """One record per setting x organ: summary, and against the baseline the paired comparison."""
    base = table.baseline_setting()
    records = []
    for setting in sorted(table.dice, key=lambda s: (s != base, s)):
        secs = [s for s in table.seconds[setting] if s == s]
        for organ in table.organs():
            values = table.dice[setting].get(organ, {})
            x = np.array(list(values.values()), dtype=np.float64)
            low, high = bootstrap_ci(x)
            rec = {"table": table.name, "setting": setting, "organ": organ, "n": len(x),
                   "mean": float(x.mean()) if len(x) else float("nan"),
                   "std": float(x.std()) if len(x) else float("nan"), "ci_low": low, "ci_high": high,
                   "seconds_per_epoch": float(np.mean(secs)) if secs else float("nan"),
                   "baseline": base or "", "n_pairs": 0, "diff_mean": float("nan"), "diff_ci_low": float("nan"),
                   "diff_ci_high": float("nan"), "p_wilcoxon": float("nan"), "p_holm": float("nan")}
            if base and setting != base and values and organ in table.dice[base]:
                c = paired(values, table.dice[base][organ])
                rec.update(n_pairs=c.n, diff_mean=c.mean_diff, diff_ci_low=c.ci_low, diff_ci_high=c.ci_high,
                           p_wilcoxon=c.p_wilcoxon)
            records.append(rec)
    adjusted = holm([r["p_wilcoxon"] for r in records])
    for rec, p in zip(records, adjusted):
        rec["p_holm"] = float(p)
    return records


def render_table(table: Table, records: list[dict]) -> str:
    organs = table.organs()
    by = {(r["setting"], r["organ"]): r for r in records}
    settings = list(dict.fromkeys(r["setting"] for r in records))
    base = table.baseline_setting()
    md = [f"## {table.name}", "", "Per-body test Dice, mean ± standard deviation over rounds and bodies (n bodies); "
          "seconds per training epoch.", "",
          "| setting | " + " | ".join(organs) + " | s/epoch |", "|---" * (len(organs) + 2) + "|"]
    for s in settings:
        cells = []
        for o in organs:
            r = by[(s, o)]
            cells.append(f"{r['mean']:.3f} ± {r['std']:.3f} ({r['n']})" if r["n"] else "–")
        spe = by[(s, organs[0])]["seconds_per_epoch"] if organs else float("nan")
        md.append(f"| {s}{' (baseline)' if s == base else ''} | " + " | ".join(cells) + f" | {spe:.1f} |")
    if table.baseline and base is None:
        md += ["", f"Baseline `{table.baseline}`: no run of that setting, so no comparison."]
    elif base and len(settings) > 1:
        md += ["", f"Against the baseline `{base}`, paired on the bodies both scored: mean difference in Dice "
               "[95 % bootstrap CI], Wilcoxon signed-rank p (Holm-adjusted over this table's comparisons).", "",
               "| setting | " + " | ".join(organs) + " |", "|---" * (len(organs) + 1) + "|"]
        for s in settings:
            if s == base:
                continue
            cells = []
            for o in organs:
                r = by[(s, o)]
                if not r["n_pairs"]:
                    cells.append("–")
                    continue
                cells.append(f"{_fmt(r['diff_mean'], True)} [{_fmt(r['diff_ci_low'], True)}, "
                             f"{_fmt(r['diff_ci_high'], True)}], p {_p(r['p_wilcoxon'])} ({_p(r['p_holm'])}), "
                             f"n {r['n_pairs']}")
            md.append(f"| {s} | " + " | ".join(cells) + " |")
    if table.missing:
        md += ["", "Runs without results (failed, unfinished or never started), by their overrides:",
               *[f"- `{m}`" for m in table.missing]]
    return "\n".join(md) + "\n"


CSV_FIELDS = ["table", "setting", "organ", "n", "mean", "std", "ci_low", "ci_high", "seconds_per_epoch", "baseline",
              "n_pairs", "diff_mean", "diff_ci_low", "diff_ci_high", "p_wilcoxon", "p_holm"]


def render_csv(records: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in records:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return out.getvalue()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def plot_bars(table: Table, records: list[dict]) -> bytes:
    """Grouped bars: organs on the x axis, one bar per setting, whiskers the 95 % bootstrap CI of the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = table.organs()
    settings = list(dict.fromkeys(r["setting"] for r in records))
    by = {(r["setting"], r["organ"]): r for r in records}
    width = 0.8 / max(len(settings), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(organs) + 0.15 * len(settings) * len(organs), 4))
    for i, s in enumerate(settings):
        means = np.array([by[(s, o)]["mean"] for o in organs])
        low = means - np.array([by[(s, o)]["ci_low"] for o in organs])
        high = np.array([by[(s, o)]["ci_high"] for o in organs]) - means
        ax.bar(np.arange(len(organs)) + (i - (len(settings) - 1) / 2) * width, np.nan_to_num(means), width,
               yerr=np.nan_to_num([low, high]), capsize=2, label=s)
    ax.set_xticks(np.arange(len(organs)), organs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test Dice per body (mean, 95 % CI)")
    ax.set_title(table.name)
    ax.legend(fontsize=7, loc="lower left")
    data = _png(fig)
    plt.close(fig)
    return data


def plot_curves(table: Table, settings: list[str]) -> bytes | None:
    """Validation Dice per epoch, one panel per organ, one line per setting (mean over its runs), in the order (and
    colours) of the bar plot."""
    organs = [o for o in table.organs() if any(table.curves[s].get(o) for s in table.curves)]
    if not organs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(organs), 3)
    rows = math.ceil(len(organs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, organ in zip(axes.flat, organs):
        for colour, setting in enumerate(settings):
            series = table.curves.get(setting, {}).get(organ)
            if not series:
                continue
            n = min(len(s) for s in series)
            with warnings.catch_warnings():  # an epoch without a value in any run stays a gap in the line
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(np.array([s[:n] for s in series], dtype=np.float64), axis=0)
            ax.plot(np.arange(1, n + 1), mean, color=f"C{colour}", label=f"{setting} ({len(series)} runs)")
        ax.set_title(organ)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Dice")
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(organs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{table.name}: validation Dice per epoch")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m landmark_unet.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first DIR)")
    ap.add_argument("--baseline", default=None, help="the row to compare against, as overrides (e.g. fusion=none)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = ap.parse_args(argv)
    with exit_on_input_error():
        tables = collect(args.dirs, baseline=args.baseline)
        if not tables:
            raise InputError(args.dirs[0], "no run (no .hydra folder) below this directory")
        out = args.out or args.dirs[0]
        out.mkdir(parents=True, exist_ok=True)
        md, records = [], []
        for table in tables.values():
            recs = analyse(table)
            records += recs
            md.append(render_table(table, recs))
            if not args.no_plots and recs:
                atomic_write_bytes(out / f"{table.name}_dice.png", plot_bars(table, recs))
                curves = plot_curves(table, list(dict.fromkeys(r["setting"] for r in recs)))
                if curves is not None:
                    atomic_write_bytes(out / f"{table.name}_curves.png", curves)
        text = "\n".join(md)
        atomic_write_bytes(out / "report.md", text.encode())
        atomic_write_bytes(out / "report.csv", render_csv(records).encode())
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
