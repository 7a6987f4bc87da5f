"""Paired comparisons of two methods over training seeds: mean difference, its standard error, one-sided t-test.

Each training seed gives every student the same initialisation, data order and evaluation prompts, so the two
scores of one seed form a pair and the per-seed difference d_k = a_k − b_k removes what the seed does to both.
The claim "a > b" is tested one-sided: t = mean(d) / (sd(d) / √n) with n − 1 degrees of freedom
(`scipy.stats.ttest_rel(a, b, alternative="greater")`). A fixed reference (the demo's single teacher) is
compared the same way by repeating its value for every seed, which is the one-sample test of d against 0.

Conventions: fewer than two pairs give no test (t and p are None); when every difference is the same, the
t statistic is ±∞ (p = 0 or 1) and a zero difference gives p = 1 — a claim never holds on a tie.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class PairedComparison:
    """The evidence for "a > b" from paired per-seed scores."""

    n: int  # number of pairs
    mean_a: float
    mean_b: float
    mean_diff: float  # mean of a_k − b_k
    std_err: float  # sd(d) / √n (0 with one pair)
    t: float | None  # None with fewer than two pairs
    p_value: float | None  # one-sided, H1: mean(a − b) > 0; None with fewer than two pairs
    diffs: tuple[float, ...]

    def holds(self, alpha: float = 0.05, min_pairs: int = 3) -> bool:
        """True when there are at least `min_pairs` pairs and the one-sided p-value is below `alpha`."""
        return self.p_value is not None and self.n >= min_pairs and self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (infinite t written as a string)."""
        out = asdict(self)
        out["diffs"] = list(self.diffs)
        if out["t"] is not None and math.isinf(out["t"]):
            out["t"] = "inf" if out["t"] > 0 else "-inf"
        return out


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """Compare per-seed scores a_k and b_k (same seeds, same order): mean difference, SE, one-sided paired t-test."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same number of seeds, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no scores to compare")
    a, b = [float(x) for x in a], [float(x) for x in b]
    diffs = tuple(x - y for x, y in zip(a, b))
    n = len(diffs)
    mean_diff = statistics.fmean(diffs)
    if n < 2:
        return PairedComparison(n, statistics.fmean(a), statistics.fmean(b), mean_diff, 0.0, None, None, diffs)
    std_err = statistics.stdev(diffs) / math.sqrt(n)
    if std_err == 0.0:  # every pair differs by the same amount: t = ±inf, or undefined (a tie)
        t = math.copysign(math.inf, mean_diff) if mean_diff else 0.0
        p = 0.0 if mean_diff > 0 else 1.0
    else:
        from scipy import stats

        result = stats.ttest_rel(a, b, alternative="greater")
        t, p = float(result.statistic), float(result.pvalue)
    return PairedComparison(n, statistics.fmean(a), statistics.fmean(b), mean_diff, std_err, t, p, diffs)
