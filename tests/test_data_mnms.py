"""M&Ms / M&Ms-2 datalists (synthetic data and hand-built folders in the real layouts) and split_by_group."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
from collections import Counter

import pytest

from monai_groupdistil.data import (
    load_mnms2_datalist,
    load_mnms_datalist,
    mnms2_group_names,
    mnms_group_names,
    split_by_group,
)
from tests.data_fixtures import (
    CSV_NAME,
    REAL_ROWS,
    build_mnms2_layout,
    build_real_layout,
    snapshot,
    tiny_mnms,
)

KEYS = {"image", "seg", "label", "group", "group_name", "vendor", "centre", "subject", "ed", "es"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_mnms(tmp_path_factory)


@pytest.fixture(scope="module")
def synth_csv(synth):
    with open(os.path.join(synth, CSV_NAME), newline="") as f:
        return {r["External code"]: r for r in csv.DictReader(f)}


@pytest.fixture
def real(tmp_path):
    return build_real_layout(tmp_path)


def _rewrite_csv(base, edit):
    """Rewrite the CSV of a hand-built folder line by line with ``edit(lines) -> lines``."""
    path = base / CSV_NAME
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


# ------------------------------------------------------------------------------------------ synthetic data
def test_synthetic_train_entries_match_csv_and_disk(synth, synth_csv):
    before = snapshot(synth)
    train, names = load_mnms_datalist(synth, split="train", return_group_names=True)
    assert names == ["A", "B", "C", "D"]
    on_disk = set(os.listdir(os.path.join(synth, "Training", "Labeled")))
    expected = {c for c in on_disk if synth_csv[c]["Pathology"] in ("NOR", "HCM", "DCM")}
    assert {e["subject"] for e in train} == expected and len(train) == 9  # 12 minus the 3 HHD subjects
    for e in train:
        assert KEYS <= set(e)
        row = synth_csv[e["subject"]]
        folder = os.path.join(synth, "Training", "Labeled", e["subject"])
        assert e["image"] == os.path.join(folder, f"{e['subject']}_sa.nii.gz")
        assert e["seg"] == os.path.join(folder, f"{e['subject']}_sa_gt.nii.gz")
        assert e["label"] == ("NOR", "HCM", "DCM").index(row["Pathology"]) and e["pathology"] == row["Pathology"]
        assert e["vendor"] == row["Vendor"] and e["vendor_name"] == row["VendorName"]
        assert e["group"] == "ABCD".index(row["Vendor"]) and e["group_name"] == row["Vendor"]
        assert type(e["group"]) is int and type(e["label"]) is int
        assert e["centre"] == int(row["Centre"]) and e["ed"] == int(row["ED"]) and e["es"] == int(row["ES"])
        assert e["split"] == "train"
    assert [e["subject"] for e in train] == sorted(e["subject"] for e in train)
    assert snapshot(synth) == before  # the loader writes nothing


def test_synthetic_group_indices_stable_across_splits(synth):
    parts = {s: load_mnms_datalist(synth, split=s) for s in ("train", "val", "test")}
    assert "D" not in {e["vendor"] for e in parts["train"]}  # D absent from training ...
    for split in ("val", "test"):  # ... keeps index 3 elsewhere
        assert {(e["vendor"], e["group"]) for e in parts[split]} >= {("D", 3)}
    for part in parts.values():
        assert all(e["group"] == "ABCD".index(e["vendor"]) for e in part)
    everything = load_mnms_datalist(synth, split="all")
    assert sorted(e["subject"] for e in everything) == sorted(e["subject"] for p in parts.values() for e in p)
    assert Counter(e["split"] for e in everything) == {s: len(p) for s, p in parts.items()}


def test_synthetic_cross_and_centre_groups(synth):
    cross, names = load_mnms_datalist(synth, split="all", group_by=("vendor", "label"), return_group_names=True)
    assert names == mnms_group_names(("vendor", "label")) and len(names) == 12
    assert names[:4] == ["A/NOR", "A/HCM", "A/DCM", "B/NOR"]
    for e in cross:
        assert e["group"] == "ABCD".index(e["vendor"]) * 3 + e["label"]
        assert e["group_name"] == f"{e['vendor']}/{e['pathology']}" == names[e["group"]]
    centre, names = load_mnms_datalist(synth, split="all", group_by="centre", return_group_names=True)
    assert names == ["1", "2", "3", "4", "5"]
    assert all(e["group"] == e["centre"] - 1 and e["group_name"] == str(e["centre"]) for e in centre)
    swapped = load_mnms_datalist(synth, split="all", group_by=("label", "center"))  # alias, label first
    assert all(e["group"] == e["label"] * 5 + e["centre"] - 1 for e in swapped)


def test_synthetic_classes_unlabeled_and_root_forms(synth, caplog):
    with caplog.at_level(logging.INFO, logger="monai_groupdistil.data"):
        default = load_mnms_datalist(synth, split="all")
    # one HHD subject in each training vendor cell (see TINY_KWARGS), none in the cells of 1-2 subjects of val/test
    assert "left out 3 M&Ms subject(s) whose pathology is not in classes" in caplog.text and "'HHD': 3" in caplog.text
    assert "2 Training/Unlabeled subject(s) not included" in caplog.text
    four = load_mnms_datalist(synth, split="all", classes=("NOR", "HCM", "DCM", "HHD"))
    assert len(four) == len(default) + 3
    assert {e["label"] for e in four if e["pathology"] == "HHD"} == {3}
    with_unl = load_mnms_datalist(synth, split="train", include_unlabeled=True, classes=("NOR", "HCM", "DCM", "HHD"))
    unl = [e for e in with_unl if e["split"] == "unlabeled"]
    assert len(unl) == 2 and all(e["seg"] is None and os.path.isfile(e["image"]) for e in unl)
    parent = os.path.dirname(synth)  # the folder containing OpenDataset works the same
    assert load_mnms_datalist(parent, split="test") == load_mnms_datalist(synth, split="test")


# ------------------------------------------------------------------------------------------ real layout
def test_real_layout(real, caplog):
    before = snapshot(real)
    with caplog.at_level(logging.INFO, logger="monai_groupdistil.data"):
        train = load_mnms_datalist(real, split="train")
    assert [e["subject"] for e in train] == ["A0S9V9", "A1D0Q7", "A1D9Z7"]  # A2C0I1 (HHD) left out
    assert "'HHD': 1" in caplog.text and "1 Training/Unlabeled subject(s) not included" in caplog.text
    a0, a1, a19 = train
    assert (a0["pathology"], a0["label"], a0["group"], a0["centre"], a0["ed"], a0["es"]) == ("HCM", 1, 0, 1, 0, 5)
    assert math.isnan(a0["height"]) and math.isnan(a0["weight"]) and a0["age"] == 67 and a0["sex"] == "M"
    assert (a1["height"], a1["weight"], a1["vendor_name"], a1["label"]) == (175.0, 88.0, "Philips", 2)
    assert (a19["centre"], a19["group"], a19["ed"], a19["es"]) == (3, 1, 7, 3)  # ED in the last frame
    test = load_mnms_datalist(real, split="test")
    assert [(e["subject"], e["vendor"], e["group"], e["centre"]) for e in test] == [("E4W8Z6", "D", 3, 5)]
    assert test[0]["seg"].endswith("Testing/E4W8Z6/E4W8Z6_sa_gt.nii.gz")
    val = load_mnms_datalist(real, split="val", group_by=("vendor", "label"))
    assert [(e["subject"], e["group"], e["group_name"]) for e in val] == [("D1H6M2", 2 * 3 + 1, "C/HCM")]
    unl = load_mnms_datalist(real, split="all", include_unlabeled=True)
    assert [e["subject"] for e in unl if e["seg"] is None] == ["C0S7W0"]
    assert len(unl) == 6 and [e["split"] for e in unl][:4] == ["train", "train", "train", "unlabeled"]
    assert snapshot(real) == before


def test_missing_csv_and_root(tmp_path, real):
    with pytest.raises(FileNotFoundError, match="dataset root not found: .*nowhere"):
        load_mnms_datalist(tmp_path / "nowhere")
    os.remove(real / CSV_NAME)
    with pytest.raises(FileNotFoundError, match=r"211230_M&Ms_Dataset_information_diagnosis_opendataset\.csv"):
        load_mnms_datalist(real)
    with pytest.raises(FileNotFoundError, match="metadata CSV not found: .*other.csv"):
        load_mnms_datalist(real, csv_path=real / "other.csv")


def test_csv_missing_column(real):
    _rewrite_csv(real, lambda lines: [",".join(c for i, c in enumerate(line.split(",")) if i != 6) for line in lines])
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['ES'\]"):
        load_mnms_datalist(real)


@pytest.mark.parametrize(
    "row, match",
    [
        ("7,Z9Z9Z9,Siemens,E,1,0,5,50,NOR,M,,", r"line 9: column 'Vendor' must be one of"),
        ("7,Z9Z9Z9,Siemens,A,9,0,5,50,NOR,M,,", r"line 9: column 'Centre' must be one of"),
        ("7,Z9Z9Z9,Siemens,A,1,x,5,50,NOR,M,,", r"line 9: column 'ED' must be an integer, got 'x'"),
        ("7,Z9Z9Z9,Siemens,A,1,0,-1,50,NOR,M,,", r"line 9: column 'ES' must be a 0-based frame index"),
        ("7,A0S9V9,Siemens,A,1,0,5,50,NOR,M,,", r"'A0S9V9' is listed twice \(lines 2 and 9\)"),
    ],
)
def test_bad_csv_cells(real, row, match):
    _rewrite_csv(real, lambda lines: [*lines, row])
    with pytest.raises(ValueError, match=match):
        load_mnms_datalist(real)


def test_subject_without_image(real, caplog):
    _rewrite_csv(real, lambda lines: [*lines, "7,Z9Z9Z9,Siemens,A,1,0,5,50,NOR,M,,"])
    with pytest.raises(FileNotFoundError, match=r"1 M&Ms subject\(s\) without image.*Z9Z9Z9: no folder Z9Z9Z9/"):
        load_mnms_datalist(real)
    os.remove(real / "Training" / "Labeled" / "A1D0Q7" / "A1D0Q7_sa.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"2 M&Ms subject.*image not found: .*A1D0Q7_sa\.nii\.gz"):
        load_mnms_datalist(real, split="test")  # checked whatever the requested split
    with caplog.at_level(logging.WARNING, logger="monai_groupdistil.data"):
        train = load_mnms_datalist(real, on_missing="skip")
    assert [e["subject"] for e in train] == ["A0S9V9", "A1D9Z7"]
    assert "skipped 2 M&Ms subject(s)" in caplog.text and "Z9Z9Z9" in caplog.text


def test_folder_not_in_csv(real):
    shutil.copytree(real / "Testing" / "E4W8Z6", real / "Testing" / "Q1Q1Q1")
    with pytest.raises(FileNotFoundError, match=r"Q1Q1Q1: folder .*Q1Q1Q1 is not listed in"):
        load_mnms_datalist(real)
    assert len(load_mnms_datalist(real, split="test", on_missing="skip")) == 1


def test_corrupt_nifti_named(real):
    bad = real / "Training" / "Labeled" / "A1D0Q7" / "A1D0Q7_sa.nii.gz"
    bad.write_bytes(b"this is not a nifti file" * 20)
    with pytest.raises(RuntimeError, match=r"cannot read NIfTI file .*A1D0Q7_sa\.nii\.gz"):
        load_mnms_datalist(real)
    assert len(load_mnms_datalist(real, check_frames=False)) == 3  # header not read


def test_frames_outside_image(real):
    _rewrite_csv(
        real, lambda lines: [line.replace(",A1D9Z7,Philips,B,3,7,3,", ",A1D9Z7,Philips,B,3,8,3,") for line in lines]
    )
    with pytest.raises(ValueError, match=r"A1D9Z7: ED=8 .* outside the 8 frames of .*A1D9Z7_sa\.nii\.gz"):
        load_mnms_datalist(real)


def test_mask_shape_mismatch(real):
    from tests.data_fixtures import heart_phantom, save_nifti

    _, mask = heart_phantom(shape=(24, 20, 5, 7), ed=0, es=4)
    save_nifti(mask, real / "Validation" / "D1H6M2" / "D1H6M2_sa_gt.nii.gz")
    with pytest.raises(ValueError, match=r"mask .*D1H6M2_sa_gt\.nii\.gz has shape"):
        load_mnms_datalist(real, split="val")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "training"}, "unknown split 'training'"),
        ({"group_by": "scanner"}, "unknown group_by key 'scanner'"),
        ({"group_by": ("vendor", "vendor")}, "repeated"),
        ({"group_by": ()}, "at least one key"),
        ({"on_missing": "ignore"}, "on_missing must be one of"),
        ({"classes": ()}, "at least one pathology"),
    ],
)
def test_bad_arguments(real, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_mnms_datalist(real, **kwargs)


def test_missing_split_folder(real):
    shutil.rmtree(real / "Testing")
    with pytest.raises(FileNotFoundError, match="split folder for 'test' not found: .*Testing"):
        load_mnms_datalist(real, split="test", on_missing="skip")
    assert len(load_mnms_datalist(real, split="train", on_missing="skip")) == 3


def test_csv_rows_are_the_fixture_rows():
    """The hand-built CSV is the documented real header plus rows; guard against edits of the fixture."""
    assert all(len(r.split(",")) == 12 for r in REAL_ROWS)


# ------------------------------------------------------------------------------------------ M&Ms-2
def test_mnms2(tmp_path, caplog):
    base = build_mnms2_layout(tmp_path)
    before = snapshot(base)
    with caplog.at_level(logging.INFO, logger="monai_groupdistil.data"):
        train, names = load_mnms2_datalist(tmp_path, split="train", return_group_names=True)
    assert names == ["GE MEDICAL SYSTEMS", "Philips Medical Systems", "SIEMENS"]
    assert [(e["subject"], e["pathology"], e["group"]) for e in train] == [("001", "NOR", 2), ("002", "LV", 1),
                                                                          ("003", "HCM", 0)]  # fmt: skip
    assert "'XYZ': 1" in caplog.text  # subject 004 left out
    e = train[0]
    assert e["image"] == str(base / "dataset" / "001" / "001_SA_ED.nii.gz") and e["seg"].endswith("001_SA_ED_gt.nii.gz")
    assert e["cine"].endswith("001_SA_CINE.nii.gz") and e["es_image"].endswith("001_SA_ES.nii.gz")
    assert (e["ed_image"], e["ed_seg"]) == (e["image"], e["seg"]) and e["es_seg"].endswith("001_SA_ES_gt.nii.gz")
    assert (e["label"], e["scanner"], e["field"], e["ed"], e["es"], e["frame"]) == (0, "Avanto", "1.5", 0, 0, "ed")
    val = load_mnms2_datalist(base, split="val")
    test = load_mnms2_datalist(base, split="test")
    assert [(x["subject"], x["group"], x["split"]) for x in val + test] == [("161", 1, "val"), ("201", 2, "test")]
    es = load_mnms2_datalist(base, split="all", frame="es", view="LA", group_by="scanner")
    scanners = mnms2_group_names(base, "scanner")
    assert scanners == ["Achieva", "Avanto", "Signa Explorer", "Skyra"]
    assert all(x["image"].endswith(f"{x['subject']}_LA_ES.nii.gz") and scanners[x["group"]] == x["scanner"] for x in es)
    cross = load_mnms2_datalist(base, split="all", group_by=("VENDOR", "label"))
    assert all(x["group"] == names.index(x["vendor"]) * 8 + x["label"] for x in cross)
    assert snapshot(base) == before


def test_mnms2_entries_have_the_required_keys(tmp_path):
    """Every key the issue requires, ``centre`` included (None: M&Ms-2 has no centre column)."""
    base = build_mnms2_layout(tmp_path)
    for frame in ("ed", "es"):
        data = load_mnms2_datalist(base, split="all", frame=frame)
        assert len(data) == 5
        for e in data:
            assert KEYS <= set(e), KEYS - set(e)
            assert e["centre"] is None
    # no path key may look like a MONAI metadata key of "image"/"seg" (Spacingd would call .update() on it)
    assert not [k for k in data[0] if k.startswith(("image_", "seg_"))]


def _latin1_csv(path):
    """Make a CSV invalid UTF-8: one Latin-1 encoded character."""
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"SIEMENS", b"SI\xc9MENS", 1).replace(b"Siemens", b"Si\xe9mens", 1))


def test_csv_not_utf8_is_a_clear_error(tmp_path):
    real = build_real_layout(tmp_path / "mnms")
    _latin1_csv(real / CSV_NAME)
    with pytest.raises(ValueError) as info:
        load_mnms_datalist(real)
    assert not isinstance(info.value, UnicodeDecodeError)
    message = str(info.value)
    assert f"metadata CSV {real / CSV_NAME} is not UTF-8 text" in message and "offset" in message, message
    base = build_mnms2_layout(tmp_path / "mnms2")
    _latin1_csv(base / "dataset_information.csv")
    for load in (load_mnms2_datalist, mnms2_group_names):
        with pytest.raises(ValueError, match=r"metadata CSV .*dataset_information\.csv is not UTF-8 text") as info:
            load(base)
        assert not isinstance(info.value, UnicodeDecodeError)
    # a UTF-8 byte-order mark (Excel's "CSV UTF-8") is still accepted
    csv_path = real / CSV_NAME
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes().replace(b"Si\xe9mens", b"Siemens"))
    assert [e["subject"] for e in load_mnms_datalist(real)] == ["A0S9V9", "A1D0Q7", "A1D9Z7"]


def test_mnms2_errors(tmp_path):
    base = build_mnms2_layout(tmp_path)
    with pytest.raises(ValueError, match="unknown group_by key 'centre'"):
        load_mnms2_datalist(base, group_by="centre")
    with pytest.raises(ValueError, match="frame must be 'ed' or 'es'"):
        load_mnms2_datalist(base, frame="mid")
    os.remove(base / "dataset" / "002" / "002_SA_ED.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"have no image on disk: .*002_SA_ED\.nii\.gz"):
        load_mnms2_datalist(base)
    assert [x["subject"] for x in load_mnms2_datalist(base, on_missing="skip")] == ["001", "003"]
    with open(base / "dataset_information.csv", "a") as f:
        f.write("400,NOR,SIEMENS,Avanto,1.5\n")
    with pytest.raises(ValueError, match="column 'SUBJECT_CODE' must be in 1-360, got 400"):
        load_mnms2_datalist(base, on_missing="skip")
    (base / "dataset_information.csv").write_text("SUBJECT_CODE,DISEASE,VENDOR,FIELD\n1,NOR,SIEMENS,1.5\n")
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['SCANNER'\]"):
        load_mnms2_datalist(base)
    os.remove(base / "dataset_information.csv")
    with pytest.raises(FileNotFoundError, match="dataset_information.csv"):
        load_mnms2_datalist(base)


# ------------------------------------------------------------------------------------------ split_by_group
def _pooled():
    return [{"id": i, "group": g} for i, g in enumerate([0] * 50 + [1] * 30 + [2] * 20 + [3] * 3)]


def test_split_by_group_stratified():
    pooled = _pooled()
    parts = split_by_group(pooled, (0.6, 0.2, 0.2), seed=0)
    counts = [Counter(e["group"] for e in p) for p in parts]
    assert counts[0] == {0: 30, 1: 18, 2: 12, 3: 2}
    assert counts[1] == {0: 10, 1: 6, 2: 4, 3: 1}
    assert counts[2] == {0: 10, 1: 6, 2: 4}
    ids = [e["id"] for p in parts for e in p]
    assert sorted(ids) == list(range(len(pooled)))  # disjoint and covering
    assert all([e["id"] for e in p] == sorted(e["id"] for e in p) for p in parts)  # original order kept
    assert split_by_group(pooled, (0.6, 0.2, 0.2), seed=0) == parts
    assert split_by_group(pooled, (0.6, 0.2, 0.2), seed=1) != parts
    two = split_by_group(pooled, (0.5, 0.5), seed=0, group_key="group")
    assert [len(p) for p in two] == [52, 51]


def test_split_by_group_rounding_leftovers_and_empty_parts():
    """MONAI's rounding int(f * n + 0.5) per part can leave entries over: they go to the last non-empty part."""
    pooled = [{"id": i, "group": g} for i, g in enumerate(["b"] * 10 + ["a"] * 7)]  # any hashable group ids
    parts = split_by_group(pooled, (1 / 3, 1 / 3, 1 / 3), seed=2)
    # group b: 3.33 -> 3, 3, 3 and 1 left over; group a: 2.33 -> 2, 2, 2 and 1 left over
    assert [Counter(e["group"] for e in p) for p in parts] == [{"b": 3, "a": 2}, {"b": 3, "a": 2}, {"b": 4, "a": 3}]
    assert sorted(e["id"] for p in parts for e in p) == list(range(17))
    parts = split_by_group(pooled, (1 / 3, 1 / 3, 1 / 3, 0.0), seed=2)  # left over: to part 2, not the empty part 3
    assert [len(p) for p in parts] == [5, 5, 7, 0]
    assert split_by_group([], (0.5, 0.5)) == ([], [])


def test_split_by_group_resplits_real_layout(real):
    pooled = load_mnms_datalist(real, split="all")
    train, test = split_by_group(pooled, (0.5, 0.5), seed=0)
    assert len(train) + len(test) == len(pooled) == 5


@pytest.mark.parametrize(
    "fractions, data, match",
    [
        ((0.5, 0.4), _pooled(), "must sum to 1"),
        ((1.2, -0.2), _pooled(), "non-negative"),
        ((), _pooled(), "non-negative numbers"),
        ((0.5, 0.5), [{"group": 0}, {"label": 1}], "entry 1 has no 'group' key"),
    ],
)
def test_split_by_group_errors(fractions, data, match):
    with pytest.raises(ValueError, match=match):
        split_by_group(data, fractions)


def test_docstring_examples_run():
    import doctest

    from monai_groupdistil.data import mnms

    result = doctest.testmod(mnms)
    assert result.attempted > 0 and result.failed == 0, result
