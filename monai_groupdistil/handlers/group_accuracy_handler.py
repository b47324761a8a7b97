"""GroupAccuracyHandler: worst-group accuracy as an ignite/MONAI key metric, with the per-group values."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai_groupdistil.handlers.group_metric_handler import GroupMetricHandler
from monai_groupdistil.metrics import per_sample_accuracy

__all__ = ["GroupAccuracyHandler"]


class GroupAccuracyHandler(GroupMetricHandler):
    """Worst-group accuracy as an ignite metric: :py:class:`GroupMetricHandler` of ``per_sample_accuracy``.

    ``GroupAccuracyHandler(G)`` is ``GroupMetricHandler(per_sample_accuracy, G, metric_name="accuracy")``; it is
    named because accuracy is the metric group-DRO selects models by and the classification bundles use it as
    their ``key_val_metric``. Its value, the worst group's accuracy, then picks the checkpoint with the best worst
    group. At the end of every evaluation it also writes into ``engine.state.metrics``: ``<prefix>accuracy``
    (overall), ``<prefix>mean_group_accuracy``, ``<prefix>worst_group_accuracy``, ``<prefix>group_accuracy/<name>``
    for every group (NaN for a group without samples) and, with ``group_counts``, ``<prefix>weighted_accuracy``
    (group accuracies weighted by training-set shares). The full result dict is kept in ``self.result``.

    ``y_pred`` is ``[B, C, *spatial]`` scores (argmax over ``C``) or class indices ``[B]`` / ``[B, 1, *spatial]``;
    ``y`` class indices or one-hot. The groups come from ``output_transform`` or the batch, as in
    :py:class:`GroupMetricHandler`.

    Args:
        num_groups: number of groups.
        group_names: one name per group for the metric keys; defaults to ``group0``, ``group1``...
        output_transform: callable mapping ``engine.state.output`` to ``(y_pred, y)`` or ``(y_pred, y, groups)``;
            ``None`` uses ``from_engine(["pred", "label"])``.
        group_key: key of the group ids in the batch.
        group_counts: optional training-set size of every group (adds the weighted accuracy).
        prefix: prefix of the additional metric keys.
        save_details: store the per-sample correctness and groups in ``engine.state.metric_details[name]``.

    Raises:
        ValueError: when ``group_names`` does not have ``num_groups`` names.

    Example::

        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=val_loader, network=net,
            key_val_metric={"val_worst_group_acc": GroupAccuracyHandler(num_groups=4)},
            val_handlers=[CheckpointSaver(save_dir, {"network": net}, save_key_metric=True)],
        )
    """

    def __init__(
        self,
        num_groups: int,
        group_names: Sequence[str] | None = None,
        output_transform: Callable | None = None,
        group_key: str = "group",
        group_counts: Sequence[float] | None = None,
        prefix: str = "",
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric=per_sample_accuracy,
            num_groups=num_groups,
            group_names=group_names,
            metric_name="accuracy",
            output_transform=output_transform,
            group_key=group_key,
            group_counts=group_counts,
            prefix=prefix,
            save_details=save_details,
        )
