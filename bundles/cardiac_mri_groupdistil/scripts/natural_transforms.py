"""Natural-image (ImageNet-style) preprocessing for RGB classification datasets such as Waterbirds.

The deterministic chain built by :func:`natural_image_preprocessing` follows the group-DRO reference code for
Waterbirds (resize to a square ``resize`` x ``resize``, centre crop ``spatial_size``, scale to [0, 1], normalise
with the ImageNet channel statistics)::

    LoadImaged                   RGB file with PILReader (grey or RGBA files converted to RGB), (H, W, 3)
    EnsureChannelFirstd          (3, H, W)
    Resized                      (3, resize, resize), "area" interpolation (averaging: no aliasing when shrinking)
    CenterSpatialCropd           (3, *spatial_size)             (left out with ``center_crop=False``)
    ScaleIntensityRanged         [0, 255] -> [0, 1] (like torchvision's ``ToTensor``)
    NormalizeIntensityd          (x - mean[c]) / std[c] per channel (ImageNet statistics by default)
    EnsureTyped                  float32

:func:`natural_image_augmentation` is the training counterpart of the centre crop, applied after
``natural_image_preprocessing(..., center_crop=False)``: a random crop of random size and aspect ratio resized to
``spatial_size`` (like torchvision's ``RandomResizedCrop``, built from ``RandScaleCropd`` and ``Resized``) and a
random horizontal flip. Only MONAI transforms are used, so every step is invertible/traceable as MONAI's are.

:func:`natural_image_datalist` lists the images to classify at inference (a folder, a JSON datalist or a
Waterbirds release).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    RandScaleCropd,
    Resized,
    ScaleIntensityRanged,
)
from monai.utils import ensure_tuple, ensure_tuple_rep

from monai_groupdistil.data.json_datalist import load_json_datalist

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "natural_image_preprocessing",
    "natural_image_augmentation",
    "natural_image_datalist",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel (R, G, B) mean of ImageNet, for intensities in [0, 1]."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel (R, G, B) standard deviation of ImageNet, for intensities in [0, 1]."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File name endings :func:`natural_image_datalist` collects from a folder (case-insensitive)."""


def _to_rgb(image: Any) -> Any:
    """PIL converter: grey-level, palette and RGBA images to RGB (module level, so it pickles for workers)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _size2d(value: Sequence[int] | int, name: str) -> tuple[int, int]:
    size = tuple(int(v) for v in ensure_tuple_rep(value, 2)) if isinstance(value, int) else tuple(map(int, value))
    if len(size) != 2 or any(s < 1 for s in size):
        raise ValueError(f"{name} must be a positive int or two positive ints (H, W), got {value!r}.")
    return size  # type: ignore[return-value]


def natural_image_preprocessing(
    spatial_size: Sequence[int] | int = 224,
    resize: Sequence[int] | int | None = 256,
    keys: KeysCollection = "image",
    center_crop: bool = True,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    load: bool = True,
    mode: str = "area",
) -> Compose:
    """Deterministic ImageNet-style preprocessing: image file -> ``float32`` tensor ``(3, *spatial_size)``.

    Args:
        spatial_size: output size ``(H, W)`` (an int for a square), the size of the centre crop.
        resize: size the image is resized to before the crop (an int for a square, as in the group-DRO reference
            code, which scales every image to 256/224 of the crop size); None resizes straight to
            ``spatial_size``. Must be at least ``spatial_size`` in both dimensions.
        keys: keys of the image paths (or images, with ``load=False``).
        center_crop: crop the centre ``spatial_size`` (evaluation); False keeps the ``resize`` image for
            :func:`natural_image_augmentation` to crop at random (training).
        mean: per-channel mean subtracted after scaling to [0, 1] (ImageNet's by default); None skips the
            normalisation (then ``std`` must be None too).
        std: per-channel standard deviation divided by.
        load: start with ``LoadImaged`` (PILReader, RGB) and ``EnsureChannelFirstd``; False expects channel-first
            ``(3, H, W)`` arrays with values in [0, 255].
        mode: interpolation of the resizing (see :class:`monai.transforms.Resized`). ``"area"`` averages the
            pixels that fall into each output pixel, the right filter for shrinking photographs; ``"bilinear"``
            is smoother for enlarging small images. (MONAI's ``anti_aliasing`` option is not used: its Gaussian
            filter pads with zeros and darkens the image border.)

    Returns:
        a :class:`monai.transforms.Compose` of dictionary transforms; other keys (``label``, ``group``,
        ``img_id``...) pass through unchanged.

    Raises:
        ValueError: for a non-positive size, a ``resize`` smaller than ``spatial_size``, or ``mean``/``std`` of
            different lengths, a zero ``std``, or only one of them given.

    Example::

        from monai.data import DataLoader, Dataset
        from scripts.natural_transforms import natural_image_preprocessing
        from monai_groupdistil.data.waterbirds import load_waterbirds_datalist

        ds = Dataset(load_waterbirds_datalist(root, "val"), transform=natural_image_preprocessing(224, 256))
        batch = next(iter(DataLoader(ds, batch_size=8)))  # batch["image"]: [8, 3, 224, 224], batch["group"]: [8]
    """
    crop = _size2d(spatial_size, "spatial_size")
    size = crop if resize is None else _size2d(resize, "resize")
    if size[0] < crop[0] or size[1] < crop[1]:
        raise ValueError(f"resize {size} must be at least spatial_size {crop} in both dimensions.")
    if (mean is None) != (std is None):
        raise ValueError(f"mean and std must both be given or both be None, got mean={mean!r}, std={std!r}.")
    if mean is not None and std is not None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)} values.")
        if any(s == 0 for s in std):
            raise ValueError(f"std must not contain 0, got {std}.")
    keys = ensure_tuple(keys)
    transforms: list = []
    if load:
        transforms += [
            LoadImaged(keys, reader=PILReader(converter=_to_rgb, reverse_indexing=False), image_only=True),
            EnsureChannelFirstd(keys),
        ]
    align = None if mode in ("area", "nearest", "nearest-exact") else False
    transforms.append(Resized(keys, spatial_size=size, mode=mode, align_corners=align))
    if center_crop:
        transforms.append(CenterSpatialCropd(keys, roi_size=crop))
    transforms.append(ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=False))
    if mean is not None:
        transforms.append(NormalizeIntensityd(keys, subtrahend=mean, divisor=std, channel_wise=True))
    transforms.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(transforms)


def natural_image_augmentation(
    spatial_size: Sequence[int] | int = 224,
    keys: KeysCollection = "image",
    scale: Sequence[float] = (0.7, 1.0),
    flip_prob: float = 0.5,
) -> Compose:
    """Random resized crop and horizontal flip for training, after ``natural_image_preprocessing(center_crop=False)``.

    A crop whose side lengths are drawn independently in ``[sqrt(scale[0]), sqrt(scale[1])]`` times the image's
    (so its area is in ``scale`` times the image's and its aspect ratio varies by up to ``sqrt(scale[1] /
    scale[0])``), at a random position (``RandScaleCropd``), is resized to ``spatial_size`` (``Resized``, bilinear:
    the preprocessed image is already close to ``spatial_size``, so the factor is near 1);
    then the image is flipped left-right with probability ``flip_prob`` (``RandFlipd`` on the width axis). The
    group-DRO reference trains Waterbirds with ``RandomResizedCrop(scale=(0.7, 1.0))`` and a horizontal flip.
    Seed it with ``Compose.set_random_state`` or :func:`monai.utils.set_determinism`.

    Args:
        spatial_size: output size ``(H, W)``.
        keys: keys of the preprocessed ``(C, H, W)`` images.
        scale: ``(min, max)`` fraction of the image area kept by the crop, ``0 < min <= max <= 1``.
        flip_prob: probability of the left-right flip.

    Returns:
        a :class:`monai.transforms.Compose` of dictionary transforms.

    Raises:
        ValueError: for a ``scale`` outside ``(0, 1]`` or decreasing, or ``flip_prob`` outside ``[0, 1]``.

    Example::

        train_transform = Compose([
            natural_image_preprocessing(spatial_size=64, resize=72, center_crop=False),
            natural_image_augmentation(spatial_size=64),
        ])
    """
    out = _size2d(spatial_size, "spatial_size")
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {tuple(scale)}.")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}.")
    keys = ensure_tuple(keys)
    return Compose([
        RandScaleCropd(keys, roi_scale=math.sqrt(lo), max_roi_scale=math.sqrt(hi), random_center=True,
                       random_size=True),
        Resized(keys, spatial_size=out, mode="bilinear", align_corners=False),
        RandFlipd(keys, prob=flip_prob, spatial_axis=1),
        EnsureTyped(keys, dtype=torch.float32),
    ])  # fmt: skip


def natural_image_datalist(
    input_path: str | os.PathLike,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    split: str = "test",
    id_key: str = "img_id",
) -> list[dict[str, Any]]:
    """Datalist of images to classify (inference).

    ``input_path`` may be:

    - a Waterbirds release (a folder holding ``metadata.csv``): the images of ``split`` (``"all"`` for every
      split), with their ``img_id``, ``label`` and ``group``;
    - a JSON file holding a list of ``{"image": path, "img_id": str (optional)}`` (relative paths are taken from
      the JSON file's folder);
    - a folder, searched recursively for files ending in one of ``extensions``; the identifier is the path
      relative to the folder.

    Args:
        input_path: the release, JSON file or folder.
        extensions: file endings collected from a folder (case-insensitive).
        split: the Waterbirds split read from a release.
        id_key: key of the identifiers in the entries.

    Returns:
        entries with ``image`` (path) and ``id_key``, sorted by path for folders.

    Raises:
        FileNotFoundError: when ``input_path`` does not exist or a folder holds no image.
        ValueError: for a malformed JSON datalist (the entry is named).

    Example::

        >>> import tempfile
        >>> from monai_groupdistil.data.waterbirds import make_synthetic_waterbirds
        >>> root = make_synthetic_waterbirds(tempfile.mkdtemp(), n_images=10, image_size=16)
        >>> len(natural_image_datalist(root, split="all"))
        10
    """
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(
            f"inference input '{path}' does not exist (a folder of images, a JSON datalist or a Waterbirds release "
            "is expected)."
        )
    if path.is_dir() and (path / "metadata.csv").is_file():
        from monai_groupdistil.data.waterbirds import load_waterbirds_datalist

        entries = load_waterbirds_datalist(path, split=split)
        return [{**d, id_key: d["img_id"]} for d in entries]
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"inference input '{path}' is a file but not a JSON datalist (*.json).")
        return [
            {"image": item["image"], id_key: str(item.get(id_key, Path(item["image"]).name))}
            for item in load_json_datalist(path)
        ]
    endings = tuple(e.lower() for e in extensions)
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.lower().endswith(endings))
    if not files:
        raise FileNotFoundError(f"no image ({', '.join(endings)}) found under '{path}'.")
    return [{"image": str(f), id_key: f.relative_to(path).as_posix()} for f in files]
