"""GroupReportHandler: per-group evaluation report (CSV, JSON) and plots at the end of an evaluator run."""

from __future__ import annotations

import csv
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
from monai.utils import IgniteInfo, evenly_divisible_all_gather, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys

from monai_groupdistil.handlers.group_accuracy_handler import split_output
from monai_groupdistil.handlers.group_dro_handler import GroupDROHandler, default_group_names
from monai_groupdistil.metrics.group_accuracy import _check_groups, _summarise, as_batch, per_sample_accuracy
from monai_groupdistil.visualize import plot_dro_weights, plot_group_accuracy

idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["GroupReportHandler", "per_sample_cross_entropy"]

CSV_COLUMNS = ("group", "name", "samples", "accuracy", "mean_loss")


def per_sample_cross_entropy(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy of every sample from logits (mean over voxels for dense outputs).

    Args:
        y_pred: logits ``[B, C, *spatial]`` with ``C > 1``.
        y: class indices ``[B]`` / ``[B, 1, *spatial]`` or one-hot ``[B, C, *spatial]``.

    Returns:
        ``[B]``; NaN everywhere when ``y_pred`` holds no logits (class indices or a single channel).
    """
    if not y_pred.is_floating_point() or y_pred.ndim < 2 or y_pred.shape[1] < 2:
        return torch.full((y_pred.shape[0],), float("nan"))
    if y.ndim == y_pred.ndim and y.shape[1] == y_pred.shape[1] and y.shape[1] > 1:
        y = y.argmax(dim=1)
    elif y.ndim == y_pred.ndim:
        y = y[:, 0]
    ce = F.cross_entropy(y_pred.float(), y.long().to(y_pred.device), reduction="none")
    return ce.reshape(ce.shape[0], -1).mean(dim=1) if ce.ndim > 1 else ce


def _num(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class GroupReportHandler:
    """Writes a per-group evaluation report when an evaluator run completes.

    During the run it accumulates every sample's correctness, loss (cross entropy of ``pred`` vs ``label`` by
    default; ``pred`` must then hold logits, i.e. no argmax in the evaluator's postprocessing) and group. At
    ``COMPLETED`` it gathers all ranks' samples, and rank 0 writes into ``output_dir``:

    - ``group_report.csv``: columns ``group, name, samples, accuracy, mean_loss``, one row per group (``nan``
      for a group without samples);
    - ``metrics.json``: ``accuracy`` (overall), ``mean_group_accuracy``, ``worst_group_accuracy``,
      ``worst_group`` (its name), plus ``mean_loss``, ``samples``, ``per_group_accuracy`` (name -> value) and,
      with ``group_counts``, ``weighted_accuracy``; NaN is written as ``null``;
    - ``group_accuracy.png``: per-group accuracy bars;
    - ``dro_weights.png``: the DRO-weight trajectories, when ``dro_handler`` holds a history.

    The plots need matplotlib; without it they are skipped with a warning that says how to install it (CSV and
    JSON are always written). The latest summary is kept in ``self.summary`` on every rank.

    Groups come from ``output_transform`` when it returns ``(y_pred, y, groups)``, otherwise from
    ``engine.state.batch[group_key]`` (works with an unmodified ``SupervisedEvaluator``).

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
        names = default_group_names(num_groups) if group_names is None else [str(n) for n in group_names]
        if len(names) != num_groups:
            raise ValueError(f"group_names has {len(names)} names but num_groups is {num_groups}.")
        self.output_dir = Path(output_dir)
        self.num_groups = num_groups
        self.group_names = names
        self.output_transform = from_engine([Keys.PRED, Keys.LABEL]) if output_transform is None else output_transform
        self.group_key = group_key
        self.loss_fn = per_sample_cross_entropy if loss_fn is None else loss_fn
        self.dro_handler = dro_handler
        self.group_counts = group_counts
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
        self._correct: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._groups: list[torch.Tensor] = []

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """Accumulate the iteration's per-sample correctness, loss and group."""
        y_pred, y, groups = split_output(engine, self.output_transform(engine.state.output), self.group_key)
        pred_t, y_t = as_batch(y_pred, "y_pred").detach(), as_batch(y, "y").detach()
        correct = per_sample_accuracy(pred_t, y_t)
        loss = self.loss_fn(pred_t, y_t).detach()
        loss = loss.reshape(loss.shape[0], -1).float().mean(dim=1) if loss.ndim > 1 else loss.float()
        self._correct.append(correct.float().cpu())
        self._losses.append(loss.reshape(-1).cpu())
        self._groups.append(_check_groups(as_batch(groups, "groups"), correct.shape[0], self.num_groups).cpu())

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._correct:
            local = torch.stack([torch.cat(self._correct), torch.cat(self._losses), torch.cat(self._groups).float()])
        else:
            local = torch.zeros(3, 0)
        data = local.t().contiguous()  # [N, 3]: samples first, as evenly_divisible_all_gather expects
        if idist.get_world_size() > 1:
            device = idist.device()
            data = evenly_divisible_all_gather(data.to(device), concat=True).cpu()
        return data[:, 0], data[:, 1], data[:, 2].long()

    def completed(self, engine: Engine) -> None:
        """Gather the samples of all ranks and (rank 0) write the report files."""
        correct, losses, groups = self._gathered()
        result = _summarise(correct, groups, self.num_groups, self.group_counts)
        counts = result["counts"]
        loss_sum = torch.zeros(self.num_groups, dtype=torch.float64).index_add(0, groups, losses.double())
        mean_loss = torch.where(counts > 0, loss_sum / counts.clamp_min(1), torch.full_like(loss_sum, float("nan")))
        worst_id = result["worst_group_id"]
        summary: dict[str, Any] = {
            "accuracy": _num(result["overall"]),
            "mean_group_accuracy": _num(result["mean_group"]),
            "worst_group_accuracy": _num(result["worst_group"]),
            "worst_group": self.group_names[worst_id] if worst_id >= 0 else None,
            "mean_loss": _num(float(losses.double().mean())) if losses.numel() else None,
            "samples": int(correct.numel()),
            "per_group_accuracy": {n: _num(float(v)) for n, v in zip(self.group_names, result["per_group"])},
        }
        if "weighted" in result:
            summary["weighted_accuracy"] = _num(result["weighted"])
        self.summary = summary
        if idist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "group_report.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for g, name in enumerate(self.group_names):
                writer.writerow([g, name, int(counts[g]), float(result["per_group"][g]), float(mean_loss[g])])
        with open(self.output_dir / "metrics.json", "w") as f:
            json.dump(summary, f, indent=2)
        if self.plots:
            self._write_plots(result)

    def _write_plots(self, result: dict[str, Any]) -> None:
        try:
            plot_group_accuracy(
                result["per_group"], self.group_names, self.output_dir / "group_accuracy.png", result["counts"].tolist()
            )
            dro = self.dro_handler
            if dro is not None and dro.weight_history:
                iters, weights, _ = dro.history_tensors()
                plot_dro_weights(weights, dro.group_names, self.output_dir / "dro_weights.png", iters)
        except ImportError as err:
            warnings.warn(f"GroupReportHandler: plots skipped: {err}", stacklevel=2)
