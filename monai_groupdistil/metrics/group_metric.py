"""Any per-sample metric (MONAI cumulative metrics such as Dice or Hausdorff distance, or accuracy) per group.

:py:class:`GroupMetric` wraps a metric that gives one value per sample (``[B]``) or per sample and channel
(``[B, C]``), e.g. ``monai.metrics.DiceMetric(include_background=False, reduction="none")``, keeps every sample's
values with its group id and reports, per channel and averaged over the channels, the value of every group, the
worst group (the minimum, or the maximum for a metric where lower is better such as a distance), the mean over
groups, the overall value and the training-share weighted value. NaN values (e.g. Dice of a structure absent from
both prediction and ground truth with ``ignore_empty=True``) are left out of every mean.

Our own because MONAI's cumulative metrics reduce over all samples (``reduction``), never per group; the per-sample
values are taken from the MONAI metric itself, so any of them works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric

from monai_groupdistil.losses.checks import check_groups, check_per_group

__all__ = ["GroupMetric", "as_batch", "per_sample_values", "summarise_group_values"]


def as_batch(data: Any, name: str) -> torch.Tensor:
    """Return ``data`` as one batch-first tensor.

    Args:
        data: a batch-first tensor, or a list/tuple of channel-first tensors or numbers (MONAI's decollated form).
        name: the argument name used in error messages.

    Returns:
        ``data`` itself when it is a tensor, else its items stacked along a new first dimension ``[B, ...]``.

    Raises:
        ValueError: when ``data`` is ``None`` or an empty list.
        TypeError: when ``data`` is neither a tensor nor a sequence of tensors/numbers.

    Example::

        >>> import torch
        >>> as_batch([torch.zeros(2, 3), torch.ones(2, 3)], "y_pred").shape
        torch.Size([2, 2, 3])
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


def per_sample_values(metric: Callable, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The per-sample values ``[B, C]`` of ``metric`` on one batch, without touching the metric's own buffers.

    Args:
        metric: a MONAI ``CumulativeIterationMetric`` (called, and then reset so that its own buffers stay empty:
            its ``reduction`` does not matter), or a callable ``metric(y_pred, y, **kwargs)`` returning ``[B]`` or
            ``[B, C]``.
        y_pred: batch-first prediction.
        y: batch-first ground truth.
        kwargs: further arguments of the metric (e.g. ``spacing`` for ``HausdorffDistanceMetric``).

    Returns:
        float tensor ``[B, C]`` (``C = 1`` for a metric with one value per sample).

    Raises:
        ValueError: when the metric does not give one row of values per sample.

    Example::

        >>> import torch
        >>> per_sample_values(lambda p, y: (p == y).float().mean(dim=1), torch.tensor([[1, 0]]), torch.tensor([[1, 1]]))
        tensor([[0.5000]])
    """
    values = metric(y_pred, y, **kwargs)
    if isinstance(metric, CumulativeIterationMetric):
        metric.reset()
    values = torch.as_tensor(values).detach()
    batch = y_pred.shape[0]
    if values.ndim == 0 or values.shape[0] != batch or values.ndim > 2:
        raise ValueError(
            f"{type(metric).__name__} gave values of shape {tuple(values.shape)} for a batch of {batch}; a per-sample "
            "metric giving [B] or [B, C] is needed."
        )
    values = values.float()
    return values[:, None] if values.ndim == 1 else values


def summarise_group_values(
    values: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    group_counts: Sequence[float] | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Per-group summary of per-sample metric values.

    Args:
        values: ``[N, C]`` (or ``[N]``) per-sample values; NaN entries are ignored.
        groups: ``[N]`` integer group ids in ``[0, num_groups)``.
        num_groups: number of groups ``G``.
        group_counts: optional training-set size of every group (adds ``weighted``).
        higher_is_better: the worst group is the one with the lowest value (True) or the highest (False).

    Returns:
        a dict with ``per_group_channel`` (float64 ``[G, C]``: mean over the group's samples of every channel),
        ``per_group`` (``[G]``: mean of the group's channel means, e.g. the mean Dice over LV, MYO and RV),
        ``counts`` (long ``[G]``, samples per group), ``worst_group`` (float), ``worst_group_id`` (int, -1 when no
        group has a value), ``mean_group`` (mean of ``per_group`` over the groups that have a value),
        ``overall_channel`` (``[C]``, over all samples), ``overall`` (mean of ``overall_channel``) and, with
        ``group_counts``, ``weighted`` (``per_group`` averaged with the training shares of the groups present).
        Empty groups give NaN.

    Raises:
        ValueError: for group ids outside ``[0, num_groups)`` or a ``group_counts`` of the wrong length, negative or
            not finite.

    Example::

        >>> import torch
        >>> r = summarise_group_values(torch.tensor([[1.0, 0.5], [0.0, 0.5]]), torch.tensor([0, 1]), num_groups=2)
        >>> r["per_group"].tolist(), r["worst_group_id"], r["overall"]
        ([0.75, 0.25], 1, 0.5)
    """
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    values = values[:, None] if values.ndim == 1 else values
    groups = check_groups(torch.as_tensor(groups).cpu().reshape(-1), values.shape[0], num_groups)
    counts = torch.bincount(groups, minlength=num_groups)
    per_group_channel = torch.full((num_groups, values.shape[1]), float("nan"), dtype=torch.float64)
    for g in range(num_groups):
        per_group_channel[g] = torch.nanmean(values[groups == g], 0)  # NaN for an empty group
    per_group = torch.nanmean(per_group_channel, 1)
    present = ~torch.isnan(per_group)
    nan = float("nan")
    worst_id = -1
    if present.any():
        fill = float("inf") if higher_is_better else float("-inf")
        masked = torch.where(present, per_group, torch.full_like(per_group, fill))
        worst_id = int(masked.argmin() if higher_is_better else masked.argmax())
    overall_channel = torch.nanmean(values, 0)  # NaN for a channel without values, also for no samples
    out: dict[str, Any] = {
        "per_group_channel": per_group_channel,
        "per_group": per_group,
        "counts": counts,
        "worst_group": float(per_group[worst_id]) if worst_id >= 0 else nan,
        "worst_group_id": worst_id,
        "mean_group": float(torch.nanmean(per_group, 0)),
        "overall_channel": overall_channel,
        "overall": float(torch.nanmean(overall_channel, 0)),
    }
    if group_counts is not None:
        prior = check_per_group(group_counts, num_groups, "group_counts") * present
        total = float(prior.sum())
        out["weighted"] = float((prior * per_group.nan_to_num()).sum() / total) if total > 0 else nan
    return out


class GroupMetric(CumulativeIterationMetric):
    """Cumulative per-group version of any per-sample metric (MONAI ``DiceMetric``, ``HausdorffDistanceMetric``...).

    Call it on every batch with ``(y_pred, y, groups, **kwargs)``; the wrapped metric computes the per-sample values
    (``[B]`` or ``[B, C]``), which are buffered with the group ids (gathered over all ranks by ``aggregate()``, as
    every MONAI cumulative metric). ``aggregate()`` returns the dict of :py:func:`summarise_group_values`.

    Args:
        metric: the per-sample metric: a MONAI ``CumulativeIterationMetric`` (its per-batch values are taken before
            any reduction, so its ``reduction`` does not matter, and its own buffers are not used), or a callable
            ``metric(y_pred, y, **kwargs) -> [B] or [B, C]``.
        num_groups: number of groups ``G``.
        group_counts: optional training-set size of every group (adds ``weighted`` to the result).
        higher_is_better: False for metrics where lower is better (distances): the worst group is the highest.

    Raises:
        ValueError: for ``num_groups < 1``, or a ``group_counts`` without one finite value ``>= 0`` per group.

    Example::

        >>> import torch
        >>> from monai.metrics import DiceMetric
        >>> dice = GroupMetric(DiceMetric(include_background=False, reduction="none"), num_groups=2)
        >>> labels = torch.tensor([[[0, 1], [1, 1]], [[0, 1], [0, 0]]])  # [B, H, W]
        >>> pred = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2)  # [B, 2, H, W]
        >>> _ = dice(pred, pred, groups=torch.tensor([0, 1]))
        >>> dice.aggregate()["per_group"].tolist()
        [1.0, 1.0]
    """

    def __init__(
        self,
        metric: Callable,
        num_groups: int,
        group_counts: Sequence[float] | None = None,
        higher_is_better: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        if not callable(metric):
            raise TypeError(f"metric must be a MONAI metric or a callable, got {type(metric).__name__}.")
        self.metric = metric
        self.num_groups = num_groups
        if group_counts is not None:  # checked now, not after a whole validation pass
            check_per_group(group_counts, num_groups, "group_counts")
        self.group_counts = group_counts
        self.higher_is_better = bool(higher_is_better)

    def __call__(  # type: ignore[override]
        self, y_pred: Any, y: Any = None, groups: Any = None, **kwargs: Any
    ) -> list[torch.Tensor]:
        """Add one batch.

        Args:
            y_pred: batch-first tensor or a list of channel-first tensors (MONAI's decollated form).
            y: the ground truth, same conventions.
            groups: integer group ids ``[B]`` or a list of them.
            kwargs: passed on to the wrapped metric (e.g. ``spacing``).

        Returns:
            ``[values [B, C], group ids [B]]``, also appended to the buffers.
        """
        pred_t, y_t = as_batch(y_pred, "y_pred"), as_batch(y, "y")
        ret = self._compute_tensor(pred_t.detach(), y_t.detach(), groups=as_batch(groups, "groups"), **kwargs)
        self.extend(*ret)
        return ret

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, groups: torch.Tensor | None = None, **kwargs: Any
    ) -> list[torch.Tensor]:
        if y is None or groups is None:
            raise ValueError(f"{type(self).__name__} needs y and groups.")
        values = per_sample_values(self.metric, y_pred, y, **kwargs)
        groups = check_groups(groups.to(values.device).reshape(-1), values.shape[0], self.num_groups)
        return [values, groups]

    def aggregate(self) -> dict[str, Any]:  # type: ignore[override]
        """The dict of :py:func:`summarise_group_values` over all buffered samples (all ranks).

        Raises:
            RuntimeError: when no batch was added since the last ``reset()``.
        """
        buffers = self.get_buffer()
        if buffers is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate() called before any batch was added.")
        values, groups = buffers
        return summarise_group_values(values, groups, self.num_groups, self.group_counts, self.higher_is_better)
