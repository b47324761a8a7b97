"""Dataset set-up that every bundle uses: the data preparation of rank 0 in a multi-process run, the warning that
synthetic data is being generated and the record of its settings, group counts and file stems. Each release's
set-up is in its own module (``mnms_datasets``, ``waterbirds_datasets``, ``segmentation_datasets``)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

__all__ = [
    "check_synthetic",
    "group_counts",
    "is_empty_or_missing",
    "path_stem",
    "record_synthetic",
    "run_on_rank_zero",
    "warn_synthetic",
]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger
SYNTHETIC_RECORD = "synthetic_data.json"  # written next to the generated data: the generator's settings


def run_on_rank_zero(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on rank 0 only (every process when not distributed), then synchronise the ranks."""
    distributed = dist.is_available() and dist.is_initialized()
    result, error = None, None
    if not distributed or dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # re-raised after the barrier so no rank hangs
            error = err
    if distributed:
        flag = [error is not None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] and error is None:
            raise RuntimeError("preparing the dataset failed on rank 0; see its log.")
    if error is not None:
        raise error
    return result


def is_empty_or_missing(path: Path) -> bool:
    """Whether ``path`` does not exist or is an empty folder (where the synthetic data may be generated); the record
    of synthetic data deleted since (:py:data:`SYNTHETIC_RECORD` alone) counts as empty."""
    return not path.exists() or (path.is_dir() and all(p.name == SYNTHETIC_RECORD for p in path.iterdir()))


def warn_synthetic(path: Path, generated: str, release: str, real_folder: str) -> None:
    """Warn that ``path`` (missing or empty) gets synthetic data: a misspelled ``dataset_dir`` would land here."""
    state = "does not exist" if not path.exists() else "is empty"
    logger.warning(
        "dataset_dir '%s' %s: generating %s there and training on them: SYNTHETIC data, not the %s. If you meant "
        "a real release, the path may be misspelled: point --dataset_dir at %s.",
        os.path.abspath(path),
        state,
        generated,
        release,
        real_folder,
    )


def record_synthetic(path: Path, settings: dict[str, Any]) -> None:
    """Write the settings the synthetic data in ``path`` were generated with (:py:data:`SYNTHETIC_RECORD`)."""
    temporary = path / f".{SYNTHETIC_RECORD}.tmp"
    temporary.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(temporary, path / SYNTHETIC_RECORD)


def check_synthetic(path: Path, settings: dict[str, Any]) -> None:
    """Warn when the synthetic data already in ``path`` were generated with other settings than this run's: the
    data set-up uses existing data as they are, so e.g. another ``synthetic_subjects`` would go unnoticed."""
    record = path / SYNTHETIC_RECORD
    if not record.is_file():
        return  # a real release, or data generated before the record existed
    try:
        used = json.loads(record.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(used, dict):
        return  # not a record of ours
    wanted = json.loads(json.dumps(settings, default=str))
    differ = {k: (used.get(k), v) for k, v in wanted.items() if used.get(k) != v}
    if differ:
        logger.warning(
            "dataset_dir '%s' holds synthetic data generated with %s; this run's settings (%s) apply only when the "
            "data are generated, so the existing data are used as they are. Delete the folder, or pass another "
            "--dataset_dir, to generate them with this run's settings.",
            os.path.abspath(path),
            ", ".join(f"{k}={old!r}" for k, (old, _) in differ.items()),
            ", ".join(f"{k}={new!r}" for k, (_, new) in differ.items()),
        )


def group_counts(datalist: Sequence[dict], num_groups: int, group_key: str = "group") -> list[int]:
    """Number of entries of every group ``0 .. num_groups - 1`` (the ``N_g`` of the group-DRO adjustment)."""
    counts = Counter(int(d[group_key]) for d in datalist)
    bad = sorted(g for g in counts if not 0 <= g < num_groups)
    if bad:
        raise ValueError(f"datalist has group ids {bad} outside [0, {num_groups}).")
    return [counts.get(g, 0) for g in range(num_groups)]


def path_stem(path: Path) -> str:
    """The file name without its ``.nii.gz`` / ``.nii`` suffix (or its last suffix): a subject's name."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
