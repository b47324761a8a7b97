"""Segmentation data: ED/ES frame entries (M&Ms and M&Ms-2 layouts), the invertible preprocessing, the slice dataset,
the segmentation dataset set-up and the bad-input errors (naming the file or subject)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from monai_groupdistil.data import load_mnms_datalist
from scripts import SegmentationSliceDataset, make_synthetic_mnms, segmentation_frames, segmentation_preprocessing
from scripts.segmentation_datasets import prepare_seg_dataset, seg_inference_datalist, seg_splits

SIZE, PIXDIM = (24, 24), (8.0, 8.0)


@pytest.fixture(scope="module")
def mnms(tmp_path_factory):
    root = make_synthetic_mnms(
        tmp_path_factory.mktemp("seg") / "data", n_subjects=10, seed=3, matrix_scale=0.4, n_frames=4, num_workers=0
    )
    return root


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def test_frames_of_mnms_subjects_keep_the_subject_and_both_frame_indices(mnms):
    subjects = load_mnms_datalist(mnms, "train")
    frames = segmentation_frames(subjects)
    assert len(frames) == 2 * len(subjects)
    for s, ed, es in zip(subjects, frames[0::2], frames[1::2]):
        assert (ed["frame"], ed["frame_index"], es["frame"], es["frame_index"]) == ("ed", s["ed"], "es", s["es"])
        for e in (ed, es):
            assert e["image"] == s["image"] and e["label"] == s["seg"] and e["group"] == s["group"]
        assert ed["case"] == f"{s['subject']}_ed"


def test_preprocessing_gives_the_annotated_frame_and_inverts_to_the_input_grid(mnms):
    entry = segmentation_frames(load_mnms_datalist(mnms, "train"))[1]  # an ES frame
    preprocessing = segmentation_preprocessing(SIZE, PIXDIM)
    item = preprocessing(dict(entry))
    img = nib.load(entry["image"])
    mask = np.asarray(nib.load(entry["label"]).dataobj)[..., entry["frame_index"]]
    nz = img.shape[2]
    assert item["image"].shape == (1, *SIZE, nz) and item["label"].shape == (1, *SIZE, nz)
    assert float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1
    assert set(torch.unique(item["label"]).tolist()) == set(np.unique(mask).tolist()) == {0, 1, 2, 3}
    assert item["image"].pixdim.tolist()[:2] == pytest.approx(list(PIXDIM))
    # the label mapped back with Invertd: the input frame's grid, and at the annotated voxels mostly the truth
    inverse = Invertd("label", preprocessing, orig_keys="label", nearest_interp=True)
    back = inverse(dict(item))["label"]
    assert back.shape == (1, *mask.shape) and np.allclose(back.affine.numpy(), img.affine)
    agree = float((back[0].numpy() == mask)[mask > 0].mean())
    assert agree > 0.5  # coarse 8 mm grid and back


def test_slice_dataset_keeps_the_labelled_slices_with_their_group(mnms):
    entries = segmentation_frames(load_mnms_datalist(mnms, "train"))[:4]
    ds = SegmentationSliceDataset(entries, segmentation_preprocessing(SIZE, PIXDIM))
    expected = 0
    for e in entries:
        expected += int(segmentation_preprocessing(SIZE, PIXDIM)(dict(e))["label"].flatten(0, 2).amax(0).gt(0).sum())
    assert len(ds) == expected and ds.volumes == 4
    item = ds[0]
    assert item["image"].shape == (1, *SIZE) and item["label"].max() > 0
    assert item["group"] == entries[0]["group"] and item["case"] == entries[0]["case"]


def test_seg_splits_are_by_subject_with_both_frames(mnms):
    splits = seg_splits(mnms)
    assert splits["layout"] == "mnms" and splits["group_names"] == ["A", "B", "C", "D"]
    subjects = {p: {e["subject"] for e in splits[p]} for p in ("train", "val", "test")}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    for part in ("train", "val", "test"):
        assert len(splits[part]) == 2 * len(subjects[part])
    assert sum(splits["group_counts"]) == len(splits["train"])


def _mnms2(root: Path, subjects: dict[int, str]) -> Path:
    """A tiny M&Ms-2 release: the CSV and 3-D SA ED/ES images and masks."""
    base = root / "MnM2"
    (base / "dataset").mkdir(parents=True)
    with open(base / "dataset_information.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["SUBJECT_CODE", "DISEASE", "VENDOR", "SCANNER", "FIELD"])
        for number, vendor in subjects.items():
            w.writerow([number, "NOR", vendor, "X", "1.5"])
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 9.0, 1.0])
    for number in subjects:
        folder = base / "dataset" / f"{number:03d}"
        folder.mkdir()
        for frame in ("ED", "ES"):
            mask = np.zeros((30, 30, 4), np.uint8)
            mask[8:20, 8:20] = 2
            mask[11:17, 11:17] = 1
            mask[20:24, 8:20] = 3
            _save(
                folder / f"{number:03d}_SA_{frame}.nii.gz", (rng.random(mask.shape) + mask).astype(np.float32), affine
            )
            _save(folder / f"{number:03d}_SA_{frame}_gt.nii.gz", mask, affine)
    return base


def test_mnms2_layout_frames_splits_and_inference_list(tmp_path):
    base = _mnms2(tmp_path, {1: "GE", 2: "SIEMENS", 3: "GE", 161: "SIEMENS", 162: "GE", 201: "GE", 202: "SIEMENS"})
    assert prepare_seg_dataset(tmp_path) == str(base)
    splits = seg_splits(base)
    assert splits["layout"] == "mnms2" and splits["group_names"] == ["GE", "SIEMENS"]
    assert [e["case"] for e in splits["train"]] == ["001_ed", "001_es", "002_ed", "002_es", "003_ed", "003_es"]
    assert all(
        e["frame_index"] == 0 and e["label"].endswith(f"_SA_{e['frame'].upper()}_gt.nii.gz") for e in splits["train"]
    )
    item = segmentation_preprocessing(SIZE, PIXDIM)(dict(splits["val"][0]))
    assert item["label"].shape == (1, *SIZE, 4)
    listed = seg_inference_datalist(tmp_path)
    assert len(listed) == 14 and {e["subject"] for e in listed} >= {"001_ed", "202_es"}


# ------------------------------------------------------------------ bad input


def _frame_entry(tmp_path: Path, mask: np.ndarray, image_shape=(12, 12, 3)) -> dict:
    affine = np.diag([2.0, 2.0, 8.0, 1.0])
    image = _save(tmp_path / "img.nii.gz", np.random.default_rng(0).random(image_shape).astype(np.float32), affine)
    label = _save(tmp_path / "img_gt.nii.gz", mask, affine)
    return {"image": image, "label": label, "frame_index": 0}


def test_mask_with_a_label_outside_0_3_names_the_file(tmp_path):
    mask = np.zeros((12, 12, 3), np.uint8)
    mask[4:8, 4:8] = 5
    entry = _frame_entry(tmp_path, mask)
    with pytest.raises(Exception) as info:
        segmentation_preprocessing(SIZE, PIXDIM)(entry)
    message = str(info.value.__cause__ or info.value)
    assert f"mask {entry['label']} (frame 0) holds label(s) [5] outside 0-3" in message


def test_mask_of_another_shape_names_both_files(tmp_path):
    entry = _frame_entry(tmp_path, np.ones((12, 10, 3), np.uint8))
    with pytest.raises(Exception) as info:
        segmentation_preprocessing(SIZE, PIXDIM)(entry)
    message = str(info.value.__cause__ or info.value)
    assert (
        f"mask {entry['label']} has spatial shape (12, 10, 3) (frame 0), its image {entry['image']} has (12, 12, 3)"
        in (message)
    )


def test_frame_without_annotation_and_subject_without_mask_are_refused(tmp_path, mnms):
    entry = _frame_entry(tmp_path, np.zeros((12, 12, 3), np.uint8))
    with pytest.raises(Exception) as info:
        segmentation_preprocessing(SIZE, PIXDIM)(entry)
    assert f"mask {entry['label']} (frame 0) has no labelled voxel" in str(info.value.__cause__ or info.value)
    subject = dict(load_mnms_datalist(mnms, "train")[0], seg=None)
    with pytest.raises(
        ValueError, match=rf"subject {subject['subject']}: image .*_sa.nii.gz has no mask at ED \(frame"
    ):
        segmentation_frames([subject])
    assert "label" not in segmentation_frames([subject], require_masks=False)[0]  # inference needs none
    with pytest.raises(ValueError, match=r"frames must be 'ed' and/or 'es', got \('mid',\)"):
        segmentation_frames([subject], frames="mid")


def test_dataset_dir_that_is_neither_release_nor_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is neither empty nor an M&Ms or M&Ms-2 release"):
        prepare_seg_dataset(tmp_path)


def test_docstring_examples_run():
    import doctest

    from scripts import segmentation

    result = doctest.testmod(segmentation)
    assert result.attempted > 0 and result.failed == 0, result
