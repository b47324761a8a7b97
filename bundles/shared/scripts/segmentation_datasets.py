"""Dataset set-up of the segmentation bundle (``bundles/cardiac_mri_seg_groupdistil``): M&Ms, M&Ms-2 or the
embedded synthetic data; splits by subject, one entry per subject and frame (ED, ES)."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_groupdistil.data.json_datalist import load_json_datalist
from monai_groupdistil.data.mnms import (
    MNMS2_CLASSES,
    MNMS2_CSV_NAME,
    MNMS_CSV_NAME,
    load_mnms2_datalist,
    load_mnms_datalist,
    mnms2_group_names,
)

from .datasets import check_synthetic, group_counts, is_empty_or_missing, path_stem
from .mnms_datasets import find_mnms_root, generate_mnms, mnms_splits, official_or_resplit, synthetic_settings
from .segmentation import segmentation_frames

__all__ = [
    "SEG_PATHOLOGIES",
    "find_mnms2_root",
    "prepare_seg_dataset",
    "seg_splits",
    "seg_inference_datalist",
]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger

SEG_PATHOLOGIES = ("NOR", "HCM", "DCM", "HHD", "ARV", "AHS", "IHD", "LVNC", "Other")
"""M&Ms pathology codes kept for segmentation (every subject is segmented, whatever its pathology)."""


def find_mnms2_root(dataset_dir: str | os.PathLike) -> str | None:
    """The ``MnM2`` folder of an M&Ms-2 release at or directly under ``dataset_dir``, or None."""
    path = Path(dataset_dir)
    for candidate in (path, path / "MnM2"):
        if (candidate / MNMS2_CSV_NAME).is_file() and (candidate / "dataset").is_dir():
            return str(candidate)
    return None


def prepare_seg_dataset(
    dataset_dir: str | os.PathLike, synthetic_subjects: int = 120, seed: int = 0, **synthetic_kwargs: Any
) -> str:
    """The dataset folder to train on: an M&Ms-2 release, an M&Ms release, or the synthetic data generated there.

    Args:
        dataset_dir: the bundle's ``dataset_dir``: the ``MnM2`` folder (or its parent), the ``OpenDataset`` folder
            (or its parent), or a missing or empty folder, where the synthetic M&Ms-layout data are generated,
            with a WARNING naming the folder (a misspelled path would otherwise train on synthetic data unnoticed).
        synthetic_subjects: labelled subjects of the synthetic data.
        seed: seed of the synthetic data.
        synthetic_kwargs: further arguments of :func:`~scripts.make_synthetic_mnms`.

    Returns:
        the ``MnM2`` or ``OpenDataset`` folder.

    Raises:
        ValueError: when ``dataset_dir`` is neither empty nor one of the two releases.
    """
    found = find_mnms2_root(dataset_dir) or find_mnms_root(dataset_dir)
    if found is not None:
        check_synthetic(Path(dataset_dir), synthetic_settings(synthetic_subjects, seed, **synthetic_kwargs))
        return found
    if not is_empty_or_missing(Path(dataset_dir)):
        raise ValueError(
            f"dataset_dir '{dataset_dir}' is neither empty nor an M&Ms or M&Ms-2 release: no '{MNMS_CSV_NAME}' in it "
            f"or in its 'OpenDataset' folder, and no '{MNMS2_CSV_NAME}' with a 'dataset' folder in it or in its "
            "'MnM2' folder. Point dataset_dir at a release, or at a new or empty folder to generate the synthetic "
            "dataset there."
        )
    release = "M&Ms-2 or M&Ms release"
    real_folder = "the M&Ms-2 'MnM2' folder or the M&Ms 'OpenDataset' folder (or its parent)"
    return generate_mnms(Path(dataset_dir), synthetic_subjects, seed, release, real_folder, **synthetic_kwargs)


def _mnms2_subjects(root: str, group_by: str | Sequence[str], fractions, seed: int, resplit: bool | None):
    names = mnms2_group_names(root, group_by)
    parts = {
        s: load_mnms2_datalist(root, split=s, group_by=group_by, classes=MNMS2_CLASSES)
        for s in ("train", "val", "test")
    }
    parts, resplit = official_or_resplit(parts, names, fractions, seed, resplit, "M&Ms-2")
    return parts, names, resplit


def seg_splits(
    dataset_root: str | os.PathLike,
    group_by: str | Sequence[str] = "vendor",
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    frames: Sequence[str] = ("ed", "es"),
    resplit: bool | None = None,
) -> dict[str, Any]:
    """Train, validation and test frame entries (one per subject and frame) with group names and training counts.

    The split is by subject: both frames of a subject are in the same split. M&Ms: the official splits, or, when the
    training split lacks a group (the real release has no vendor D there), all splits pooled and re-split stratified
    by group (:py:func:`~scripts.mnms_splits`, every pathology kept). M&Ms-2: subjects 1-160 /
    161-200 / 201-360, re-split in the same way when needed.

    Args:
        dataset_root: the ``OpenDataset`` or ``MnM2`` folder (:py:func:`prepare_seg_dataset`).
        group_by: ``"vendor"`` or ``"centre"`` (M&Ms), ``"vendor"``, ``"scanner"`` or ``"field"`` (M&Ms-2).
        seed: seed of a re-split.
        fractions: train / val / test fractions of a re-split.
        frames: the frames of every subject.
        resplit: force (True) or forbid (False) the re-split; None decides as above.

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "group_names": [...], "num_groups": G, "group_counts":
        [frames of each group in train], "resplit": bool, "layout": "mnms" | "mnms2"}``.

    Raises:
        ValueError: a split without subjects, a subject without masks (naming it and its image), an unknown
            ``group_by``.
    """
    root = str(dataset_root)
    if find_mnms2_root(root) is not None:
        parts, names, resplit = _mnms2_subjects(find_mnms2_root(root), group_by, fractions, seed, resplit)
        layout = "mnms2"
    else:
        found = mnms_splits(root, group_by, SEG_PATHOLOGIES, fractions=fractions, seed=seed, resplit=resplit)
        parts = {s: found[s] for s in ("train", "val", "test")}
        names, resplit, layout = found["group_names"], found["resplit"], "mnms"
    out: dict[str, Any] = {}
    for split, subjects in parts.items():
        if not subjects:
            raise ValueError(f"the {split} split of {root} has no subject; the dataset is too small.")
        out[split] = segmentation_frames(subjects, frames=frames, require_masks=True)
    return {
        **out,
        "group_names": list(names),
        "num_groups": len(names),
        "group_counts": group_counts(out["train"], len(names)),
        "resplit": bool(resplit),
        "layout": layout,
    }


def seg_inference_datalist(input_path: str | os.PathLike, frame: int = 0) -> list[dict[str, Any]]:
    """Datalist of short-axis images to segment.

    ``input_path`` may be:

    - an M&Ms release: the ED and ES frames of every subject (``<code>_ed``, ``<code>_es``);
    - an M&Ms-2 release: the ``SA_ED`` and ``SA_ES`` files of every subject;
    - a JSON file with a list of ``{"image": path, "frame": int (optional), "subject": str (optional)}``;
    - a folder of ``*.nii.gz`` / ``*.nii`` files, searched recursively (names ending in ``_gt`` or ``_seg`` are
      masks and skipped): 3-D ``(x, y, z)`` short-axis volumes, or 4-D cines ``(x, y, z, t)`` of which frame
      ``frame`` is segmented.

    Returns:
        entries with ``image``, ``frame_index`` and ``subject`` (the output file's stem).

    Raises:
        FileNotFoundError: when ``input_path`` does not exist or holds no image.
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(
            f"inference input '{path}' does not exist (a folder of NIfTI short-axis images, a JSON datalist or an "
            "M&Ms / M&Ms-2 release is expected)."
        )
    if path.is_dir() and find_mnms2_root(path) is not None:
        subjects = load_mnms2_datalist(find_mnms2_root(path), split="all", classes=MNMS2_CLASSES, on_missing="skip")
        return _frames_to_infer(segmentation_frames(subjects, require_masks=False))
    if path.is_dir() and find_mnms_root(path) is not None:
        subjects = load_mnms_datalist(
            find_mnms_root(path), split="all", include_unlabeled=True, classes=SEG_PATHOLOGIES, on_missing="skip"
        )
        return _frames_to_infer(segmentation_frames(subjects, require_masks=False))
    if path.is_file() and path.suffix == ".json":
        return [
            {
                "image": item["image"],
                "frame_index": int(item.get("frame", frame)),
                "subject": str(item.get("subject", path_stem(Path(item["image"])))),
            }
            for item in load_json_datalist(path)
        ]
    files = sorted(
        f
        for f in glob.glob(str(path / "**" / "*.nii*"), recursive=True)
        if not path_stem(Path(f)).endswith(("_gt", "_seg"))
    )
    if not files:
        raise FileNotFoundError(f"no NIfTI image (*.nii, *.nii.gz) found under '{path}'.")
    return [{"image": f, "frame_index": int(frame), "subject": path_stem(Path(f))} for f in files]


def _frames_to_infer(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"image": e["image"], "frame_index": e["frame_index"], "subject": e["case"]} for e in entries]
