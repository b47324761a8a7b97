"""GroupMetricHandler: any per-sample metric per group as an ignite/MONAI metric; its value is the worst group's.

A MONAI ``IgniteMetricHandler`` of :py:class:`~monai_groupdistil.metrics.GroupMetric`: our own because MONAI's
metric handlers reduce over all samples, not per group. :py:func:`extract_groups` and :py:func:`split_output` are
how every group handler of this package finds the group ids of an iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data.utils import affine_to_spacing
from monai.handlers import IgniteMetricHandler, from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys

from monai_groupdistil.handlers.group_dro_handler import default_group_names
from monai_groupdistil.metrics.group_metric import GroupMetric

reinit__is_reduced, _ = optional_import(
    "ignite.metrics.metric", IgniteInfo.OPT_IMPORT_VERSION, min_version, "reinit__is_reduced", as_type="decorator"
)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["GroupMetricHandler", "batch_spacing", "extract_groups", "split_output"]


def extract_groups(engine: Engine, group_key: str = "group") -> Any:
    """The group ids of the current iteration, read from ``engine.state.batch[group_key]``.

    Works with collated batches (a dictionary) and with MONAI's decollated batches (a list of dictionaries);
    falls back to ``engine.state.output[group_key]`` (e.g. :py:class:`DistillationTrainer` outputs).

    Args:
        engine: the ignite engine of the running iteration.
        group_key: key of the group ids.

    Returns:
        the collated group ids (a tensor ``[B]``), or a list of ``B`` ids for a decollated batch.

    Raises:
        KeyError: when neither the batch nor the output holds ``group_key`` (the keys present are named).

    Example::

        groups = extract_groups(evaluator, "group")  # in a handler of an ITERATION_COMPLETED event
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
    """``(y_pred, y, groups)`` from the output of an ``output_transform``: ``(y_pred, y, groups)`` as it is, or
    ``(y_pred, y)`` with the groups of :py:func:`extract_groups`.

    Args:
        engine: the ignite engine of the running iteration.
        output: the transformed output, 2 or 3 items.
        group_key: key of the group ids in the batch (used for a 2-item output).

    Returns:
        ``(y_pred, y, groups)``.

    Raises:
        ValueError: when the output has neither 2 nor 3 items.

    Example::

        y_pred, y, groups = split_output(engine, from_engine(["pred", "label"])(engine.state.output), "group")
    """
    if isinstance(output, Mapping) or not isinstance(output, (list, tuple)) or len(output) not in (2, 3):
        raise ValueError(
            "output_transform must return (y_pred, y) or (y_pred, y, groups), "
            f"got {type(output).__name__}{'' if not hasattr(output, '__len__') else f' of length {len(output)}'}."
        )
    if len(output) == 3:
        return output[0], output[1], output[2]
    return output[0], output[1], extract_groups(engine, group_key)


def batch_spacing(key: str = Keys.LABEL) -> Callable[[Engine], dict[str, Any]]:
    """Metric arguments ``{"spacing": [...]}`` holding every sample's voxel spacing, read from ``batch[key]``.

    For :py:class:`GroupMetricHandler`'s ``metric_kwargs`` with MONAI's ``HausdorffDistanceMetric`` or
    ``SurfaceDistanceMetric``, so distances are in mm. The spacing comes from the ``MetaTensor``'s affine (the norms
    of its spatial columns; collated batches and decollated lists of samples both work); a plain tensor gives ``{}``
    (unit spacing).

    Args:
        key: key of the ``MetaTensor`` whose affine gives the spacing (the label: its grid is the metric's).

    Returns:
        a function ``engine -> {"spacing": [[sx, sy(, sz)] per sample]}`` (``{}`` without an affine).

    Example::

        GroupMetricHandler(HausdorffDistanceMetric(percentile=95, reduction="none"), num_groups=4,
                           metric_kwargs=batch_spacing("label"), higher_is_better=False, metric_name="hd95")
    """

    def spacing(engine: Engine) -> dict[str, Any]:
        batch = engine.state.batch
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        out = []
        for item in items:
            value = item.get(key) if isinstance(item, Mapping) else None
            affine = getattr(value, "affine", None)
            if affine is None:
                return {}
            affine = torch.as_tensor(affine)
            # a collated batch [B, C, *spatial] has one affine per sample; a decollated item [C, *spatial] one
            rank = value.ndim - (2 if affine.ndim == 3 else 1)
            for a in affine.reshape(-1, *affine.shape[-2:]):
                out.append([float(v) for v in affine_to_spacing(a, r=rank)])
        return {"spacing": out}

    return spacing


class GroupMetricHandler(IgniteMetricHandler):
    """Ignite metric of :py:class:`monai_groupdistil.metrics.GroupMetric`: any per-sample metric per group.

    Its value is the worst group's (the lowest, or the highest when ``higher_is_better`` is False), so as an
    evaluator's ``key_val_metric`` it selects the checkpoint with the best worst group. At the end of every
    evaluation it also writes into ``engine.state.metrics``, with ``m = prefix + metric_name``:

    - ``<m>`` (over all samples), ``mean_group_<m>``, ``worst_group_<m>``, ``group_<m>/<group>`` for every group
      (NaN for a group without samples) and, with ``group_counts``, ``weighted_<m>``;
    - with ``channel_names`` (a metric with several values per sample, e.g. Dice of LV, MYO and RV):
      ``<m>/<channel>`` and ``group_<m>/<group>/<channel>`` as well; the values above are then means over the
      channels.

    (``prefix`` goes in front of each key: ``<prefix>worst_group_<name>``.) The full result dict is kept in
    ``self.result``.

    Where the groups come from: ``output_transform`` may return ``(y_pred, y, groups)``; when it returns
    ``(y_pred, y)`` (the default, ``from_engine(["pred", "label"])``), the groups are read from
    ``engine.state.batch[group_key]``, which works with an unmodified ``monai.engines.SupervisedEvaluator``.

    Args:
        metric: the per-sample metric (a MONAI cumulative metric with ``reduction="none"``, or a callable
            ``(y_pred, y, **kwargs) -> [B] or [B, C]``).
        num_groups: number of groups.
        group_names: one name per group for the metric keys; defaults to ``group0``, ``group1``...
        metric_name: the name in the metric keys.
        channel_names: one name per value of a sample (e.g. ``["LV", "MYO", "RV"]``); None: no per-channel keys.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)`` or ``(y_pred, y, groups)``; ``None`` uses
            ``from_engine(["pred", "label"])``.
        group_key: key of the group ids in the batch.
        group_counts: optional training-set size of every group (adds the weighted value).
        higher_is_better: False for distances: the worst group is the highest.
        metric_kwargs: optional ``engine -> dict`` of further metric arguments for the iteration (e.g.
            :py:func:`batch_spacing`).
        prefix: prefix of the metric keys.
        save_details: store the per-sample values and groups in ``engine.state.metric_details[name]``.

    Raises:
        ValueError: when ``group_names`` does not have ``num_groups`` names.

    Example::

        dice = GroupMetricHandler(DiceMetric(include_background=False, reduction="none"), num_groups=4,
                                  group_names=["A", "B", "C", "D"], metric_name="dice",
                                  channel_names=["LV", "MYO", "RV"])
        evaluator = SupervisedEvaluator(..., key_val_metric={"val_worst_group_dice": dice})
    """

    def __init__(
        self,
        metric: Callable,
        num_groups: int,
        group_names: Sequence[str] | None = None,
        metric_name: str = "metric",
        channel_names: Sequence[str] | None = None,
        output_transform: Callable | None = None,
        group_key: str = "group",
        group_counts: Sequence[float] | None = None,
        higher_is_better: bool = True,
        metric_kwargs: Callable[[Engine], Mapping[str, Any]] | None = None,
        prefix: str = "",
        save_details: bool = True,
    ) -> None:
        group_metric = GroupMetric(metric, num_groups, group_counts, higher_is_better)
        if output_transform is None:
            output_transform = from_engine([Keys.PRED, Keys.LABEL])
        super().__init__(metric_fn=group_metric, output_transform=output_transform, save_details=save_details)
        names = default_group_names(num_groups) if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups:
            raise ValueError(f"group_names has {len(names)} names but num_groups is {num_groups}.")
        self.num_groups = num_groups
        self.group_names = names
        self.metric_name = str(metric_name)
        self.channel_names = None if channel_names is None else [str(c) for c in channel_names]
        self.group_key = group_key
        self.metric_kwargs = metric_kwargs
        self.prefix = prefix
        self.result: dict[str, Any] | None = None

    def attach(self, engine: Engine, name: str) -> None:  # type: ignore[override]
        """Attach to ``engine`` under ``name``, the key of the worst group's value.

        Raises:
            ValueError: when ``name`` is one of the other keys this handler writes (e.g. ``"accuracy"``, the overall
                value): written after it, that value would replace the worst group's, and an evaluator selecting
                models by ``name`` would select by the overall value.
        """
        if name in self.written_keys():
            raise ValueError(
                f"the metric name {name!r} is also the key of another value this handler writes ({name!r} would "
                f"hold that value, not the worst group's); name the metric otherwise, e.g. "
                f"'val_worst_group_{self.metric_name}'."
            )
        super().attach(engine, name)

    def written_keys(self) -> list[str]:
        """The keys :py:meth:`completed` writes besides the metric's own name (``worst_group_<m>`` aside, which
        holds the same value): overall, mean over groups, per group, weighted (with ``group_counts``), per
        channel."""
        m, p, n = f"{self.prefix}{self.metric_name}", self.prefix, self.metric_name
        keys = [m, f"{p}mean_group_{n}", *(f"{p}group_{n}/{g}" for g in self.group_names)]
        if self.metric_fn.group_counts is not None:
            keys.append(f"{p}weighted_{n}")
        for c in self.channel_names or []:
            keys += [f"{m}/{c}", *(f"{p}group_{n}/{g}/{c}" for g in self.group_names)]
        return keys

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """Add the iteration's ``(y_pred, y, groups)`` (and ``metric_kwargs(engine)``) to the metric."""
        output = self._output_transform(engine.state.output)
        y_pred, y, groups = split_output(engine, output, self.group_key)
        kwargs = dict(self.metric_kwargs(engine)) if self.metric_kwargs is not None else {}
        self.metric_fn(y_pred, y, groups=groups, **kwargs)

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
        """The worst group's value (the full result is kept in ``self.result``)."""
        self.result = self.metric_fn.aggregate()
        self._is_reduced = True
        if self.save_details:
            if self._engine is None or self._name is None:
                raise RuntimeError("please call the attach() function to connect expected engine first.")
            self._engine.state.metric_details[self._name] = self.metric_fn.get_buffer()  # type: ignore
        return float(self.result["worst_group"])

    def completed(self, engine: Engine, name: str) -> None:
        """Write the worst group's value under ``name`` and the other values under their own keys."""
        super().completed(engine, name)
        res = self.result
        if res is None:
            return
        m, metrics = f"{self.prefix}{self.metric_name}", engine.state.metrics
        p, n = self.prefix, self.metric_name
        metrics[m] = float(res["overall"])
        metrics[f"{p}mean_group_{n}"] = float(res["mean_group"])
        metrics[f"{p}worst_group_{n}"] = float(res["worst_group"])
        for g, gname in enumerate(self.group_names):
            metrics[f"{p}group_{n}/{gname}"] = float(res["per_group"][g])
        if "weighted" in res:
            metrics[f"{p}weighted_{n}"] = float(res["weighted"])
        if self.channel_names is not None and "per_group_channel" in res:
            per_channel = res["per_group_channel"]
            if per_channel.shape[1] != len(self.channel_names):
                raise ValueError(
                    f"channel_names has {len(self.channel_names)} names but the metric gave {per_channel.shape[1]} "
                    "values per sample."
                )
            for c, cname in enumerate(self.channel_names):
                metrics[f"{m}/{cname}"] = float(res["overall_channel"][c])
                for g, gname in enumerate(self.group_names):
                    metrics[f"{p}group_{n}/{gname}/{cname}"] = float(per_channel[g, c])
