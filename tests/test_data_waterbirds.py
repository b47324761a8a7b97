"""Waterbirds datalist reader and the synthetic stand-in."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_groupdistil.data.waterbirds import WATERBIRDS_COLUMNS, load_waterbirds_datalist
from scripts import synthetic_waterbirds
from scripts.synthetic_waterbirds import _render, make_synthetic_waterbirds


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


def test_synthetic_backgrounds_differ(synthetic):
    data = load_waterbirds_datalist(synthetic, "all")
    pixels = {d["img_id"]: np.asarray(Image.open(d["image"]), dtype=float) / 255 for d in data}
    corner = {k: v[:6, :6].reshape(-1, 3).mean(0) for k, v in pixels.items()}  # background (almost always)
    blue_water = np.mean([corner[d["img_id"]][2] for d in data if d["place"] == 1])
    blue_land = np.mean([corner[d["img_id"]][2] for d in data if d["place"] == 0])
    assert blue_water - blue_land > 0.2


def _elongation(mask):
    """Ratio of the principal axes of the mask's pixel coordinates."""
    coords = np.argwhere(mask).astype(float)
    eig = np.linalg.eigvalsh(np.cov(coords.T))
    return float(np.sqrt(eig[1] / eig[0]))


def _birds(y, n=40, **kwargs):
    rng = np.random.default_rng(y)
    return [_render(rng, y, place=int(rng.integers(2)), size=64, **kwargs) for _ in range(n)]


def test_synthetic_bird_shape_follows_the_label_and_is_small():
    land, water = _birds(0), _birds(1)
    assert np.mean([_elongation(m) for _, m in water]) > np.mean([_elongation(m) for _, m in land]) + 0.5
    area = np.mean([m.mean() for _, m in land + water])
    assert 0.02 < area < 0.12  # the background covers most of the image
    small = np.mean([m.mean() for _, m in _birds(0, bird_scale=0.5) + _birds(1, bird_scale=0.5)])
    assert small == pytest.approx(area / 4, rel=0.25)  # the area scales with bird_scale squared


def _bird_colour(birds):
    return np.mean([img[m].mean(0) / 255 for img, m in birds], axis=0)


def test_synthetic_colour_cue():
    warm = lambda c: c[0] - c[2]  # noqa: E731  red minus blue
    with_cue = {y: _bird_colour(_birds(y, n=200, noise=0.0, colour_cue=1.0)) for y in (0, 1)}
    assert warm(with_cue[0]) - warm(with_cue[1]) > 0.3  # warm landbirds; pale, dark and slate waterbirds
    without = {y: _bird_colour(_birds(y, n=200, noise=0.0, colour_cue=0.0)) for y in (0, 1)}
    assert np.abs(without[0] - without[1]).max() < 0.08  # same palette for both classes


def test_synthetic_landbird_colour_cue_applies_to_landbirds_only(tmp_path, monkeypatch):
    """``landbird_colour_cue`` is the landbirds' colour cue (what ``_render`` does with a cue:
    ``test_synthetic_colour_cue``), ``colour_cue`` stays the waterbirds'; equal to ``colour_cue`` it changes nothing."""
    base = dict(n_images=40, seed=2, image_size=16)
    a = make_synthetic_waterbirds(tmp_path / "a", colour_cue=0.9, **base)
    b = make_synthetic_waterbirds(tmp_path / "b", colour_cue=0.9, landbird_colour_cue=0.9, **base)
    pixels = lambda root: [np.asarray(Image.open(d["image"])) for d in load_waterbirds_datalist(root, "all")]  # noqa: E731
    assert _rows(a) == _rows(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))

    cues = []
    original = synthetic_waterbirds._render

    def recording(rng, y, place, size, bird_scale, noise, colour_cue):
        cues.append((y, colour_cue))
        return original(rng, y, place, size, bird_scale, noise, colour_cue)

    monkeypatch.setattr(synthetic_waterbirds, "_render", recording)
    make_synthetic_waterbirds(tmp_path / "c", colour_cue=0.9, landbird_colour_cue=0.2, **base)
    assert {c for y, c in cues if y == 0} == {0.2} and {c for y, c in cues if y == 1} == {0.9}
    assert len(cues) == 40
    with pytest.raises(ValueError, match=r"landbird_colour_cue must lie in \[0, 1\] or be None, got 1.5"):
        make_synthetic_waterbirds(tmp_path / "d", n_images=10, landbird_colour_cue=1.5)
    assert not (tmp_path / "d" / "metadata.csv").exists()


def test_synthetic_group_bird_scale_and_place_noise(tmp_path, monkeypatch):
    """``group_bird_scale`` multiplies the bird scale of the named groups (group = 2 * y + place) and no other's (a
    factor of 1 changes nothing, image for image); ``place_noise`` sets the noise of every image of a place."""
    base = dict(n_images=40, seed=3, image_size=16, bird_scale=0.8)
    pixels = lambda root: [np.asarray(Image.open(d["image"])) for d in load_waterbirds_datalist(root, "all")]  # noqa: E731
    a = make_synthetic_waterbirds(tmp_path / "a", **base)
    b = make_synthetic_waterbirds(tmp_path / "b", group_bird_scale={"landbird/land": 1.0}, **base)
    assert _rows(a) == _rows(b) and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))

    calls = []  # (group, place, bird scale, noise) of every image _render draws
    original = synthetic_waterbirds._render

    def recording(rng, y, place, size, bird_scale, noise, colour_cue):
        calls.append((2 * y + place, place, bird_scale, noise))
        return original(rng, y, place, size, bird_scale, noise, colour_cue)

    monkeypatch.setattr(synthetic_waterbirds, "_render", recording)
    c = make_synthetic_waterbirds(tmp_path / "c", group_bird_scale={"landbird/land": 0.5}, **base)
    assert {s for g, _, s, _ in calls if g == 0} == {0.4} and {s for g, _, s, _ in calls if g != 0} == {0.8}
    groups = [d["group"] for d in load_waterbirds_datalist(c, "all")]
    assert len(calls) == 40 and [g for g, *_ in calls] == groups  # every image, in the datalist's order
    # place_noise: the noise level of every image of a place, either class; the other place keeps ``noise``
    calls.clear()
    make_synthetic_waterbirds(tmp_path / "e", place_noise={"land": 0.3}, noise=0.02, **base)
    assert {n for _, p, _, n in calls if p == 0} == {0.3} and {n for _, p, _, n in calls if p == 1} == {0.02}
    for bad in ({"forest": 0.3}, {"land": -0.1}, {"water": float("inf")}):
        with pytest.raises(ValueError, match=r"place_noise must map 'land' and/or 'water' to a noise level >= 0"):
            make_synthetic_waterbirds(tmp_path / "d", n_images=10, place_noise=bad)
    with pytest.raises(ValueError, match=r"group_bird_scale has unknown groups \['bird/land'\]; the groups are"):
        make_synthetic_waterbirds(tmp_path / "d", n_images=10, group_bird_scale={"bird/land": 0.5})
    with pytest.raises(ValueError, match=r"group_bird_scale\['waterbird/water'\] \* bird_scale must lie in \(0, 1.5\]"):
        make_synthetic_waterbirds(tmp_path / "d", n_images=10, group_bird_scale={"waterbird/water": 2.0})
    assert not (tmp_path / "d" / "metadata.csv").exists()


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
    for value in ("1.9", "inf", "nan", "one"):  # never truncated to a label, never a raw OverflowError
        (root / "metadata.csv").write_text(text.replace("Laysan_Albatross_0002_1027.jpg,1,1,1", f"x.jpg,{value},1,1"))
        with pytest.raises(ValueError, match=rf"line 4: column 'y' must be one of \(0, 1\), got '{value}'"):
            load_waterbirds_datalist(root, "all", check_files=False)
    (root / "metadata.csv").write_text(text.replace("Laysan_Albatross_0002_1027.jpg,1,1,1", "x.jpg,1.0,1,1.0"))
    assert load_waterbirds_datalist(root, "all", check_files=False)[2]["group"] == 3  # whole numbers written as floats


def test_synthetic_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="correlation must lie in"):
        make_synthetic_waterbirds(tmp_path, n_images=10, correlation=1.5)
    with pytest.raises(ValueError, match="n_images must be >= 3"):
        make_synthetic_waterbirds(tmp_path, n_images=2)
    with pytest.raises(ValueError, match=r"bird_scale must lie in \(0, 1.5\], got 0"):
        make_synthetic_waterbirds(tmp_path, n_images=10, bird_scale=0)
    with pytest.raises(ValueError, match=r"colour_cue must lie in \[0, 1\], got 2"):
        make_synthetic_waterbirds(tmp_path, n_images=10, colour_cue=2)
    with pytest.raises(ValueError, match="noise must be >= 0, got -0.1"):
        make_synthetic_waterbirds(tmp_path, n_images=10, noise=-0.1)
    assert not (tmp_path / "metadata.csv").exists()


def test_synthetic_refuses_an_existing_dataset_or_a_folder_of_other_files(tmp_path):
    small = {"n_images": 6, "image_size": 16}
    root = Path(make_synthetic_waterbirds(tmp_path / "a", **small))
    before = (root / "metadata.csv").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a dataset \(metadata.csv\); pass overwrite=True"):
        make_synthetic_waterbirds(root, seed=1, **small)
    assert (root / "metadata.csv").read_text() == before
    make_synthetic_waterbirds(root, seed=1, overwrite=True, **small)
    after = (root / "metadata.csv").read_text()
    assert after != before and all((root / r["img_filename"]).is_file() for r in csv.DictReader(io.StringIO(after)))
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is not empty and holds no metadata.csv"):
            make_synthetic_waterbirds(mine, overwrite=overwrite, **small)
    assert [p.name for p in mine.iterdir()] == ["photo.jpg"]


def test_command_line_refuses_an_existing_dataset_unless_overwrite(tmp_path):
    shared = Path(__file__).resolve().parents[1] / "bundles" / "shared"  # python -m scripts, from a bundle folder
    cmd = [
        sys.executable,
        "-m",
        "scripts",
        "waterbirds",
        "--root",
        str(tmp_path),
        "--n-images",
        "6",
        "--image-size",
        "16",
    ]
    make_synthetic_waterbirds(tmp_path, n_images=6, image_size=16)
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=shared)
    assert (
        refused.returncode == 2 and "error: " in refused.stderr and "--overwrite on the command line" in refused.stderr
    )
    replaced = subprocess.run(
        [*cmd, "--overwrite", "--seed", "4"], capture_output=True, text=True, timeout=120, cwd=shared
    )
    assert replaced.returncode == 0, replaced.stderr
    assert "_4.jpg" in (tmp_path / "metadata.csv").read_text()  # the file names carry the seed
