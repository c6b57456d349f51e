"""Paired statistics for comparing two settings on the same test bodies.

The study (section 5.2) could not say whether landmarks help: its tables hold one mean per setting. Here every body
is scored by both settings, so the question is answered on the per-body differences ``d = setting - baseline``:
their mean with a 95 % percentile bootstrap confidence interval, a two-sided Wilcoxon signed-rank test (no normality
assumed, Dice differences are skewed), and Holm's correction when one table makes several comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedComparison:
    """Mean per-body difference with its bootstrap CI, the Wilcoxon p-value and the number of pairs."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_wilcoxon: float


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (1D); (nan, nan) when empty.

    Resamples the values with replacement ``n_boot`` times with a fixed seed, so a report is reproducible.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (exact for small samples without ties).

    1.0 when every difference is zero (nothing to test), nan without data.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if d.size == 0:
        return float("nan")
    if not np.any(d):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired(setting: dict, baseline: dict, level: float = 0.95, seed: int = 0) -> PairedComparison:
    """Compare two {body key: Dice} mappings on the bodies both scored (keys: e.g. (round, body name))."""
    keys = sorted(set(setting) & set(baseline))
    d = np.array([setting[k] - baseline[k] for k in keys], dtype=np.float64)
    low, high = bootstrap_ci(d, level=level, seed=seed)
    return PairedComparison(n=len(keys), mean_diff=float(d.mean()) if len(d) else float("nan"), ci_low=low,
                            ci_high=high, p_wilcoxon=wilcoxon_p(d))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (nan entries are left out and stay nan)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
