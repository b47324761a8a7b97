"""Writes classification predictions (identifier, predicted class, class probabilities) to a CSV file."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ClassPredictionWriter"]


class ClassPredictionWriter:
    """Collects an evaluator's class predictions and writes them to a CSV file when the run completes.

    One row per sample: the identifier read from ``engine.state.batch[id_key]``, the predicted class name and one
    probability column per class (``prob_<name>``; softmax of the logits in ``engine.state.output["pred"]``). In a
    multi-process run each rank's rows are gathered and rank 0 writes the file.

    Args:
        output_file: the CSV file to write (its folder is created).
        class_names: names of the classes, in the order of the network's outputs.
        id_key: key of the sample identifiers in the batch (strings or numbers).
        pred_transform: maps ``engine.state.output`` to the logits ``[B, C]``; default: the ``pred`` entries.

    Raises:
        KeyError: when the batch lacks ``id_key`` (the keys present are named).
        ValueError: when the logits do not have ``len(class_names)`` columns.

    Example::

        writer = ClassPredictionWriter("eval/predictions.csv", ["NOR", "HCM", "DCM"], id_key="subject")
        evaluator = SupervisedEvaluator(..., val_handlers=[writer])
    """

    def __init__(
        self,
        output_file: str | os.PathLike,
        class_names: Sequence[str],
        id_key: str = "subject",
        pred_transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.output_file = Path(output_file)
        self.class_names = [str(c) for c in class_names]
        self.id_key = id_key
        self.pred_transform = pred_transform
        self.rows: list[list[Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register the collection and writing callbacks on ``engine``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _logits(self, output: Any) -> torch.Tensor:
        if self.pred_transform is not None:
            return torch.as_tensor(self.pred_transform(output))
        if isinstance(output, dict):
            return torch.as_tensor(output["pred"])
        return torch.stack([torch.as_tensor(o["pred"]) for o in output])  # decollated list of dicts

    def _ids(self, batch: Any) -> list[str]:
        if isinstance(batch, dict):
            if self.id_key not in batch:
                raise KeyError(f"the batch has no '{self.id_key}' key; keys present: {sorted(map(str, batch))}.")
            ids = batch[self.id_key]
        else:
            missing = [d for d in batch if self.id_key not in d]
            if missing:
                raise KeyError(f"the batch has no '{self.id_key}' key; keys present: {sorted(map(str, missing[0]))}.")
            ids = [d[self.id_key] for d in batch]
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return [str(i) for i in ids]

    def _collect(self, engine: Engine) -> None:
        logits = self._logits(engine.state.output).detach().float().cpu()
        logits = logits.reshape(logits.shape[0], -1)
        if logits.shape[1] != len(self.class_names):
            raise ValueError(
                f"predictions have {logits.shape[1]} classes but class_names has {len(self.class_names)}: "
                f"{self.class_names}."
            )
        probs = torch.softmax(logits, dim=1)
        for sample_id, p in zip(self._ids(engine.state.batch), probs.tolist()):
            self.rows.append([sample_id, self.class_names[max(range(len(p)), key=p.__getitem__)], *p])

    def _write(self, engine: Engine) -> None:
        rows = self.rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            if torch.distributed.get_rank() != 0:
                return
            rows = [r for part in gathered for r in part]
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([self.id_key, "predicted_class", *[f"prob_{c}" for c in self.class_names]])
            for row in rows:
                writer.writerow([row[0], row[1], *[f"{v:.6f}" for v in row[2:]]])
