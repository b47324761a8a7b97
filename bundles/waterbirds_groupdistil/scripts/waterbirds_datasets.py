"""Dataset set-up of the Waterbirds bundle: the Waterbirds release, or the embedded synthetic stand-in in its
layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monai_groupdistil.data.waterbirds import WATERBIRDS_GROUP_NAMES, load_waterbirds_datalist

from .datasets import (
    check_synthetic,
    group_counts,
    is_empty_or_missing,
    run_on_rank_zero,
    warn_synthetic,
)
from .synthetic_waterbirds import make_synthetic_waterbirds

__all__ = ["prepare_waterbirds_dataset", "waterbirds_splits"]


def prepare_waterbirds_dataset(
    dataset_dir: str | os.PathLike, synthetic_images: int = 600, seed: int = 0, **synthetic_kwargs: Any
) -> str:
    """Return the Waterbirds folder to train on, generating the synthetic stand-in in an empty ``dataset_dir``.

    A missing or empty ``dataset_dir`` gets the synthetic stand-in
    (:py:func:`scripts.make_synthetic_waterbirds`, ``synthetic_images`` images), with a WARNING naming
    the folder (a misspelled path would otherwise train on synthetic data without notice). In a multi-process run
    only rank 0 generates; the other ranks wait for it.

    Args:
        dataset_dir: the bundle's ``dataset_dir``: the release folder (with ``metadata.csv``), or a missing or empty
            folder.
        synthetic_images: number of images of the synthetic stand-in.
        seed: seed of the synthetic stand-in.
        synthetic_kwargs: further arguments of ``make_synthetic_waterbirds``.

    Returns:
        the folder holding ``metadata.csv``.

    Raises:
        ValueError: when ``dataset_dir`` is neither empty nor a Waterbirds release (no ``metadata.csv``).
    """
    path = Path(dataset_dir)
    settings = {"synthetic_images": synthetic_images, "seed": seed, **synthetic_kwargs}
    if (path / "metadata.csv").is_file():
        check_synthetic(path, settings)
        return str(path)
    if not is_empty_or_missing(path):
        raise ValueError(
            f"dataset_dir '{path}' is neither empty nor a Waterbirds release (no 'metadata.csv' in it). Point "
            "dataset_dir at the release folder (e.g. waterbird_complete95_forest2water2), or at a new or empty "
            "folder to generate the synthetic stand-in there."
        )

    def generate():
        real_folder = "the release folder (e.g. waterbird_complete95_forest2water2, with its metadata.csv)"
        warn_synthetic(path, f"{synthetic_images} synthetic images", "Waterbirds release", real_folder)
        make_synthetic_waterbirds(path, n_images=synthetic_images, seed=seed, **synthetic_kwargs)  # records them

    run_on_rank_zero(generate)
    return str(path)


def waterbirds_splits(dataset_root: str | os.PathLike) -> dict[str, Any]:
    """Train, validation and test datalists of a Waterbirds release with group names and training counts."""
    parts = {s: load_waterbirds_datalist(dataset_root, s) for s in ("train", "val", "test")}
    for name, part in parts.items():
        if not part:
            raise ValueError(f"the {name} split of {dataset_root} is empty.")
    names = list(WATERBIRDS_GROUP_NAMES)
    return {**parts, "group_names": names, "num_groups": 4, "group_counts": group_counts(parts["train"], 4)}
