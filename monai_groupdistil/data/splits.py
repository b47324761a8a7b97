"""Group-stratified re-splitting of a pooled datalist."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["split_by_group"]

logger = logging.getLogger("monai_groupdistil.data")


def _largest_remainder(total: int, fractions: Sequence[float]) -> list[int]:
    exact = np.asarray(fractions, dtype=np.float64) * total
    counts = np.floor(exact + 1e-9).astype(int)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def split_by_group(
    datalist: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    group_key: str = "group",
) -> tuple[list[Mapping[str, Any]], ...]:
    """Re-split a pooled datalist into parts with the same group proportions (stratified by group).

    Needed for the real M&Ms release, whose official training split has no vendor D: pool the splits with
    ``load_mnms_datalist(root, split="all")`` and re-split. Within each group the entries are shuffled with
    ``seed`` and cut by ``fractions`` (largest-remainder rounding, so every part gets
    ``round(fraction * n_group)`` of each group and the parts add up to the group); each part keeps the
    original order of the datalist. The same datalist, fractions and seed always give the same parts.

    Args:
        datalist: entries with an integer (or hashable) group under ``group_key``.
        fractions: non-negative fractions of the parts, summing to 1.
        seed: seed of the per-group shuffle.
        group_key: the key holding the group of an entry.

    Returns:
        a tuple with one list per fraction (the input dicts themselves, not copies).

    Raises:
        ValueError: fractions negative, empty or not summing to 1; an entry without ``group_key``.

    Example::

        pooled = load_mnms_datalist(root, split="all")
        train, val, test = split_by_group(pooled, (0.6, 0.2, 0.2), seed=0)
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(not np.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative numbers, got {fractions}.")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions):.6g}).")
    by_group: dict[Any, list[int]] = {}
    for i, entry in enumerate(datalist):
        if group_key not in entry:
            raise ValueError(f"datalist entry {i} has no {group_key!r} key: {sorted(entry)}.")
        by_group.setdefault(entry[group_key], []).append(i)
    rng = np.random.default_rng(int(seed))
    assigned = np.empty(len(datalist), dtype=np.int64)
    for group in sorted(by_group, key=repr):
        idx = np.asarray(by_group[group])
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for part, count in enumerate(_largest_remainder(len(idx), fractions)):
            assigned[idx[start : start + count]] = part
            start += count
    parts = tuple([datalist[i] for i in range(len(datalist)) if assigned[i] == p] for p in range(len(fractions)))
    logger.info("split_by_group: %d entries into parts of sizes %s", len(datalist), [len(p) for p in parts])
    return parts
