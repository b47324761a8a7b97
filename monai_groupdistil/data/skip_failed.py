"""Inference input that keeps going: a study that cannot be loaded or preprocessed, or whose input or network output is
not finite, is set aside with the reason, and the other studies (its batch-mates too) are predicted.

- :class:`SkipFailedDataset`: MONAI's ``Dataset`` returning a failure record instead of raising;
- :class:`SkipFailedLoader`: batches of the good items of a :class:`SkipFailedDataset`, the failures in ``failures``;
- :class:`SkipNonFinited`: a postprocessing step that applies its transforms to a finite prediction only.

:class:`monai_groupdistil.handlers.InferenceFailureHandler` collects the failures of both stages, writes them to a CSV
file and ends the run with an error naming them, after the outputs of the other studies are written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import DataLoader, Dataset, list_data_collate
from monai.transforms import Compose, MapTransform

__all__ = [
    "FAILURE_KEY",
    "SkipFailedDataset",
    "SkipFailedLoader",
    "SkipNonFinited",
    "failure_reason",
    "non_finite_reason",
    "skip_failed_collate",
]

FAILURE_KEY = "inference_failure"
"""Key of the failure record of an item: in a :class:`SkipFailedDataset` item, ``{"id", "file", "reason"}``; in an
item that :class:`SkipNonFinited` set aside, the reason."""

logger = logging.getLogger(__name__)


def failure_reason(error: BaseException, max_length: int = 300) -> str:
    """``"<type>: <message>"`` of the innermost cause of ``error``, the message's first line only, at most
    ``max_length`` characters (MONAI wraps a transform's error in ``RuntimeError("applying transform ...")``, which
    does not say what went wrong, and ``LoadImage`` appends every reader's traceback to its message)."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return reason if len(reason) <= max_length else reason[: max_length - 3] + "..."


def non_finite_reason(value: Any, what: str) -> str | None:
    """``None`` when ``value`` (a tensor or array) is finite; otherwise a reason such as
    ``"non-finite input 'image': 4096 of 4096 values are NaN or infinite"``."""
    tensor = torch.as_tensor(value)
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    bad = int((~torch.isfinite(tensor)).sum())
    return f"non-finite {what}: {bad} of {tensor.numel()} values are NaN or infinite" if bad else None


class SkipFailedDataset(Dataset):
    """MONAI's ``Dataset`` whose failing items become failure records (MONAI has no dataset that skips failing items).

    An item whose ``transform`` raises (a missing or corrupt file, a frame out of range, ...) or whose
    ``finite_keys`` hold a NaN or infinite value after the transform is returned as
    ``{FAILURE_KEY: {"id": <id_key of the entry>, "file": <file_key of the entry>, "reason": "..."}}``; the reason of
    an error is ``"FileNotFoundError: '<file>' does not exist"`` when the entry's file does not exist, otherwise
    :func:`failure_reason` of it. Batch it with :class:`SkipFailedLoader` (or :func:`skip_failed_collate`), which
    keeps the good items and collects the records.

    Args:
        data: the datalist.
        transform: the preprocessing of one entry.
        file_key: the entry's key naming its file, quoted in the record.
        id_key: the entry's identifier key, quoted in the record (the entry's index when it has none).
        finite_keys: keys of the transformed item that must be finite.

    Example::

        dataset = SkipFailedDataset(inference_datalist(path), cardiac_preprocessing(seg_key=None), id_key="subject")
        loader = SkipFailedLoader(dataset, batch_size=8)
        for batch in loader: ...  # only good items; loader.failures: the records of the others
    """

    def __init__(
        self,
        data: Sequence,
        transform: Sequence[Callable] | Callable | None = None,
        file_key: str = "image",
        id_key: str = "subject",
        finite_keys: KeysCollection = ("image",),
    ) -> None:
        super().__init__(data=data, transform=transform)
        self.file_key = file_key
        self.id_key = id_key
        self.finite_keys = [finite_keys] if isinstance(finite_keys, str) else list(finite_keys)

    def _transform(self, index: int) -> Any:
        entry = self.data[index]
        try:
            item = super()._transform(index)
            reason = next(
                (r for k in self.finite_keys if (r := non_finite_reason(item[k], f"input '{k}'")) is not None), None
            )
        except Exception as error:  # noqa: BLE001 (any error of one item is that item's failure)
            file = entry.get(self.file_key) if isinstance(entry, Mapping) else None
            if isinstance(file, (str, os.PathLike)) and not os.path.exists(file):
                reason = f"FileNotFoundError: '{file}' does not exist"  # clearer than a reader's error
            else:
                reason = failure_reason(error)
        if reason is None:
            return item
        found = isinstance(entry, Mapping)
        record = {
            "id": str(entry.get(self.id_key, index)) if found else str(index),
            "file": str(entry.get(self.file_key, "")) if found else "",
            "reason": reason,
        }
        return {FAILURE_KEY: record}


def skip_failed_collate(batch: Sequence[Mapping]) -> dict:
    """``list_data_collate`` of the good items of ``batch``, with the failure records of the others as a list under
    ``FAILURE_KEY`` (an empty dict and the records when every item failed)."""
    failures = [item[FAILURE_KEY] for item in batch if FAILURE_KEY in item]
    good = [item for item in batch if FAILURE_KEY not in item]
    collated = list_data_collate(good) if good else {}
    collated[FAILURE_KEY] = failures
    return collated


class SkipFailedLoader:
    """Iterates a MONAI ``DataLoader`` of a :class:`SkipFailedDataset`, yielding the batches of its good items.

    The failure records of the current (or last) pass are in ``failures``, each logged as a WARNING that names the
    item, its file and the reason. A batch whose items all failed is not yielded, so the loader has no length: an
    evaluator run on it learns the number of iterations at the end of its epoch (and keeps it for a later run:
    ``InferenceFailureHandler`` forgets it at every epoch start, so that each pass runs to the loader's end).

    Args:
        dataset: a :class:`SkipFailedDataset`.
        batch_size: items per batch (a batch holds fewer when some of its items failed).
        num_workers: worker processes of the ``DataLoader``.
        kwargs: other arguments of MONAI's ``DataLoader`` (``collate_fn`` is :func:`skip_failed_collate`).

    Example::

        evaluator = SupervisedEvaluator(device, SkipFailedLoader(dataset, batch_size=8), network, ...)
    """

    def __init__(self, dataset: SkipFailedDataset, batch_size: int = 1, num_workers: int = 0, **kwargs: Any) -> None:
        self.loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=skip_failed_collate, **kwargs
        )
        self.failures: list[dict[str, str]] = []

    def __iter__(self) -> Iterator[dict]:
        self.failures = []
        for batch in self.loader:
            for record in batch.pop(FAILURE_KEY):
                logger.warning("study '%s' (%s) not predicted: %s", record["id"], record["file"], record["reason"])
                self.failures.append(record)
            if batch:
                yield batch


class SkipNonFinited(MapTransform):
    """A postprocessing step: ``transform`` for an item whose ``keys`` are finite; any other item is left as it is
    and marked with ``FAILURE_KEY`` (the reason), for ``InferenceFailureHandler`` to record and remove.

    The evaluator applies its postprocessing to one item at a time, so a non-finite prediction sets aside its item
    only: the outputs of the others (e.g. the masks written by a ``SaveImaged`` in ``transform``) are made as usual.

    Args:
        keys: keys of the network's output that must be finite (``"pred"``).
        transform: the postprocessing of a finite item (a transform, e.g. a ``Compose``, or a sequence of them).

    Example::

        postprocessing = SkipNonFinited("pred", Compose([AsDiscreted("pred", argmax=True), SaveImaged("pred")]))
    """

    def __init__(self, keys: KeysCollection, transform: Sequence[Callable] | Callable) -> None:
        super().__init__(keys)
        self.transform = transform if callable(transform) else Compose(transform)

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        for key in self.key_iterator(dict(data)):
            reason = non_finite_reason(data[key], f"network output '{key}'")
            if reason is not None:
                return {**data, FAILURE_KEY: reason}
        return self.transform(data)
