"""Paired comparisons a reviewer accepts: a t interval over seeds, and a bootstrap over items.

Both compare method A with method B on the same units (seeds that share data order, or the same
cloze items) and report A - B: for a loss or an NLL, negative means A is better. A difference
"holds" only where its 95% interval excludes zero. Neither corrects for multiplicity: a table that
makes m comparisons should say m beside it (about 1 in 20 intervals excludes zero by chance).
"""

import math

import numpy as np


def t_quantile(p, df, grid=200_001):
    """The p-quantile (p > 1/2) of Student's t with df degrees of freedom, without scipy. With
    x = sqrt(df) tan(u), the t density in u is proportional to cos(u)^(df - 1) on [0, pi/2): we
    integrate that (trapezoid rule), find the u whose share of the half is 2p - 1, map it back."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 1/2 < p < 1 and df >= 1, got p={p}, df={df}")
    u = np.linspace(0.0, math.pi / 2, grid)
    f = np.cos(u) ** (df - 1)
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2)])
    return math.sqrt(df) * math.tan(np.interp(2 * p - 1, cdf / cdf[-1], u))


def paired_t(a, b, level=0.95):
    """Per-seed values of A and B (seed i of each paired) -> the mean of A - B, its t interval at
    `level` (n - 1 degrees of freedom), and whether it holds. n >= 2 seeds."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need two paired lists of at least 2 values, got {len(d)} differences")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile((1 + level) / 2, len(d) - 1) * sd / math.sqrt(len(d))
    low, high = mean - half, mean + half
    return dict(
        mean=mean, low=low, high=high, sd=sd, n=len(d), df=len(d) - 1, holds=low > 0 or high < 0
    )


def paired_bootstrap(nll_a, nll_b, resamples=10_000, seed=0, level=0.95):
    """Per-item NLL of A and B on the same items (nats) -> the mean of A - B per item, its
    percentile interval at `level` over `resamples` resamples of the items (drawn with replacement
    by numpy's generator seeded `seed`, one resample after another), whether it holds, and the share
    of items A wins (a lower NLL; a tie counts half)."""
    d = np.asarray(nll_a, dtype=np.float64) - np.asarray(nll_b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need two paired lists of at least 2 items, got {len(d)} differences")
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(resamples)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    won = float(np.mean(d < 0) + np.mean(d == 0) / 2)
    return dict(
        mean=float(d.mean()),
        low=float(low),
        high=float(high),
        n=len(d),
        won=won,
        holds=bool(low > 0 or high < 0),
    )
