"""PNG plots of group results: per-group accuracy bars, per-group per-structure metric bars, DRO-weight
trajectories and segmentation overlays (needs matplotlib, imported with MONAI's ``optional_import``).
Our own because ``monai.visualize`` draws images, volumes and TensorBoard summaries, not per-group charts.

No pyplot and no global backend change: the plots are ``matplotlib.figure.Figure`` objects, which ``savefig``
renders with the Agg backend, so they work on machines without a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from monai.utils import optional_import

__all__ = [
    "has_matplotlib",
    "plot_group_accuracy",
    "plot_group_metric",
    "plot_dro_weights",
    "plot_segmentation_overlays",
]

Figure, has_matplotlib = optional_import(
    "matplotlib.figure",
    name="Figure",
    descriptor="plotting needs matplotlib (`{}` failed); install it with `pip install matplotlib` (or "
    "`pip install monai-groupdistil[plot]`); CSV and JSON reports do not need it",
)


def _axes(width: float, height: float):
    """A figure of ``width`` x ``height`` inches with one axes."""
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def _group_ticks(ax, group_names: Sequence[str], counts: Sequence[int] | None) -> None:
    """One x tick per group, named, with its number of samples under the name when ``counts`` is given."""
    if counts is None:
        labels = [str(n) for n in group_names]
    else:
        labels = [f"{n}\n(n={int(c)})" for n, c in zip(group_names, counts)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)


def _save(fig, ax, path: str | os.PathLike, ylabel: str, title: str, dpi: int = 100) -> str:
    """Label the y axis, title the axes and write the figure as PNG; returns ``str(path)``."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return str(path)


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
        OptionalImportError: when matplotlib is not installed (MONAI's, an ``ImportError``).

    Example::

        plot_group_accuracy([0.91, 0.62, float("nan")], ["A", "B", "C"], "group_accuracy.png", counts=[40, 12, 0])
    """
    values = [float(v) for v in (per_group.tolist() if isinstance(per_group, torch.Tensor) else per_group)]
    present = [v for v in values if not math.isnan(v)]
    worst = min(present) if present else None
    fig, ax = _axes(max(4.0, 0.9 * len(values) + 2), 3.5)
    heights = [0.0 if math.isnan(v) else v for v in values]
    colors = ["tab:red" if worst is not None and v == worst else "tab:blue" for v in values]
    bars = ax.bar(range(len(values)), heights, color=colors)
    for bar, v in zip(bars, values):
        text = "n/a" if math.isnan(v) else f"{v:.3f}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, text, ha="center", va="bottom", fontsize=8)
    _group_ticks(ax, group_names, counts)
    ax.set_ylim(0.0, 1.1)
    return _save(fig, ax, path, "accuracy", title)


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
        OptionalImportError: when matplotlib is not installed (MONAI's, an ``ImportError``).
        ValueError: when ``weights`` is not ``[T, G]`` with ``G == len(group_names)``.

    Example::

        iterations, weights, _ = dro_handler.history_tensors()  # weights [T, G]
        plot_dro_weights(weights, dro_handler.group_names, "dro_weights.png", iterations)
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 2 or w.shape[1] != len(group_names):
        raise ValueError(f"weights must be [T, {len(group_names)}], got {tuple(w.shape)}.")
    x = list(range(1, w.shape[0] + 1)) if iterations is None else [int(i) for i in torch.as_tensor(iterations)]
    fig, ax = _axes(6.0, 3.5)
    for g, name in enumerate(group_names):
        ax.plot(x, w[:, g].tolist(), label=str(name), marker="o" if len(x) == 1 else None)  # one point: no line
    ax.axhline(1.0 / len(group_names), color="gray", linestyle="--", linewidth=0.8, label="uniform")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
    return _save(fig, ax, path, "weight q_g", title)


def plot_group_metric(
    per_group_channel: Sequence[Sequence[float]] | torch.Tensor,
    group_names: Sequence[str],
    channel_names: Sequence[str],
    path: str | os.PathLike,
    metric_name: str = "Dice",
    counts: Sequence[int] | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = (0.0, 1.05),
) -> str:
    """Grouped bar chart of a metric per group (x axis) and channel (bars, e.g. LV, MYO, RV) with the channel mean.

    Args:
        per_group_channel: ``[G, C]`` values (NaN drawn as a missing bar).
        group_names: ``G`` names.
        channel_names: ``C`` names.
        path: the PNG file to write.
        metric_name: y-axis label.
        counts: optional samples per group (shown under the names).
        title: figure title (default ``"<metric_name> per group and structure"``).
        ylim: y-axis range, None for automatic (e.g. distances).

    Returns:
        ``str(path)``.

    Raises:
        OptionalImportError: when matplotlib is not installed (MONAI's, an ``ImportError``).
        ValueError: when the values are not ``[G, C]`` for the names given.

    Example::

        plot_group_metric(result["per_group_channel"], ["A", "B"], ["LV", "MYO", "RV"], "group_dice.png",
                          counts=result["counts"].tolist())  # result: GroupMetric(DiceMetric(...)).aggregate()
    """
    values = torch.as_tensor(per_group_channel, dtype=torch.float64)
    if values.ndim != 2 or tuple(values.shape) != (len(group_names), len(channel_names)):
        raise ValueError(
            f"per_group_channel must be [{len(group_names)}, {len(channel_names)}] (groups x channels), got "
            f"{tuple(values.shape)}."
        )
    mean = torch.nanmean(values, dim=1)  # the channel mean of every group, NaN channels left out
    series = [*channel_names, "mean"]
    data = torch.cat([values, mean[:, None]], dim=1)
    width = 0.8 / len(series)
    fig, ax = _axes(max(5.0, 1.3 * len(group_names) + 2), 3.8)
    for c, name in enumerate(series):
        xs = [g + (c - (len(series) - 1) / 2) * width for g in range(len(group_names))]
        heights = [0.0 if math.isnan(v) else v for v in data[:, c].tolist()]
        ax.bar(xs, heights, width=width, label=name, color="black" if name == "mean" else None)
    _group_ticks(ax, group_names, counts)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7, ncol=len(series))
    return _save(fig, ax, path, metric_name, title or f"{metric_name} per group and structure")


def plot_segmentation_overlays(
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    preds: Sequence[torch.Tensor],
    titles: Sequence[str],
    path: str | os.PathLike,
    num_classes: int = 4,
) -> str:
    """Rows of (image, ground truth overlay, prediction overlay) for a few 2-D slices, written as PNG.

    Args:
        images: 2-D intensity images ``[H, W]``.
        labels: 2-D label maps ``[H, W]`` (0 background).
        preds: 2-D predicted label maps ``[H, W]``.
        titles: one title per row (e.g. the case and its Dice).
        path: the PNG file to write.
        num_classes: number of labels including background (colour scale).

    Returns:
        ``str(path)``.

    Raises:
        OptionalImportError: when matplotlib is not installed (MONAI's, an ``ImportError``).
        ValueError: when the sequences differ in length or are empty.

    Example::

        plot_segmentation_overlays([image[0, ..., z]], [label[0, ..., z]], [pred[0, ..., z]], ["case 1: Dice 0.82"],
                                   "cases.png")  # image, label, pred: [1, H, W, Z]
    """
    n = len(images)
    if n == 0 or not len(labels) == len(preds) == len(titles) == n:
        raise ValueError(
            f"images, labels, preds and titles must have the same non-zero length, got {n}, {len(labels)}, "
            f"{len(preds)}, {len(titles)}."
        )
    fig = Figure(figsize=(7.5, 2.6 * n))
    for i in range(n):
        image = torch.as_tensor(images[i]).float().cpu().t()  # (x, y) -> rows y, columns x
        for j, (overlay, name) in enumerate(((None, "image"), (labels[i], "ground truth"), (preds[i], "prediction"))):
            ax = fig.add_subplot(n, 3, 3 * i + j + 1)
            ax.imshow(image.numpy(), cmap="gray", origin="lower")
            if overlay is not None:
                lab = torch.as_tensor(overlay).float().cpu().t()
                masked = torch.where(lab > 0, lab, torch.full_like(lab, float("nan")))
                ax.imshow(masked.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=num_classes - 1, origin="lower")
            ax.set_title(f"{titles[i]}\n{name}" if j == 0 else name, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return str(path)
