"""Per-group accuracy (worst-group, mean-group and overall), the group-DRO model-selection metric.

Accuracy is one per-sample metric of :py:class:`~monai_groupdistil.metrics.GroupMetric`; this module gives it its
three usual forms: :py:func:`per_sample_accuracy` (the per-sample values), :py:func:`compute_group_accuracy` (one call
on whole tensors) and :py:class:`GroupAccuracy` (accumulated over batches and ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from monai_groupdistil.metrics.group_metric import GroupMetric, as_batch, summarise_group_values

__all__ = ["GroupAccuracy", "class_indices", "compute_group_accuracy", "per_sample_accuracy"]


def class_indices(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """The class index of every sample (or voxel) from scores, one-hot or class indices.

    The one rule by which the accuracy metrics and the report handlers read predictions and labels.

    Args:
        x: ``[B, C, *spatial]`` with ``C > 1`` (logits, probabilities or one-hot: the argmax over ``C`` is taken),
            or class indices ``[B]`` / ``[B, 1, *spatial]`` (rounded when floating point).
        name: the argument name used in error messages.

    Returns:
        long tensor ``[B]`` or ``[B, *spatial]``.

    Raises:
        ValueError: when ``x`` is a scalar (no batch dimension).

    Example::

        >>> import torch
        >>> class_indices(torch.tensor([[0.1, 0.9], [0.8, 0.2]])).tolist()  # scores [B, C] -> argmax
        [1, 0]
        >>> class_indices(torch.tensor([[1.0], [0.0]])).tolist()  # indices [B, 1] -> [B]
        [1, 0]
    """
    if x.ndim == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar.")
    if x.ndim >= 2 and x.shape[1] > 1:
        return x.argmax(dim=1)
    if x.ndim >= 2:
        x = x[:, 0]
    return x.round().long() if x.is_floating_point() else x.long()


def per_sample_accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of every sample: 0/1 for classification, the fraction of correct voxels for dense outputs.

    The per-sample metric behind :py:func:`compute_group_accuracy`, :py:class:`GroupAccuracy` and the accuracy
    handlers; give it to :py:class:`~monai_groupdistil.metrics.GroupMetric` like any other per-sample metric.
    Predictions and labels are read with :py:func:`class_indices`.

    Args:
        y_pred: ``[B, C, *spatial]`` scores (argmax over ``C``; logits, probabilities or one-hot) when ``C > 1``,
            otherwise class indices ``[B]`` or ``[B, 1, *spatial]``.
        y: class indices ``[B]`` / ``[B, 1, *spatial]`` or one-hot ``[B, C, *spatial]``.

    Returns:
        float tensor ``[B]``.

    Raises:
        ValueError: when the batch sizes or the spatial shapes of ``y_pred`` and ``y`` differ.

    Example::

        >>> import torch
        >>> per_sample_accuracy(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])).tolist()
        [1.0, 0.0]
    """
    pred_idx, label_idx = class_indices(y_pred, "y_pred"), class_indices(y, "y")
    if pred_idx.shape != label_idx.shape:
        raise ValueError(
            f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} do not describe the same samples "
            f"(class maps {tuple(pred_idx.shape)} vs {tuple(label_idx.shape)})."
        )
    correct = (pred_idx == label_idx.to(pred_idx.device)).float()
    return correct.reshape(correct.shape[0], -1).mean(dim=1) if correct.ndim > 1 else correct


def compute_group_accuracy(
    y_pred: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor | Sequence[torch.Tensor],
    groups: torch.Tensor | Sequence[int | torch.Tensor],
    num_groups: int,
    group_counts: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Accuracy of every group, the worst and mean group accuracy and the overall accuracy, in one call.

    The group-DRO evaluation (Sagawa et al., 2020) selects models by the worst-group accuracy; groups without any
    sample are reported as NaN and ignored by ``worst_group`` and ``mean_group``. The functional form of
    :py:class:`GroupAccuracy` (as ``monai.metrics.compute_dice`` is of ``DiceMetric``), for predictions already in
    memory: it is :py:func:`~monai_groupdistil.metrics.summarise_group_values` of :py:func:`per_sample_accuracy`.

    Args:
        y_pred: ``[B, C, *spatial]`` scores (argmax over ``C``) or class indices ``[B]`` / ``[B, 1, *spatial]``; a
            list of channel-first tensors is stacked.
        y: class indices ``[B]`` / ``[B, 1, *spatial]`` or one-hot ``[B, C, *spatial]`` (or a list of them).
        groups: integer group ids ``[B]`` in ``[0, num_groups)`` (or a list of ints / 0-d tensors).
        num_groups: number of groups ``G``.
        group_counts: optional training-set size of every group; when given the result also holds ``weighted``,
            the group accuracies averaged with the groups' training-set shares (the group-DRO "average accuracy").

    Returns:
        a dict with ``per_group`` (float64 tensor ``[G]``, NaN for an empty group), ``counts`` (long ``[G]``),
        ``worst_group`` (float), ``worst_group_id`` (int, -1 when there are no samples), ``mean_group`` (float, the
        unweighted mean over the non-empty groups), ``overall`` (float, over samples) and optionally ``weighted``.
        Dense outputs count the fraction of correct voxels of every sample.

    Raises:
        ValueError: for mismatched batch sizes or group ids outside ``[0, num_groups)``.
        TypeError: for non-integer group ids.

    Example::

        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        >>> result = compute_group_accuracy(logits, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), num_groups=3)
        >>> result["per_group"].tolist()[:2], result["worst_group"], result["overall"]
        ([1.0, 0.5], 0.5, 0.6666666666666666)
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
    correct = per_sample_accuracy(as_batch(y_pred, "y_pred"), as_batch(y, "y"))
    return summarise_group_values(correct, as_batch(groups, "groups"), num_groups, group_counts)


class GroupAccuracy(GroupMetric):
    """Cumulative per-group accuracy: :py:class:`GroupMetric` of :py:func:`per_sample_accuracy`.

    ``GroupAccuracy(G)`` is ``GroupMetric(per_sample_accuracy, G)``, named because accuracy is the metric group-DRO
    selects models by. Call it on every batch with ``(y_pred, y, groups)``; ``aggregate()`` gathers all ranks'
    samples and returns the dict of :py:func:`compute_group_accuracy`. In an ignite evaluator use
    :py:class:`monai_groupdistil.handlers.GroupAccuracyHandler`.

    Args:
        num_groups: number of groups ``G``.
        group_counts: optional training-set size of every group (adds ``weighted`` to the result).

    Raises:
        ValueError: for ``num_groups < 1``.

    Example::

        >>> import torch
        >>> metric = GroupAccuracy(num_groups=2)
        >>> _ = metric(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), groups=torch.tensor([0, 1]))
        >>> metric.aggregate()["worst_group"]
        0.0
    """

    def __init__(self, num_groups: int, group_counts: Sequence[float] | None = None) -> None:
        super().__init__(per_sample_accuracy, num_groups, group_counts)
