"""Statistics of a recoverability study: where a choice stands among all choices, rank correlation, intervals.

Plain numpy and scipy. A placement compares one choice with the other choices of a set by one measure; Kendall's
tau is the tau-b of scipy (ties handled); intervals are percentile bootstraps over a sample (seeded, so a study
reports the same interval twice) or Student-t intervals over seeds. FID is the Frechet distance of two Gaussians
fitted to feature vectors, so its own sampling noise can be bootstrapped over the generated samples.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

Interval = tuple[float, float]


# --------------------------------------------------------------------------- placing a choice among all choices


@dataclass(frozen=True)
class Placement:
    """Where one choice stands among `size` choices by one measure.

    rank: 1 + the number of choices strictly better; percentile: the share of the other choices it beats, a tie
    counting half, in percent (100: the best of the set, 0: the worst); regret: how far it is from the best value
    of the set, in the measure's units (0 for the best).
    """

    rank: int
    percentile: float
    regret: float
    size: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def place(values: Mapping[Hashable, float], chosen: Hashable, lower_is_better: bool = True) -> Placement:
    """The placement of `values[chosen]` among all of `values` (the chosen one included)."""
    if chosen not in values:
        raise ValueError(f"The chosen key {chosen!r} is not among the {len(values)} measured choices.")
    keys = list(values)
    scores = np.asarray([values[key] for key in keys], dtype=np.float64)
    if not lower_is_better:
        scores = -scores
    if not np.isfinite(scores).all():
        raise ValueError("Every measured value must be finite to place a choice among them.")
    position = keys.index(chosen)
    own, others = scores[position], np.delete(scores, position)
    better, ties = int((others < own).sum()), int((others == own).sum())
    worse = len(others) - better - ties
    percentile = 100.0 if not len(others) else 100.0 * (worse + 0.5 * ties) / len(others)
    return Placement(rank=1 + better, percentile=percentile, regret=float(own - scores.min()), size=len(scores))


# --------------------------------------------------------------------------- intervals


def bootstrap_indices(size: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, size) indices drawn with replacement from range(size), reproducible from `seed`."""
    if size < 1 or replicates < 1:
        raise ValueError(f"A bootstrap needs size >= 1 and replicates >= 1, got size={size}, replicates={replicates}.")
    return np.random.default_rng(seed).integers(0, size, size=(replicates, size))


def percentile_interval(replicates: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval | None:
    """The central `level` interval of bootstrap replicates (NaN replicates left out); None when none is finite."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = 50.0 * (1.0 - level)
    return float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))


def bootstrap(
    statistic: Callable[[np.ndarray], float], size: int, replicates: int = 1000, seed: int = 0
) -> np.ndarray:
    """`statistic(indices)` for every bootstrap resample of range(size): the replicates, in draw order."""
    return np.asarray([statistic(rows) for rows in bootstrap_indices(size, replicates, seed)], dtype=np.float64)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, Interval | None]:
    """The mean of `values` and its Student-t interval; no interval from fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    half = float(stats.t.ppf(0.5 + level / 2.0, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, (mean - half, mean + half)


def excludes_zero(interval: Interval | None) -> bool:
    """True when an interval lies entirely on one side of zero (a difference distinguishable from none)."""
    return interval is not None and (interval[0] > 0.0 or interval[1] < 0.0)


# --------------------------------------------------------------------------- rank correlation


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired samples; NaN when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"Kendall's tau needs two paired samples of at least 2 values, got {len(x)} and {len(y)}.")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.kendalltau(x, y).statistic)


def kendall_tau_with_interval(
    x: Sequence[float], y: Sequence[float], replicates: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, Interval | None]:
    """Kendall's tau-b and its bootstrap interval over the pairs (resamples with a constant side are left out)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    tau = kendall_tau(x, y)
    taus = bootstrap(lambda rows: kendall_tau(x[rows], y[rows]), len(x), replicates, seed)
    return tau, percentile_interval(taus, level)


# --------------------------------------------------------------------------- FID from features


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) feature vectors, float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean: np.ndarray, cov: np.ndarray, reference_mean: np.ndarray, reference_cov: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), the distance FID reports."""
    # the eigenvalues of C1 C2 are real and non-negative (a product of two PSD matrices); tiny negative or
    # imaginary parts are round-off, so the trace of the square root is the sum of their clipped square roots
    eigenvalues = np.linalg.eigvals(cov @ reference_cov)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    return float(np.square(mean - reference_mean).sum() + np.trace(cov) + np.trace(reference_cov) - 2.0 * trace_sqrt)


def fid_from_features(features: np.ndarray, reference_mean: np.ndarray, reference_cov: np.ndarray) -> float:
    return frechet_distance(*gaussian_statistics(features), reference_mean, reference_cov)


def fid_replicates(
    features: np.ndarray, reference_mean: np.ndarray, reference_cov: np.ndarray, replicates: int = 1000, seed: int = 0
) -> np.ndarray:
    """FID of every bootstrap resample of the generated samples' features (the reference set held fixed)."""
    features = np.asarray(features, dtype=np.float64)
    return bootstrap(lambda rows: fid_from_features(features[rows], reference_mean, reference_cov),
                     len(features), replicates, seed)
