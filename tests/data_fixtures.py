"""Shared helpers of the data tests: a tiny synthetic M&Ms dataset (built once per session) and small hand-built
folders in the real M&Ms and M&Ms-2 layouts.

Plain functions rather than fixtures, so test modules wrap them in their own fixtures without a conftest.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

TINY_KWARGS = {
    "n_subjects": 24,
    "seed": 3,
    "split_fractions": (0.5, 0.25, 0.25),
    # vendor D absent from training, as in the real release
    "vendor_fractions": {
        "train": {"A": 1.0, "B": 1.0, "C": 1.0, "D": 0.0},
        "val": {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0},
        "test": {"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0},
    },
    "pathology_fractions": {"NOR": 1.0, "HCM": 1.0, "DCM": 1.0, "HHD": 1.0},
    "n_unlabeled": 2,
    "n_frames": 6,
    "matrix_scale": 0.5,
    "num_workers": 0,
}

_CACHE: dict[str, str] = {}


def tiny_mnms(tmp_path_factory) -> str:
    """``OpenDataset`` path of the tiny synthetic dataset (``TINY_KWARGS``), generated once per session."""
    if "tiny" not in _CACHE:
        from scripts import make_synthetic_mnms

        _CACHE["tiny"] = make_synthetic_mnms(tmp_path_factory.mktemp("tiny_mnms"), **TINY_KWARGS)
    return _CACHE["tiny"]


# --------------------------------------------------------------------------------------- real M&Ms layout
REAL_HEADER = ",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"
# written exactly like the release: unnamed index column, empty Height/Weight cells
REAL_ROWS = [
    "0,A0S9V9,Siemens,A,1,0,5,67,HCM,M,,",
    "1,A1D0Q7,Philips,B,2,0,4,53,DCM,M,175.0,88.0",
    "2,A1D9Z7,Philips,B,3,7,3,24,NOR,F,,",
    "3,A2C0I1,Siemens,A,1,1,5,71,HHD,F,162.0,",
    "4,C0S7W0,GE,C,4,0,4,45,NOR,M,,",
    "5,D1H6M2,GE,C,4,0,3,38,HCM,F,,",
    "6,E4W8Z6,Canon,D,5,0,4,60,DCM,M,180.0,95.0",
]
REAL_FOLDERS = {
    "A0S9V9": ("Training/Labeled", True),
    "A1D0Q7": ("Training/Labeled", True),
    "A1D9Z7": ("Training/Labeled", True),
    "A2C0I1": ("Training/Labeled", True),
    "C0S7W0": ("Training/Unlabeled", False),
    "D1H6M2": ("Validation", True),
    "E4W8Z6": ("Testing", True),
}
REAL_SHAPE = (24, 20, 5, 8)  # x, y, z, t
REAL_SPACING = (1.25, 1.25, 10.0)
CSV_NAME = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"


def heart_phantom(shape=REAL_SHAPE, ed: int = 0, es: int = 4, centre=(12, 9), lv_slices=(1, 2, 3)):
    """A small 4-D cine (float32) and mask: LV disc (bright) in a MYO ring (dark) on ``lv_slices``, smaller at ES,
    an RV blob beside it; the mask is labelled at ED and ES only. Returns ``(image, mask)``."""
    nx, ny, nz, nt = shape
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    image = np.full(shape, 20.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    for t in range(nt):
        scale = 0.7 if t == es else 1.0
        r = np.hypot(xx - centre[0], yy - centre[1])
        rv = np.hypot(xx - centre[0] + 7, yy - centre[1]) < 2.5
        for z in lv_slices:
            lv, myo = r < 3.0 * scale, (r >= 3.0 * scale) & (r < 5.0)
            image[..., z, t][myo] = 60.0
            image[..., z, t][lv] = 200.0
            image[..., z, t][rv & ~myo & ~lv] = 180.0
            if t in (ed, es):
                mask[..., z, t][rv & ~myo & ~lv] = 3
                mask[..., z, t][myo] = 2
                mask[..., z, t][lv] = 1
    return image, mask


def save_nifti(array: np.ndarray, path: str | os.PathLike, spacing=REAL_SPACING) -> str:
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms((*spacing, 40.0)[: array.ndim])
    nib.save(img, os.fspath(path))
    return os.fspath(path)


def build_real_layout(root: str | os.PathLike) -> Path:
    """A small folder in the real M&Ms layout (CSV written byte-for-byte like the release). Returns ``OpenDataset``."""
    base = Path(root) / "OpenDataset"
    for rel in ("Training/Labeled", "Training/Unlabeled", "Validation", "Testing"):
        (base / rel).mkdir(parents=True, exist_ok=True)
    (base / CSV_NAME).write_text("\n".join([REAL_HEADER, *REAL_ROWS]) + "\n", encoding="utf-8")
    for row in REAL_ROWS:
        cells = row.split(",")
        code, ed, es = cells[1], int(cells[5]), int(cells[6])
        rel, labelled = REAL_FOLDERS[code]
        folder = base / rel / code
        folder.mkdir()
        image, mask = heart_phantom(ed=ed, es=es)
        save_nifti(image, folder / f"{code}_sa.nii.gz")
        if labelled:
            save_nifti(mask, folder / f"{code}_sa_gt.nii.gz")
    return base


# --------------------------------------------------------------------------------------- M&Ms-2 layout
MNMS2_ROWS = [
    ("1", "NOR", "SIEMENS", "Avanto", "1.5"),
    ("2", "LV", "Philips Medical Systems", "Achieva", "3.0"),
    ("3", "HCM", "GE MEDICAL SYSTEMS", "Signa Explorer", "1.5"),
    ("4", "XYZ", "SIEMENS", "Skyra", "3.0"),
    ("161", "ARR", "Philips Medical Systems", "Achieva", "3.0"),
    ("201", "DRV", "SIEMENS", "Avanto", "1.5"),
]


def build_mnms2_layout(root: str | os.PathLike) -> Path:
    """A small folder in the M&Ms-2 layout (3-D ED/ES files with masks, a 4-D cine). Returns ``MnM2``."""
    base = Path(root) / "MnM2"
    (base / "dataset").mkdir(parents=True)
    lines = ["SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD"] + [",".join(r) for r in MNMS2_ROWS]
    (base / "dataset_information.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    image4, mask4 = heart_phantom(shape=(24, 20, 5, 8), ed=0, es=4)
    for number, *_ in MNMS2_ROWS:
        code = f"{int(number):03d}"
        folder = base / "dataset" / code
        folder.mkdir()
        for view in ("SA", "LA"):
            for frame, t in (("ED", 0), ("ES", 4)):
                save_nifti(image4[..., t], folder / f"{code}_{view}_{frame}.nii.gz")
                save_nifti(mask4[..., t], folder / f"{code}_{view}_{frame}_gt.nii.gz")
        save_nifti(image4, folder / f"{code}_SA_CINE.nii.gz")
    return base


def snapshot(folder: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder`` (to prove nothing was written)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns)
    return out
