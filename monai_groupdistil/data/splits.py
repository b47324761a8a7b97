"""Group-stratified re-splitting of a pooled datalist."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import partition_dataset_classes

__all__ = ["split_by_group"]

logger = logging.getLogger("monai_groupdistil.data")


def split_by_group(
    datalist: Sequence[Mapping[str, Any]],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    group_key: str = "group",
) -> tuple[list[Mapping[str, Any]], ...]:
    """Re-split a pooled datalist into parts with the same group proportions (stratified by group).

    Needed for the real M&Ms release, whose official training split has no vendor D: pool the splits with
    ``load_mnms_datalist(root, split="all")`` and re-split. The entries are cut with MONAI's
    ``partition_dataset_classes`` (the groups as classes, shuffled with ``seed``): every part gets
    ``int(fraction * n_group + 0.5)`` entries of each group, in order, the last part at most what is left; what
    this rounding leaves over goes to the last part with a non-zero fraction, so the parts add up to the datalist.
    Each part keeps the original order of the datalist. An entry is one subject (one study), so a subject is never
    divided between parts. The same datalist, fractions and seed always give the same parts.

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
    for i, entry in enumerate(datalist):
        if group_key not in entry:
            raise ValueError(f"datalist entry {i} has no {group_key!r} key: {sorted(entry)}.")
    codes = {g: c for c, g in enumerate(sorted({e[group_key] for e in datalist}, key=repr))}  # any hashable ids
    classes = [codes[e[group_key]] for e in datalist]
    index_parts = partition_dataset_classes(range(len(datalist)), classes, ratios=fractions, shuffle=True, seed=seed)
    index_parts = index_parts or [[] for _ in fractions]  # MONAI returns no part for an empty datalist
    last = max(p for p, f in enumerate(fractions) if f > 0)  # the last part with a non-zero fraction
    index_parts[last] = [*index_parts[last], *set(range(len(datalist))).difference(*index_parts)]
    parts = tuple([datalist[i] for i in sorted(p)] for p in index_parts)
    logger.info("split_by_group: %d entries into parts of sizes %s", len(datalist), [len(p) for p in parts])
    return parts
