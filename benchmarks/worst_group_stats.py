"""Statistics of the worst-group benchmark: paired bootstrap intervals over seeds and the sweep's winners.

Used by ``benchmarks/worst_group.py``; kept apart so that the tests can check them against independent
computations without running the benchmark.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["paired_bootstrap_ci", "paired_difference", "sweep_winners"]


def paired_bootstrap_ci(
    differences: Sequence[float], level: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (one per seed).

    The seeds are resampled with replacement ``n_boot`` times (a fixed generator, so the interval is
    reproducible); the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
    means (numpy's default linear interpolation).

    Args:
        differences: ``[n]`` paired differences, ``n >= 1``.
        level: coverage in ``(0, 1)``.
        n_boot: number of bootstrap resamples.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``; both equal the single difference when ``n == 1``.

    Raises:
        ValueError: no differences, a non-finite difference or ``level`` outside ``(0, 1)``.

    Example::

        >>> paired_bootstrap_ci([1.0, 1.0, 1.0])
        (1.0, 1.0)
    """
    d = np.asarray(list(differences), dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"differences must be a non-empty 1-D sequence, got shape {d.shape}.")
    if not np.isfinite(d).all():
        raise ValueError(f"differences must be finite, got {d.tolist()}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_difference(a: dict, b: dict) -> dict:
    """Paired comparison of two arms: ``a`` and ``b`` map seed -> value; only seeds present in both are used.

    Returns ``{"n", "mean", "low", "high", "positive", "differences"}`` (``positive``: seeds with ``a > b``);
    ``n == 0`` gives NaN mean and bounds.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    if not diffs:
        return {"n": 0, "mean": float("nan"), "low": float("nan"), "high": float("nan"), "positive": 0}
    low, high = paired_bootstrap_ci(diffs)
    return {
        "n": len(diffs),
        "mean": statistics.fmean(diffs),
        "low": low,
        "high": high,
        "positive": sum(d > 0 for d in diffs),
        "differences": diffs,
    }


def sweep_winners(rows: Iterable[dict], keys: Sequence[str]) -> dict[str, dict]:
    """The best configuration of every method of a sweep, scored on validation data only.

    A configuration (the values of ``keys``) is scored by the mean, over every (setting, seed) it ran on, of the
    worst-group validation accuracy of its selected epoch (``val_worst``); ties (equal to 9 decimals) go to the higher
    mean average validation accuracy (``val_average``), then to the first configuration in the order of ``rows``.

    Args:
        rows: sweep rows with ``method``, ``val_worst``, ``val_average`` and the ``keys`` (empty string for a key
            that the method does not have).
        keys: hyper-parameter columns that identify a configuration.

    Returns:
        ``{method: {"config": {key: value, ...}, "val_worst": mean, "val_average": mean, "runs": count}}``, the
        config holding only the keys the method uses (non-empty values).
    """
    scores: dict[str, dict[tuple, list[tuple[float, float]]]] = {}
    for r in rows:
        config = tuple((k, r[k]) for k in keys if r.get(k, "") != "")
        scores.setdefault(r["method"], {}).setdefault(config, []).append(
            (float(r["val_worst"]), float(r["val_average"]))
        )
    winners = {}
    for method, configs in scores.items():
        best = None
        for config, values in configs.items():  # insertion order: the first of equal scores wins
            score = (statistics.fmean(v[0] for v in values), statistics.fmean(v[1] for v in values))
            # compared to 9 decimals: the means of the same accuracies added in another order differ in the last
            # bit, which would decide a tie on the worst group before the average could
            if best is None or tuple(round(x, 9) for x in score) > tuple(round(x, 9) for x in best[1]):
                best = (config, score, len(values))
        assert best is not None
        winners[method] = {"config": dict(best[0]), "val_worst": best[1][0], "val_average": best[1][1], "runs": best[2]}
    return winners
