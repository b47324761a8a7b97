"""The synthetic multi-vendor M&Ms generator: layout, CSV, NIfTI headers, labels, vendor and pathology signatures."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts import make_synthetic_mnms
from scripts.synthetic import PATHOLOGY_PROFILES, VENDOR_PROFILES
from tests.data_fixtures import CSV_NAME, REAL_HEADER, TINY_KWARGS, tiny_mnms

SPLIT_DIRS = {"train": "Training/Labeled", "val": "Validation", "test": "Testing", "unlabeled": "Training/Unlabeled"}
VENDOR_NAMES = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
VENDOR_CENTRES = {"A": {1}, "B": {2, 3}, "C": {4}, "D": {5}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_mnms(tmp_path_factory)


def _read_subjects(root):
    """CSV rows with the split folder, image and mask arrays of every subject (read independently of the loader)."""
    with open(os.path.join(root, CSV_NAME), newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        code = row["External code"]
        split = next(s for s, rel in SPLIT_DIRS.items() if os.path.isdir(os.path.join(root, rel, code)))
        folder = os.path.join(root, SPLIT_DIRS[split], code)
        img = nib.load(os.path.join(folder, f"{code}_sa.nii.gz"))
        gt_path = os.path.join(folder, f"{code}_sa_gt.nii.gz")
        gt = nib.load(gt_path) if os.path.exists(gt_path) else None
        out.append({
            **row, "split": split, "img": img, "image": img.get_fdata(dtype=np.float32),
            "gt": None if gt is None else np.asarray(gt.dataobj), "ed": int(row["ED"]), "es": int(row["ES"]),
        })  # fmt: skip
    return out


@pytest.fixture(scope="module")
def subjects(root):
    return _read_subjects(root)


@pytest.fixture(scope="module")
def vendor_subjects(tmp_path_factory):
    """Three healthy subjects per vendor at the full field of view (static tissue far from the heart)."""
    root = make_synthetic_mnms(
        tmp_path_factory.mktemp("vendors"), n_subjects=12, seed=11, split_fractions=(1, 0, 0),
        vendor_fractions={v: 1.0 for v in "ABCD"}, pathology_fractions={"NOR": 1.0}, n_frames=4,
    )  # fmt: skip
    return _read_subjects(root)


def test_layout_and_csv(root, subjects):
    assert os.path.basename(root) == "OpenDataset"
    for rel in SPLIT_DIRS.values():
        assert os.path.isdir(os.path.join(root, rel))
    with open(os.path.join(root, CSV_NAME), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == REAL_HEADER  # unnamed index column first, then exactly the real columns
    assert [line.split(",")[0] for line in lines[1:]] == [str(i) for i in range(len(lines) - 1)]
    n_unlabeled = TINY_KWARGS["n_unlabeled"]
    assert len(subjects) == TINY_KWARGS["n_subjects"] + n_unlabeled
    counts = Counter(s["split"] for s in subjects)
    assert counts == {"train": 12, "val": 6, "test": 6, "unlabeled": n_unlabeled}
    codes = [s["External code"] for s in subjects]
    assert len(set(codes)) == len(codes) and all(len(c) == 6 and c.isalnum() for c in codes)
    assert any(s["Height"] == "" and s["Weight"] == "" for s in subjects)  # empty cells, as in the release
    for s in subjects:
        assert s["VendorName"] == VENDOR_NAMES[s["Vendor"]]
        assert int(s["Centre"]) in VENDOR_CENTRES[s["Vendor"]]
        files = sorted(os.listdir(os.path.join(root, SPLIT_DIRS[s["split"]], s["External code"])))
        code = s["External code"]
        expected = [f"{code}_sa.nii.gz"] if s["split"] == "unlabeled" else [f"{code}_sa.nii.gz", f"{code}_sa_gt.nii.gz"]
        assert files == expected
    # requested vendor proportions per split: D absent from training, all four vendors in val and test
    per_split = {sp: Counter(s["Vendor"] for s in subjects if s["split"] == sp) for sp in ("train", "val", "test")}
    assert per_split["train"] == {"A": 4, "B": 4, "C": 4}
    assert per_split["val"] == {"A": 2, "B": 2, "C": 1, "D": 1}
    assert per_split["test"] == {"A": 2, "B": 2, "C": 1, "D": 1}
    # pathology fractions: each training (vendor) cell of 4 holds one of each of the 4 pathologies
    for vendor in "ABC":
        paths = Counter(s["Pathology"] for s in subjects if s["split"] == "train" and s["Vendor"] == vendor)
        assert paths == {"NOR": 1, "HCM": 1, "DCM": 1, "HHD": 1}


def test_nifti_dimensions_spacing_and_labels(subjects):
    n_frames, scale = TINY_KWARGS["n_frames"], TINY_KWARGS["matrix_scale"]
    for s in subjects:
        prof = VENDOR_PROFILES[s["Vendor"]]
        img = s["img"]
        expected = (round(prof.matrix[0] * scale), round(prof.matrix[1] * scale), prof.n_slices, n_frames)
        assert img.shape == expected
        assert img.get_data_dtype() == np.float32
        zooms = img.header.get_zooms()
        np.testing.assert_allclose(zooms[:3], (prof.pixel, prof.pixel, prof.slice_spacing), rtol=1e-5)
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), zooms[:3], rtol=1e-5)
        assert img.header.get_xyzt_units() == ("mm", "msec")
        assert 0 <= s["ed"] < n_frames and 0 <= s["es"] < n_frames and s["ed"] != s["es"]
        assert np.all(s["image"] >= 0) and np.array_equal(s["image"], np.rint(s["image"]))
        if s["gt"] is None:
            assert s["split"] == "unlabeled"
            continue
        gt = s["gt"]
        assert gt.shape == img.shape and gt.dtype == np.uint8
        labelled = {t for t in range(n_frames) if gt[..., t].any()}
        assert labelled == {s["ed"], s["es"]}  # labels at ED and ES only
        for t in (s["ed"], s["es"]):
            assert set(np.unique(gt[..., t])) == {0, 1, 2, 3}
        # ED larger than ES (LV cavity volume), image bright in the LV blood pool and darker in the myocardium
        assert (gt[..., s["ed"]] == 1).sum() > (gt[..., s["es"]] == 1).sum()
        frame, lab = s["image"][..., s["ed"]], gt[..., s["ed"]]
        assert frame[lab == 1].mean() > 1.5 * frame[lab == 2].mean()


def _ed_measures(s):
    """LV area (mm^2) and mean wall thickness (mm) at the ED mid-ventricular slice, from the mask."""
    gt, (dx, dy) = s["gt"][..., s["ed"]], s["img"].header.get_zooms()[:2]
    slices = [z for z in range(gt.shape[2]) if (gt[..., z] == 1).any() and (gt[..., z] == 2).any()]
    z = slices[(len(slices) - 1) // 2]
    lv, myo = (gt[..., z] == 1).sum() * dx * dy, (gt[..., z] == 2).sum() * dx * dy
    return lv, np.sqrt((lv + myo) / np.pi) - np.sqrt(lv / np.pi)


def test_pathology_changes_anatomy(subjects):
    by_path: dict[str, list] = {}
    for s in subjects:
        if s["gt"] is not None:
            by_path.setdefault(s["Pathology"], []).append(_ed_measures(s))
    area = {p: np.mean([m[0] for m in v]) for p, v in by_path.items()}
    wall = {p: np.mean([m[1] for m in v]) for p, v in by_path.items()}
    assert set(by_path) == {"NOR", "HCM", "DCM", "HHD"}
    # profiles: NOR wall 8.5 mm, HCM 17, DCM 6, HHD 12.5; LV radius NOR 24, DCM 33 (area ratio ~1.9)
    assert wall["HCM"] > 1.5 * wall["NOR"]
    assert wall["NOR"] < wall["HHD"] < wall["HCM"]
    assert wall["DCM"] < wall["NOR"]
    assert area["DCM"] > 1.4 * area["NOR"]
    assert area["HCM"] < area["NOR"]
    for p in by_path:  # wall within 35 % of the profile mean (partial voxels, slice position)
        target = PATHOLOGY_PROFILES[p]["wall"][0]
        assert abs(wall[p] - target) < 0.35 * target, (p, wall[p])


def test_vendor_signatures_differ(vendor_subjects):
    stats: dict[str, list] = {}
    for s in vendor_subjects:
        if s["gt"] is None:
            continue
        image, gt = s["image"], s["gt"]
        ed = gt[..., s["ed"]]
        blood = image[..., s["ed"]][ed == 1].mean()
        myo = image[..., s["ed"]][ed == 2].mean()
        # noise: temporal standard deviation of static voxels (outside the heart's bounding box grown by 8 voxels,
        # inside the body: brighter than the lungs)
        xs, ys = np.nonzero(np.any(gt > 0, axis=(2, 3)))
        far = np.ones(image.shape[:2], dtype=bool)
        far[max(xs.min() - 8, 0) : xs.max() + 9, max(ys.min() - 8, 0) : ys.max() + 9] = False
        tissue = far[..., None] & (image[..., 0] > 0.15 * blood)
        noise = np.median(image.std(axis=3)[tissue])
        stats.setdefault(s["Vendor"], []).append((blood, myo / blood, noise / blood))
    med = {v: np.median(np.asarray(x), axis=0) for v, x in stats.items()}
    assert set(med) == {"A", "B", "C", "D"}
    for v, (blood, contrast, noise) in med.items():
        prof = VENDOR_PROFILES[v]
        assert 0.6 * prof.scale < blood < 1.4 * prof.scale, (v, blood)  # intensity scale
        assert abs(contrast - prof.myo) < 0.12, (v, contrast)  # myocardium / blood contrast
        assert 0.5 * prof.noise < noise < 1.6 * prof.noise, (v, noise)  # relative noise level
    # the ordering of the signatures is measurable: B < A < D < C in scale, D noisiest and least contrasted
    assert med["B"][0] < med["A"][0] < med["D"][0] < med["C"][0]
    assert med["D"][2] > 1.8 * max(med[v][2] for v in "ABC")
    assert med["D"][1] > max(med[v][1] for v in "ABC")


def _digest(folder: str) -> dict[str, str]:
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_deterministic_and_seed_dependent(tmp_path):
    kw = {"n_subjects": 3, "n_frames": 4, "matrix_scale": 0.25, "num_workers": 0}
    a = make_synthetic_mnms(tmp_path / "a", seed=7, **kw)
    b = make_synthetic_mnms(tmp_path / "b", seed=7, **{**kw, "num_workers": 2})  # processes don't change output
    c = make_synthetic_mnms(tmp_path / "c", seed=8, **kw)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert len(_digest(a)) == 1 + 2 * 3


def test_vendor_fractions_and_correlation(tmp_path):
    out = make_synthetic_mnms(
        tmp_path,
        n_subjects=20,
        split_fractions=(1, 0, 0),
        vendor_fractions={"A": 0.5, "B": 0.25, "C": 0.25},
        pathology_vendor_correlation=0.8,
        n_frames=4,
        matrix_scale=0.25,
        num_workers=0,
    )
    with open(os.path.join(out, CSV_NAME), newline="") as f:
        rows = list(csv.DictReader(f))
    cells = Counter((r["Vendor"], r["Pathology"]) for r in rows)
    # A: 10 subjects, round(0.8 * 10) = 8 NOR (correlated), the other 2 by thirds (largest remainder: NOR, HCM)
    # B: 5 subjects, 4 HCM, 1 left: NOR; C: 5 subjects, 4 DCM, 1 NOR
    assert cells == {("A", "NOR"): 9, ("A", "HCM"): 1, ("B", "HCM"): 4, ("B", "NOR"): 1, ("C", "DCM"): 4,
                     ("C", "NOR"): 1}  # fmt: skip
    assert len(os.listdir(os.path.join(out, "Training", "Labeled"))) == 20
    assert os.listdir(os.path.join(out, "Validation")) == [] and os.listdir(os.path.join(out, "Testing")) == []


def test_default_demo_size_arguments():
    """The default arguments describe the demo size: 60 subjects of 10 frames, realistic matrices and slice counts.

    Only the arguments are checked: speed targets are not unit-tested; the generation time of this default demo is
    measured and recorded in docs/data.md."""
    import inspect

    defaults = inspect.signature(make_synthetic_mnms).parameters
    assert defaults["n_subjects"].default == 60 and defaults["n_frames"].default == 10
    for prof in VENDOR_PROFILES.values():
        assert all(128 <= m <= 256 for m in prof.matrix) and 6 <= prof.n_slices <= 10


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_subjects": 0}, ValueError, "n_subjects"),
        ({"vendor_fractions": {"E": 1.0}}, ValueError, "unknown key 'E'"),
        ({"vendor_fractions": {"train": {"A": -1.0}}}, ValueError, r"vendor_fractions\['train'\]\['A'\]"),
        ({"vendor_fractions": {"train": {"A": 1.0}, "B": 1.0}}, ValueError, "mixes split keys"),
        ({"pathology_fractions": {"FOO": 1.0}}, ValueError, "pathology_fractions: unknown key 'FOO'"),
        ({"pathology_vendor_correlation": 1.5}, ValueError, "pathology_vendor_correlation"),
        ({"correlated_pathology": {"A": "XYZ"}}, ValueError, "correlated_pathology"),
        ({"split_fractions": (1.0, 0.0)}, ValueError, "split_fractions"),
        ({"correlation_splits": ("training",)}, ValueError, "unknown split 'training'"),
        ({"n_frames": 2}, ValueError, "n_frames"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_synthetic_mnms(tmp_path, **{"n_subjects": 2, "matrix_scale": 0.25, **kwargs})
    assert not (tmp_path / "OpenDataset").exists()


def test_existing_output_needs_overwrite(tmp_path):
    kw = {"n_subjects": 1, "n_frames": 4, "matrix_scale": 0.25, "num_workers": 0}
    out = make_synthetic_mnms(tmp_path, **kw)
    with pytest.raises(FileExistsError, match="OpenDataset already exists"):
        make_synthetic_mnms(tmp_path, **kw)
    (Path(out) / "stale.txt").write_text("x")
    make_synthetic_mnms(tmp_path, overwrite=True, **kw)
    assert not (Path(out) / "stale.txt").exists()


def test_command_line(tmp_path):
    cmd = [sys.executable, "-m", "scripts", "synthetic", "--root", str(tmp_path), "--n-subjects", "4",
           "--n-frames", "4", "--matrix-scale", "0.25", "--seed", "5", "--vendor-fractions", "A=1,D=1",
           "--num-workers", "0"]  # fmt: skip
    shared = Path(__file__).resolve().parents[1] / "bundles" / "shared"  # python -m scripts, from a bundle folder
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=shared)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "OpenDataset"
    assert res.stdout.strip().splitlines()[-1] == str(out)
    with open(out / CSV_NAME, newline="") as f:
        vendors = Counter(r["Vendor"] for r in csv.DictReader(f))
    assert set(vendors) == {"A", "D"} and sum(vendors.values()) == 4
    again = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, cwd=shared
    )  # exists: clean error, exit code 2
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = subprocess.run(
        [*cmd[:5], str(tmp_path / "x"), "--vendor-fractions", "A"], capture_output=True, text=True, cwd=shared
    )
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    assert "RuntimeWarning" not in res.stderr + bad.stderr  # the package's __main__, not a submodule run as a script
    unknown = subprocess.run([*cmd[:3], "nothing"], capture_output=True, text=True, cwd=shared)
    assert unknown.returncode == 2 and "{synthetic,waterbirds}" in unknown.stderr
