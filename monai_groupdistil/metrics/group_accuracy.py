"""Per-group accuracy (worst-group, mean-group and overall) for group-robust model selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["GroupAccuracy", "compute_group_accuracy", "per_sample_accuracy", "as_batch"]


def as_batch(data: Any, name: str) -> torch.Tensor:
    """Return ``data`` as one batch-first tensor.

    Args:
        data: a batch-first tensor, or a list/tuple of channel-first tensors or numbers (MONAI's decollated form).
        name: the argument name used in error messages.

    Raises:
        ValueError: when ``data`` is ``None`` or an empty list.
        TypeError: when ``data`` is neither a tensor nor a sequence of tensors/numbers.
    """
    if data is None:
        raise ValueError(f"{name} is required, got None.")
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError(f"{name} is an empty list.")
        return torch.stack([torch.as_tensor(d) for d in data], dim=0)
    raise TypeError(f"{name} must be a batch-first tensor or a list of channel-first tensors, got {type(data)}.")


def _class_indices(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[B, C>1, *spatial]`` scores/one-hot -> argmax ``[B, *spatial]``; ``[B]`` or ``[B, 1, *spatial]`` -> as is."""
    if x.ndim == 0:
        raise ValueError(f"{name} must have a batch dimension, got a scalar.")
    if x.ndim >= 2 and x.shape[1] > 1:
        return x.argmax(dim=1)
    if x.ndim >= 2:
        x = x[:, 0]
    return x.round().long() if x.is_floating_point() else x.long()


def per_sample_accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of every sample: 0/1 for classification, the fraction of correct voxels for dense outputs.

    Args:
        y_pred: ``[B, C, *spatial]`` scores (argmax over ``C``; logits, probabilities or one-hot) when ``C > 1``,
            otherwise class indices ``[B]`` or ``[B, 1, *spatial]``.
        y: class indices ``[B]`` / ``[B, 1, *spatial]`` or one-hot ``[B, C, *spatial]``.

    Returns:
        float tensor ``[B]``.

    Raises:
        ValueError: when the batch sizes or the spatial shapes of ``y_pred`` and ``y`` differ.
    """
    pred_idx, label_idx = _class_indices(y_pred, "y_pred"), _class_indices(y, "y")
    if pred_idx.shape != label_idx.shape:
        raise ValueError(
            f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} do not describe the same samples "
            f"(class maps {tuple(pred_idx.shape)} vs {tuple(label_idx.shape)})."
        )
    correct = (pred_idx == label_idx.to(pred_idx.device)).float()
    return correct.reshape(correct.shape[0], -1).mean(dim=1) if correct.ndim > 1 else correct


def _check_groups(groups: torch.Tensor, batch: int, num_groups: int) -> torch.Tensor:
    groups = groups.reshape(-1)
    if groups.is_floating_point():
        if not bool((groups == groups.round()).all()):
            raise TypeError(f"groups must hold integer group ids, got {groups.tolist()}.")
    elif groups.dtype == torch.bool or groups.is_complex():
        raise TypeError(f"groups must be an integer tensor, got dtype {groups.dtype}.")
    groups = groups.long()
    if groups.numel() != batch:
        raise ValueError(f"groups has {groups.numel()} entries but the batch has {batch} samples.")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(
            f"group ids must lie in [0, {num_groups}), got values in [{int(groups.min())}, {int(groups.max())}]."
        )
    return groups


def _summarise(
    correct: torch.Tensor, groups: torch.Tensor, num_groups: int, group_counts: Sequence[float] | None
) -> dict[str, Any]:
    correct = correct.double().cpu()
    groups = groups.long().cpu()
    counts = torch.bincount(groups, minlength=num_groups)
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add(0, groups, correct)
    per_group = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    present = counts > 0
    nan = float("nan")
    worst_id = int(torch.where(present, per_group, torch.full_like(per_group, 2.0)).argmin()) if present.any() else -1
    out: dict[str, Any] = {
        "per_group": per_group,
        "counts": counts,
        "worst_group": float(per_group[worst_id]) if worst_id >= 0 else nan,
        "worst_group_id": worst_id,
        "mean_group": float(per_group[present].mean()) if present.any() else nan,
        "overall": float(correct.mean()) if correct.numel() else nan,
    }
    if group_counts is not None:
        prior = torch.as_tensor(group_counts, dtype=torch.float64).flatten()
        if prior.numel() != num_groups:
            raise ValueError(f"group_counts must have {num_groups} values, got {prior.numel()}.")
        prior = prior * present
        out["weighted"] = float((prior * per_group.nan_to_num()).sum() / prior.sum()) if prior.sum() > 0 else nan
    return out


def compute_group_accuracy(
    y_pred: torch.Tensor | Sequence[torch.Tensor],
    y: torch.Tensor | Sequence[torch.Tensor],
    groups: torch.Tensor | Sequence[int | torch.Tensor],
    num_groups: int,
    group_counts: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Accuracy of every group, the worst and mean group accuracy and the overall accuracy.

    The group-DRO evaluation (Sagawa et al., 2020) selects models by the worst-group accuracy; groups without any
    sample are reported as NaN and ignored by ``worst_group`` and ``mean_group``.

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
    pred_t, y_t = as_batch(y_pred, "y_pred"), as_batch(y, "y")
    correct = per_sample_accuracy(pred_t, y_t)
    groups_t = _check_groups(as_batch(groups, "groups"), correct.shape[0], num_groups)
    return _summarise(correct, groups_t, num_groups, group_counts)


class GroupAccuracy(CumulativeIterationMetric):
    """Cumulative per-group accuracy: worst-group, mean-group and overall accuracy over an evaluation run.

    Call it on every batch with ``(y_pred, y, groups)``; ``aggregate()`` gathers all ranks' samples and returns the
    dict of :py:func:`compute_group_accuracy`. In an ignite evaluator use
    :py:class:`monai_groupdistil.handlers.GroupAccuracyHandler`.

    Args:
        num_groups: number of groups ``G``.
        group_counts: optional training-set size of every group (adds ``weighted`` to the result).

    Example::

        >>> import torch
        >>> metric = GroupAccuracy(num_groups=2)
        >>> _ = metric(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), groups=torch.tensor([0, 1]))
        >>> metric.aggregate()["worst_group"]
        0.0
    """

    def __init__(self, num_groups: int, group_counts: Sequence[float] | None = None) -> None:
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        self.num_groups = num_groups
        self.group_counts = group_counts

    def __call__(  # type: ignore[override]
        self, y_pred: Any, y: Any = None, groups: Any = None, **kwargs: Any
    ) -> list[torch.Tensor]:
        """Add one batch.

        Args:
            y_pred: batch-first tensor or list of channel-first tensors (see :py:func:`compute_group_accuracy`).
            y: the labels, same conventions.
            groups: integer group ids ``[B]`` or a list of them.

        Returns:
            ``[per-sample accuracy [B], group ids [B]]``, also appended to the buffers.
        """
        pred_t, y_t = as_batch(y_pred, "y_pred"), as_batch(y, "y")
        ret = self._compute_tensor(pred_t.detach(), y_t.detach(), groups=as_batch(groups, "groups"))
        self.extend(*ret)
        return ret

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, groups: torch.Tensor | None = None, **kwargs: Any
    ) -> list[torch.Tensor]:
        if y is None or groups is None:
            raise ValueError("GroupAccuracy needs y and groups.")
        correct = per_sample_accuracy(y_pred, y)
        groups = _check_groups(groups.to(correct.device), correct.shape[0], self.num_groups)
        return [correct, groups]

    def aggregate(self) -> dict[str, Any]:  # type: ignore[override]
        """Return the dict of :py:func:`compute_group_accuracy` over all buffered samples (all ranks).

        Raises:
            RuntimeError: when no batch was added since the last ``reset()``.
        """
        buffers = self.get_buffer()
        if buffers is None:
            raise RuntimeError("GroupAccuracy.aggregate() called before any batch was added.")
        correct, groups = buffers
        return _summarise(correct, groups, self.num_groups, self.group_counts)
