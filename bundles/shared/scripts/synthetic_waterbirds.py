"""A small synthetic Waterbirds stand-in, written in the release's layout (the bundle's embedded default data).

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monai_groupdistil.data.waterbirds import WATERBIRDS_COLUMNS, WATERBIRDS_GROUP_NAMES

from .datasets import record_synthetic

_SPECIES = {0: ("014.Indigo_Bunting", "Indigo_Bunting"), 1: ("045.Northern_Fulmar", "Northern_Fulmar")}
_PLACE_FILES = {0: "/b/bamboo_forest/{:08d}.jpg", 1: "/o/ocean/{:08d}.jpg"}


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
    landbird_colour_cue: float | None = None,
    group_bird_scale: Mapping[str, float] | None = None,
    place_noise: Mapping[str, float] | None = None,
    overwrite: bool = False,
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
        landbird_colour_cue: the same probability for landbirds only (``colour_cue`` then applies to waterbirds);
            ``None`` (default) uses ``colour_cue`` for both. A lower value makes landbirds harder to recognise than
            waterbirds, so the groups differ in difficulty as well as in size.
        group_bird_scale: a factor on ``bird_scale`` for the images of some groups, keyed by group name
            (``"landbird/land"``, ``"landbird/water"``, ``"waterbird/land"``, ``"waterbird/water"``), e.g.
            ``{"landbird/land": 0.5}``: that group's birds are half as large, so one group (here a common one) is
            harder than the others whatever its size. ``None`` (default) leaves every group at ``bird_scale``
            (so does a factor of 1, image for image). A change that only one group has is also a feature of
            that group: within a place it tells the label (smaller landbirds on land make landbirds easier to
            tell from waterbirds on land).
        place_noise: the pixel noise of the images of a place, replacing ``noise`` there, keyed by ``"land"`` or
            ``"water"``, e.g. ``{"land": 0.3}``: every image of that place, of either class, is noisier (a site
            with poorer images), so the groups of that place are harder without the change telling the label.
        overwrite: write over a stand-in that ``root`` already holds: its ``metadata.csv`` is replaced and the
            images it lists are written (images of the earlier stand-in with other names, e.g. another seed, stay);
            otherwise an existing one is an error.

    Returns:
        the dataset folder (``root``) as a string.

    Raises:
        ValueError: for an out-of-range argument.
        FileExistsError: ``root`` holds a dataset (``metadata.csv``) and ``overwrite`` is False, or other files
            (nothing is written among them).
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
    if landbird_colour_cue is not None and not 0.0 <= landbird_colour_cue <= 1.0:
        raise ValueError(f"landbird_colour_cue must lie in [0, 1] or be None, got {landbird_colour_cue}.")
    cues = (colour_cue if landbird_colour_cue is None else landbird_colour_cue, colour_cue)  # by label y
    factors = dict(group_bird_scale or {})
    unknown = sorted(set(factors) - set(WATERBIRDS_GROUP_NAMES))
    if unknown:
        raise ValueError(f"group_bird_scale has unknown groups {unknown}; the groups are {WATERBIRDS_GROUP_NAMES}.")
    for name, factor in factors.items():
        if not 0.0 < bird_scale * factor <= 1.5:
            raise ValueError(
                f"group_bird_scale[{name!r}] * bird_scale must lie in (0, 1.5], got {factor} * {bird_scale}."
            )
    scales = [bird_scale * factors.get(name, 1.0) for name in WATERBIRDS_GROUP_NAMES]  # by group 2 * y + place
    noises = dict(place_noise or {})
    if set(noises) - {"land", "water"} or not all(np.isfinite(v) and v >= 0.0 for v in noises.values()):
        raise ValueError(f"place_noise must map 'land' and/or 'water' to a noise level >= 0, got {place_noise}.")
    noise_by_place = [noises.get("land", noise), noises.get("water", noise)]
    fractions = np.asarray(split_fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {split_fractions}.")
    from PIL import Image  # pillow is a dependency of the package

    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        if not (root / "metadata.csv").is_file():
            raise FileExistsError(
                f"{root} is not empty and holds no metadata.csv: write the stand-in into a new or empty folder."
            )
        if not overwrite:
            raise FileExistsError(
                f"{root} already holds a dataset (metadata.csv); pass overwrite=True (--overwrite on the command line) "
                "to replace it."
            )
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
        image, _ = _render(rng, y, place, image_size, scales[2 * y + place], noise_by_place[place], cues[y])
        Image.fromarray(image).save(root / filename, quality=92)
        rows.append([index + 1, filename, y, int(split), place, _PLACE_FILES[place].format(index + 1)])
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(WATERBIRDS_COLUMNS)
        writer.writerows(rows)
    # every setting that shapes the data, the count and seed under the bundle's names, so that a bundle run asking
    # for others says so (check_synthetic)
    settings = {
        "synthetic_images": n_images,
        "seed": seed,
        "correlation": correlation,
        "split_fractions": split_fractions,
        "image_size": image_size,
        "bird_scale": bird_scale,
        "noise": noise,
        "colour_cue": colour_cue,
        "landbird_colour_cue": landbird_colour_cue,
        "group_bird_scale": group_bird_scale,
        "place_noise": place_noise,
    }
    record_synthetic(root, settings)
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
    """Command line: ``python -m scripts waterbirds --root DIR [--n-images N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts waterbirds",
        description="Write a synthetic Waterbirds stand-in (layout of the release). The bundle's default data: "
        "--n-images 800 --image-size 80 (the bundle's synthetic_images; train.json generates it by itself).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", required=True, default=argparse.SUPPRESS, help="output folder")
    parser.add_argument("--n-images", type=int, default=400, help="images over the three splits")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--correlation", type=float, default=0.95, help="P(place = label) in training")
    parser.add_argument("--image-size", type=int, default=64, help="pixels per side")
    parser.add_argument("--bird-scale", type=float, default=1.0, help="bird size, in (0, 1.5]")
    parser.add_argument("--noise", type=float, default=0.05, help="pixel noise")
    parser.add_argument("--colour-cue", type=float, default=1.0, help="P(bird colour from its class)")
    parser.add_argument("--landbird-colour-cue", type=float, default=None, help="the same, landbirds only")
    parser.add_argument("--overwrite", action="store_true", help="write over a stand-in in --root")
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
        landbird_colour_cue=args.landbird_colour_cue,
        overwrite=args.overwrite,
    )
    print(path)
