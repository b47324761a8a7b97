"""Waterbirds (Sagawa et al., 2020): the standard datalist reader and a small synthetic stand-in in the same layout.

The release (folder such as ``waterbird_complete95_forest2water2/``) holds ``metadata.csv`` with the columns
``img_id, img_filename, y, split, place, place_filename`` and the images at ``<root>/<img_filename>``
(``NNN.Species/Species_Name_XXXX_YYYY.jpg``). ``y`` is 0 for a landbird and 1 for a waterbird, ``place`` 0 for a
land and 1 for a water background, ``split`` 0 train, 1 val, 2 test. The groups are ``g = 2 * y + place``.

:py:func:`make_synthetic_waterbirds` writes small RGB JPEG images in that layout: a small foreground "bird" whose
shape and colour palette depend on the label, drawn at a random place, size and orientation on a background
texture (vertical forest-like stripes in greens and browns for land, horizontal waves in blues for water) that
agrees with the label in a fraction ``correlation`` of the training images (about 95% in the real data) and is
independent of it in the validation and test splits, as in Waterbirds. As in the real data, the background is the
large, easy cue and the bird the small, harder one, so a model trained without group information tends to learn
the background shortcut and fails on the rare groups (a landbird on water, a waterbird on land).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "WATERBIRDS_COLUMNS",
    "WATERBIRDS_GROUP_NAMES",
    "WATERBIRDS_SPLITS",
    "load_waterbirds_datalist",
    "make_synthetic_waterbirds",
]

logger = logging.getLogger("monai_groupdistil.data")

WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
WATERBIRDS_SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_GROUP_NAMES = ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")
_LABELS = ("landbird", "waterbird")
_PLACES = ("land", "water")
_SPECIES = {0: ("014.Indigo_Bunting", "Indigo_Bunting"), 1: ("045.Northern_Fulmar", "Northern_Fulmar")}
_PLACE_FILES = {0: "/b/bamboo_forest/{:08d}.jpg", 1: "/o/ocean/{:08d}.jpg"}


def load_waterbirds_datalist(
    root: str | os.PathLike, split: str = "train", check_files: bool = True, skip_missing: bool = False
) -> list[dict]:
    """Read the Waterbirds ``metadata.csv`` into a MONAI datalist.

    Args:
        root: the dataset folder holding ``metadata.csv`` and the image folders.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        check_files: check that every listed image exists.
        skip_missing: with ``check_files``, leave out (and log the number of) listed images that do not exist,
            instead of raising.

    Returns:
        one dict per image: ``image`` (path), ``label`` (``y``), ``place``, ``group`` (``2 * y + place``),
        ``group_name`` (``"landbird/land"``, ...), ``img_id``, ``split`` (name).

    Raises:
        FileNotFoundError: when ``metadata.csv`` is missing, or a listed image is (unless ``skip_missing``).
        ValueError: for an unknown ``split``, a CSV lacking a required column, or a row whose ``y``, ``place`` or
            ``split`` is not one of the documented values (the row and column are named).

    Example::

        >>> from monai_groupdistil.data import load_waterbirds_datalist, make_synthetic_waterbirds
        >>> import tempfile
        >>> root = make_synthetic_waterbirds(tempfile.mkdtemp(), n_images=16, image_size=32)
        >>> sorted(load_waterbirds_datalist(root, "train")[0])
        ['group', 'group_name', 'image', 'img_id', 'label', 'place', 'split']
    """
    if split != "all" and split not in WATERBIRDS_SPLITS:
        raise ValueError(f"split must be one of {sorted(WATERBIRDS_SPLITS)} or 'all', got {split!r}.")
    root = Path(root)
    csv_path = root / "metadata.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"Waterbirds metadata not found: {csv_path} (expected columns {WATERBIRDS_COLUMNS}).")
    split_names = {v: k for k, v in WATERBIRDS_SPLITS.items()}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("img_id", "img_filename", "y", "split", "place") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {missing}; found {reader.fieldnames}.")
        rows = list(reader)
    datalist, absent = [], []
    for line, row in enumerate(rows, start=2):
        values = {}
        for column, allowed in (("y", (0, 1)), ("place", (0, 1)), ("split", (0, 1, 2))):
            try:
                values[column] = int(float(row[column]))
            except (TypeError, ValueError):
                values[column] = None
            if values[column] not in allowed:
                raise ValueError(
                    f"{csv_path}, line {line}: column {column!r} must be one of {allowed}, got {row[column]!r}."
                )
        if split != "all" and values["split"] != WATERBIRDS_SPLITS[split]:
            continue
        image = root / row["img_filename"]
        if check_files and not image.is_file():
            absent.append(str(image))
            continue
        group = 2 * values["y"] + values["place"]
        datalist.append(
            {
                "image": str(image),
                "label": values["y"],
                "place": values["place"],
                "group": group,
                "group_name": WATERBIRDS_GROUP_NAMES[group],
                "img_id": row["img_id"],
                "split": split_names[values["split"]],
            }
        )
    if absent:
        if not skip_missing:
            raise FileNotFoundError(
                f"{len(absent)} image(s) listed in {csv_path} do not exist, e.g. {absent[0]}; "
                "pass skip_missing=True to leave them out."
            )
        logger.warning("Waterbirds: %d listed image(s) are missing and were left out, e.g. %s", len(absent), absent[0])
    return datalist


def make_synthetic_waterbirds(
    root: str | os.PathLike,
    n_images: int = 400,
    seed: int = 0,
    correlation: float = 0.95,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    image_size: int = 64,
    bird_scale: float = 1.0,
    noise: float = 0.05,
    colour_cue: float = 1.0,
) -> str:
    """Write a synthetic stand-in of Waterbirds (RGB JPEGs and ``metadata.csv``) under ``root``.

    The label (``y``: 0 landbird, 1 waterbird) sets the bird's shape (a compact round body with a small head; an
    elongated body with a long neck) and, with probability ``colour_cue``, its colour palette (four warm colours for
    landbirds; white, grey, black and slate for waterbirds; otherwise a colour of either palette); its position,
    size and orientation vary. The place (0 land, 1 water) sets the background texture, which covers most of the
    image. In the training split the place agrees with the label with probability ``correlation``; in the
    validation and test splits the place is drawn independently of the label, so all four groups are equally likely
    there.

    Args:
        root: output folder (created); the images and ``metadata.csv`` are written directly under it.
        n_images: total number of images over the three splits.
        seed: random seed; the output is identical for a given seed and arguments.
        correlation: probability that place == label in the training split, in ``[0.5, 1]``.
        split_fractions: fractions of the images in train, val and test.
        image_size: side of the square images in pixels (>= 16).
        bird_scale: size of the bird relative to a bird filling about a third of the image, in ``(0, 1.5]``;
            smaller birds make the label harder to read than the background.
        noise: standard deviation of the Gaussian pixel noise (intensities in ``[0, 1]``), ``>= 0``.
        colour_cue: probability in ``[0, 1]`` that the bird's colour comes from its own class's palette; 0 leaves
            only the shape to tell the classes apart.

    Returns:
        the dataset folder (``root``) as a string.

    Raises:
        ValueError: for an out-of-range argument.
    """
    if n_images < 3:
        raise ValueError(f"n_images must be >= 3 (one image per split at least), got {n_images}.")
    if not 0.5 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [0.5, 1], got {correlation}.")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}.")
    if not 0.0 < bird_scale <= 1.5:
        raise ValueError(f"bird_scale must lie in (0, 1.5], got {bird_scale}.")
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise}.")
    if not 0.0 <= colour_cue <= 1.0:
        raise ValueError(f"colour_cue must lie in [0, 1], got {colour_cue}.")
    fractions = np.asarray(split_fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {split_fractions}.")
    from PIL import Image  # pillow is a dependency of the package

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = np.floor(fractions / fractions.sum() * n_images).astype(int)
    counts[0] += n_images - counts.sum()
    splits = np.repeat(np.arange(3), counts)
    rows = []
    for index, split in enumerate(splits):
        y = int(rng.integers(2))
        if split == 0:
            place = y if rng.random() < correlation else 1 - y
        else:
            place = int(rng.integers(2))
        folder, species = _SPECIES[y]
        filename = f"{folder}/{species}_{index + 1:04d}_{seed}.jpg"
        (root / folder).mkdir(exist_ok=True)
        image, _ = _render(rng, y, place, image_size, bird_scale, noise, colour_cue)
        Image.fromarray(image).save(root / filename, quality=92)
        rows.append([index + 1, filename, y, int(split), place, _PLACE_FILES[place].format(index + 1)])
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(WATERBIRDS_COLUMNS)
        writer.writerows(rows)
    return str(root)


# bird colours (RGB in [0, 1]): landbird-like warm colours and waterbird-like pale and dark ones
_BIRD_PALETTES = (
    np.array([[0.7, 0.3, 0.15], [0.8, 0.62, 0.25], [0.4, 0.27, 0.15], [0.85, 0.45, 0.2]]),
    np.array([[0.92, 0.92, 0.88], [0.6, 0.6, 0.6], [0.12, 0.12, 0.12], [0.35, 0.4, 0.55]]),
)


def _render(
    rng: np.random.Generator,
    y: int,
    place: int,
    size: int,
    bird_scale: float = 1.0,
    noise: float = 0.05,
    colour_cue: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image (background texture by ``place``, bird shape by ``y``) and the bird's boolean mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(10, 16)
    if place == 0:  # land: vertical trunks and foliage, greens and browns
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * xx + phase + 0.6 * np.sin(9 * yy))
        base = np.stack([0.25 + 0.25 * stripes, 0.45 + 0.2 * stripes, 0.15 + 0.05 * stripes], -1)
    else:  # water: horizontal waves, blues
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * freq * yy + phase + 0.8 * np.sin(7 * xx))
        base = np.stack([0.15 + 0.1 * waves, 0.35 + 0.15 * waves, 0.6 + 0.3 * waves], -1)
    cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    scale = bird_scale * rng.uniform(0.8, 1.2)
    angle = rng.uniform(-0.5, 0.5)
    flip = 1.0 if rng.random() < 0.5 else -1.0  # facing left or right
    dy, dx = yy - cy, xx - cx
    ry = (np.cos(angle) * dy - np.sin(angle) * dx) / scale
    rx = flip * (np.sin(angle) * dy + np.cos(angle) * dx) / scale
    if y == 0:  # landbird: round body, small head
        body = (rx / 0.16) ** 2 + (ry / 0.13) ** 2 <= 1
        head = ((rx - 0.14) / 0.07) ** 2 + ((ry + 0.1) / 0.07) ** 2 <= 1
    else:  # waterbird: long body, long neck
        body = (rx / 0.24) ** 2 + (ry / 0.09) ** 2 <= 1
        neck = (np.abs(rx - 0.2) < 0.03) & (ry < 0) & (ry > -0.25)
        head = (((rx - 0.23) / 0.06) ** 2 + ((ry + 0.27) / 0.05) ** 2 <= 1) | neck
    mask = body | head
    palette = _BIRD_PALETTES[y] if rng.random() < colour_cue else _BIRD_PALETTES[int(rng.integers(2))]
    colour = palette[rng.integers(len(palette))] + rng.normal(0, 0.05, 3)
    base[mask] = np.clip(colour, 0, 1) * (0.85 + 0.15 * rng.random((int(mask.sum()), 1)))
    base = base + rng.normal(0, noise, base.shape).astype(np.float32)
    return (np.clip(base, 0, 1) * 255).astype(np.uint8), mask


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m monai_groupdistil.data waterbirds --root DIR [--n-images N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_groupdistil.data waterbirds",
        description="Write a synthetic Waterbirds stand-in (layout of the release).",
    )
    parser.add_argument("--root", required=True, help="output folder")
    parser.add_argument("--n-images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--correlation", type=float, default=0.95)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--bird-scale", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--colour-cue", type=float, default=1.0)
    args = parser.parse_args(argv)
    path = make_synthetic_waterbirds(
        args.root,
        args.n_images,
        args.seed,
        args.correlation,
        image_size=args.image_size,
        bird_scale=args.bird_scale,
        noise=args.noise,
        colour_cue=args.colour_cue,
    )
    print(path)
