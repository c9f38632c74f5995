"""The study report's statistics: pure functions of numbers, and the rule that turns a difference and its p into a
verdict.

One pair of runs A, B over the evaluation items both answered and the seeds both have:
  c_i = correctness of item i averaged over the seeds,  d_i = c_i(A) - c_i(B),  difference = 100 * mean_i d_i;
  paired bootstrap: resample the items with replacement; 95% CI = 2.5th/97.5th percentiles of the resampled
  difference; two-sided p = (1 + #{|d* - d| >= |d|}) / (1 + resamples), the resampled differences shifted to the
  null of no difference;
  sign test: n = #{i: d_i != 0}, k = #{i: d_i > 0}, p = min(1, 2 * sum_{j <= min(k, n-k)} C(n, j) / 2^n).

Study II's pilot compares a run with the base model on the same test items (paired_nll_difference for ConvAI2's
turns, paired_accuracy_difference for commonsense items) and counts the difference in standard errors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ALPHA = 0.05
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported (the opposite is significant)"
NOT_DISTINGUISHABLE = "not distinguishable at this scale"


class Bootstrap(NamedTuple):
    """A bootstrap's 95% interval of a mean and its two-sided p against no difference."""

    low: float                     # 2.5th percentile of the resampled means
    high: float                    # 97.5th percentile
    p: float


def paired_bootstrap(differences, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Bootstrap:
    """(2.5th percentile, 97.5th percentile, two-sided p) of mean(d) over items resampled with replacement;
    p = (1 + #{|mean(d*) - mean(d)| >= |mean(d)|}) / (1 + resamples)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_bootstrap needs a non-empty 1-D sequence of per-item differences")
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, d.size, size=(min(1000, resamples - start), d.size))].mean(axis=1)
                            for start in range(0, resamples, 1000)])
    return bootstrap_summary(means, d.mean())


def bootstrap_summary(means: np.ndarray, observed: float) -> Bootstrap:
    """(2.5th percentile, 97.5th percentile, two-sided p) of resampled means around the observed one:
    p = (1 + #{|mean* - observed| >= |observed|}) / (1 + resamples)."""
    extreme = np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12)
    low, high = np.percentile(means, [2.5, 97.5])
    return Bootstrap(float(low), float(high), (1 + int(extreme)) / (1 + means.size))


def block_bootstrap(series: list, block: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Bootstrap:
    """paired_bootstrap's (low, high, p) for the mean of d over several series of dependent values (one per training
    run): each resample redraws every series as consecutive blocks of ``block`` values starting at random positions
    (a moving-block bootstrap, wrapping at the end), which keeps the dependence between neighbouring values."""
    series = [np.asarray(x, dtype=np.float64) for x in series if len(x)]
    if not series or block < 1:
        raise ValueError("block_bootstrap needs a non-empty series and a block of >= 1 values")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for x in series:
        starts = rng.integers(0, x.size, size=(resamples, -(-x.size // block)))
        positions = (starts[:, :, None] + np.arange(block)).reshape(resamples, -1)[:, :x.size] % x.size
        total += x[positions].sum(axis=1)
    return bootstrap_summary(total / sum(x.size for x in series), np.concatenate(series).mean())


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: p = min(1, 2 * sum_{j <= min(wins, losses)} C(n, j) / 2^n), n = wins + losses."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test needs counts >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, j) for j in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def at_least_k_successes(k: int, chances: list[float]) -> float:
    """P(X >= k) for X the number of successes in independent trials with success probabilities p_i (the binomial
    when they are equal): P_0 = [1], P_i[j] = P_{i-1}[j] (1 - p_i) + P_{i-1}[j - 1] p_i, then sum_{j >= k} P_n[j]."""
    dist = [1.0]
    for p in chances:
        dist = [a * (1 - p) + b * p for a, b in zip(dist + [0.0], [0.0] + dist)]
    return sum(dist[max(k, 0):])


class PairedDifference(NamedTuple):
    """A paired difference over n items (> 0: the run is better) and its standard error."""

    difference: float
    se: float
    n: int

    @property
    def standard_errors(self) -> float:
        """difference / se: +-inf when se is 0 and the difference is not, 0 when both are."""
        if self.se > 0:
            return self.difference / self.se
        return math.copysign(math.inf, self.difference) if self.difference else 0.0


def paired_nll_difference(base_nll, run_nll, tokens) -> PairedDifference:
    """Per test turn d_i = nll_base_i - nll_run_i (each summed over the turn's T_i tokens, the same in both runs):
    difference = sum_i d_i / sum_i T_i (nats per token), se = sd(d) * sqrt(n) / sum_i T_i (sd with n - 1)."""
    base, run, t = (np.asarray(x, dtype=np.float64) for x in (base_nll, run_nll, tokens))
    if not base.ndim == 1 or base.shape != run.shape or base.shape != t.shape or base.size < 2:
        raise ValueError(f"paired_nll_difference needs >= 2 turns and one NLL of each run and one token count per "
                         f"turn, got {base.shape}, {run.shape}, {t.shape}")
    d, total = base - run, t.sum()
    return PairedDifference(float(d.sum() / total), float(d.std(ddof=1) * math.sqrt(d.size) / total), int(d.size))


def paired_accuracy_difference(run_correct, base_correct) -> PairedDifference:
    """Per item d_i = correct_run_i - correct_base_i (each 0 or 1): difference = 100 * mean(d) points,
    se = 100 * sd(d) / sqrt(n) (sd with n - 1)."""
    run, base = (np.asarray(x, dtype=np.float64) for x in (run_correct, base_correct))
    if not run.ndim == 1 or run.shape != base.shape or run.size < 2:
        raise ValueError(f"paired_accuracy_difference needs >= 2 items and one correctness of each run per item, "
                         f"got {run.shape} and {base.shape}")
    d = run - base
    return PairedDifference(float(100 * d.mean()), float(100 * d.std(ddof=1) / math.sqrt(d.size)), int(d.size))


def verdict(difference: float, p: float) -> str:
    """Supported: the difference (signed so that > 0 is the paper's direction) is > 0 with p < ALPHA; not supported:
    < 0 with p < ALPHA; otherwise not distinguishable."""
    if p >= ALPHA:
        return NOT_DISTINGUISHABLE
    return SUPPORTED if difference > 0 else NOT_SUPPORTED


def chance_verdict(p: float) -> str:
    """A count against chance (Table 10, Figure 3) is supported when P(at least as many by chance) < ALPHA."""
    return SUPPORTED if p < ALPHA else NOT_DISTINGUISHABLE
