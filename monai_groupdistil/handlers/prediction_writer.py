"""A CSV saver for MONAI's ``ClassificationSaver``: identifier, predicted class and probabilities of every sample."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from monai.data import CSVSaver

__all__ = ["ClassProbabilitySaver"]


class ClassProbabilitySaver(CSVSaver):
    """MONAI's ``CSVSaver`` with a header row and the name of the predicted class, for ``ClassificationSaver``.

    Our own subclass because MONAI's ``CSVSaver`` writes neither a header nor class names (one line per sample:
    the identifier and the values). Give it as ``saver`` to MONAI's ``ClassificationSaver``, which collects the
    predictions of an evaluator, gathers them from every rank in a multi-process run and saves them on one rank.
    Each sample of the batch ``[B, C]`` (class probabilities, e.g. after ``Activationsd(softmax=True)``) is one row:
    ``<id_name>`` (its ``filename_or_obj``), ``predicted_class`` (the name of the largest value) and one column
    ``prob_<name>`` per class, six decimals. Every :meth:`finalize` (the end of a run) writes the file anew.

    Args:
        class_names: names of the ``C`` classes, in the order of the network's outputs.
        output_dir: folder of the CSV file (created).
        filename: name of the CSV file.
        id_name: header of the identifier column.
        delimiter: the delimiter of the CSV file.

    Raises:
        ValueError: from :meth:`finalize`, when a sample does not have ``len(class_names)`` values.

    Example::

        saver = ClassificationSaver(
            batch_transform=lambda batch: {"filename_or_obj": from_engine(["subject"])(batch)},
            output_transform=from_engine(["pred"]),  # probabilities: postprocessing Activationsd(softmax=True)
            saver=ClassProbabilitySaver(["NOR", "HCM", "DCM"], "eval", "predictions.csv", id_name="subject"),
        )
        evaluator = SupervisedEvaluator(..., postprocessing=Activationsd("pred", softmax=True), val_handlers=[saver])
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | os.PathLike = "./",
        filename: str = "predictions.csv",
        id_name: str = "subject",
        delimiter: str = ",",
    ) -> None:
        super().__init__(output_dir=output_dir, filename=filename, overwrite=True, flush=False, delimiter=delimiter)
        self.class_names = [str(c) for c in class_names]
        self.id_name = id_name
        self.output_file = self.output_dir / filename

    def finalize(self) -> None:
        """Write the header and one row per saved sample, then clear the cache."""
        rows = []
        for sample_id, values in self.get_cache().items():
            probs = values.flatten().tolist()
            if len(probs) != len(self.class_names):
                raise ValueError(
                    f"the prediction of '{sample_id}' has {len(probs)} values but class_names has "
                    f"{len(self.class_names)}: {self.class_names}."
                )
            best = max(range(len(probs)), key=probs.__getitem__)
            rows.append([sample_id, self.class_names[best], *[f"{p:.6f}" for p in probs]])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=self.delimiter)
            writer.writerow([self.id_name, "predicted_class", *[f"prob_{c}" for c in self.class_names]])
            writer.writerows(rows)
        self.reset_cache()
