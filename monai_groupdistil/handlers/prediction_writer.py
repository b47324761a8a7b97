"""Writing inference outputs so that a run keeps what it can: predictions and failures written atomically, failing
studies set aside and reported.

- :class:`ClassProbabilitySaver`: the ``saver`` of MONAI's ``ClassificationSaver`` (``predictions.csv``);
- :class:`AtomicNibabelWriter`: the ``writer`` of MONAI's ``SaveImaged`` (segmentation masks);
- :class:`InferenceFailureHandler`: records the studies that failed (with ``monai_groupdistil.data.skip_failed``),
  writes them to ``failures.csv`` and ends the run with :class:`InferenceFailedError` after the others are written.

Every file is written with :py:func:`monai_groupdistil.engines.checkpoint_saver.atomic_write` (a temporary file in its
folder, renamed into place), so an earlier file is replaced only by a complete new one; a run that stops before
writing leaves it as it was.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai.data import CSVSaver, NibabelWriter
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import

from monai_groupdistil.data.skip_failed import FAILURE_KEY
from monai_groupdistil.engines.checkpoint_saver import atomic_write

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "AtomicNibabelWriter",
    "ClassProbabilitySaver",
    "InferenceFailedError",
    "InferenceFailureHandler",
    "write_csv_atomically",
]

logger = logging.getLogger(__name__)


def write_csv_atomically(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]], delimiter: str = ","
) -> Path:
    """Write ``header`` and ``rows`` to the CSV file ``path`` (its folder created) with :py:func:`atomic_write`: an
    earlier ``path`` is replaced only by the complete new file, never left truncated or deleted.

    Args:
        path: the CSV file.
        header: the first row.
        rows: the other rows.
        delimiter: the delimiter of the CSV file.

    Returns:
        ``path``, as a ``Path``.

    Example::

        write_csv_atomically("eval/failures.csv", ["subject", "file", "reason"], [["A1", "a1.nii.gz", "EOFError"]])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


class ClassProbabilitySaver(CSVSaver):
    """MONAI's ``CSVSaver`` with a header row and the name of the predicted class, for ``ClassificationSaver``.

    Our own subclass because MONAI's ``CSVSaver`` writes neither a header nor class names (one line per sample:
    the identifier and the values), and deletes an existing file when it is built (``overwrite=True``), before any
    prediction is made. Give it as ``saver`` to MONAI's ``ClassificationSaver``, which collects the predictions of an
    evaluator, gathers them from every rank in a multi-process run and saves them on one rank. Each sample of the
    batch ``[B, C]`` (class probabilities, e.g. after ``Activationsd(softmax=True)``) is one row: ``<id_name>`` (its
    ``filename_or_obj``), ``predicted_class`` (the name of the largest value) and one column ``prob_<name>`` per
    class, six decimals. Every :meth:`finalize` (the end of a run) writes the file anew with
    :func:`write_csv_atomically`: an earlier file stays as it was until then.

    Args:
        class_names: names of the ``C`` classes, in the order of the network's outputs.
        output_dir: folder of the CSV file (created when the file is written).
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
        super().__init__(output_dir=output_dir, filename=filename, overwrite=False, flush=False, delimiter=delimiter)
        self.class_names = [str(c) for c in class_names]
        self.id_name = id_name
        self.output_file = self.output_dir / filename

    def finalize(self) -> None:
        """Write the header and one row per saved sample (replacing the file atomically), then clear the cache."""
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
        header = [self.id_name, "predicted_class", *[f"prob_{c}" for c in self.class_names]]
        write_csv_atomically(self.output_file, header, rows, delimiter=self.delimiter)
        self.reset_cache()


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes to a temporary file in the target folder and renames it into place.

    An earlier file of the same name (a mask of an earlier run) is replaced only by the complete new one; a run
    killed while writing leaves it as it was. Give it as ``writer`` to MONAI's ``SaveImage``/``SaveImaged``.

    Example::

        SaveImaged("pred", output_dir="eval/masks", output_postfix="seg", writer=AtomicNibabelWriter)
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        """Write the image to ``filename`` with :py:func:`atomic_write` (the temporary file keeps the suffixes, so
        the format). Arguments as ``NibabelWriter.write``."""
        with atomic_write(filename) as temporary:
            super().write(temporary, verbose=verbose, **obj_kwargs)


class InferenceFailedError(RuntimeError):
    """Raised at the end of an inference run in which some studies failed; ``failures`` holds their records
    (``{"id", "file", "reason"}``)."""

    def __init__(self, message: str, failures: Sequence[dict[str, str]]) -> None:
        super().__init__(message)
        self.failures = list(failures)


class InferenceFailureHandler:
    """Records the studies an inference run could not predict, writes them to a CSV file and raises at the end.

    Two stages fail a study: its loading or preprocessing (it raised, or its input is not finite), recorded by a
    ``monai_groupdistil.data.skip_failed.SkipFailedLoader`` given to the evaluator as its data loader and read here
    from ``engine.data_loader.failures``; and the network (a non-finite prediction), which
    ``monai_groupdistil.data.skip_failed.SkipNonFinited`` in the postprocessing marks. The handler removes a marked
    item from ``engine.state.batch`` and ``engine.state.output`` right after the postprocessing
    (``IterationEvents.MODEL_COMPLETED``), so the savers and metrics after it see the good items only.

    At the end of the epoch it writes ``output_file`` (``<id_name>,file,reason``, one row per failed study; only the
    header when none failed, so no earlier list survives a run that succeeded) with the same atomic write as the
    predictions; when no study at all was predicted it raises :class:`InferenceFailedError` there, before the savers
    run, which leaves the earlier predictions as they were. Otherwise, at the end of the run (``Events.COMPLETED``,
    after the savers wrote the other studies' outputs) it raises :class:`InferenceFailedError` naming every failed
    study. One process: the records of other ranks are not gathered. With a ``SkipFailedLoader``, whose number of
    batches can change from one pass to the next, it makes every pass run to the loader's end.

    Give it to the evaluator before the savers (``val_handlers=[..., handler, saver]``): its end-of-epoch check must
    come before theirs. The evaluator must decollate (MONAI's default). A batch whose every study failed reaches the
    savers as empty lists: give them transforms that accept one, as in the example (MONAI's ``from_engine`` reads the
    first item and raises ``IndexError`` on an empty list).

    Args:
        output_file: the CSV file of the failed studies.
        id_name: header of the identifier column, and the key of a study's identifier in the batch.
        file_key: the key of the study's input in the batch (a ``MetaTensor``, whose ``filename_or_obj`` is
            recorded, or a path).

    Raises:
        InferenceFailedError: at the end of a run in which some studies failed; its message names each (identifier,
            file, reason) and the CSV file.

    Example::

        loader = SkipFailedLoader(SkipFailedDataset(datalist, preprocessing), batch_size=8)
        postprocessing = SkipNonFinited("pred", Activationsd("pred", softmax=True))
        failures = InferenceFailureHandler("eval/failures.csv", id_name="subject")
        prediction_saver = ClassificationSaver(
            batch_transform=lambda batch: [{"filename_or_obj": item["subject"]} for item in batch],
            output_transform=lambda output: [item["pred"] for item in output],  # [] when the whole batch failed
            saver=ClassProbabilitySaver(["NOR", "HCM", "DCM"], "eval", "predictions.csv", id_name="subject"),
        )
        evaluator = SupervisedEvaluator(device, loader, network, postprocessing=postprocessing,
                                        val_handlers=[failures, prediction_saver])
        evaluator.run()  # InferenceFailedError after predictions.csv is written, when a study failed
    """

    max_listed = 20  # failures named in the error's message (all are in the CSV file)

    def __init__(self, output_file: str | os.PathLike, id_name: str = "subject", file_key: str = "image") -> None:
        self.output_file = Path(output_file)
        self.id_name = id_name
        self.file_key = file_key
        self.failures: list[dict[str, str]] = []
        self.predicted = 0
        self._output_failures: list[dict[str, str]] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler's steps on ``engine`` (a MONAI workflow: it fires ``MODEL_COMPLETED``)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self._set_aside)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._raise)

    def _started(self, engine: Engine) -> None:
        self.failures, self._output_failures, self.predicted = [], [], 0
        if hasattr(engine.data_loader, "failures"):  # a SkipFailedLoader: its batch count can change between passes,
            engine.state.epoch_length = None  # and ignite would otherwise stop a later pass at the first one's count

    def _file_of(self, item: dict) -> str:
        value = item.get(self.file_key, "")
        meta = getattr(value, "meta", None)
        return str(meta.get("filename_or_obj", "")) if isinstance(meta, dict) else str(value)

    def _set_aside(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if not isinstance(output, list):
            return
        failed = [i for i, o in enumerate(output) if isinstance(o, dict) and FAILURE_KEY in o]
        for i in failed:
            record = {"id": str(batch[i].get(self.id_name, "")), "file": self._file_of(batch[i])}
            record["reason"] = str(output[i][FAILURE_KEY])
            logger.warning("study '%s' (%s) not predicted: %s", record["id"], record["file"], record["reason"])
            self._output_failures.append(record)
        if failed:
            engine.state.batch = [b for i, b in enumerate(batch) if i not in failed]
            engine.state.output = [o for i, o in enumerate(output) if i not in failed]
        self.predicted += len(output) - len(failed)

    def _write(self, engine: Engine) -> None:
        self.failures = [*getattr(engine.data_loader, "failures", []), *self._output_failures]
        rows = [[f["id"], f["file"], f["reason"]] for f in self.failures]
        write_csv_atomically(self.output_file, [self.id_name, "file", "reason"], rows)
        if self.failures and self.predicted == 0:
            raise InferenceFailedError(
                self._message("no study was predicted (earlier outputs left as they were)"), self.failures
            )

    def _raise(self, engine: Engine) -> None:
        if self.failures:
            raise InferenceFailedError(
                self._message(f"the other {self.predicted} were predicted and their outputs written"), self.failures
            )

    def _message(self, outcome: str) -> str:
        total = self.predicted + len(self.failures)
        listed = "; ".join(f"'{f['id']}' ({f['file']}): {f['reason']}" for f in self.failures[: self.max_listed])
        more = len(self.failures) - self.max_listed
        return (
            f"inference failed for {len(self.failures)} of {total} studies ({outcome}); each is listed in "
            f"'{self.output_file}': {listed}{f'; and {more} more' if more > 0 else ''}. Fix or remove these files "
            "and run again."
        )
