"""Dataset set-up of the cardiac classification bundle: the M&Ms release, or the embedded synthetic data in its layout;
the official splits or a re-split by group; the inference datalist of 4-D cine studies."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_groupdistil.data import MNMS_CLASSES, MNMS_CSV_NAME, load_mnms_datalist, mnms_group_names, split_by_group
from monai_groupdistil.data.json_datalist import load_json_datalist

from .datasets import (
    check_synthetic,
    group_counts,
    is_empty_or_missing,
    path_stem,
    run_on_rank_zero,
    warn_synthetic,
)
from .synthetic import make_synthetic_mnms

__all__ = [
    "find_mnms_root",
    "generate_mnms",
    "inference_datalist",
    "mnms_splits",
    "official_or_resplit",
    "prepare_mnms_dataset",
]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger


def generate_mnms(
    path: Path, synthetic_subjects: int, seed: int, release: str, real_folder: str, **synthetic_kwargs: Any
) -> str:
    """Generate the synthetic M&Ms-layout data in ``path`` (rank 0 only, the others wait); its OpenDataset folder."""

    def generate():
        warn_synthetic(path, f"{synthetic_subjects} synthetic subjects", release, real_folder)
        make_synthetic_mnms(path, n_subjects=synthetic_subjects, seed=seed, **synthetic_kwargs)  # records its settings

    run_on_rank_zero(generate)
    found = find_mnms_root(path)
    assert found is not None
    return found


def synthetic_settings(synthetic_subjects: int, seed: int, **synthetic_kwargs: Any) -> dict[str, Any]:
    """The settings of this run's synthetic M&Ms-layout data under the names ``make_synthetic_mnms`` records them
    with, compared with the record when the data are reused."""
    return {"synthetic_subjects": synthetic_subjects, "seed": seed, **synthetic_kwargs}


def find_mnms_root(dataset_dir: str | os.PathLike) -> str | None:
    """The ``OpenDataset`` folder of an M&Ms release at or directly under ``dataset_dir``, or None."""
    path = Path(dataset_dir)
    for candidate in (path, path / "OpenDataset"):
        if (candidate / MNMS_CSV_NAME).is_file():
            return str(candidate)
    return None


def prepare_mnms_dataset(
    dataset_dir: str | os.PathLike, synthetic_subjects: int = 120, seed: int = 0, **synthetic_kwargs: Any
) -> str:
    """Return the ``OpenDataset`` folder to train on, generating the embedded synthetic data when needed.

    - ``dataset_dir`` holds an M&Ms release (the metadata CSV in it or in its ``OpenDataset/``): it is used as is.
    - ``dataset_dir`` is missing or empty: the synthetic multi-vendor dataset is generated there
      (:py:func:`scripts.make_synthetic_mnms`) with ``synthetic_subjects`` subjects, with a WARNING
      naming the folder (a misspelled path would otherwise train on synthetic data without notice).
    - anything else is an error, so that a wrong path never trains on the wrong data.

    In a multi-process run only rank 0 generates; the other ranks wait for it.

    Args:
        dataset_dir: the bundle's ``dataset_dir``.
        synthetic_subjects: number of labelled subjects of the synthetic dataset.
        seed: seed of the synthetic dataset.
        synthetic_kwargs: further arguments of ``make_synthetic_mnms`` (vendor fractions, correlation...).

    Raises:
        ValueError: when ``dataset_dir`` is neither empty nor an M&Ms release.
    """
    found = find_mnms_root(dataset_dir)
    if found is not None:
        check_synthetic(Path(dataset_dir), synthetic_settings(synthetic_subjects, seed, **synthetic_kwargs))
        return found
    path = Path(dataset_dir)
    if not is_empty_or_missing(path):
        raise ValueError(
            f"dataset_dir '{path}' is neither empty nor an M&Ms release: no '{MNMS_CSV_NAME}' in it or in its "
            "'OpenDataset' folder. Point dataset_dir at the release's OpenDataset folder (or its parent), or at a "
            "new or empty folder to generate the synthetic dataset there."
        )
    release, real_folder = "M&Ms release", "the release's OpenDataset folder (or its parent)"
    return generate_mnms(path, synthetic_subjects, seed, release, real_folder, **synthetic_kwargs)


def official_or_resplit(
    parts: dict[str, list[dict]],
    group_names: Sequence[str],
    fractions: Sequence[float],
    seed: int,
    resplit: bool | None,
    release: str = "M&Ms",
) -> tuple[dict[str, list[dict]], bool]:
    """The official ``train``/``val``/``test`` datalists, or all of them pooled and re-split stratified by group.

    Args:
        parts: ``{"train": [...], "val": [...], "test": [...]}`` entries with a ``group`` id.
        group_names: names of the group ids (logged).
        fractions: train / val / test fractions of a re-split.
        seed: seed of a re-split.
        resplit: force (True) or forbid (False) the re-split; None re-splits when the training split lacks a group
            that occurs in another split (the real M&Ms training split has no vendor D).
        release: the release's name, logged.

    Returns:
        the splits and whether they were re-split.
    """
    everywhere = {d["group"] for part in parts.values() for d in part}
    in_train = {d["group"] for d in parts["train"]}
    if resplit is None:
        resplit = bool(everywhere - in_train)
    if resplit:
        missing = [group_names[g] for g in sorted(everywhere - in_train)]
        logger.info("pooling the %s splits and re-splitting by group (training split lacks %s)", release, missing)
        pooled = parts["train"] + parts["val"] + parts["test"]
        parts = dict(zip(("train", "val", "test"), (list(p) for p in split_by_group(pooled, fractions, seed=seed))))
    return parts, bool(resplit)


def mnms_splits(
    dataset_root: str | os.PathLike,
    group_by: str | Sequence[str] = "vendor",
    classes: Sequence[str] = MNMS_CLASSES,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    resplit: bool | None = None,
) -> dict[str, Any]:
    """Train, validation and test datalists of an M&Ms release, with the group names and training counts.

    The official splits are used when the training split holds every group that occurs in the release; otherwise
    (the real M&Ms training split has no vendor D) all splits are pooled and re-split stratified by group with
    :py:func:`monai_groupdistil.data.split_by_group`. ``resplit`` forces either choice.

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "group_names": [...], "num_groups": G,
        "group_counts": [N_0, ...], "resplit": bool}``.
    """
    names = mnms_group_names(group_by, classes)
    parts = {
        s: load_mnms_datalist(dataset_root, split=s, group_by=group_by, classes=classes)
        for s in ("train", "val", "test")
    }
    parts, resplit = official_or_resplit(parts, names, fractions, seed, resplit, "M&Ms")
    for name, part in parts.items():
        if not part:
            raise ValueError(f"the {name} split of {dataset_root} is empty; the dataset is too small to train on.")
    return {
        **parts,
        "group_names": names,
        "num_groups": len(names),
        "group_counts": group_counts(parts["train"], len(names)),
        "resplit": resplit,
    }


def inference_datalist(input_path: str | os.PathLike, frame: int = 0) -> list[dict[str, Any]]:
    """Datalist of 4-D short-axis cine studies to classify.

    ``input_path`` may be:

    - an M&Ms release (``OpenDataset`` or its parent): every subject of every split, ED frame from the CSV;
    - a JSON file holding a list of ``{"image": path, "ed": int (optional), "subject": str (optional)}`` (relative
      paths are taken from the JSON file's folder);
    - a folder of ``*.nii.gz`` / ``*.nii`` studies, searched recursively (files ending in ``_gt`` are masks and are
      skipped); the frame is ``frame`` (0 by default: cine acquisitions usually start at end-diastole).

    Returns:
        entries with ``image``, ``ed``, ``es`` (= ``ed``) and ``subject``.

    Raises:
        FileNotFoundError: when ``input_path`` does not exist or holds no study.
        ValueError: for a malformed JSON datalist (the entry and key are named).
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(
            f"inference input '{path}' does not exist (a folder of NIfTI studies, a JSON "
            "datalist or an M&Ms release is expected)."
        )
    root = find_mnms_root(path) if path.is_dir() else None
    if root is not None:
        entries = load_mnms_datalist(
            root,
            split="all",
            include_unlabeled=True,
            classes=("NOR", "HCM", "DCM", "ARV", "AHS", "HHD", "IHD", "LVNC", "Other"),
            on_missing="skip",
        )
        return [{"image": d["image"], "ed": d["ed"], "es": d["ed"], "subject": d["subject"]} for d in entries]
    if path.is_file() and path.suffix == ".json":
        out = []
        for item in load_json_datalist(path):
            ed = int(item.get("ed", frame))
            subject = str(item.get("subject", path_stem(Path(item["image"]))))
            out.append({"image": item["image"], "ed": ed, "es": ed, "subject": subject})
        return out
    files = sorted(
        f for f in glob.glob(str(path / "**" / "*.nii*"), recursive=True) if not path_stem(Path(f)).endswith("_gt")
    )
    if not files:
        raise FileNotFoundError(f"no NIfTI study (*.nii, *.nii.gz) found under '{path}'.")
    return [{"image": f, "ed": frame, "es": frame, "subject": path_stem(Path(f))} for f in files]
