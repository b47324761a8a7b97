"""PNG plots of group results: per-group accuracy bars and DRO-weight trajectories (needs matplotlib)."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["plot_group_accuracy", "plot_dro_weights", "require_matplotlib"]

_MISSING = (
    "plotting needs matplotlib, which is not installed; install it with `pip install matplotlib` "
    "(or `pip install monai-groupdistil[plot]`). CSV and JSON reports do not need it."
)


def require_matplotlib() -> Any:
    """Return ``matplotlib.figure.Figure`` (no pyplot, no global backend change).

    Raises:
        ImportError: with installation instructions when matplotlib is not installed.
    """
    try:
        return importlib.import_module("matplotlib.figure").Figure
    except ImportError as err:
        raise ImportError(_MISSING) from err


def plot_group_accuracy(
    per_group: Sequence[float] | torch.Tensor,
    group_names: Sequence[str],
    path: str | os.PathLike,
    counts: Sequence[int] | None = None,
    title: str = "Per-group accuracy",
) -> str:
    """Bar chart of the accuracy of every group, the worst group highlighted, written as PNG.

    Args:
        per_group: accuracy of every group in ``[0, 1]`` (NaN for a group without samples, drawn as "n/a").
        group_names: one name per group.
        path: the PNG file to write.
        counts: optional number of samples of every group (shown under the names).
        title: figure title.

    Returns:
        ``str(path)``.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    figure_cls = require_matplotlib()
    values = [float(v) for v in (per_group.tolist() if isinstance(per_group, torch.Tensor) else per_group)]
    present = [v for v in values if not math.isnan(v)]
    worst = min(present) if present else None
    labels = [
        f"{n}\n(n={int(c)})" if counts is not None else str(n)
        for n, c in zip(group_names, counts if counts is not None else [0] * len(values))
    ]
    fig = figure_cls(figsize=(max(4.0, 0.9 * len(values) + 2), 3.5))
    ax = fig.add_subplot(1, 1, 1)
    heights = [0.0 if math.isnan(v) else v for v in values]
    colors = ["tab:red" if worst is not None and v == worst else "tab:blue" for v in values]
    bars = ax.bar(range(len(values)), heights, color=colors)
    for bar, v in zip(bars, values):
        text = "n/a" if math.isnan(v) else f"{v:.3f}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, text, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def plot_dro_weights(
    weights: Sequence[Sequence[float]] | torch.Tensor,
    group_names: Sequence[str],
    path: str | os.PathLike,
    iterations: Sequence[int] | torch.Tensor | None = None,
    title: str = "Group-DRO weights",
) -> str:
    """Trajectories of the group-DRO weights over the training iterations, written as PNG.

    Args:
        weights: ``[T, G]`` weights of every iteration.
        group_names: one name per group.
        path: the PNG file to write.
        iterations: ``[T]`` iteration numbers (default ``1..T``).
        title: figure title.

    Returns:
        ``str(path)``.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when ``weights`` is not ``[T, G]`` with ``G == len(group_names)``.
    """
    figure_cls = require_matplotlib()
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 2 or w.shape[1] != len(group_names):
        raise ValueError(f"weights must be [T, {len(group_names)}], got {tuple(w.shape)}.")
    x = list(range(1, w.shape[0] + 1)) if iterations is None else [int(i) for i in torch.as_tensor(iterations)]
    fig = figure_cls(figsize=(6.0, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    for g, name in enumerate(group_names):
        ax.plot(x, w[:, g].tolist(), label=str(name))
    ax.axhline(1.0 / len(group_names), color="gray", linestyle="--", linewidth=0.8, label="uniform")
    ax.set_xlabel("iteration")
    ax.set_ylabel("weight q_g")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)
