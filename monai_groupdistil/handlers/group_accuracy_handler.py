"""GroupAccuracyHandler: worst-group accuracy as an ignite/MONAI key metric, with the per-group values."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys

from monai_groupdistil.handlers.group_dro_handler import default_group_names
from monai_groupdistil.metrics import GroupAccuracy

reinit__is_reduced, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["GroupAccuracyHandler", "extract_groups", "split_output"]


def extract_groups(engine: Engine, group_key: str = "group") -> Any:
    """The group ids of the current iteration, read from ``engine.state.batch[group_key]``.

    Works with collated batches (a dictionary) and with MONAI's decollated batches (a list of dictionaries);
    falls back to ``engine.state.output[group_key]`` (e.g. :py:class:`DistillationTrainer` outputs).

    Raises:
        KeyError: when neither the batch nor the output holds ``group_key`` (the keys present are named).
    """
    for source in (engine.state.batch, engine.state.output):
        if isinstance(source, Mapping) and group_key in source:
            return source[group_key]
        if isinstance(source, (list, tuple)) and source and all(isinstance(d, Mapping) for d in source):
            if all(group_key in d for d in source):
                return [d[group_key] for d in source]
    batch = engine.state.batch
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    present = sorted(map(str, first.keys())) if isinstance(first, Mapping) else type(first).__name__
    raise KeyError(f"the batch has no '{group_key}' key (needed for group metrics); keys present: {present}.")


def split_output(engine: Engine, output: Any, group_key: str) -> tuple[Any, Any, Any]:
    """``(y_pred, y, groups)`` from a transformed output ``(y_pred, y)`` (groups read from the batch) or
    ``(y_pred, y, groups)``.

    Raises:
        ValueError: when the output has neither 2 nor 3 items.
    """
    if isinstance(output, Mapping) or not isinstance(output, (list, tuple)) or len(output) not in (2, 3):
        raise ValueError(
            "output_transform must return (y_pred, y) or (y_pred, y, groups), "
            f"got {type(output).__name__}{'' if not hasattr(output, '__len__') else f' of length {len(output)}'}."
        )
    if len(output) == 3:
        return output[0], output[1], output[2]
    return output[0], output[1], extract_groups(engine, group_key)


class GroupAccuracyHandler(IgniteMetricHandler):
    """Ignite metric of :py:class:`monai_groupdistil.metrics.GroupAccuracy`; its value is the worst-group accuracy.

    Used as an evaluator's ``key_val_metric`` it selects the checkpoint with the best worst-group accuracy, the
    group-DRO model-selection rule. At the end of every evaluation it also writes into ``engine.state.metrics``:
    ``<prefix>accuracy`` (overall), ``<prefix>mean_group_accuracy``, ``<prefix>worst_group_accuracy``,
    ``<prefix>group_accuracy/<name>`` for every group (NaN for a group without samples) and, with
    ``group_counts``, ``<prefix>weighted_accuracy`` (group accuracies weighted by training-set shares).
    The full result dict is kept in ``self.result``.

    Where the groups come from: ``output_transform`` may return ``(y_pred, y, groups)``; when it returns
    ``(y_pred, y)`` (the default, ``from_engine(["pred", "label"])``), the groups are read from
    ``engine.state.batch[group_key]``, which works with an unmodified ``monai.engines.SupervisedEvaluator``.

    Args:
        num_groups: number of groups.
        group_names: one name per group for the metric keys; defaults to ``group0``, ``group1``...
        output_transform: callable mapping ``engine.state.output`` to ``(y_pred, y)`` or ``(y_pred, y, groups)``;
            ``None`` uses ``from_engine(["pred", "label"])``.
        group_key: key of the group ids in the batch.
        group_counts: optional training-set size of every group (adds the weighted accuracy).
        prefix: prefix of the additional metric keys.
        save_details: store the per-sample correctness and groups in ``engine.state.metric_details[name]``.

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
        metric = GroupAccuracy(num_groups=num_groups, group_counts=group_counts)
        if output_transform is None:
            output_transform = from_engine([Keys.PRED, Keys.LABEL])
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
        names = default_group_names(num_groups) if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups:
            raise ValueError(f"group_names has {len(names)} names but num_groups is {num_groups}.")
        self.num_groups = num_groups
        self.group_names = names
        self.group_key = group_key
        self.prefix = prefix
        self.result: dict[str, Any] | None = None

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """Add the iteration's ``(y_pred, y, groups)`` to the metric."""
        output = self._output_transform(engine.state.output)
        self.update(split_output(engine, output, self.group_key))

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """
        Args:
            output: ``(y_pred, y, groups)``.

        Raises:
            ValueError: when ``output`` does not have 3 items.
        """
        if len(output) != 3:
            raise ValueError(f"output must be (y_pred, y, groups), got {len(output)} items.")
        y_pred, y, groups = output
        self.metric_fn(y_pred, y, groups=groups)

    def compute(self) -> float:
        """The worst-group accuracy (the full result is kept in ``self.result``)."""
        self.result = self.metric_fn.aggregate()
        self._is_reduced = True
        if self.save_details:
            if self._engine is None or self._name is None:
                raise RuntimeError("please call the attach() function to connect expected engine first.")
            self._engine.state.metric_details[self._name] = self.metric_fn.get_buffer()  # type: ignore
        return float(self.result["worst_group"])

    def completed(self, engine: Engine, name: str) -> None:
        """Write the worst-group accuracy under ``name`` and the other values under their own keys."""
        super().completed(engine, name)
        res = self.result
        if res is None:
            return
        p, metrics = self.prefix, engine.state.metrics
        metrics[f"{p}accuracy"] = float(res["overall"])
        metrics[f"{p}mean_group_accuracy"] = float(res["mean_group"])
        metrics[f"{p}worst_group_accuracy"] = float(res["worst_group"])
        for g, gname in enumerate(self.group_names):
            metrics[f"{p}group_accuracy/{gname}"] = float(res["per_group"][g])
        if "weighted" in res:
            metrics[f"{p}weighted_accuracy"] = float(res["weighted"])
