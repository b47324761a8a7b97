"""Waterbirds (Sagawa et al., 2020): the standard datalist reader.

The release (folder such as ``waterbird_complete95_forest2water2/``) holds ``metadata.csv`` with the columns
``img_id, img_filename, y, split, place, place_filename`` and the images at ``<root>/<img_filename>``
(``NNN.Species/Species_Name_XXXX_YYYY.jpg``). ``y`` is 0 for a landbird and 1 for a waterbird, ``place`` 0 for a
land and 1 for a water background, ``split`` 0 train, 1 val, 2 test. The groups are ``g = 2 * y + place``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

__all__ = [
    "WATERBIRDS_COLUMNS",
    "WATERBIRDS_GROUP_NAMES",
    "WATERBIRDS_SPLITS",
    "load_waterbirds_datalist",
]

logger = logging.getLogger("monai_groupdistil.data")

WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_GROUP_NAMES = ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")


def load_waterbirds_datalist(
    root: str | os.PathLike, split: str = "train", check_files: bool = True, skip_missing: bool = False
) -> list[dict]:
    """Read the Waterbirds ``metadata.csv`` into a MONAI datalist.

    Args:
        root: the dataset folder holding ``metadata.csv`` and the image folders.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        check_files: check that every listed image exists.
        skip_missing: with ``check_files``, leave out (and log the number of) listed images that do not exist,
            instead of raising.

    Returns:
        one dict per image: ``image`` (path), ``label`` (``y``), ``place``, ``group`` (``2 * y + place``),
        ``group_name`` (``"landbird/land"``, ...), ``img_id``, ``split`` (name).

    Raises:
        FileNotFoundError: when ``metadata.csv`` is missing, or a listed image is (unless ``skip_missing``).
        ValueError: for an unknown ``split``, a CSV lacking a required column, or a row whose ``y``, ``place`` or
            ``split`` is not one of the documented values (the row and column are named).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> from monai_groupdistil.data import load_waterbirds_datalist
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "metadata.csv").write_text(
        ...     "img_id,img_filename,y,split,place,place_filename\\n"
        ...     "1,001.Bird/a.jpg,1,0,0,/b/bamboo_forest/a.jpg\\n"
        ... )
        >>> item = load_waterbirds_datalist(root, "train", check_files=False)[0]
        >>> item["group"], item["group_name"], item["label"]
        (2, 'waterbird/land', 1)
    """
    if split != "all" and split not in WATERBIRDS_SPLITS:
        raise ValueError(f"split must be one of {sorted(WATERBIRDS_SPLITS)} or 'all', got {split!r}.")
    root = Path(root)
    csv_path = root / "metadata.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"Waterbirds metadata not found: {csv_path} (expected columns {WATERBIRDS_COLUMNS}).")
    split_names = {v: k for k, v in WATERBIRDS_SPLITS.items()}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("img_id", "img_filename", "y", "split", "place") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {missing}; found {reader.fieldnames}.")
        rows = list(reader)
    datalist, absent = [], []
    for line, row in enumerate(rows, start=2):
        values = {}
        for column, allowed in (("y", (0, 1)), ("place", (0, 1)), ("split", (0, 1, 2))):
            try:
                number = float(row[column])
            except (TypeError, ValueError):
                number = math.nan
            values[column] = int(number) if number.is_integer() else None  # 1.9, inf and NaN are refused
            if values[column] not in allowed:
                raise ValueError(
                    f"{csv_path}, line {line}: column {column!r} must be one of {allowed}, got {row[column]!r}."
                )
        if split != "all" and values["split"] != WATERBIRDS_SPLITS[split]:
            continue
        image = root / row["img_filename"]
        if check_files and not image.is_file():
            absent.append(str(image))
            continue
        group = 2 * values["y"] + values["place"]
        datalist.append(
            {
                "image": str(image),
                "label": values["y"],
                "place": values["place"],
                "group": group,
                "group_name": WATERBIRDS_GROUP_NAMES[group],
                "img_id": row["img_id"],
                "split": split_names[values["split"]],
            }
        )
    if absent:
        if not skip_missing:
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {csv_path} do not exist, e.g. {absent[0]}; "
                "pass skip_missing=True to leave them out."
            )
        logger.warning("Waterbirds: %d listed image(s) are missing and were left out, e.g. %s", len(absent), absent[0])
    return datalist
