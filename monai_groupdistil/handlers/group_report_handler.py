"""Per-group evaluation reports (CSV, JSON, plots) at the end of an evaluator run: ``GroupMetricReportHandler``
(any per-sample metrics per channel, e.g. Dice and Hausdorff distance per structure, with overlays of the worst
group's cases) and its classification form ``GroupReportHandler`` (accuracy and loss).

Our own because MONAI's ``MetricsSaver`` writes ``engine.state.metrics`` and per-sample details, not a row per group."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from monai.handlers import from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys

from monai_groupdistil.engines.checkpoint_saver import atomic_write
from monai_groupdistil.handlers.group_dro_handler import GroupDROHandler, default_group_names
from monai_groupdistil.handlers.group_metric_handler import split_output
from monai_groupdistil.handlers.prediction_writer import write_csv_atomically
from monai_groupdistil.metrics.group_accuracy import class_indices, per_sample_accuracy
from monai_groupdistil.metrics.group_metric import GroupMetric, as_batch
from monai_groupdistil.visualize import (
    plot_dro_weights,
    plot_group_accuracy,
    plot_group_metric,
    plot_segmentation_overlays,
)

idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["GroupMetricReportHandler", "GroupReportHandler", "per_sample_cross_entropy"]

CSV_COLUMNS = ("group", "name", "samples", "accuracy", "mean_loss")


def per_sample_cross_entropy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy of every sample from logits (mean over voxels for dense outputs).

    Args:
        y_pred: logits ``[B, C, *spatial]`` with ``C > 1``.
        y: class indices ``[B]`` / ``[B, *spatial]`` / ``[B, 1, *spatial]`` or one-hot ``[B, C, *spatial]``.

    Returns:
        ``[B]``; NaN everywhere when ``y_pred`` holds no logits (class indices or a single channel).

    Example::

        >>> import torch
        >>> per_sample_cross_entropy(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]))
        tensor([0.6931, 0.6931])
    """
    if not y_pred.is_floating_point() or y_pred.ndim < 2 or y_pred.shape[1] < 2:
        return torch.full((y_pred.shape[0],), float("nan"))
    if y.ndim == y_pred.ndim:  # one-hot or [B, 1, *spatial] indices; [B] / [B, *spatial] indices are used as they are
        y = class_indices(y, "y")
    ce = F.cross_entropy(y_pred.float(), y.long().to(y_pred.device), reduction="none")
    return ce.reshape(ce.shape[0], -1).mean(dim=1) if ce.ndim > 1 else ce


def _finite(value: float) -> float | None:
    """A JSON-safe number: NaN and infinities (e.g. a distance to an empty prediction) become ``null``."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


class GroupMetricReportHandler:
    """Per-group report of any per-sample metrics (e.g. Dice and 95 % Hausdorff distance per structure), written
    when an evaluator run completes.

    Every metric is accumulated with :py:class:`~monai_groupdistil.metrics.GroupMetric` (gathered over all ranks);
    rank 0 then writes into ``output_dir``:

    - ``group_report.csv``: columns ``group, name, structure, samples, <metric>...``; for every group one row per
      channel (``channel_names``, e.g. LV, MYO, RV) and one ``mean`` row (the mean over the channels);
    - ``metrics.json``: for every metric ``<m>`` (over all samples), ``mean_group_<m>``, ``worst_group_<m>``,
      ``per_group_<m>`` (group -> channel -> value), ``<m>_per_structure``, ``weighted_<m>`` with
      ``group_counts``; ``worst_group`` (the worst group by ``key_metric``), ``samples``; NaN and infinities are
      written as ``null``;
    - ``group_<key_metric>.png``: the key metric per group and channel;
    - ``dro_weights.png``: the DRO-weight trajectories, when ``dro_handler`` holds a history;
    - ``worst_group_cases.png``: overlays (image, ground truth, prediction) of the ``overlays`` samples of the worst
      group with the lowest key metric (the slice with the most ground-truth foreground of a 3-D sample). In a
      multi-process evaluation they are taken from rank 0's share of the samples.

    The plots need matplotlib; without it they are skipped with a warning. ``self.summary`` holds the JSON content.
    The CSV and JSON files are each replaced whole (an atomic write), one after the other: a failure between the two
    leaves the new CSV beside the previous JSON.

    ``output_transform`` maps ``engine.state.output`` to ``(y_pred, y)`` or ``(y_pred, y, groups)``: one-hot (or
    probability) ``[B, C, *spatial]`` tensors, as MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric`` expect
    (e.g. after ``AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=C)`` in the evaluator's
    postprocessing); the groups come from the batch otherwise.

    Args:
        output_dir: folder of the report files (created).
        num_groups: number of groups.
        metrics: name -> per-sample metric (MONAI cumulative metric with ``reduction="none"`` or a callable giving
            ``[B, C]``), e.g. ``{"dice": DiceMetric(include_background=False, reduction="none")}``.
        group_names: one name per group (default ``group0``...).
        channel_names: one name per channel of the metrics (e.g. ``["LV", "MYO", "RV"]``); default ``c0``...
        key_metric: the metric that names the worst group, draws the bar plot and picks the overlays (default: the
            first of ``metrics``).
        lower_is_better: names of the metrics where lower is better (distances).
        metric_kwargs: name -> ``engine -> dict`` of further arguments (e.g. ``batch_spacing("label")`` for
            distances in mm).
        output_transform: see above; ``None`` uses ``from_engine(["pred", "label"])``.
        group_key: key of the group ids in the batch.
        image_key: key of the network input in ``engine.state.output`` (for the overlays).
        case_key: key of a sample's name in the batch (for the overlay titles); missing names are numbered.
        dro_handler: the training run's :py:class:`GroupDROHandler`, for the weight plot.
        group_counts: optional training-set size of every group (adds ``weighted_<m>``).
        overlays: number of worst-group samples drawn (0: none).
        plots: write the PNG plots.

    Raises:
        ValueError: for an empty ``metrics``, names of the wrong length, or a ``key_metric`` not in ``metrics``.

    Example::

        report = GroupMetricReportHandler(
            "eval", num_groups=4, group_names=["A", "B", "C", "D"], channel_names=["LV", "MYO", "RV"],
            metrics={"dice": DiceMetric(include_background=False, reduction="none"),
                     "hd95": HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")},
            lower_is_better=["hd95"], metric_kwargs={"hd95": batch_spacing("label")},
        )
        evaluator = SupervisedEvaluator(..., postprocessing=one_hot, val_handlers=[report])
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_groups: int,
        metrics: dict[str, Callable],
        group_names: Sequence[str] | None = None,
        channel_names: Sequence[str] | None = None,
        key_metric: str | None = None,
        lower_is_better: Sequence[str] = (),
        metric_kwargs: dict[str, Callable[[Engine], dict]] | None = None,
        output_transform: Callable | None = None,
        group_key: str = "group",
        image_key: str = Keys.IMAGE,
        case_key: str = "case",
        dro_handler: GroupDROHandler | None = None,
        group_counts: Sequence[float] | None = None,
        overlays: int = 4,
        plots: bool = True,
    ) -> None:
        if not metrics:
            raise ValueError("metrics must name at least one metric, e.g. {'dice': DiceMetric(reduction='none')}.")
        names = default_group_names(num_groups) if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups:
            raise ValueError(f"group_names has {len(names)} names but num_groups is {num_groups}.")
        self.key_metric = next(iter(metrics)) if key_metric is None else str(key_metric)
        if self.key_metric not in metrics:
            raise ValueError(f"key_metric {self.key_metric!r} is not one of the metrics {sorted(metrics)}.")
        unknown = sorted(set(lower_is_better) - set(metrics))
        if unknown:
            raise ValueError(f"lower_is_better names {unknown}, which are not metrics ({sorted(metrics)}).")
        self.output_dir = Path(output_dir)
        self.num_groups = num_groups
        self.group_names = names
        self.channel_names = None if channel_names is None else [str(c) for c in channel_names]
        self.lower_is_better = set(lower_is_better)
        self.metrics = {
            name: GroupMetric(m, num_groups, group_counts, higher_is_better=name not in self.lower_is_better)
            for name, m in metrics.items()
        }
        self.metric_kwargs = dict(metric_kwargs or {})
        self.output_transform = from_engine([Keys.PRED, Keys.LABEL]) if output_transform is None else output_transform
        self.group_key = group_key
        self.image_key = image_key
        self.case_key = case_key
        self.dro_handler = dro_handler
        self.group_counts = group_counts
        self.overlays = int(overlays)
        self.plots = plots
        self.summary: dict[str, Any] | None = None
        self.reset()

    def attach(self, engine: Engine) -> None:
        """Reset at ``EPOCH_STARTED``, accumulate at ``ITERATION_COMPLETED``, write at ``COMPLETED``."""
        for event, fn in (
            (Events.EPOCH_STARTED, self.reset),
            (Events.ITERATION_COMPLETED, self.iteration_completed),
            (Events.COMPLETED, self.completed),
        ):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)

    def reset(self, engine: Engine | None = None) -> None:
        """Drop the accumulated samples."""
        for metric in self.metrics.values():
            metric.reset()
        self._snapshots: list[dict[str, Any]] = []

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """Accumulate the iteration's per-sample metric values, groups and an overlay snapshot of every sample."""
        y_pred, y, groups = split_output(engine, self.output_transform(engine.state.output), self.group_key)
        pred_t, y_t = as_batch(y_pred, "y_pred").detach(), as_batch(y, "y").detach()
        values = {}
        for name, metric in self.metrics.items():
            kwargs = self.metric_kwargs[name](engine) if name in self.metric_kwargs else {}
            values[name], groups_t = metric(pred_t, y_t, groups=groups, **kwargs)
        if self.overlays > 0:
            self._snapshot(engine, pred_t, y_t, groups_t, values[self.key_metric])

    def _snapshot(self, engine: Engine, pred: torch.Tensor, y: torch.Tensor, groups, key_values) -> None:
        output = engine.state.output
        try:
            images = as_batch(from_engine([self.image_key])(output), "image").detach()
        except (KeyError, TypeError, ValueError):
            return
        cases = None
        batch = engine.state.batch
        if isinstance(batch, dict) and self.case_key in batch:
            cases = list(batch[self.case_key])
        elif isinstance(batch, (list, tuple)) and batch and all(isinstance(d, dict) for d in batch):
            cases = [d.get(self.case_key) for d in batch]
        pred_map, label_map = class_indices(pred, "y_pred").cpu(), class_indices(y, "y").cpu()
        image = images[:, 0].float().cpu()
        score = torch.nanmean(key_values.double(), dim=1).cpu() if key_values.ndim > 1 else key_values.cpu()
        for b in range(pred_map.shape[0]):
            lab, prd, img = label_map[b], pred_map[b], image[b]
            if lab.ndim == 3:  # a volume: the slice with the most ground-truth foreground
                z = int((lab > 0).flatten(0, 1).sum(0).argmax())
                lab, prd, img = lab[..., z], prd[..., z], img[..., z]
            name = cases[b] if cases is not None and b < len(cases) else f"sample {len(self._snapshots)}"
            self._snapshots.append({
                "image": img.half(), "label": lab.to(torch.uint8), "pred": prd.to(torch.uint8),
                "group": int(groups[b]), "score": float(score[b]), "case": str(name),
            })  # fmt: skip

    def completed(self, engine: Engine) -> None:
        """Gather the samples of all ranks and (rank 0) write the report files."""
        results = {name: metric.aggregate() for name, metric in self.metrics.items()}
        self.summary = self.summarise(results)
        if idist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        header, *rows = self.csv_rows(results)
        write_csv_atomically(self.output_dir / "group_report.csv", header, rows)
        with atomic_write(self.output_dir / "metrics.json") as temporary:
            temporary.write_text(json.dumps(self.summary, indent=2))
        if self.plots:
            try:
                self.write_plots(results)
                dro = self.dro_handler
                if dro is not None and dro.weight_history:
                    iters, weights, _ = dro.history_tensors()
                    plot_dro_weights(weights, dro.group_names, self.output_dir / "dro_weights.png", iters)
            except ImportError as err:
                warnings.warn(f"{type(self).__name__}: plots skipped: {err}", stacklevel=2)

    def channel_names_of(self, results: dict[str, dict[str, Any]]) -> list[str]:
        """The channel names, checked against every metric's number of values per sample.

        Raises:
            ValueError: when a metric gives another number of values per sample than there are names.
        """
        channels = results[self.key_metric]["per_group_channel"].shape[1]
        cnames = self.channel_names if self.channel_names is not None else [f"c{c}" for c in range(channels)]
        for name, res in results.items():
            if res["per_group_channel"].shape[1] != len(cnames):
                raise ValueError(
                    f"metric {name!r} gave {res['per_group_channel'].shape[1]} values per sample but there are "
                    f"{len(cnames)} channel names {cnames}."
                )
        return cnames

    def summarise(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The content of ``metrics.json`` from the aggregated results of every metric."""
        cnames = self.channel_names_of(results)
        key = results[self.key_metric]
        worst_id = key["worst_group_id"]
        summary: dict[str, Any] = {
            "worst_group": self.group_names[worst_id] if worst_id >= 0 else None,
            "key_metric": self.key_metric,
            "samples": int(key["counts"].sum()),
        }
        for name, res in results.items():
            summary[name] = _finite(res["overall"])
            summary[f"mean_group_{name}"] = _finite(res["mean_group"])
            summary[f"worst_group_{name}"] = _finite(res["worst_group"])
            summary[f"{name}_per_structure"] = {c: _finite(v) for c, v in zip(cnames, res["overall_channel"].tolist())}
            summary[f"per_group_{name}"] = {
                g: {
                    **{c: _finite(v) for c, v in zip(cnames, res["per_group_channel"][k].tolist())},
                    "mean": _finite(float(res["per_group"][k])),
                }
                for k, g in enumerate(self.group_names)
            }
            if "weighted" in res:
                summary[f"weighted_{name}"] = _finite(res["weighted"])
        return summary

    def csv_rows(self, results: dict[str, dict[str, Any]]) -> list[list[Any]]:
        """The rows of ``group_report.csv``, header first."""
        cnames = self.channel_names_of(results)
        counts = results[self.key_metric]["counts"]
        rows: list[list[Any]] = [["group", "name", "structure", "samples", *results]]
        for k, gname in enumerate(self.group_names):
            for c, cname in enumerate([*cnames, "mean"]):
                values = [
                    float(res["per_group"][k]) if c == len(cnames) else float(res["per_group_channel"][k, c])
                    for res in results.values()
                ]
                rows.append([k, gname, cname, int(counts[k]), *values])
        return rows

    def write_plots(self, results: dict[str, dict[str, Any]]) -> None:
        """The key metric per group and channel, and the overlays of the worst group's cases."""
        name, key = self.key_metric, results[self.key_metric]
        cnames, worst_id = self.channel_names_of(results), key["worst_group_id"]
        plot_group_metric(
            key["per_group_channel"],
            self.group_names,
            cnames,
            self.output_dir / f"group_{name}.png",
            metric_name=name,
            counts=key["counts"].tolist(),
            ylim=None if name in self.lower_is_better else (0.0, 1.05),
        )
        cases = [s for s in self._snapshots if s["group"] == worst_id and not math.isnan(s["score"])]
        cases.sort(key=lambda s: s["score"], reverse=name in self.lower_is_better)
        cases = cases[: self.overlays]
        if cases:
            plot_segmentation_overlays(
                [s["image"] for s in cases],
                [s["label"] for s in cases],
                [s["pred"] for s in cases],
                [f"{self.group_names[worst_id]} {s['case']}: {name} {s['score']:.3f}" for s in cases],
                self.output_dir / "worst_group_cases.png",
                num_classes=len(cnames) + 1,
            )


class GroupReportHandler(GroupMetricReportHandler):
    """Per-group classification report (accuracy and loss) written when an evaluator run completes.

    A :py:class:`GroupMetricReportHandler` of two per-sample metrics, ``accuracy`` (``per_sample_accuracy``) and
    ``mean_loss`` (cross entropy of ``pred`` vs ``label`` by default; ``pred`` must then hold logits, i.e. no argmax
    in the evaluator's postprocessing), gathered over all ranks. It exists for its classification layout: one CSV
    row per group (no structures) and the accuracy-named JSON keys that the classification bundles' evaluation
    documents. ``y_pred`` is ``[B, C]`` logits, ``y`` class indices ``[B]`` (or one-hot). Rank 0 writes into
    ``output_dir``:

    - ``group_report.csv``: columns ``group, name, samples, accuracy, mean_loss``, one row per group (``nan``
      for a group without samples);
    - ``metrics.json``: ``accuracy`` (overall), ``mean_group_accuracy``, ``worst_group_accuracy``,
      ``worst_group`` (its name), plus ``mean_loss``, ``samples``, ``per_group_accuracy`` (name -> value) and,
      with ``group_counts``, ``weighted_accuracy``; NaN is written as ``null``;
    - ``group_accuracy.png``: per-group accuracy bars;
    - ``dro_weights.png``: the DRO-weight trajectories, when ``dro_handler`` holds a history.

    The plots need matplotlib; without it they are skipped with a warning (CSV and JSON are always written). The
    latest summary is kept in ``self.summary`` on every rank. Groups come from ``output_transform`` when it returns
    ``(y_pred, y, groups)``, otherwise from ``engine.state.batch[group_key]``.

    Args:
        output_dir: folder of the report files (created).
        num_groups: number of groups.
        group_names: one name per group (default ``group0``...).
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)`` or ``(y_pred, y, groups)``; ``None`` uses
            ``from_engine(["pred", "label"])``.
        group_key: key of the group ids in the batch.
        loss_fn: per-sample loss ``loss_fn(y_pred, y) -> [B]`` (default :py:func:`per_sample_cross_entropy`).
        dro_handler: the training run's :py:class:`GroupDROHandler`, for the weight plot.
        group_counts: optional training-set size of every group (adds ``weighted_accuracy``).
        plots: write the PNG plots.

    Raises:
        ValueError: when ``group_names`` does not have ``num_groups`` names.

    Example::

        report = GroupReportHandler(output_dir="eval", num_groups=4, group_names=names, dro_handler=dro)
        evaluator = SupervisedEvaluator(..., val_handlers=[report])
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_groups: int,
        group_names: Sequence[str] | None = None,
        output_transform: Callable | None = None,
        group_key: str = "group",
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        dro_handler: GroupDROHandler | None = None,
        group_counts: Sequence[float] | None = None,
        plots: bool = True,
    ) -> None:
        super().__init__(
            output_dir,
            num_groups,
            metrics={"accuracy": per_sample_accuracy, "mean_loss": loss_fn or per_sample_cross_entropy},
            group_names=group_names,
            lower_is_better=["mean_loss"],
            output_transform=output_transform,
            group_key=group_key,
            dro_handler=dro_handler,
            group_counts=group_counts,
            overlays=0,
            plots=plots,
        )

    def summarise(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        accuracy, loss = results["accuracy"], results["mean_loss"]
        worst_id = accuracy["worst_group_id"]
        summary: dict[str, Any] = {
            "accuracy": _finite(accuracy["overall"]),
            "mean_group_accuracy": _finite(accuracy["mean_group"]),
            "worst_group_accuracy": _finite(accuracy["worst_group"]),
            "worst_group": self.group_names[worst_id] if worst_id >= 0 else None,
            "mean_loss": _finite(loss["overall"]),
            "samples": int(accuracy["counts"].sum()),
            "per_group_accuracy": {n: _finite(float(v)) for n, v in zip(self.group_names, accuracy["per_group"])},
        }
        if "weighted" in accuracy:
            summary["weighted_accuracy"] = _finite(accuracy["weighted"])
        return summary

    def csv_rows(self, results: dict[str, dict[str, Any]]) -> list[list[Any]]:
        accuracy, loss = results["accuracy"], results["mean_loss"]
        rows: list[list[Any]] = [list(CSV_COLUMNS)]
        for g, name in enumerate(self.group_names):
            rows.append(
                [g, name, int(accuracy["counts"][g]), float(accuracy["per_group"][g]), float(loss["per_group"][g])]
            )
        return rows

    def write_plots(self, results: dict[str, dict[str, Any]]) -> None:
        accuracy = results["accuracy"]
        plot_group_accuracy(
            accuracy["per_group"], self.group_names, self.output_dir / "group_accuracy.png", accuracy["counts"].tolist()
        )
