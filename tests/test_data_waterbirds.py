"""Waterbirds datalist reader and the synthetic stand-in."""

from __future__ import annotations

import csv
import hashlib
import logging

import numpy as np
import pytest
from PIL import Image

from monai_groupdistil.data.waterbirds import (
    WATERBIRDS_COLUMNS,
    load_waterbirds_datalist,
    make_synthetic_waterbirds,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_waterbirds(tmp_path_factory.mktemp("wb"), n_images=400, seed=3, image_size=32)


def _rows(root):
    with open(f"{root}/metadata.csv", newline="") as f:
        return list(csv.reader(f))


def test_synthetic_layout_and_header(synthetic):
    rows = _rows(synthetic)
    assert tuple(rows[0]) == WATERBIRDS_COLUMNS
    assert len(rows) == 401
    splits = [int(r[3]) for r in rows[1:]]
    assert (splits.count(0), splits.count(1), splits.count(2)) == (240, 80, 80)
    first = rows[1]
    assert first[1].split("/")[0] in ("014.Indigo_Bunting", "045.Northern_Fulmar") and first[1].endswith(".jpg")
    image = Image.open(f"{synthetic}/{first[1]}")
    assert image.mode == "RGB" and image.size == (32, 32)


def test_synthetic_spurious_correlation_in_train_only(synthetic):
    data = {s: load_waterbirds_datalist(synthetic, s) for s in ("train", "val", "test")}
    agree = np.mean([d["label"] == d["place"] for d in data["train"]])
    assert 0.90 <= agree <= 0.99  # 95% on 240 draws
    held_out = data["val"] + data["test"]
    assert 0.38 <= np.mean([d["label"] == d["place"] for d in held_out]) <= 0.62
    assert {d["group"] for d in held_out} == {0, 1, 2, 3}


def test_synthetic_backgrounds_and_birds_differ(synthetic):
    data = load_waterbirds_datalist(synthetic, "all")
    pixels = {d["img_id"]: np.asarray(Image.open(d["image"]), dtype=float) / 255 for d in data}
    corner = {k: v[:6, :6].reshape(-1, 3).mean(0) for k, v in pixels.items()}  # background only
    blue_water = np.mean([corner[d["img_id"]][2] for d in data if d["place"] == 1])
    blue_land = np.mean([corner[d["img_id"]][2] for d in data if d["place"] == 0])
    assert blue_water - blue_land > 0.2
    centre = {k: v[12:20, 12:20].reshape(-1, 3).mean(0) for k, v in pixels.items()}  # the bird
    red_minus_blue = {
        y: np.mean([centre[d["img_id"]][0] - centre[d["img_id"]][2] for d in data if d["label"] == y]) for y in (0, 1)
    }
    assert red_minus_blue[0] - red_minus_blue[1] > 0.2  # warm landbirds, pale waterbirds


def test_synthetic_is_deterministic(tmp_path):
    a = make_synthetic_waterbirds(tmp_path / "a", n_images=12, seed=5, image_size=16)
    b = make_synthetic_waterbirds(tmp_path / "b", n_images=12, seed=5, image_size=16)
    c = make_synthetic_waterbirds(tmp_path / "c", n_images=12, seed=6, image_size=16)
    digest = lambda root: hashlib.sha256(  # noqa: E731
        b"".join(open(d["image"], "rb").read() for d in load_waterbirds_datalist(root, "all"))
    ).hexdigest()
    assert _rows(a) == _rows(b) and digest(a) == digest(b)
    assert digest(a) != digest(c)


def _real_layout(root, rows):
    """A hand-built folder written like the release's metadata.csv (pandas-style, index-free)."""
    root.mkdir()
    with open(root / "metadata.csv", "w", newline="") as f:
        f.write("img_id,img_filename,y,split,place,place_filename\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")
    for r in rows:
        (root / r[1]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / r[1])
    return root


REAL_ROWS = [
    [1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 2, 0, "/o/ocean/00002178.jpg"],
    [2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, 0, 1, "/o/ocean/00000123.jpg"],
    [3, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 1, 1, 1, "/l/lake/natural/00000065.jpg"],
    [4, "014.Indigo_Bunting/Indigo_Bunting_0001_12469.jpg", 0, 0, 0, "/b/bamboo_forest/00000711.jpg"],
    [5, "014.Indigo_Bunting/Indigo_Bunting_0002_11574.jpg", 0, 0, 1, "/o/ocean/00000112.jpg"],
]


def test_loader_on_real_layout(tmp_path):
    root = _real_layout(tmp_path / "waterbird_complete95_forest2water2", REAL_ROWS)
    train = load_waterbirds_datalist(root, "train")
    assert [d["img_id"] for d in train] == ["2", "4", "5"]
    assert [(d["label"], d["place"], d["group"], d["group_name"]) for d in train] == [
        (1, 1, 3, "waterbird/water"),
        (0, 0, 0, "landbird/land"),
        (0, 1, 1, "landbird/water"),
    ]
    assert train[0]["image"] == str(root / REAL_ROWS[1][1]) and train[0]["split"] == "train"
    assert [d["group"] for d in load_waterbirds_datalist(root, "test")] == [2]
    assert len(load_waterbirds_datalist(root, "all")) == 5


def test_loader_bad_input(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match=r"metadata not found: .*nowhere/metadata.csv"):
        load_waterbirds_datalist(tmp_path / "nowhere")
    root = _real_layout(tmp_path / "wb", REAL_ROWS)
    with pytest.raises(ValueError, match="split must be one of"):
        load_waterbirds_datalist(root, "training")
    (root / REAL_ROWS[3][1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed .* do not exist, e.g. .*Indigo_Bunting_0001"):
        load_waterbirds_datalist(root, "train")
    with caplog.at_level(logging.WARNING, logger="monai_groupdistil.data"):
        assert len(load_waterbirds_datalist(root, "train", skip_missing=True)) == 2
    assert "1 listed image(s) are missing" in caplog.text
    text = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_text(text.replace(",place,", ",location,"))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['place'\]"):
        load_waterbirds_datalist(root)
    (root / "metadata.csv").write_text(text.replace("Laysan_Albatross_0002_1027.jpg,1,1,1", "x.jpg,7,1,1"))
    with pytest.raises(ValueError, match=r"line 4: column 'y' must be one of \(0, 1\), got '7'"):
        load_waterbirds_datalist(root, "all", check_files=False)


def test_synthetic_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="correlation must lie in"):
        make_synthetic_waterbirds(tmp_path, n_images=10, correlation=1.5)
    with pytest.raises(ValueError, match="n_images must be >= 3"):
        make_synthetic_waterbirds(tmp_path, n_images=2)
    assert not (tmp_path / "metadata.csv").exists()
