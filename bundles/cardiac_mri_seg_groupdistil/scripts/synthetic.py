"""Synthetic multi-vendor cardiac cine MRI in the exact layout of the M&Ms open release.

:func:`make_synthetic_mnms` writes, under ``root``, an ``OpenDataset/`` folder laid out like the real
M&Ms release (see :mod:`monai_groupdistil.data.mnms`)::

    OpenDataset/
        211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
        Training/Labeled/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz
        Training/Unlabeled/<code>/<code>_sa.nii.gz
        Validation/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz
        Testing/<code>/<code>_sa.nii.gz, <code>_sa_gt.nii.gz

so that :func:`~monai_groupdistil.data.load_mnms_datalist` reads it exactly as it reads the real data.

Each image is a 4-D short-axis cine stack ``(x, y, z, t)`` stored as float32 (integer-valued, like scanner
output) with the voxel spacing in the NIfTI header (``pixdim`` = in-plane spacing, slice spacing, frame
interval in ms). Each mask is 4-D uint8 with 1 = LV blood pool, 2 = myocardium, 3 = RV, annotated at the
ED and ES frames only (all other frames are 0), as in the real release.

Anatomy
    The left ventricle is a truncated prolate ellipsoid (cavity and epicardium), cut by ``z`` short-axis
    slices from the base (slice 0) towards the apex, with an elliptic in-plane section, a long-axis tilt
    and an in-plane rotation. The right ventricle is a crescent wrapped around the septum, shorter than the
    LV, with a thin free wall. Epicardial fat, the chest wall, body outline and lungs form the background.
    The cycle is a smooth contraction from ED (largest cavity) to ES (smallest) and back; the myocardial
    cross-section area is conserved per slice, so the wall thickens in systole. Subject-to-subject variation:
    body size, heart position, orientation of the LV-RV axis, ellipticity, tilt, slice offset, ED frame and
    the ES phase. Per pathology (ED values, mm; radius ratio ES/ED):

    ======  ===================  ===================  ===========  ==================================
    code    LV cavity radius     wall thickness       ES/ED ratio  notes
    ======  ===================  ===================  ===========  ==================================
    NOR     24 +- 2              8.5 +- 0.8           0.66         healthy
    HCM     20 +- 2              17 +- 2              0.52         asymmetric septal hypertrophy
    DCM     33 +- 3              6 +- 0.7             0.86         dilated, thin, hypokinetic
    HHD     25 +- 2              12.5 +- 1            0.62         concentric, moderate
    ARV     24 +- 2              8 +- 0.8             0.66         dilated, hypokinetic RV
    ======  ===================  ===================  ===========  ==================================

Vendor signatures (:data:`VENDOR_PROFILES`)
    Each vendor has its own intensity scale, tissue contrast (myocardium and background relative to blood),
    noise level (Rician), multiplicative bias-field strength, edge blur, in-plane spacing, matrix size,
    slice count and slice spacing. Vendor D (Canon) is deliberately the hardest: lowest blood-myocardium
    contrast, highest noise, strongest bias field, most blur and the coarsest spacing. The values are
    plausible for bSSFP cine, not measured from the real release.

    ======  ========  ======  =======  =====  =====  =====  ==========  ======  =====  ======
    vendor  name      scale   myo/bl   noise  bias   blur   pixel (mm)  matrix  nz     dz (mm)
    ======  ========  ======  =======  =====  =====  =====  ==========  ======  =====  ======
    A       Siemens   400     0.25     0.02   0.10   0.8    1.35        176x160 9      10
    B       Philips   120     0.30     0.035  0.20   1.0    1.50        160x160 10     9
    C       GE        1500    0.22     0.03   0.25   1.1    1.40        160x176 8      10
    D       Canon     900     0.42     0.07   0.30   1.6    1.70        136x136 7      10
    ======  ========  ======  =======  =====  =====  =====  ==========  ======  =====  ======

Splits, vendors and pathologies
    ``n_subjects`` labelled subjects are split into train / val / test by ``split_fractions``; the vendor
    proportions of each split are given by ``vendor_fractions`` (one mapping for all splits or one per split),
    so a minority vendor (default: vendor D, 5 % of train) can be produced. Pathologies are allocated per
    (split, vendor) cell by ``pathology_fractions``; with ``pathology_vendor_correlation`` = rho a fraction rho
    of every cell in ``correlation_splits`` gets the vendor's ``correlated_pathology`` instead, producing a
    spurious vendor-pathology correlation. All counts are rounded with the largest-remainder method, so the
    output is exact and fully deterministic for a given ``seed`` (files are byte-identical: gzip with mtime 0).

Command line::

    python -m scripts synthetic --root DIR [--n-subjects 60] [--seed 0] \\
        [--vendor-fractions A=0.4,B=0.35,C=0.2,D=0.05] [--test-vendor-fractions A=.25,B=.25,C=.25,D=.25] \\
        [--correlation 0.8] [--n-unlabeled 0] [--n-frames 10] [--matrix-scale 1.0] [--overwrite]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import logging
import math
import multiprocessing
import os
import shutil
import string
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_groupdistil.data.mnms import (
    MNMS_CSV_COLUMNS,
    MNMS_CSV_NAME,
    MNMS_SPLIT_FOLDERS,
    MNMS_VENDOR_CENTRES,
    MNMS_VENDOR_NAMES,
    MNMS_VENDORS,
)

from .datasets import record_synthetic

__all__ = [
    "VendorProfile",
    "VENDOR_PROFILES",
    "PATHOLOGY_PROFILES",
    "DEFAULT_VENDOR_FRACTIONS",
    "DEFAULT_CORRELATED_PATHOLOGY",
    "make_synthetic_mnms",
    "render_subject",
    "main",
]

logger = logging.getLogger("monai_groupdistil.data")

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class VendorProfile:
    """Acquisition signature of one vendor (intensities relative to LV blood = 1).

    Attributes:
        scale: multiplier from relative intensity to stored values.
        myo: myocardium (and RV free wall) intensity.
        tissue: chest wall / soft tissue intensity.
        fat: epicardial fat intensity.
        lung: lung intensity.
        rv_blood: RV blood pool intensity.
        noise: Rician noise standard deviation (relative to blood).
        bias: strength of the smooth multiplicative bias field (log-amplitude).
        blur: edge width of anatomical boundaries in mm (partial volume / resolution).
        pixel: in-plane spacing in mm (x and y).
        matrix: in-plane matrix size (x, y).
        n_slices: number of short-axis slices.
        slice_spacing: distance between slice centres in mm.
    """

    scale: float
    myo: float
    tissue: float
    fat: float
    lung: float
    rv_blood: float
    noise: float
    bias: float
    blur: float
    pixel: float
    matrix: tuple[int, int]
    n_slices: int
    slice_spacing: float


VENDOR_PROFILES: dict[str, VendorProfile] = {
    "A": VendorProfile(400.0, 0.25, 0.38, 0.80, 0.04, 0.95, 0.020, 0.10, 0.8, 1.35, (176, 160), 9, 10.0),
    "B": VendorProfile(120.0, 0.30, 0.45, 0.85, 0.06, 0.92, 0.035, 0.20, 1.0, 1.50, (160, 160), 10, 9.0),
    "C": VendorProfile(1500.0, 0.22, 0.30, 0.70, 0.03, 0.90, 0.030, 0.25, 1.1, 1.40, (160, 176), 8, 10.0),
    "D": VendorProfile(900.0, 0.42, 0.50, 0.75, 0.08, 0.85, 0.070, 0.30, 1.6, 1.70, (136, 136), 7, 10.0),
}
"""Per-vendor acquisition signatures (see the module docstring table)."""

# pathology -> (LV cavity radius mean, sd), (wall mean, sd), (ES/ED radius ratio mean, sd), septal asymmetry,
#              (LV length mean, sd), RV size factor, RV ES/ED ratio
PATHOLOGY_PROFILES: dict[str, dict[str, object]] = {
    "NOR": {"radius": (24.0, 2.0), "wall": (8.5, 0.8), "ratio": (0.66, 0.04), "asym": 0.05, "length": (80.0, 5.0),
            "rv": 1.0, "rv_ratio": 0.70},
    "HCM": {"radius": (20.0, 2.0), "wall": (17.0, 2.0), "ratio": (0.52, 0.05), "asym": 0.30, "length": (78.0, 5.0),
            "rv": 0.95, "rv_ratio": 0.68},
    "DCM": {"radius": (33.0, 3.0), "wall": (6.0, 0.7), "ratio": (0.86, 0.04), "asym": 0.0, "length": (95.0, 6.0),
            "rv": 1.05, "rv_ratio": 0.80},
    "HHD": {"radius": (25.0, 2.0), "wall": (12.5, 1.0), "ratio": (0.62, 0.04), "asym": 0.05, "length": (82.0, 5.0),
            "rv": 1.0, "rv_ratio": 0.70},
    "ARV": {"radius": (24.0, 2.0), "wall": (8.0, 0.8), "ratio": (0.66, 0.04), "asym": 0.05, "length": (80.0, 5.0),
            "rv": 1.45, "rv_ratio": 0.88},
}  # fmt: skip
"""Anatomy per pathology (mm, ED): LV cavity radius, wall thickness, ES/ED cavity radius ratio, septal
asymmetry of the wall, LV length, RV size factor and RV ES/ED ratio."""

DEFAULT_VENDOR_FRACTIONS: dict[str, dict[str, float]] = {
    "train": {"A": 0.40, "B": 0.35, "C": 0.20, "D": 0.05},
    "val": {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25},
    "test": {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25},
}
"""Default vendor proportions per split: vendor D is a 5 % minority in training, all balanced at test time."""

DEFAULT_PATHOLOGY_FRACTIONS: dict[str, float] = {"NOR": 1 / 3, "HCM": 1 / 3, "DCM": 1 / 3}

DEFAULT_CORRELATED_PATHOLOGY: dict[str, str] = {"A": "NOR", "B": "HCM", "C": "DCM", "D": "NOR"}
"""Pathology each vendor is over-represented with when ``pathology_vendor_correlation > 0``."""

_SPLIT_DIRS = {
    "train": MNMS_SPLIT_FOLDERS["train"],
    "val": MNMS_SPLIT_FOLDERS["val"],
    "test": MNMS_SPLIT_FOLDERS["test"],
}
_RR_MS = 900.0  # cardiac cycle length used for the frame interval in the header


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``total`` proportional to ``weights`` (largest remainder, ties by order)."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return [0] * len(w)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def _check_fractions(name: str, fractions: Mapping[str, float], allowed: Sequence[str]) -> dict[str, float]:
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(f"{name} must be a non-empty mapping, got {fractions!r}.")
    out = {}
    for key, value in fractions.items():
        if key not in allowed:
            raise ValueError(f"{name}: unknown key {key!r}, expected one of {tuple(allowed)}.")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}[{key!r}] must be a finite non-negative number, got {value}.")
        out[key] = value
    if sum(out.values()) <= 0:
        raise ValueError(f"{name} must have a positive sum, got {fractions!r}.")
    return out


def _resolve_vendor_fractions(vendor_fractions) -> dict[str, dict[str, float]]:
    if vendor_fractions is None:
        return {s: dict(v) for s, v in DEFAULT_VENDOR_FRACTIONS.items()}
    if not isinstance(vendor_fractions, Mapping) or not vendor_fractions:
        raise ValueError(f"vendor_fractions must be a mapping, got {vendor_fractions!r}.")
    keys = set(vendor_fractions)
    if keys <= set(SPLITS):  # one mapping per split; missing splits keep the default
        out = {s: dict(v) for s, v in DEFAULT_VENDOR_FRACTIONS.items()}
        for split, fr in vendor_fractions.items():
            out[split] = _check_fractions(f"vendor_fractions[{split!r}]", fr, MNMS_VENDORS)
        return out
    if keys & set(SPLITS):
        raise ValueError(
            f"vendor_fractions mixes split keys {SPLITS} and vendor keys {MNMS_VENDORS}: {vendor_fractions!r}."
        )
    fr = _check_fractions("vendor_fractions", vendor_fractions, MNMS_VENDORS)
    return {s: dict(fr) for s in SPLITS}


def _cycle(n_frames: int, ed: int, es: int) -> np.ndarray:
    """Contraction state per frame: 0 at ED, 1 at ES, smooth (cosine) systole and diastole."""
    phase = ((np.arange(n_frames) - ed) % n_frames) / n_frames
    phi_es = ((es - ed) % n_frames) / n_frames
    c = np.where(
        phase <= phi_es,
        0.5 * (1 - np.cos(np.pi * phase / phi_es)),
        0.5 * (1 + np.cos(np.pi * (phase - phi_es) / (1 - phi_es))),
    )
    return c.astype(np.float32)


def _edge(d: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance ``d`` (mm, positive inside): a linear ramp over +-``width``.

    Works in place on ``d`` (which must be a float32 temporary) to keep the rendering fast.
    """
    d *= np.float32(0.5 / width)
    d += np.float32(0.5)
    return np.clip(d, 0.0, 1.0, out=d)


def _blend(roi: np.ndarray, level: float, weight: np.ndarray) -> None:
    """``roi += (level - roi) * weight`` in place (``weight`` is overwritten)."""
    tmp = np.subtract(np.float32(level), roi, dtype=np.float32)
    tmp *= weight
    roi += tmp


def _sample_subject(rng: np.random.Generator, pathology: str, vendor: str, n_frames: int) -> dict:
    """Draw the anatomy and acquisition parameters of one subject."""
    p = PATHOLOGY_PROFILES[pathology]
    size = float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15))
    radius = float(np.clip(rng.normal(*p["radius"]), 0.6 * p["radius"][0], 1.4 * p["radius"][0])) * size
    wall = float(np.clip(rng.normal(*p["wall"]), 0.6 * p["wall"][0], 1.4 * p["wall"][0])) * size
    ed = int(rng.choice([0, 0, 0, 1, n_frames - 1]))
    es = int((ed + round(n_frames * rng.uniform(0.33, 0.42))) % n_frames)
    return {
        "pathology": pathology,
        "vendor": vendor,
        "radius": radius,
        "wall": wall,
        "ratio": float(np.clip(rng.normal(*p["ratio"]), 0.35, 0.97)),
        "asym": float(p["asym"]) * float(rng.uniform(0.7, 1.3)),
        "length": float(rng.normal(*p["length"])) * size,
        "rv": float(p["rv"]) * float(rng.uniform(0.9, 1.1)),
        "rv_ratio": float(p["rv_ratio"]),
        "ecc": float(rng.uniform(0.88, 1.0)),
        "centre": rng.normal(0.0, 8.0, size=2).astype(np.float32),
        "angle": float(rng.normal(np.pi, 0.35)),  # direction of the RV from the LV centre
        "tilt": rng.normal(0.0, 0.08, size=2).astype(np.float32),
        "z0": float(rng.uniform(-4.0, 6.0)),
        "body": (float(rng.normal(160.0, 10.0)) * size, float(rng.normal(115.0, 8.0)) * size),
        "body_offset": rng.normal((-20.0, 15.0), 5.0).astype(np.float32),
        "gain": float(rng.uniform(0.85, 1.15)),
        "bias_coef": rng.normal(0.0, 1.0, size=6).astype(np.float32),
        "texture": rng.uniform(0.0, 2 * np.pi, size=4).astype(np.float32),
        "ed": ed,
        "es": es,
        "n_frames": n_frames,
        "age": int(rng.integers(18, 85)),
        "sex": str(rng.choice(["M", "F"])),
        "height": float(np.round(rng.normal(170.0, 9.0), 1)),
        "weight": float(np.round(rng.normal(78.0, 12.0), 1)),
        "has_hw": bool(rng.random() < 0.5),
    }


def render_subject(params: Mapping, profile: VendorProfile, matrix_scale: float = 1.0, labels: bool = True):
    """Render one subject's 4-D cine image and mask.

    Args:
        params: subject parameters as drawn by the generator (anatomy, ED/ES, frame count, ...).
        profile: the vendor's acquisition signature.
        matrix_scale: scales the in-plane matrix at constant spacing (a smaller field of view), for tests.
        labels: also build the mask.

    Returns:
        ``(image, mask, spacing)``: float32 ``(x, y, z, t)`` integer-valued intensities, uint8 mask of the same
        shape with labels at the ED and ES frames only (None when ``labels`` is False), and the voxel spacing
        ``(dx, dy, dz)`` in mm.
    """
    f32 = np.float32
    nx, ny = (max(32, int(round(m * matrix_scale))) for m in profile.matrix)
    nz, nt, px, dz = profile.n_slices, int(params["n_frames"]), profile.pixel, profile.slice_spacing
    e = profile.blur
    x = ((np.arange(nx, dtype=f32) - f32((nx - 1) / 2)) * f32(px))[:, None]
    y = ((np.arange(ny, dtype=f32) - f32((ny - 1) / 2)) * f32(px))[None, :]

    # static background (x, y): body with textured tissue, two lungs, air outside
    bx, by = x - params["body_offset"][0], y - params["body_offset"][1]
    body_a, body_b = params["body"]
    ph = params["texture"]
    texture = 1.0 + 0.06 * np.sin(x / 23.0 + ph[0]) * np.cos(y / 31.0 + ph[1]) + 0.04 * np.sin((x + y) / 13.0 + ph[2])
    body = _edge(((1.0 - np.sqrt((bx / body_a) ** 2 + (by / body_b) ** 2)) * body_b).astype(f32), 3.0)
    bg = (profile.tissue * texture * body).astype(f32)
    for side in (-1.0, 1.0):
        lx, ly = bx - side * 0.5 * body_a, by + 10.0
        _blend(bg, profile.lung, _edge(((1.0 - np.sqrt((lx / 45.0) ** 2 + (ly / 62.0) ** 2)) * 45.0).astype(f32), 2.0))
    image = np.empty((nx, ny, nz, nt), dtype=f32)
    image[...] = bg[:, :, None, None]

    # heart region of interest (LV, RV, fat, tilt), computed on (xr, yr, z, t)
    cx, cy = (float(c) for c in params["centre"])
    radius, wall, length, rv = params["radius"], params["wall"], params["length"], params["rv"]
    zpos = params["z0"] + np.arange(nz, dtype=f32) * f32(dz)
    zc = np.maximum(zpos, 0.0)[None, None, :, None]  # slices above the base look like the base
    rv_a, rv_b, d_rv = 0.75 * (radius + wall) * rv, 1.35 * (radius + wall) * rv, 0.95 * (radius + wall)
    reach = max(d_rv + rv_a, rv_b, (radius + wall) * (1.0 + params["asym"])) + 3.0 + 2.0 * e + 4.0
    shift = float(np.abs(params["tilt"]).max() * zc.max())
    ix = np.nonzero(np.abs(x[:, 0] - cx) < reach + shift)[0]
    iy = np.nonzero(np.abs(y[0, :] - cy) < reach + shift)[0]
    sx, sy = slice(int(ix[0]), int(ix[-1]) + 1), slice(int(iy[0]), int(iy[-1]) + 1)
    xr = x[sx][:, :, None, None] - f32(cx) - f32(params["tilt"][0]) * zc
    yr = y[:, sy][:, :, None, None] - f32(cy) - f32(params["tilt"][1]) * zc
    ca, sa = f32(math.cos(params["angle"])), f32(math.sin(params["angle"]))
    u, v = xr * ca + yr * sa, yr * ca - xr * sa  # u points towards the RV; (xr, yr, z, 1)
    r = np.sqrt(u**2 + (v / f32(params["ecc"])) ** 2)
    r_endo_ed = f32(radius) * np.sqrt(np.clip(1.0 - (zc / f32(length)) ** 2, 0.0, None))
    wall_psi = f32(wall) * (1.0 + f32(params["asym"]) * u / np.maximum(r, f32(1e-3)))
    r_epi_ed = (f32(radius) + wall_psi) * np.sqrt(np.clip(1.0 - (zc / f32(length + wall)) ** 2, 0.0, None))
    myo_area = np.maximum(r_epi_ed**2 - r_endo_ed**2, 0.0)  # conserved over the cycle
    c = _cycle(nt, params["ed"], params["es"])[None, None, None, :]
    r_endo = r_endo_ed * (1.0 - f32(1.0 - params["ratio"]) * c)  # (1, 1, z, t)
    r_epi = np.sqrt(r_endo**2 + myo_area)  # (xr, yr, z, t)
    rho_rv = np.sqrt(((u - f32(d_rv)) / f32(rv_a)) ** 2 + (v / f32(rv_b)) ** 2)
    s_rv = np.sqrt(np.clip(1.0 - (zc / f32(0.85 * length)) ** 2, 0.0, None)) * (1.0 - f32(1.0 - params["rv_ratio"]) * c)
    rv_edge = (s_rv - rho_rv) * f32(rv_a)  # ~signed distance (mm) to the RV endocardium, positive inside
    roi = np.ascontiguousarray(image[sx, sy])
    m_epi = _edge(r_epi - r, e)
    _blend(roi, profile.fat, _edge(r_epi + f32(2.0) - r, e))
    _blend(roi, profile.myo, _edge(rv_edge + f32(3.0), e))
    m_rv = _edge(rv_edge.copy(), e)
    m_rv *= 1.0 - m_epi
    _blend(roi, profile.rv_blood, m_rv)
    _blend(roi, profile.myo, m_epi.copy())
    _blend(roi, 1.0, _edge(r_endo - r, e))
    image[sx, sy] = roi

    # bias field, Rician noise, vendor scale
    xn, yn = x / f32(nx * px / 2), y / f32(ny * px / 2)
    zn = (np.arange(nz, dtype=f32) / f32(max(nz - 1, 1)) - f32(0.5))[None, None, :]
    k = params["bias_coef"]
    poly = k[0] * xn + k[1] * yn + k[2] * xn * yn + 0.5 * k[3] * xn**2 + 0.5 * k[4] * yn**2
    poly = poly[..., None] + 0.5 * k[5] * zn
    image *= np.exp(f32(profile.bias) * poly).astype(f32)[..., None]
    noise_rng = np.random.default_rng(params["noise_seed"])
    sigma = f32(profile.noise)
    # Rician magnitude |s + n1 + i n2|: n2 is n1 read at a far (odd, pseudo-random) offset of the flat array, so each
    # voxel gets two distinct standard normal draws at half the cost of drawing both
    noise = noise_rng.standard_normal(image.size, dtype=f32)
    noise *= sigma
    image += noise.reshape(image.shape)
    image *= image
    noise = np.roll(noise, image.size // 2 + int(noise_rng.integers(1, 1000)) * 2 + 1)
    noise *= noise
    image += noise.reshape(image.shape)
    np.sqrt(image, out=image)
    image *= f32(profile.scale * params["gain"])
    np.rint(image, out=image)

    mask = None
    if labels:
        mask = np.zeros(image.shape, dtype=np.uint8)
        for t in sorted({params["ed"], params["es"]}):
            lab = np.zeros(r.shape[:3], dtype=np.uint8)
            rr, re, rp = r[..., 0], r_endo[..., t], r_epi[..., t]
            lab[(rv_edge[..., t] > 0) & (rr >= rp)] = 3
            lab[rr < rp] = 2
            lab[rr < re] = 1
            mask[sx, sy, :, t] = lab
    return image, mask, (px, px, dz)


def _nifti_bytes(array: np.ndarray, spacing: Sequence[float], n_frames: int) -> bytes:
    """Gzip-compressed NIfTI-1 bytes with the spacing in the affine and pixdim (deterministic: mtime 0)."""
    nx, ny, nz = array.shape[:3]
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-(nx - 1) / 2 * spacing[0], -(ny - 1) / 2 * spacing[1], 0.0]
    img = nib.Nifti1Image(array, affine)
    img.header.set_zooms((*(float(s) for s in spacing), _RR_MS / n_frames))
    img.header.set_xyzt_units("mm", "msec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_subject(task: tuple) -> tuple[str, float]:
    folder, code, params, matrix_scale, labelled = task
    t0 = time.perf_counter()
    image, mask, spacing = render_subject(params, VENDOR_PROFILES[params["vendor"]], matrix_scale, labels=labelled)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{code}_sa.nii.gz"), "wb") as f:
        f.write(_nifti_bytes(image, spacing, params["n_frames"]))
    if mask is not None:
        with open(os.path.join(folder, f"{code}_sa_gt.nii.gz"), "wb") as f:
            f.write(_nifti_bytes(mask, spacing, params["n_frames"]))
    return code, time.perf_counter() - t0


def _make_codes(rng: np.random.Generator, n: int) -> list[str]:
    """Unique 6-character codes in the style of the real release (letter, digit, letter, digit, ...)."""
    letters, digits = np.array(list(string.ascii_uppercase)), np.array(list(string.digits))
    codes: list[str] = []
    seen: set[str] = set()
    while len(codes) < n:
        code = "".join(str(rng.choice(letters)) if i % 2 == 0 else str(rng.choice(digits)) for i in range(6))
        if code not in seen:
            seen.add(code)
            codes.append(code)
    return codes


def make_synthetic_mnms(
    root: str | os.PathLike,
    n_subjects: int = 60,
    seed: int = 0,
    vendor_fractions: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None = None,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    pathology_fractions: Mapping[str, float] | None = None,
    pathology_vendor_correlation: float = 0.0,
    correlated_pathology: Mapping[str, str] | None = None,
    correlation_splits: Sequence[str] = ("train",),
    n_unlabeled: int = 0,
    n_frames: int = 10,
    matrix_scale: float = 1.0,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> str:
    """Write a synthetic multi-vendor M&Ms-like dataset and return the path of its ``OpenDataset`` folder.

    Args:
        root: folder under which ``OpenDataset/`` is written (created if needed).
        n_subjects: number of labelled subjects over train, val and test.
        seed: random seed; the output (file contents included) is identical for the same arguments.
        vendor_fractions: vendor proportions, either one mapping ``{"A": .4, ...}`` used for every split or
            ``{"train": {...}, "val": {...}, "test": {...}}`` (a missing split keeps its default). Values are
            normalised. Default :data:`DEFAULT_VENDOR_FRACTIONS` (vendor D 5 % of train, balanced val/test).
        split_fractions: fractions of ``n_subjects`` in train (``Training/Labeled``), val (``Validation``) and
            test (``Testing``).
        pathology_fractions: pathology proportions, keys from :data:`PATHOLOGY_PROFILES`
            (default NOR, HCM, DCM equally).
        pathology_vendor_correlation: fraction in [0, 1] of every (split, vendor) cell of
            ``correlation_splits`` that gets the vendor's ``correlated_pathology`` (a spurious correlation).
        correlated_pathology: vendor -> pathology used by the correlation (default
            :data:`DEFAULT_CORRELATED_PATHOLOGY`).
        correlation_splits: splits in which the correlation is applied.
        n_unlabeled: extra training subjects written to ``Training/Unlabeled`` (image only): vendor C as in the
            real release, or the training vendor proportions when vendor C has no share of the training split.
        n_frames: frames per cine (the real data have 20-30; fewer keep the files small).
        matrix_scale: scales each vendor's matrix at constant spacing (smaller field of view), e.g. 0.5 in tests.
        overwrite: remove an existing ``OpenDataset`` first; otherwise an existing one is an error.
        num_workers: worker processes for rendering and writing; 0 works in this process; None (default) uses
            up to 4 processes (forked where the platform allows) when there are more than 8 subjects. The output
            does not depend on it.

    Returns:
        the path of the written ``OpenDataset`` folder.

    Raises:
        FileExistsError: ``root/OpenDataset`` exists and ``overwrite`` is False.
        ValueError: an invalid argument (the message names it).

    Example::

        from monai_groupdistil.data import load_mnms_datalist
        from scripts import make_synthetic_mnms  # from a cardiac bundle folder

        path = make_synthetic_mnms("/tmp/mnms", n_subjects=60, pathology_vendor_correlation=0.8)
        train = load_mnms_datalist(path, split="train")
    """
    if int(n_subjects) != n_subjects or n_subjects < 1:
        raise ValueError(f"n_subjects must be a positive integer, got {n_subjects!r}.")
    if int(n_unlabeled) != n_unlabeled or n_unlabeled < 0:
        raise ValueError(f"n_unlabeled must be a non-negative integer, got {n_unlabeled!r}.")
    if int(n_frames) != n_frames or n_frames < 4:
        raise ValueError(f"n_frames must be an integer >= 4, got {n_frames!r}.")
    if not 0.2 <= float(matrix_scale) <= 2.0:
        raise ValueError(f"matrix_scale must be in [0.2, 2], got {matrix_scale!r}.")
    if not 0.0 <= float(pathology_vendor_correlation) <= 1.0:
        raise ValueError(f"pathology_vendor_correlation must be in [0, 1], got {pathology_vendor_correlation!r}.")
    split_fractions = [float(f) for f in split_fractions]
    if len(split_fractions) != 3 or min(split_fractions) < 0 or sum(split_fractions) <= 0:
        raise ValueError(
            f"split_fractions must be three non-negative numbers (train, val, test), got {split_fractions}."
        )
    for s in correlation_splits:
        if s not in SPLITS:
            raise ValueError(f"correlation_splits: unknown split {s!r}, expected one of {SPLITS}.")
    vfr = _resolve_vendor_fractions(vendor_fractions)
    pfr = _check_fractions(
        "pathology_fractions",
        DEFAULT_PATHOLOGY_FRACTIONS if pathology_fractions is None else pathology_fractions,
        tuple(PATHOLOGY_PROFILES),
    )
    corr = dict(DEFAULT_CORRELATED_PATHOLOGY if correlated_pathology is None else correlated_pathology)
    for vendor, path in corr.items():
        if vendor not in MNMS_VENDORS or path not in PATHOLOGY_PROFILES:
            raise ValueError(
                f"correlated_pathology: {vendor!r} -> {path!r} must map a vendor in {MNMS_VENDORS} to a pathology "
                f"in {tuple(PATHOLOGY_PROFILES)}."
            )

    out = os.path.join(os.fspath(root), "OpenDataset")
    if os.path.exists(out):
        if not overwrite:
            raise FileExistsError(
                f"{out} already exists; pass overwrite=True (--overwrite on the command line) to replace it."
            )
        shutil.rmtree(out)
    t_start = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 20200101]))

    # allocate (split, vendor, pathology) exactly, then shuffle within each split
    rows: list[dict] = []
    split_counts = _largest_remainder(int(n_subjects), split_fractions)
    for split, n_split in zip(SPLITS, split_counts):
        vendors = [v for v in MNMS_VENDORS if v in vfr[split]]
        for vendor, n_cell in zip(vendors, _largest_remainder(n_split, [vfr[split][v] for v in vendors])):
            n_corr = 0
            if split in correlation_splits and vendor in corr:
                n_corr = int(round(float(pathology_vendor_correlation) * n_cell))
            paths = [corr.get(vendor, "NOR")] * n_corr
            names = list(pfr)
            for name, k in zip(names, _largest_remainder(n_cell - n_corr, [pfr[p] for p in names])):
                paths += [name] * k
            for p in paths:
                rows.append({"split": split, "vendor": vendor, "pathology": p, "labelled": True})
    if n_unlabeled:
        unl_fr = {"C": 1.0} if vfr["train"].get("C", 0.0) > 0 else vfr["train"]
        vendors = [v for v in MNMS_VENDORS if unl_fr.get(v, 0) > 0]
        names = list(pfr)
        for vendor, n_cell in zip(vendors, _largest_remainder(int(n_unlabeled), [unl_fr[v] for v in vendors])):
            for name, k in zip(names, _largest_remainder(n_cell, [pfr[p] for p in names])):
                rows += [{"split": "unlabeled", "vendor": vendor, "pathology": name, "labelled": False}] * k
    order = rng.permutation(len(rows))
    rows = [dict(rows[i]) for i in order]
    codes = _make_codes(rng, len(rows))

    tasks = []
    for i, (row, code) in enumerate(zip(rows, codes)):
        srng = np.random.default_rng(np.random.SeedSequence([int(seed), 1, i]))
        params = _sample_subject(srng, row["pathology"], row["vendor"], int(n_frames))
        params["noise_seed"] = [int(seed), 2, i]
        centres = MNMS_VENDOR_CENTRES[row["vendor"]]
        row.update(
            code=code,
            params=params,
            centre=int(centres[0] if len(centres) == 1 else srng.choice(centres, p=[0.6, 0.4])),
        )
        folder_rel = MNMS_SPLIT_FOLDERS[row["split"]]
        tasks.append(
            (os.path.join(out, *folder_rel.split("/"), code), code, params, float(matrix_scale), row["labelled"])
        )

    for rel in MNMS_SPLIT_FOLDERS.values():
        os.makedirs(os.path.join(out, *rel.split("/")), exist_ok=True)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if len(tasks) > 8 else 0
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0 or None, got {num_workers!r}.")
    if num_workers > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=int(num_workers), mp_context=ctx) as ex:
            list(ex.map(_write_subject, tasks, chunksize=2))
    else:
        for task in tasks:
            _write_subject(task)

    # metadata CSV, written like the real one: unnamed index column, empty Height/Weight cells where unknown
    with open(os.path.join(out, MNMS_CSV_NAME), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MNMS_CSV_COLUMNS)
        for idx, row in enumerate(sorted(rows, key=lambda r: r["code"])):
            p = row["params"]
            writer.writerow([
                idx, row["code"], MNMS_VENDOR_NAMES[row["vendor"]], row["vendor"], row["centre"], p["ed"], p["es"],
                p["age"], row["pathology"], p["sex"],
                p["height"] if p["has_hw"] else "", p["weight"] if p["has_hw"] else "",
            ])  # fmt: skip
    logger.info(
        "wrote %d synthetic M&Ms subjects (%s) to %s in %.1f s",
        len(rows),
        ", ".join(f"{s}: {sum(r['split'] == s for r in rows)}" for s in (*SPLITS, "unlabeled")),
        out,
        time.perf_counter() - t_start,
    )
    # every setting that shapes the data, the count and seed under the bundles' names, so that a bundle run asking
    # for others says so (check_synthetic)
    settings = {
        "synthetic_subjects": n_subjects,
        "seed": seed,
        "vendor_fractions": vendor_fractions,
        "split_fractions": split_fractions,
        "pathology_fractions": pathology_fractions,
        "pathology_vendor_correlation": pathology_vendor_correlation,
        "correlated_pathology": correlated_pathology,
        "correlation_splits": correlation_splits,
        "n_unlabeled": n_unlabeled,
        "n_frames": n_frames,
        "matrix_scale": matrix_scale,
    }
    record_synthetic(Path(root), settings)
    return out


def _parse_pairs(text: str) -> list[tuple[str, str, str]]:
    """``(key, value, item)`` for every ``KEY=VALUE`` item of a comma-separated list (``key`` stripped)."""
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE pairs separated by commas, got {text!r}")
        pairs.append((key.strip(), value, item))
    return pairs


def _parse_fractions(text: str) -> dict[str, float]:
    out = {}
    for key, value, item in _parse_pairs(text):
        try:
            out[key] = float(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a number in {item!r}") from e
    return out


def _parse_mapping(text: str) -> dict[str, str]:
    return {key: value.strip() for key, value, _ in _parse_pairs(text)}


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point: ``python -m scripts synthetic --root DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts synthetic",
        description="Write a synthetic multi-vendor cardiac cine dataset in the M&Ms OpenDataset layout. The bundles' "
        "default data: --n-subjects 160 (classification) or 80 (segmentation) with the other defaults (the bundle's "
        "synthetic_subjects; train.json generates it by itself).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--root", required=True, default=argparse.SUPPRESS, help="folder under which OpenDataset/ is written"
    )
    parser.add_argument("--n-subjects", type=int, default=60, help="labelled subjects (train+val+test)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--vendor-fractions", type=_parse_fractions, help="e.g. A=0.4,B=0.35,C=0.2,D=0.05 (all splits; scaled to sum 1)"
    )
    for split in SPLITS:
        parser.add_argument(f"--{split}-vendor-fractions", type=_parse_fractions, help=f"vendor fractions of {split}")
    parser.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=(0.6, 0.2, 0.2),
        metavar=("TRAIN", "VAL", "TEST"),
        help="split sizes",
    )
    parser.add_argument("--pathology-fractions", type=_parse_fractions, help="e.g. NOR=1,HCM=1,DCM=1")
    parser.add_argument("--correlation", type=float, default=0.0, help="pathology-vendor correlation in [0, 1]")
    parser.add_argument("--correlated-pathology", type=_parse_mapping, help="e.g. A=NOR,B=HCM,C=DCM,D=NOR")
    parser.add_argument("--correlation-splits", nargs="+", default=["train"], choices=SPLITS, help="splits with it")
    parser.add_argument("--n-unlabeled", type=int, default=0, help="unlabelled training subjects")
    parser.add_argument("--n-frames", type=int, default=10, help="cine frames per study")
    parser.add_argument("--matrix-scale", type=float, default=1.0, help="factor on the matrix size")
    parser.add_argument("--num-workers", type=int, default=None, help="processes; None: up to 4")
    parser.add_argument("--overwrite", action="store_true", help="replace an OpenDataset in --root")
    args = parser.parse_args(argv)
    vendor_fractions: dict | None = None
    per_split = {s: getattr(args, f"{s}_vendor_fractions") for s in SPLITS}
    if args.vendor_fractions is not None:
        vendor_fractions = {s: per_split[s] or args.vendor_fractions for s in SPLITS}
    elif any(per_split.values()):
        vendor_fractions = {s: v for s, v in per_split.items() if v}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_synthetic_mnms(
        args.root,
        n_subjects=args.n_subjects,
        seed=args.seed,
        vendor_fractions=vendor_fractions,
        split_fractions=args.split_fractions,
        pathology_fractions=args.pathology_fractions,
        pathology_vendor_correlation=args.correlation,
        correlated_pathology=args.correlated_pathology,
        correlation_splits=args.correlation_splits,
        n_unlabeled=args.n_unlabeled,
        n_frames=args.n_frames,
        matrix_scale=args.matrix_scale,
        overwrite=args.overwrite,
        num_workers=args.num_workers,
    )
    print(out)
    return out
