"""Datalists for the M&Ms (2020) and M&Ms-2 cardiac MRI releases, with vendor / centre / scanner groups.

M&Ms open release (folder ``OpenDataset/``)::

    211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
    Training/Labeled/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz
    Training/Unlabeled/<code>/<code>_sa.nii.gz
    Validation/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz
    Testing/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz

The CSV has an unnamed index column followed by ``External code, VendorName, Vendor, Centre, ED, ES, Age,
Pathology, Sex, Height, Weight`` (Height/Weight may be empty) and lists every subject of every split; the
``Pathology`` column is filled for all of them, including the unlabelled ones, so every subject can be used for
classification. The split of a subject is the folder it is found in. Images are 4-D ``(x, y, z, t)`` short-axis
cines; masks are 4-D, annotated at the 0-based ``ED`` and ``ES`` frames only (1 LV, 2 MYO, 3 RV).
Vendors: A Siemens (centre 1), B Philips (centres 2, 3), C GE (centre 4), D Canon (centre 5).

M&Ms-2 (folder ``MnM2/``)::

    dataset_information.csv          columns SUBJECT_CODE, DISEASE, VENDOR, SCANNER, FIELD
    dataset/NNN/NNN_{SA,LA}_{ED,ES}.nii.gz, NNN_{SA,LA}_{ED,ES}_gt.nii.gz, NNN_{SA,LA}_CINE.nii.gz

with subjects 001-160 train, 161-200 validation, 201-360 test.

Group indices are stable: they depend only on ``group_by`` and ``classes`` (M&Ms: vendors in the fixed order
A, B, C, D and centres 1-5) or on the whole M&Ms-2 CSV (sorted values), never on the split, so a vendor absent
from one split keeps its index. Loaders only read; nothing is written into the dataset folder.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import nibabel as nib

__all__ = [
    "MNMS_CSV_NAME",
    "MNMS_CSV_COLUMNS",
    "MNMS_REQUIRED_COLUMNS",
    "MNMS_VENDORS",
    "MNMS_VENDOR_NAMES",
    "MNMS_VENDOR_CENTRES",
    "MNMS_CENTRES",
    "MNMS_SPLIT_FOLDERS",
    "MNMS_CLASSES",
    "MNMS_GROUP_KEYS",
    "MNMS2_CSV_NAME",
    "MNMS2_CSV_COLUMNS",
    "MNMS2_SPLIT_RANGES",
    "MNMS2_CLASSES",
    "MNMS2_GROUP_KEYS",
    "mnms_group_names",
    "mnms2_group_names",
    "load_mnms_datalist",
    "load_mnms2_datalist",
]

logger = logging.getLogger("monai_groupdistil.data")

MNMS_CSV_NAME = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
"""File name of the metadata CSV in the M&Ms open release."""
MNMS_CSV_COLUMNS = ("", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex",
                    "Height", "Weight")  # fmt: skip
"""Header of the M&Ms CSV: an unnamed index column, then the named columns."""
MNMS_REQUIRED_COLUMNS = ("External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Pathology")
"""Columns the loader needs; Age, Sex, Height and Weight are read when present."""
MNMS_VENDORS = ("A", "B", "C", "D")
"""Vendor codes in their fixed group order."""
MNMS_VENDOR_NAMES = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
MNMS_VENDOR_CENTRES = {"A": (1,), "B": (2, 3), "C": (4,), "D": (5,)}
MNMS_CENTRES = (1, 2, 3, 4, 5)
MNMS_SPLIT_FOLDERS = {
    "train": "Training/Labeled",
    "unlabeled": "Training/Unlabeled",
    "val": "Validation",
    "test": "Testing",
}
"""Split name -> folder (relative to ``OpenDataset``)."""
MNMS_CLASSES = ("NOR", "HCM", "DCM")
"""Default classes: healthy, hypertrophic and dilated cardiomyopathy."""
MNMS_GROUP_KEYS = ("vendor", "centre", "label")
"""Keys accepted in ``group_by`` for M&Ms (``center``, ``pathology`` are aliases)."""

MNMS2_CSV_NAME = "dataset_information.csv"
MNMS2_CSV_COLUMNS = ("SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD")
MNMS2_SPLIT_RANGES = {"train": (1, 160), "val": (161, 200), "test": (201, 360)}
"""Split name -> inclusive range of subject numbers."""
MNMS2_CLASSES = ("NOR", "LV", "HCM", "ARR", "FALL", "CIA", "TRI", "DRV")
"""Default M&Ms-2 disease codes (as listed by the challenge; *unconfirmed* against the CSV here: subjects with
another code are left out and counted in the log)."""
MNMS2_GROUP_KEYS = ("vendor", "scanner", "field", "label")

_ALIASES = {"center": "centre", "pathology": "label", "disease": "label", "class": "label"}
_SPLITS = ("train", "val", "test", "all")
_ON_MISSING = ("error", "skip")


# ---------------------------------------------------------------------------------------------- helpers
def _normalise_group_by(group_by: str | Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    keys = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    if not keys:
        raise ValueError(f"group_by must name at least one key of {tuple(allowed)}, got {group_by!r}.")
    out = []
    for key in keys:
        if not isinstance(key, str):
            raise ValueError(f"group_by keys must be strings, got {key!r} in {group_by!r}.")
        k = _ALIASES.get(key.strip().lower(), key.strip().lower())
        if k not in allowed:
            raise ValueError(f"unknown group_by key {key!r}, expected one of {tuple(allowed)} or a tuple of them.")
        if k in out:
            raise ValueError(f"group_by key {key!r} is repeated in {group_by!r}.")
        out.append(k)
    return tuple(out)


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str):
        classes = (classes,)
    classes = tuple(str(c) for c in classes)
    if not classes:
        raise ValueError("classes must contain at least one pathology code.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes contains duplicates: {classes}.")
    return classes


class _Groups:
    """The groups of ``keys`` (one key, or several for cross groups) over ``levels`` (key -> its ordered values).

    Group ``i`` is the ``i``-th combination of the keys' values, the first key varying slowest, so the index
    depends only on the levels (never on which subjects a split holds).
    """

    def __init__(self, keys: Sequence[str], levels: dict[str, Sequence[str]]) -> None:
        self.keys = tuple(keys)
        self.levels = [tuple(str(v) for v in levels[k]) for k in self.keys]
        names = [""]
        for lvl in self.levels:
            names = [f"{a}/{b}" if a else b for a in names for b in lvl]
        self.names = names

    def of(self, values: dict[str, str]) -> dict[str, Any]:
        """``group`` (index) and ``group_name`` of an entry whose value of every key is ``values[key]``."""
        index = 0
        for key, lvl in zip(self.keys, self.levels):
            index = index * len(lvl) + lvl.index(values[key])
        return {"group": index, "group_name": self.names[index]}


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}, expected one of {_SPLITS}.")
    return split


def _check_on_missing(on_missing: str) -> str:
    if on_missing not in _ON_MISSING:
        raise ValueError(f"on_missing must be one of {_ON_MISSING}, got {on_missing!r}.")
    return on_missing


def _read_csv(path: str, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a CSV as ``(line number, {column: stripped value})``, checking the required columns."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metadata CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"metadata CSV {path} is not UTF-8 text: undecodable byte {err.object[err.start : err.start + 1]!r} at "
            f"offset {err.start} ({err.reason}); save it as UTF-8 (the encoding of the release CSVs)."
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ValueError(f"metadata CSV is empty: {path}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"metadata CSV {path} lacks required column(s) {missing}; its header is {header}.")
    rows = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise ValueError(f"{path}, line {reader.line_num}: {len(row)} cells for {len(header)} columns.")
        row = row + [""] * (len(header) - len(row))
        rows.append((reader.line_num, {h: cell.strip() for h, cell in zip(header, row)}))
    return header, rows


def _to_int(value: str, column: str, line: int, path: str, optional: bool = False) -> int | None:
    if value == "" and optional:
        return None
    try:
        f = float(value)
        if not f.is_integer():
            raise ValueError
        return int(f)
    except ValueError:
        raise ValueError(f"{path}, line {line}: column {column!r} must be an integer, got {value!r}.") from None


def _to_float(value: str, column: str, line: int, path: str) -> float:
    if value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{path}, line {line}: column {column!r} must be a number, got {value!r}.") from None


def _nifti_shape(path: str) -> tuple[int, ...]:
    """Shape from the NIfTI header only; errors name the file."""
    try:
        return tuple(int(s) for s in nib.load(path).shape)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as err:
        raise RuntimeError(f"cannot read NIfTI file {path}: {type(err).__name__}: {err}") from err


def _resolve_root(root: str | os.PathLike, folder: str, csv_name: str, layout_dir: str, explicit_csv) -> str:
    """The dataset folder: ``root`` or ``root/<folder>``, whichever holds the CSV (or, with an explicit CSV path,
    the ``layout_dir`` sub-folder)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root not found: {root}")
    candidates = (root, os.path.join(root, folder))
    marker = csv_name if explicit_csv is None else layout_dir
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, marker)):
            return candidate
    if explicit_csv is not None:
        return root
    raise FileNotFoundError(
        f"no {folder} dataset at {root}: expected {os.path.join(candidates[0], csv_name)} or "
        f"{os.path.join(candidates[1], csv_name)}."
    )


def _handle_missing(missing: list[str], on_missing: str, what: str, skipped_what: str | None = None) -> None:
    """Raise (``on_missing="error"``) or log (``"skip"``) the subjects in ``missing``, described by ``what``."""
    if not missing:
        return
    if on_missing == "error":
        shown = "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} {what}: {shown} (pass on_missing='skip' to leave them out).")
    logger.warning("skipped %d %s: %s", len(missing), skipped_what or what, "; ".join(missing))


def _log_left_out(counter: Counter, what: str, classes: Sequence[str]) -> None:
    if counter:
        logger.info(
            "left out %d %s subject(s) whose pathology is not in classes %s: %s",
            sum(counter.values()),
            what,
            tuple(classes),
            dict(sorted(counter.items())),
        )


# ---------------------------------------------------------------------------------------------- M&Ms
def _datalist(
    entries: list[dict[str, Any]], names: list[str], dataset: str, split: str, return_group_names: bool
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[str]]:
    """Log the number of subjects per group and return the datalist (with the group names when asked)."""
    per_group = dict(sorted(Counter(e["group_name"] for e in entries).items()))
    logger.info("%s %s: %d subject(s), per group %s", dataset, split, len(entries), per_group)
    return (entries, names) if return_group_names else entries


def _mnms_levels(classes: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {"vendor": MNMS_VENDORS, "centre": tuple(str(c) for c in MNMS_CENTRES), "label": tuple(classes)}


def mnms_group_names(group_by: str | Sequence[str] = "vendor", classes: Sequence[str] = MNMS_CLASSES) -> list[str]:
    """Ordered group names of an M&Ms datalist: ``names[entry["group"]] == entry["group_name"]``.

    Args:
        group_by: ``"vendor"`` (A, B, C, D), ``"centre"`` (1-5), ``"label"`` (the classes) or a tuple of them
            for cross groups, e.g. ``("vendor", "label")`` -> ``["A/NOR", "A/HCM", ..., "D/DCM"]``; index
            ``vendor_index * len(classes) + label``.
        classes: pathology codes (only used when ``"label"`` is in ``group_by``).

    Returns:
        the list of group names; its length is the number of groups.

    Raises:
        ValueError: unknown ``group_by`` key or empty / duplicated ``classes``.

    Example::

        >>> mnms_group_names("vendor")
        ['A', 'B', 'C', 'D']
        >>> mnms_group_names(("vendor", "label"), classes=("NOR", "HCM"))[:3]
        ['A/NOR', 'A/HCM', 'B/NOR']
    """
    keys = _normalise_group_by(group_by, MNMS_GROUP_KEYS)
    return _Groups(keys, _mnms_levels(_check_classes(classes))).names


def load_mnms_datalist(
    root: str | os.PathLike,
    split: str = "train",
    group_by: str | Sequence[str] = "vendor",
    classes: Sequence[str] = MNMS_CLASSES,
    include_unlabeled: bool = False,
    on_missing: str = "error",
    check_frames: bool = True,
    csv_path: str | os.PathLike | None = None,
    return_group_names: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[str]]:
    """Datalist of the M&Ms release (real or synthetic), one dict per subject, with group ids.

    Args:
        root: the ``OpenDataset`` folder or the folder containing it.
        split: ``"train"`` (``Training/Labeled``), ``"val"`` (``Validation``), ``"test"`` (``Testing``) or
            ``"all"`` (every split folder).
        group_by: ``"vendor"``, ``"centre"``, ``"label"`` or a tuple for cross groups; see :func:`mnms_group_names`.
        classes: pathology codes to keep; ``label`` is the index in ``classes``. Subjects with another pathology
            are left out and their number (per pathology) is logged.
        include_unlabeled: also return ``Training/Unlabeled`` subjects (with ``seg`` None) for ``"train"`` and
            ``"all"``; their pathology comes from the CSV like every other subject's.
        on_missing: ``"error"`` (default) raises when a CSV subject has no folder or no ``<code>_sa.nii.gz``
            on disk, or a subject folder is not in the CSV; ``"skip"`` leaves them out and logs how many.
        check_frames: read each image's NIfTI header (cheap: no voxel data) to check it is 4-D, that ED/ES are
            valid frame indices and that the mask has the image's shape.
        csv_path: the metadata CSV, default ``<OpenDataset>/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv``.
        return_group_names: also return the ordered group names.

    Returns:
        the datalist (sorted by split folder, then subject code), and the group names when
        ``return_group_names``. Each entry has: ``image`` (path of the 4-D cine), ``seg`` (path of the 4-D
        mask or None), ``label`` (int), ``group`` (int), ``group_name`` (e.g. ``"A"``, ``"A/HCM"``),
        ``pathology``, ``vendor`` (``"A"``...), ``vendor_name``, ``centre`` (int), ``subject`` (external code),
        ``ed``, ``es`` (0-based frame indices), ``split`` (``"train"``, ``"unlabeled"``, ``"val"``, ``"test"``),
        ``age`` (int, or NaN when empty), ``sex`` (str, may be empty), ``height``, ``weight`` (float, NaN when
        empty).

    Raises:
        FileNotFoundError: missing root, CSV, or (``on_missing="error"``) subject image; the path is named.
        ValueError: unknown ``split``/``group_by``/``on_missing``, a CSV that is not UTF-8 text (the file is
            named), a missing CSV column, a bad cell (the column and line are named), an unknown vendor or centre,
            duplicate codes, ED/ES outside the image frames.
        RuntimeError: an unreadable NIfTI header (with ``check_frames``); the file is named.

    Example::

        train, names = load_mnms_datalist("/data/OpenDataset", split="train", return_group_names=True)
        # names == ["A", "B", "C", "D"]; real M&Ms training has no vendor D: re-split with split_by_group
    """
    split = _check_split(split)
    on_missing = _check_on_missing(on_missing)
    classes = _check_classes(classes)
    keys = _normalise_group_by(group_by, MNMS_GROUP_KEYS)
    groups = _Groups(keys, _mnms_levels(classes))
    base = _resolve_root(root, "OpenDataset", MNMS_CSV_NAME, "Training", csv_path)
    csv_file = os.path.join(base, MNMS_CSV_NAME) if csv_path is None else os.fspath(csv_path)
    _, rows = _read_csv(csv_file, MNMS_REQUIRED_COLUMNS)

    # locate every subject folder on disk
    found: dict[str, tuple[str, str]] = {}
    for split_name, rel in MNMS_SPLIT_FOLDERS.items():
        folder = os.path.join(base, *rel.split("/"))
        if not os.path.isdir(folder):
            continue
        for code in sorted(os.listdir(folder)):
            path = os.path.join(folder, code)
            if code.startswith(".") or not os.path.isdir(path):
                continue
            if code in found:
                raise ValueError(f"subject {code!r} has two folders: {found[code][1]} and {path}.")
            found[code] = (split_name, path)

    wanted = {"train": ["train"], "val": ["val"], "test": ["test"], "all": ["train", "val", "test"]}[split]
    if include_unlabeled and split in ("train", "all"):
        wanted.insert(1, "unlabeled")
    for s in wanted:
        folder = os.path.join(base, *MNMS_SPLIT_FOLDERS[s].split("/"))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"split folder for {s!r} not found: {folder}")

    entries: list[dict[str, Any]] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    left_out: Counter = Counter()
    unlabeled_out = 0
    for line, row in rows:
        code = row["External code"]
        if not code:
            raise ValueError(f"{csv_file}, line {line}: empty 'External code'.")
        if code in seen:
            raise ValueError(f"{csv_file}: subject {code!r} is listed twice (lines {seen[code]} and {line}).")
        seen[code] = line
        vendor = row["Vendor"]
        if vendor not in MNMS_VENDORS:
            raise ValueError(f"{csv_file}, line {line}: column 'Vendor' must be one of {MNMS_VENDORS}, got {vendor!r}.")
        centre = _to_int(row["Centre"], "Centre", line, csv_file)
        if centre not in MNMS_CENTRES:
            raise ValueError(f"{csv_file}, line {line}: column 'Centre' must be one of {MNMS_CENTRES}, got {centre}.")
        ed = _to_int(row["ED"], "ED", line, csv_file)
        es = _to_int(row["ES"], "ES", line, csv_file)
        for col, val in (("ED", ed), ("ES", es)):
            if val < 0:
                raise ValueError(f"{csv_file}, line {line}: column {col!r} must be a 0-based frame index, got {val}.")

        if code not in found:
            missing.append(f"{code}: no folder {code}/ under any of {sorted(MNMS_SPLIT_FOLDERS.values())} in {base}")
            continue
        subject_split, folder = found[code]
        image = os.path.join(folder, f"{code}_sa.nii.gz")
        if not os.path.isfile(image):
            missing.append(f"{code}: image not found: {image}")
            continue
        if subject_split not in wanted:
            unlabeled_out += subject_split == "unlabeled" and split in ("train", "all")
            continue
        pathology = row["Pathology"]
        if pathology not in classes:
            left_out[pathology or "<empty>"] += 1
            continue
        seg = os.path.join(folder, f"{code}_sa_gt.nii.gz")
        seg = seg if os.path.isfile(seg) else None
        if check_frames:
            shape = _nifti_shape(image)
            if len(shape) != 4:
                raise ValueError(f"{image}: expected a 4-D (x, y, z, t) cine, got shape {shape}.")
            for col, val in (("ED", ed), ("ES", es)):
                if val >= shape[3]:
                    raise ValueError(
                        f"{code}: {col}={val} (from {csv_file}, line {line}) is outside the {shape[3]} frames of "
                        f"{image}."
                    )
            if seg is not None and _nifti_shape(seg) != shape:
                raise ValueError(f"mask {seg} has shape {_nifti_shape(seg)}, its image {image} has {shape}.")
        age = _to_int(row.get("Age", ""), "Age", line, csv_file, optional=True)
        entries.append({
            "image": image,
            "seg": seg,
            "label": classes.index(pathology),
            **groups.of({"vendor": vendor, "centre": str(centre), "label": pathology}),
            "pathology": pathology,
            "vendor": vendor,
            "vendor_name": row["VendorName"],
            "centre": int(centre),
            "subject": code,
            "ed": int(ed),
            "es": int(es),
            "split": subject_split,
            "age": math.nan if age is None else age,
            "sex": row.get("Sex", ""),
            "height": _to_float(row.get("Height", ""), "Height", line, csv_file),
            "weight": _to_float(row.get("Weight", ""), "Weight", line, csv_file),
        })  # fmt: skip

    extra = sorted(code for code in found if code not in seen)
    missing += [f"{code}: folder {found[code][1]} is not listed in {csv_file}" for code in extra]
    _handle_missing(missing, on_missing, "M&Ms subject(s) without image or metadata")
    _log_left_out(left_out, "M&Ms", classes)
    if unlabeled_out:
        logger.info("%d Training/Unlabeled subject(s) not included (include_unlabeled=False)", unlabeled_out)
    order = {s: i for i, s in enumerate(MNMS_SPLIT_FOLDERS)}
    entries.sort(key=lambda e: (order[e["split"]], e["subject"]))
    return _datalist(entries, groups.names, "M&Ms", split, return_group_names)


# ---------------------------------------------------------------------------------------------- M&Ms-2
def _mnms2_rows(base: str, csv_path: str | os.PathLike | None):
    csv_file = os.path.join(base, MNMS2_CSV_NAME) if csv_path is None else os.fspath(csv_path)
    _, rows = _read_csv(csv_file, MNMS2_CSV_COLUMNS)
    return csv_file, rows


def _mnms2_levels(rows, classes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {
        "vendor": tuple(sorted({r["VENDOR"] for _, r in rows})),
        "scanner": tuple(sorted({r["SCANNER"] for _, r in rows})),
        "field": tuple(sorted({r["FIELD"] for _, r in rows})),
        "label": classes,
    }


def mnms2_group_names(
    root: str | os.PathLike,
    group_by: str | Sequence[str] = "vendor",
    classes: Sequence[str] = MNMS2_CLASSES,
    csv_path: str | os.PathLike | None = None,
) -> list[str]:
    """Ordered group names of an M&Ms-2 datalist (from the sorted values of the whole CSV).

    Args:
        root: the ``MnM2`` folder or the folder containing it.
        group_by: ``"vendor"`` (``VENDOR``), ``"scanner"`` (``SCANNER``), ``"field"`` (``FIELD``), ``"label"``
            or a tuple for cross groups (names joined by ``/``).
        classes: disease codes (only used when ``"label"`` is in ``group_by``).
        csv_path: the CSV, default ``<MnM2>/dataset_information.csv``.

    Returns:
        the list of group names.

    Raises:
        FileNotFoundError: missing root or CSV, naming the path.
        ValueError: unknown ``group_by`` key, empty / duplicated ``classes``, a CSV that is not UTF-8 text or lacks
            a column.

    Example::

        names = mnms2_group_names("/data/MnM2", group_by="scanner")  # the sorted SCANNER values of the CSV
    """
    classes = _check_classes(classes)
    keys = _normalise_group_by(group_by, MNMS2_GROUP_KEYS)
    base = _resolve_root(root, "MnM2", MNMS2_CSV_NAME, "dataset", csv_path)
    _, rows = _mnms2_rows(base, csv_path)
    return _Groups(keys, _mnms2_levels(rows, classes)).names


def load_mnms2_datalist(
    root: str | os.PathLike,
    split: str = "train",
    group_by: str | Sequence[str] = "vendor",
    classes: Sequence[str] = MNMS2_CLASSES,
    frame: str = "ed",
    view: str = "SA",
    on_missing: str = "error",
    check_frames: bool = True,
    csv_path: str | os.PathLike | None = None,
    return_group_names: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[str]]:
    """Datalist of the M&Ms-2 release, one dict per subject, with vendor / scanner groups.

    M&Ms-2 stores the ED and ES frames as separate 3-D files, so the frame is chosen here: ``image``/``seg``
    are ``NNN_{view}_{frame}.nii.gz`` / ``..._gt.nii.gz``, and ``ed`` = ``es`` = 0 (the only frame of that file),
    which the cardiac transforms accept.

    Args:
        root: the ``MnM2`` folder or the folder containing it.
        split: ``"train"`` (001-160), ``"val"`` (161-200), ``"test"`` (201-360) or ``"all"``.
        group_by: ``"vendor"``, ``"scanner"``, ``"field"``, ``"label"`` or a tuple for cross groups; see
            :func:`mnms2_group_names` (indices come from the whole CSV, so they are the same in every split).
        classes: disease codes to keep (default :data:`MNMS2_CLASSES`); others are left out and counted in the log.
        frame: ``"ed"`` or ``"es"``.
        view: ``"SA"`` (short axis) or ``"LA"`` (long axis).
        on_missing: ``"error"`` or ``"skip"`` (log and leave out) for a subject without its image on disk.
        check_frames: read the NIfTI headers (no voxel data) to check the image is one 3-D frame and the mask
            has its shape.
        csv_path: the CSV, default ``<MnM2>/dataset_information.csv``.
        return_group_names: also return the ordered group names.

    Returns:
        the datalist sorted by subject number (and the group names). Each entry has ``image``, ``seg`` (None
        when absent), ``ed_image``, ``es_image``, ``ed_seg``, ``es_seg``, ``cine`` (paths of both frames and of
        the cine, None when absent), ``label``, ``group``, ``group_name``, ``pathology`` (the DISEASE code),
        ``vendor``, ``scanner``, ``field``, ``centre`` (always None: the M&Ms-2 CSV has no centre column; the key
        is there so that code written for M&Ms entries works unchanged), ``subject`` (``"001"``...), ``frame``,
        ``ed``, ``es`` and ``split``. The extra path keys are named ``<frame>_image``/``<frame>_seg`` rather than
        ``image_<frame>``: MONAI dictionary transforms such as ``Spacingd`` treat every key starting with
        ``image_`` or ``seg_`` as a metadata dict of ``image``/``seg``, so the entries go through
        the bundles' ``cardiac_preprocessing`` as they are.

    Raises:
        FileNotFoundError: missing root, CSV or (``on_missing="error"``) image, naming the path.
        ValueError: unknown ``split``/``group_by``/``frame``/``view``/``on_missing``, a CSV that is not UTF-8
            text (naming the file), a missing column or bad cell (naming column and line), a subject number outside
            1-360, a mask that does not match its image.
        RuntimeError: an unreadable NIfTI header; the file is named.

    Example::

        train, names = load_mnms2_datalist("/data/MnM2", split="train", frame="es", return_group_names=True)
        train[0]["image"]  # /data/MnM2/dataset/001/001_SA_ES.nii.gz
    """
    split = _check_split(split)
    on_missing = _check_on_missing(on_missing)
    classes = _check_classes(classes)
    keys = _normalise_group_by(group_by, MNMS2_GROUP_KEYS)
    frame_l = str(frame).lower()
    if frame_l not in ("ed", "es"):
        raise ValueError(f"frame must be 'ed' or 'es', got {frame!r}.")
    view_u = str(view).upper()
    if view_u not in ("SA", "LA"):
        raise ValueError(f"view must be 'SA' or 'LA', got {view!r}.")
    base = _resolve_root(root, "MnM2", MNMS2_CSV_NAME, "dataset", csv_path)
    csv_file, rows = _mnms2_rows(base, csv_path)
    groups = _Groups(keys, _mnms2_levels(rows, classes))
    wanted = ("train", "val", "test") if split == "all" else (split,)

    entries: list[dict[str, Any]] = []
    missing: list[str] = []
    left_out: Counter = Counter()
    seen: dict[int, int] = {}
    for line, row in rows:
        number = _to_int(row["SUBJECT_CODE"], "SUBJECT_CODE", line, csv_file)
        if number in seen:
            raise ValueError(f"{csv_file}: subject {number} is listed twice (lines {seen[number]} and {line}).")
        seen[number] = line
        subject_split = next((s for s, (lo, hi) in MNMS2_SPLIT_RANGES.items() if lo <= number <= hi), None)
        if subject_split is None:
            raise ValueError(f"{csv_file}, line {line}: column 'SUBJECT_CODE' must be in 1-360, got {number}.")
        if subject_split not in wanted:
            continue
        disease = row["DISEASE"]
        if disease not in classes:
            left_out[disease or "<empty>"] += 1
            continue
        code = f"{number:03d}"
        folder = os.path.join(base, "dataset", code)

        def _path(suffix: str, folder=folder, code=code) -> str | None:
            p = os.path.join(folder, f"{code}_{suffix}.nii.gz")
            return p if os.path.isfile(p) else None

        # not image_ed/seg_ed: MONAI (e.g. Spacingd) treats keys starting with "image_"/"seg_" as metadata dicts
        paths = {
            "ed_image": _path(f"{view_u}_ED"),
            "es_image": _path(f"{view_u}_ES"),
            "ed_seg": _path(f"{view_u}_ED_gt"),
            "es_seg": _path(f"{view_u}_ES_gt"),
            "cine": _path(f"{view_u}_CINE"),
        }
        image, seg = paths[f"{frame_l}_image"], paths[f"{frame_l}_seg"]
        if image is None:
            missing.append(os.path.join(folder, f"{code}_{view_u}_{frame_l.upper()}.nii.gz"))
            continue
        if check_frames:
            shape = _nifti_shape(image)
            if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
                raise ValueError(f"{image}: expected one 3-D frame, got shape {shape}.")
            if seg is not None and _nifti_shape(seg)[:3] != shape[:3]:
                raise ValueError(f"mask {seg} has shape {_nifti_shape(seg)}, its image {image} has {shape}.")
        values = {"vendor": row["VENDOR"], "scanner": row["SCANNER"], "field": row["FIELD"], "label": disease}
        entries.append({
            "image": image,
            "seg": seg,
            **paths,
            "label": classes.index(disease),
            **groups.of(values),
            "pathology": disease,
            "vendor": row["VENDOR"],
            "scanner": row["SCANNER"],
            "field": row["FIELD"],
            "centre": None,
            "subject": code,
            "frame": frame_l,
            "ed": 0,
            "es": 0,
            "split": subject_split,
        })  # fmt: skip
    _handle_missing(
        missing,
        on_missing,
        f"M&Ms-2 subject(s) listed in {csv_file} have no image on disk",
        "M&Ms-2 subject(s) with no image on disk",
    )
    _log_left_out(left_out, "M&Ms-2", classes)
    entries.sort(key=lambda e: e["subject"])
    return _datalist(entries, groups.names, "M&Ms-2", split, return_group_names)
