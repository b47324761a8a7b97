"""Natural-image (ImageNet-style) preprocessing, augmentation and the inference datalist."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from PIL import Image

from monai_groupdistil.data.waterbirds import load_waterbirds_datalist
from scripts.natural_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    natural_image_augmentation,
    natural_image_datalist,
    natural_image_preprocessing,
)
from scripts.synthetic_waterbirds import make_synthetic_waterbirds

# MONAI tries its other readers (ITK) on a file PIL cannot read; itk warns when it is imported lazily
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    return make_synthetic_waterbirds(tmp_path_factory.mktemp("wb"), n_images=12, seed=2, image_size=40)


def _write(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def _gradient(h: int, w: int) -> np.ndarray:
    """An (h, w, 3) uint8 image whose channels differ: R grows down the rows, G along the columns, B constant."""
    r = np.repeat(np.linspace(0, 255, h)[:, None], w, 1)
    g = np.repeat(np.linspace(0, 255, w)[None, :], h, 0)
    return np.stack([r, g, np.full((h, w), 200.0)], -1).round().astype(np.uint8)


def test_without_resizing_or_normalising_it_equals_the_pixels_over_255(tmp_path):
    """Channel-first (3, H, W) in the file's row/column order, values / 255 (like torchvision's ToTensor)."""
    pixels = _gradient(20, 30)
    path = _write(tmp_path / "a.png", pixels)
    out = natural_image_preprocessing(spatial_size=(20, 30), resize=None, mean=None, std=None)({"image": path})
    expected = torch.as_tensor(pixels).permute(2, 0, 1).float() / 255
    assert out["image"].shape == (3, 20, 30) and out["image"].dtype == torch.float32
    assert torch.allclose(out["image"].as_tensor(), expected, atol=1e-6)


def test_imagenet_normalisation_per_channel(tmp_path):
    pixels = _gradient(16, 16)
    path = _write(tmp_path / "a.png", pixels)
    raw = natural_image_preprocessing(16, None, mean=None, std=None)({"image": path})["image"]
    out = natural_image_preprocessing(16, None)({"image": path})["image"]
    for c in range(3):
        expected = (raw[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], expected, atol=1e-5)


def test_resize_then_centre_crop(tmp_path):
    """A 100 x 60 image resized to 40 x 40 then centre-cropped to 32 x 24 keeps the middle of the resized image."""
    path = _write(tmp_path / "a.png", _gradient(100, 60))
    full = natural_image_preprocessing((40, 40), (40, 40), mean=None, std=None)({"image": path})["image"]
    crop = natural_image_preprocessing((32, 24), (40, 40), mean=None, std=None)({"image": path})["image"]
    assert full.shape == (3, 40, 40) and crop.shape == (3, 32, 24)
    assert torch.allclose(crop, full[:, 4:36, 8:32])
    # R (rows) spans the full range after resizing: the aspect ratio is not kept (as in the group-DRO code), and
    # the area interpolation averages blocks of 2.5 rows without darkening the border
    assert float(full[0, 0].mean()) < 0.02 and float(full[0, -1].mean()) > 0.98
    assert torch.allclose(full[2], torch.full((40, 40), 200 / 255), atol=1e-6)


def test_grey_and_rgba_files_become_rgb(tmp_path):
    grey = _write(tmp_path / "grey.png", np.full((10, 10), 128, np.uint8), mode="L")
    rgba = _write(tmp_path / "rgba.png", np.full((10, 10, 4), 50, np.uint8), mode="RGBA")
    pre = natural_image_preprocessing(8, 10, mean=None, std=None)
    for path, value in ((grey, 128), (rgba, 50)):
        img = pre({"image": path})["image"]
        assert img.shape == (3, 8, 8)
        assert torch.allclose(img, torch.full_like(img, value / 255), atol=1e-6)


def test_other_keys_pass_through_and_batches_collate(waterbirds):
    data = load_waterbirds_datalist(waterbirds, "all")
    loader = DataLoader(Dataset(data, natural_image_preprocessing(32, 36)), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["group"].tolist() == [d["group"] for d in data[:4]]
    assert batch["img_id"] == [d["img_id"] for d in data[:4]]


def test_augmentation_shapes_flip_and_crop(tmp_path):
    path = _write(tmp_path / "a.png", _gradient(36, 36))
    pre = natural_image_preprocessing(32, 36, center_crop=False, mean=None, std=None)
    base = pre({"image": path})
    assert base["image"].shape == (3, 36, 36)
    # flip only: every output is the image resized to 32 x 32, flipped left-right or not
    flip = natural_image_augmentation(32, scale=(1.0, 1.0), flip_prob=0.5)
    flip.set_random_state(0)
    outs = [flip(dict(base))["image"].as_tensor() for _ in range(20)]
    plain = outs[0] if outs[0][1, 0, 0] < outs[0][1, 0, -1] else outs[0].flip(-1)
    flipped = [bool(o[1, 0, 0] > o[1, 0, -1]) for o in outs]  # G grows along the columns unless flipped
    assert 3 <= sum(flipped) <= 17
    for o, f in zip(outs, flipped):
        assert torch.allclose(o.flip(-1) if f else o, plain, atol=1e-5)
    # random resized crop: output size fixed, content differs between draws, values stay in the input range
    crop = natural_image_augmentation((32, 32), scale=(0.5, 0.6), flip_prob=0.0)
    crop.set_random_state(1)
    draws = [crop(dict(base))["image"] for _ in range(5)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.allclose(draws[0], d) for d in draws[1:])
    assert all(float(d.min()) >= -1e-5 and float(d.max()) <= 1 + 1e-5 for d in draws)
    # a crop of at most 60% of the area spans less of the rows' range than the whole image does
    assert all(float(d[0].max() - d[0].min()) < 0.85 for d in draws)


def test_train_chain_is_reproducible(waterbirds):
    entry = load_waterbirds_datalist(waterbirds, "train")[0]
    chain = Compose([natural_image_preprocessing(32, 36, center_crop=False), natural_image_augmentation(32)])
    a = chain.set_random_state(7)(dict(entry))["image"]
    b = chain.set_random_state(7)(dict(entry))["image"]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_size": 0}, "spatial_size must be a positive int"),
        ({"spatial_size": (32, 32, 32)}, "spatial_size must be a positive int"),
        ({"spatial_size": 64, "resize": 48}, "resize (48, 48) must be at least spatial_size (64, 64)"),
        ({"mean": None}, "mean and std must both be given or both be None"),
        ({"mean": (0.5, 0.5)}, "one value per channel, got 2 and 3"),
        ({"std": (0.2, 0.0, 0.2)}, "std must not contain 0"),
    ],
)
def test_preprocessing_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        natural_image_preprocessing(**{"spatial_size": 32, "resize": 36, **kwargs})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale": (0.0, 1.0)}, "scale must satisfy"),
        ({"scale": (0.9, 0.5)}, "scale must satisfy"),
        ({"scale": (0.5, 1.2)}, "scale must satisfy"),
        ({"flip_prob": 1.5}, "flip_prob must lie in"),
    ],
)
def test_augmentation_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        natural_image_augmentation(32, **kwargs)


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(RuntimeError) as info:
        natural_image_preprocessing(8, 8)({"image": str(path)})
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError) and f"cannot find a suitable reader for file: {path}" in str(cause)


# ------------------------------------------------------------------ inference datalist


def test_datalist_of_a_release_keeps_ids_labels_and_groups(waterbirds):
    entries = natural_image_datalist(waterbirds, split="all")
    expected = load_waterbirds_datalist(waterbirds, "all")
    assert [e["img_id"] for e in entries] == [d["img_id"] for d in expected]
    assert [e["group"] for e in entries] == [d["group"] for d in expected]
    assert len(natural_image_datalist(waterbirds)) == len(load_waterbirds_datalist(waterbirds, "test"))


def test_datalist_of_a_folder_is_recursive_and_sorted(tmp_path):
    for name in ("b/2.JPG", "a/1.png", "c.jpeg"):
        _write(tmp_path / name, _gradient(8, 8))
    (tmp_path / "notes.txt").write_text("skip me")
    entries = natural_image_datalist(tmp_path, id_key="name")
    assert [e["name"] for e in entries] == ["a/1.png", "b/2.JPG", "c.jpeg"]
    assert all(e["image"].startswith(str(tmp_path)) for e in entries)


def test_datalist_of_a_json_file(tmp_path):
    _write(tmp_path / "imgs" / "x.png", _gradient(8, 8))
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": "imgs/x.png", "img_id": "first"}, {"image": str(tmp_path / "y.png")}]))
    entries = natural_image_datalist(listing)
    assert entries == [
        {"image": str(tmp_path / "imgs" / "x.png"), "img_id": "first"},
        {"image": str(tmp_path / "y.png"), "img_id": "y.png"},
    ]


def test_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        natural_image_datalist(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image"):
        natural_image_datalist(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"path": "x.png"}]))
    with pytest.raises(ValueError, match="entry 0 must be an object with an 'image' key"):
        natural_image_datalist(bad)
    bad.write_text(json.dumps({"image": "x.png"}))
    with pytest.raises(ValueError, match="a JSON list of entries is expected"):
        natural_image_datalist(bad)
    text = tmp_path / "a.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="not a JSON datalist"):
        natural_image_datalist(text)
