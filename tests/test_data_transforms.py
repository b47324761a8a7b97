"""Cardiac preprocessing transforms: frame and slice selection, intensity range, resampling, heart-centred crop,
readers, errors, augmentation, and batching with group ids."""

from __future__ import annotations

import gzip
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor

from monai_groupdistil.data import load_mnms2_datalist, load_mnms_datalist
from scripts import (
    CropAroundHeartd,
    LoadCardiacImaged,
    SelectFramed,
    SelectMidVentricularSliced,
    cardiac_augmentation,
    cardiac_preprocessing,
    slice_affine_2d,
)
from tests.data_fixtures import build_mnms2_layout, build_real_layout, heart_phantom, save_nifti, tiny_mnms

# itk (ITKReader) emits SWIG deprecation warnings when it is imported lazily
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_mnms(tmp_path_factory)


@pytest.fixture(scope="module")
def entries(synth):
    train = load_mnms_datalist(synth, split="train")
    test = load_mnms_datalist(synth, split="test")
    return train[:3] + [e for e in test if e["vendor"] == "D"]


def _expected_slice(seg_path: str, frame: int) -> int:
    """Mid-ventricular slice computed independently: middle of the slices containing both LV and MYO."""
    gt = np.asarray(nib.load(seg_path).dataobj)[..., frame]
    z = [k for k in range(gt.shape[2]) if (gt[..., k] == 1).any() and (gt[..., k] == 2).any()]
    return z[(len(z) - 1) // 2]


def test_preprocessing_outputs(entries):
    pre = cardiac_preprocessing(spatial_size=(128, 128), pixdim=(1.25, 1.25))
    for entry in entries:
        out = pre(dict(entry))
        img, seg = out["image"], out["seg"]
        assert img.shape == (1, 128, 128) and seg.shape == (1, 128, 128)
        assert img.dtype == torch.float32 and isinstance(img, MetaTensor)
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0 and float(img.max()) > 0.95
        # the chosen slice is the mid-ventricular one of the ED frame and contains LV and MYO
        assert out["slice_index"] == _expected_slice(entry["seg"], entry["ed"])
        labels = set(torch.unique(seg).tolist())
        assert {1.0, 2.0} <= labels <= {0.0, 1.0, 2.0, 3.0}
        # the image shows the anatomy of the mask: blood pool brighter than myocardium
        assert img[seg == 1].mean() > img[seg == 2].mean() + 0.2
        # in-plane spacing of the output, and the crop is centred on the heart
        np.testing.assert_allclose(img.pixdim[:2].numpy(), (1.25, 1.25), atol=1e-4)
        fg = torch.nonzero(seg[0] > 0).double().mean(0)
        assert torch.all((fg - 64).abs() <= 1.5), fg
        assert (out["label"], out["group"], out["subject"]) == (entry["label"], entry["group"], entry["subject"])


def test_preprocessing_es_frame_and_physical_size(entries):
    entry = entries[0]
    ed = cardiac_preprocessing(spatial_size=(96, 96), pixdim=(1.0, 1.0))(dict(entry))
    es = cardiac_preprocessing(spatial_size=(96, 96), pixdim=(1.0, 1.0), frame="es")(dict(entry))
    assert es["slice_index"] == _expected_slice(entry["seg"], entry["es"])
    assert (ed["seg"] == 1).sum() > (es["seg"] == 1).sum()  # LV larger at ED
    # resampling preserves physical areas: LV area in mm^2 equals the native one (nearest neighbour, +-15 %)
    gt = np.asarray(nib.load(entry["seg"]).dataobj)[..., entry["ed"]][..., ed["slice_index"]]
    dx, dy = nib.load(entry["seg"]).header.get_zooms()[:2]
    native = (gt == 1).sum() * dx * dy
    assert abs(float((ed["seg"] == 1).sum()) * 1.0 - native) < 0.15 * native


def test_readers_agree(entries):
    pytest.importorskip("itk")
    entry = entries[-1]
    a = cardiac_preprocessing((64, 64), reader="NibabelReader")(dict(entry))
    b = cardiac_preprocessing((64, 64), reader="ITKReader")(dict(entry))
    assert a["slice_index"] == b["slice_index"]
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["seg"].as_tensor(), b["seg"].as_tensor())


def test_nibabel_reader_default(entries):
    a = cardiac_preprocessing((64, 64), reader="NibabelReader")(dict(entries[0]))
    b = cardiac_preprocessing((64, 64))(dict(entries[0]))
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor())


def test_unlabelled_entry_uses_middle_slice(synth):
    entry = next(e for e in load_mnms_datalist(synth, "train", include_unlabeled=True) if e["seg"] is None)
    out = cardiac_preprocessing((80, 80))(dict(entry))
    n_slices = nib.load(entry["image"]).shape[2]
    assert "seg" not in out and out["slice_index"] == n_slices // 2
    assert out["image"].shape == (1, 80, 80) and 0.0 <= float(out["image"].min()) <= float(out["image"].max()) <= 1.0


def test_percentile_clipping_ignores_outliers(tmp_path):
    image, mask = heart_phantom(ed=0, es=4)
    image[0, 0, :, :] = 1e6  # a few hot voxels (0.2 %) must not squash the range
    entry = {
        "image": save_nifti(image, tmp_path / "img.nii.gz"),
        "seg": save_nifti(mask, tmp_path / "gt.nii.gz"),
        "ed": 0,
        "es": 4,
    }
    out = cardiac_preprocessing((32, 32), pixdim=(1.25, 1.25))(entry)
    assert out["slice_index"] == 2  # LV and MYO on slices 1-3
    img, seg = out["image"][0], out["seg"][0]
    # on the 24 x 20 slice the hot voxel is above the 99.5th percentile (the LV blood, 200) and the background (20)
    # is the 0.5th: LV -> 1, myocardium (60) -> (60 - 20) / (200 - 20), background -> 0; min-max scaling would
    # have put the LV at 2e-4
    assert abs(float(img[seg == 1].median()) - 1.0) < 1e-4
    assert abs(float(img[seg == 2].median()) - 40 / 180) < 1e-4
    assert float(img.max()) == 1.0 and float(img[seg == 0].median()) == 0.0


def test_heart_centred_crop_near_border():
    seg = torch.zeros(1, 40, 30)
    seg[0, 2:6, 25:29] = 1  # heart in a corner
    img = torch.rand(1, 40, 30)
    out = CropAroundHeartd(("image", "seg"), spatial_size=(16, 16))({"image": img, "seg": seg})
    assert out["image"].shape == (1, 16, 16) and out["seg"].shape == (1, 16, 16)
    # centroid (3.5, 26.5) -> voxel (4, 26) [rounded half to even] lands at the window centre (8, 8)
    assert torch.equal(torch.nonzero(out["seg"][0]).double().mean(0), torch.tensor([7.5, 8.5], dtype=torch.double))
    torch.testing.assert_close(out["image"][0, 4:12, 0:12], img[0, 0:8, 18:30])  # the same voxels, shifted
    assert float(out["image"][0, :4].abs().sum()) == 0.0  # zero padding outside the image
    plain = CropAroundHeartd("image", spatial_size=(10, 10))({"image": img})  # no mask: image centre
    torch.testing.assert_close(plain["image"][0], img[0, 15:25, 10:20])
    with pytest.raises(ValueError, match="does not match the 2-D input"):
        CropAroundHeartd("image", spatial_size=(8, 8, 8))({"image": img})


def test_select_frame_and_slice_units():
    image, mask = heart_phantom(shape=(24, 20, 5, 8), ed=6, es=2, lv_slices=(0, 1, 2, 3))
    mask[..., 4, 6] = 3  # RV only on the apical slice: must not count as mid-ventricular
    d = SelectFramed(("image", "seg"), frame="ed")({"image": torch.as_tensor(image), "seg": torch.as_tensor(mask),
                                                   "ed": 6})  # fmt: skip
    assert d["image"].shape == (1, 24, 20, 5)
    torch.testing.assert_close(d["image"][0], torch.as_tensor(image[..., 6]))
    d = SelectMidVentricularSliced(("image", "seg"))(d)
    assert d["slice_index"] == 1 and d["image"].shape == (1, 24, 20)  # slices 0-3 -> (4 - 1) // 2 = 1
    torch.testing.assert_close(d["image"][0], torch.as_tensor(image[..., 1, 6]))
    fixed = SelectFramed("image", frame=2)({"image": torch.as_tensor(image)})
    torch.testing.assert_close(fixed["image"][0], torch.as_tensor(image[..., 2]))
    three_d = SelectFramed("image")({"image": torch.zeros(4, 5, 6), "ed": 0})  # a single 3-D frame
    assert three_d["image"].shape == (1, 4, 5, 6)
    only_myo = torch.zeros(1, 4, 4, 6)
    only_myo[0, 1, 1, 4:6] = 2
    assert SelectMidVentricularSliced("seg")({"seg": only_myo})["slice_index"] == 4  # fallback: any of the labels
    assert SelectMidVentricularSliced("image")({"image": torch.zeros(1, 4, 4, 7)})["slice_index"] == 3


def _chain(err: BaseException) -> str:
    """Messages of an exception and its causes (MONAI's Compose wraps errors in 'applying transform ...')."""
    out = []
    while err is not None:
        out.append(f"{type(err).__name__}: {err}")
        err = err.__cause__
    return "\n".join(out)


def test_frame_errors(tmp_path):
    image, _ = heart_phantom(ed=0, es=4)
    path = save_nifti(image, tmp_path / "cine.nii.gz")
    pre = cardiac_preprocessing((32, 32))
    cases = [
        (
            pre,
            {"image": path, "ed": 8},
            r"ValueError: SelectFramed: frame 'ed'=8 is outside the 8 frame\(s\) of .*cine",
        ),
        (cardiac_preprocessing((32, 32), frame="es"), {"image": path, "ed": 0, "es": -1}, r"frame 'es'=-1 is outside"),
        (pre, {"image": path}, "KeyError: .*frame key 'ed' not in the data"),
        (pre, {"image": path, "ed": 1.5}, "ValueError: .*must be an integer"),
    ]
    for transform, data, match in cases:
        with pytest.raises(RuntimeError) as info:
            transform(data)
        assert re.search(match, _chain(info.value)), _chain(info.value)
    with pytest.raises(ValueError, match="frame 'ed'=8 is outside"):  # the transform itself raises ValueError
        SelectFramed("image")({"image": torch.zeros(2, 2, 2, 8), "ed": 8})
    with pytest.raises(ValueError, match=r"must be 3-D or 4-D"):
        SelectFramed("image")({"image": torch.zeros(2, 2), "ed": 0})


def test_unreadable_files_are_named(tmp_path):
    image, _ = heart_phantom(ed=0, es=4)
    good = save_nifti(image, tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    raw = open(good, "rb").read()
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti" * 50))
    load = LoadCardiacImaged("image", reader="NibabelReader")
    for bad in (truncated, garbage, tmp_path / "missing.nii.gz"):
        with pytest.raises(RuntimeError, match=rf"cannot read .*{bad.name} \(key 'image'\)"):
            load({"image": str(bad)})
    with pytest.raises(RuntimeError) as info:  # inside the composed preprocessing too
        cardiac_preprocessing((32, 32))({"image": str(truncated), "ed": 0})
    assert "cannot read " + str(truncated) in _chain(info.value)


def test_image_only_false_keeps_header(entries):
    out = LoadCardiacImaged(("image", "seg"), image_only=False)(dict(entries[0]))
    assert out["image_meta_dict"]["filename_or_obj"] == entries[0]["image"]
    assert out["image"].shape == nib.load(entries[0]["image"]).shape


def test_real_layout_end_to_end(tmp_path):
    base = build_real_layout(tmp_path)
    data = load_mnms_datalist(base, split="all", include_unlabeled=True)
    for entry in data:
        out = cardiac_preprocessing((32, 32), pixdim=(1.25, 1.25))(dict(entry))
        assert out["image"].shape == (1, 32, 32)
        if entry["seg"] is not None:
            assert out["slice_index"] == 2 and {1.0, 2.0} <= set(torch.unique(out["seg"]).tolist())


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
@pytest.mark.parametrize("frame", ["ed", "es"])
def test_mnms2_entries_end_to_end(tmp_path, reader, frame):
    """M&Ms-2 entries (one 3-D frame per file, extra path keys) go through the preprocessing as they are."""
    if reader == "ITKReader":
        pytest.importorskip("itk")
    data = load_mnms2_datalist(build_mnms2_layout(tmp_path), split="all", frame=frame)
    pre = cardiac_preprocessing((32, 32), pixdim=(1.25, 1.25), frame=frame, reader=reader)
    lv_areas = set()
    for entry in data:
        out = pre(dict(entry))
        img, seg = out["image"], out["seg"]
        assert img.shape == (1, 32, 32) and seg.shape == (1, 32, 32) and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) == pytest.approx(1.0)
        assert out["slice_index"] == 2  # LV and MYO on slices 1-3 of the phantom
        assert {1.0, 2.0} <= set(torch.unique(seg).tolist()) <= {0.0, 1.0, 2.0, 3.0}
        assert img[seg == 1].mean() > img[seg == 2].mean() + 0.2  # the image matches the mask
        assert (out["group"], out["subject"], out["es_image"]) == (entry["group"], entry["subject"], entry["es_image"])
        lv_areas.add(int((seg == 1).sum()))
    assert len(lv_areas) == 1  # the same phantom frame for every subject
    native = heart_phantom(shape=(24, 20, 5, 8), ed=0, es=4)[1][..., 2, 0 if frame == "ed" else 4]
    assert abs(lv_areas.pop() - (native == 1).sum()) <= 0.05 * (native == 1).sum()  # 1.25 mm in and out


def _rotation(axis: str, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def _oblique_entry(folder, rotation, spacing=(1.5, 1.25, 10.0)):
    """A 96 x 96 x 5 x 8 cine and mask with an elliptic LV (radius 14 voxels) in a MYO ring on slices 1-3,
    saved with the affine ``rotation @ diag(spacing)``; returns the entry and the true LV area in mm^2."""
    xx, yy = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    r = np.hypot(xx - 48, yy - 48)
    image = np.full((96, 96, 5, 8), 20.0, np.float32)
    mask = np.zeros((96, 96, 5, 8), np.uint8)
    for z in (1, 2, 3):
        image[..., z, :][r < 20] = 60.0
        image[..., z, :][r < 14] = 200.0
        for t in (0, 4):
            mask[..., z, t][r < 20] = 2
            mask[..., z, t][r < 14] = 1
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-30.0, 20.0, 5.0)
    paths = []
    for name, array in (("cine", image), ("gt", mask)):
        img = nib.Nifti1Image(array, affine)
        img.header.set_zooms((*spacing, 40.0))
        paths.append(os.path.join(folder, f"{name}.nii.gz"))
        nib.save(img, paths[-1])
    true_area = float((mask[..., 2, 0] == 1).sum()) * spacing[0] * spacing[1]
    return {"image": paths[0], "seg": paths[1], "ed": 0, "es": 4}, true_area


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
@pytest.mark.parametrize(
    "name, rotation",
    [
        ("axial", np.eye(3)),
        ("tilted about y", _rotation("y", 40)),
        ("tilted about x and y", _rotation("x", 50) @ _rotation("y", 35)),
        ("rotated in plane and flipped", _rotation("z", 30) @ np.diag([-1.0, 1.0, 1.0])),
    ],
)
def test_oblique_stack_keeps_physical_size(tmp_path, reader, name, rotation):
    """The 2-D slice gets its true in-plane voxel sizes, so resampling preserves the LV area of a tilted stack."""
    if reader == "ITKReader":
        pytest.importorskip("itk")
    entry, true_area = _oblique_entry(tmp_path, rotation)
    out = cardiac_preprocessing((160, 160), pixdim=(1.0, 1.0), reader=reader)(dict(entry))
    np.testing.assert_allclose(out["image"].pixdim[:2].numpy(), (1.0, 1.0), atol=1e-4)
    area = float((out["seg"] == 1).sum()) * 1.0 * 1.0
    assert abs(area - true_area) < 0.03 * true_area, (name, area, true_area)
    # before resampling: the selected slice carries the true in-plane spacings (1.5, 1.25)
    keys = ("image", "seg")
    sliced = SelectMidVentricularSliced(keys)(SelectFramed(keys)(LoadCardiacImaged(keys, reader=reader)(dict(entry))))
    assert sliced["slice_index"] == 2
    for key in keys:
        assert sliced[key].shape == (1, 96, 96) and sliced[key].affine.shape == (3, 3)
        np.testing.assert_allclose(sliced[key].pixdim[:2].numpy(), (1.5, 1.25), atol=1e-6)


def test_slice_affine_2d_orientation():
    def affine(rotation, spacing=(1.5, 1.25, 8.0), origin=(3.0, -2.0, 7.0)):
        a = np.eye(4)
        a[:3, :3] = rotation @ np.diag(spacing)
        a[:3, 3] = origin
        return a

    # in-plane rotation: the 2-D affine is the same rotation with the same spacings
    out = slice_affine_2d(affine(_rotation("z", 30)))
    np.testing.assert_allclose(out[:2, :2], _rotation("z", 30)[:2, :2] @ np.diag([1.5, 1.25]), atol=1e-12)
    np.testing.assert_allclose(out[:2, 2], (3.0, -2.0))
    np.testing.assert_allclose(out[2], (0.0, 0.0, 1.0))
    # tilt about y: x and y of the slice still run along the scanner's x and y, with the true spacings
    out = slice_affine_2d(torch.as_tensor(affine(_rotation("y", 40))))
    np.testing.assert_allclose(out[:2, :2], np.diag([1.5, 1.25]), atol=1e-12)
    # a flip (RAS vs LPS storage) stays a reflection; spacings are column norms in every case
    flipped = slice_affine_2d(affine(np.diag([-1.0, -1.0, 1.0]) @ _rotation("x", 25)))
    np.testing.assert_allclose(np.linalg.norm(flipped[:2, :2], axis=0), (1.5, 1.25))
    np.testing.assert_allclose(flipped[:2, :2], np.diag([-1.5, -1.25]), atol=1e-12)
    mirrored = slice_affine_2d(affine(np.diag([-1.0, 1.0, 1.0]) @ _rotation("y", 20)))
    assert np.linalg.det(mirrored[:2, :2]) < 0
    with pytest.raises(ValueError, match="4 x 4"):
        slice_affine_2d(np.eye(3))


def test_dataloader_batches_group_ids(entries):
    ds = Dataset([dict(e) for e in entries], transform=cardiac_preprocessing((64, 64)))
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["seg"].shape == (4, 1, 64, 64)
    assert batch["group"].dtype == torch.int64 and batch["group"].tolist() == [e["group"] for e in entries]
    assert batch["label"].tolist() == [e["label"] for e in entries]


def test_augmentation(entries):
    pre = cardiac_preprocessing((64, 64))(dict(entries[0]))
    aug = cardiac_augmentation(prob=1.0)
    aug.set_random_state(seed=0)
    a = aug({k: v.clone() if torch.is_tensor(v) else v for k, v in pre.items()})
    aug.set_random_state(seed=0)
    b = aug({k: v.clone() if torch.is_tensor(v) else v for k, v in pre.items()})
    assert a["image"].shape == (1, 64, 64) and a["seg"].shape == (1, 64, 64)
    assert 0.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0
    assert set(torch.unique(a["seg"]).tolist()) <= {0.0, 1.0, 2.0, 3.0}  # nearest interpolation of labels
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor())  # seeded
    assert not torch.allclose(a["image"].as_tensor(), pre["image"].as_tensor())  # it did change the image
    # the label map moves with the image: the blood pool stays brighter than the myocardium
    assert a["image"][a["seg"] == 1].mean() > a["image"][a["seg"] == 2].mean()
    image_only = cardiac_augmentation(keys=("image",), prob=1.0)({"image": pre["image"].clone()})
    assert image_only["image"].shape == (1, 64, 64)


def test_transforms_from_config(entries):
    """Usable from a bundle config through their dotted _target_."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({
        "pre": {"_target_": "scripts.cardiac_transforms.cardiac_preprocessing", "spatial_size": [48, 48]},
        "crop": {"_target_": "scripts.cardiac_transforms.CropAroundHeartd", "keys": ["image"],
                 "spatial_size": [8, 8]},
    })  # fmt: skip
    out = parser.get_parsed_content("pre")(dict(entries[0]))
    assert out["image"].shape == (1, 48, 48)
    assert parser.get_parsed_content("crop")({"image": torch.zeros(1, 20, 20)})["image"].shape == (1, 8, 8)
    assert os.path.isfile(entries[0]["image"])


def test_docstring_examples_run():
    import doctest

    from scripts import cardiac_transforms as transforms

    result = doctest.testmod(transforms)
    assert result.attempted > 0 and result.failed == 0, result
