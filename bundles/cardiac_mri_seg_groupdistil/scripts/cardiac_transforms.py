"""Cardiac cine preprocessing: from a datalist entry (4-D cine + 4-D mask) to a network-ready 2-D slice.

The deterministic chain built by :func:`cardiac_preprocessing` is::

    LoadCardiacImaged            4-D (x, y, z, t) image and (optional) mask, any MONAI reader; a None mask dropped
    SelectFramed                 the ED (or ES) frame from the entry's ``ed``/``es`` -> (1, x, y, z)
    SelectMidVentricularSliced   middle of the slices with LV and MYO in the mask (else the middle slice) -> (1, x, y)
    ScaleIntensityRangePercentilesd   clip to the 0.5-99.5 percentiles, scale to [0, 1]
    Spacingd                     in-plane resampling to ``pixdim`` (bilinear image, nearest mask)
    CropAroundHeartd             fixed-size crop/pad centred on the heart (mask centroid, else image centre)
    EnsureTyped                  float32 tensors

and :func:`cardiac_augmentation` adds light random augmentation for training. All classes are MONAI
``MapTransform`` subclasses, usable from bundle configs with their full dotted ``_target_``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader
from monai.transforms import (
    BorderPad,
    Compose,
    EnsureTyped,
    LoadImage,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialCrop,
    SqueezeDim,
)
from monai.utils import ensure_tuple

__all__ = [
    "LoadCardiacImaged",
    "SelectFramed",
    "SelectMidVentricularSliced",
    "CropAroundHeartd",
    "slice_affine_2d",
    "cardiac_preprocessing",
    "cardiac_augmentation",
]


def source_filename(img: Any, data: Mapping, key: Hashable) -> str:
    """Best-effort source file name of ``data[key]`` for error messages."""
    if isinstance(img, MetaTensor) and img.meta.get("filename_or_obj"):
        return str(img.meta["filename_or_obj"])
    meta = data.get(f"{key}_meta_dict")
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return f"data[{key!r}]"


class LoadCardiacImaged(MapTransform):
    """Load images (e.g. 4-D cines and masks) with :class:`monai.transforms.LoadImage`, naming the file on failure.

    Keys whose value is None (e.g. ``seg`` of an unlabelled subject) are removed from the output, so the later
    transforms (with ``allow_missing_keys=True``) skip them. Arrays keep the file's axis order: a 4-D M&Ms cine
    loads as ``(x, y, z, t)``.

    Args:
        keys: keys holding file paths.
        reader: ``None`` (MONAI's choice), ``"NibabelReader"``, ``"ITKReader"`` (needs the ``itk`` package), a
            reader class or instance; see :class:`monai.transforms.LoadImage`.
        dtype: data type of the loaded arrays.
        image_only: when False, also store the reader's metadata under ``<key>_meta_dict``.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        RuntimeError: a file cannot be read (missing, corrupt, unsupported); the message names it.

    Example::

        entry = LoadCardiacImaged(["image", "seg"])({"image": "A0S9V9_sa.nii.gz", "seg": "A0S9V9_sa_gt.nii.gz"})
        entry["image"].shape  # (x, y, z, t), e.g. torch.Size([256, 216, 10, 25])
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: type[ImageReader] | ImageReader | str | None = None,
        dtype: Any = np.float32,
        image_only: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_only = image_only
        self._loader = LoadImage(reader=reader, image_only=image_only, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d and d[key] is None:
                del d[key]
        for key in self.key_iterator(d):
            path = d[key]
            try:
                out = self._loader(path)
            except Exception as err:
                raise RuntimeError(f"cannot read {path!s} (key {key!r}): {type(err).__name__}: {err}") from err
            if self.image_only:
                d[key] = out
            else:
                d[key], d[f"{key}_meta_dict"] = out
        return d


class SelectFramed(MapTransform):
    """Select one frame of a cine: ``(x, y, z, t)`` -> channel-first ``(1, x, y, z)``.

    The frame index is ``data[frame]`` when ``frame`` is a key (``"ed"`` or ``"es"`` in M&Ms datalists) or
    ``frame`` itself when it is an int; the same frame is taken from every key (image and mask). A 3-D input
    ``(x, y, z)`` is one frame (index 0 only) and just gets a channel axis.

    Args:
        keys: keys of the loaded cines.
        frame: data key holding the 0-based frame index, or a fixed index.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        KeyError: ``frame`` is a key absent from the data.
        ValueError: the index is not an integer or is outside the frames; the file is named.

    Example::

        ed = SelectFramed(["image", "seg"], frame="ed")(loaded)  # loaded["ed"] == 0: image (x, y, z, t) -> (1, x, y, z)
    """

    def __init__(self, keys: KeysCollection, frame: str | int = "ed", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame = frame

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if isinstance(self.frame, str):
            if self.frame not in d:
                raise KeyError(f"SelectFramed: frame key {self.frame!r} not in the data (keys: {sorted(map(str, d))}).")
            index = d[self.frame]
        else:
            index = self.frame
        if isinstance(index, torch.Tensor):
            index = index.item()
        if isinstance(index, (bool, np.bool_)) or int(index) != index:
            raise ValueError(f"SelectFramed: frame index {self.frame!r} must be an integer, got {index!r}.")
        index = int(index)
        for key in self.key_iterator(d):
            img = d[key]
            frames = img.shape[3] if img.ndim == 4 else 1 if img.ndim == 3 else None
            if frames is None:
                raise ValueError(
                    f"SelectFramed: {source_filename(img, d, key)} must be 3-D or 4-D (x, y, z[, t]), got shape "
                    f"{tuple(img.shape)}."
                )
            if not 0 <= index < frames:
                raise ValueError(
                    f"SelectFramed: frame {self.frame!r}={index} is outside the {frames} frame(s) of "
                    f"{source_filename(img, d, key)}."
                )
            d[key] = img[..., index][None] if img.ndim == 4 else img[None]
        return d


def slice_affine_2d(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """2-D ``3 x 3`` affine of one slice ``(x, y)`` of a volume with the ``4 x 4`` affine ``affine``.

    The in-plane spacings are the true voxel sizes, the norms of the first two columns of the 3-D affine (MONAI's
    ``SqueezeDim`` keeps the upper-left ``2 x 2`` block, whose columns are shorter when the slice plane is tilted
    out of the scanner's x-y plane, so in-plane resampling would then distort areas). The in-plane orientation is
    the rotation (or reflection, when the 2-D block has a negative determinant) closest to that ``2 x 2`` block of
    direction cosines, i.e. the slice's x-y orientation as seen by the scanner; the origin is the first two
    world coordinates of the slice's first voxel.

    Args:
        affine: ``4 x 4`` voxel-to-world affine of the slice (already cropped to it, so its translation is the
            slice's first voxel).

    Returns:
        the ``3 x 3`` float64 affine.

    Raises:
        ValueError: when ``affine`` is not ``4 x 4``.

    Example::

        >>> import numpy as np
        >>> slice_affine_2d(np.diag([1.25, 1.25, 8.0, 1.0])).tolist()
        [[1.25, 0.0, 0.0], [0.0, 1.25, 0.0], [0.0, 0.0, 1.0]]
    """
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"slice_affine_2d: expected a 4 x 4 affine, got shape {a.shape}.")
    columns = a[:3, :2]
    spacing = np.linalg.norm(columns, axis=0)
    spacing = np.where(spacing > 0, spacing, 1.0)
    block = (columns / spacing)[:2]  # in-plane direction cosines seen in the scanner's x-y plane
    u, _, vt = np.linalg.svd(block)
    rotation = u @ vt  # the orthogonal matrix nearest to the block (polar decomposition; keeps a reflection)
    out = np.eye(3)
    out[:2, :2] = rotation * spacing
    out[:2, 2] = a[:2, 3]
    return out


class SelectMidVentricularSliced(MapTransform):
    """Pick the mid-ventricular short-axis slice: ``(1, x, y, z)`` -> ``(1, x, y)``.

    With a mask under ``seg_key``, the slice is the middle one (index ``(n - 1) // 2`` of the sorted list) among
    the slices that contain every label of ``labels`` (default LV and MYO); if none does, among those with any
    of them; with no mask or no such slice, the middle slice ``z // 2``. The same slice is taken from every key.
    Uses :class:`monai.transforms.SpatialCrop` and :class:`monai.transforms.SqueezeDim`; a ``MetaTensor`` then
    gets the 2-D affine of :func:`slice_affine_2d`, whose in-plane spacings are the true voxel sizes even when the
    stack is tilted out of the scanner's x-y plane (the 2 x 2 block of the 3-D affine would shrink them).

    Args:
        keys: keys to slice (image and mask).
        seg_key: key of the mask used to locate the ventricles (may be absent).
        labels: mask labels that the slice must contain (1 LV, 2 MYO).
        slice_key: if not None, the chosen index is stored in ``data[slice_key]``.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        ValueError: an input that is not ``(1, x, y, z)`` or keys with different numbers of slices.

    Example::

        mid = SelectMidVentricularSliced(["image", "seg"], seg_key="seg")(frame)  # (1, x, y, z) -> (1, x, y)
        mid["slice_index"]  # the z index taken
    """

    def __init__(
        self,
        keys: KeysCollection,
        seg_key: str = "seg",
        labels: Sequence[int] = (1, 2),
        slice_key: str | None = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.seg_key = seg_key
        self.labels = tuple(int(v) for v in ensure_tuple(labels))
        self.slice_key = slice_key
        self.squeeze = SqueezeDim(dim=3, update_meta=False)

    def select(self, seg: torch.Tensor | np.ndarray | None, n_slices: int) -> int:
        """Index of the mid-ventricular slice of ``seg`` (``(1, x, y, z)``) or the middle slice."""
        if seg is not None:
            s = torch.as_tensor(seg)
            present = torch.stack([(s == lab).flatten(0, -2).any(0) for lab in self.labels])  # (labels, z)
            for candidates in (present.all(0), present.any(0)):
                z = torch.nonzero(candidates).flatten().tolist()
                if z:
                    return int(z[(len(z) - 1) // 2])
        return n_slices // 2

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            if d[key].ndim != 4 or d[key].shape[0] != 1:
                raise ValueError(
                    f"SelectMidVentricularSliced: {source_filename(d[key], d, key)} must be (1, x, y, z), got shape "
                    f"{tuple(d[key].shape)}."
                )
        n = {int(d[k].shape[3]) for k in keys}
        if len(n) > 1:
            raise ValueError(f"SelectMidVentricularSliced: keys {keys} have different slice counts {sorted(n)}.")
        if not keys:
            return d
        index = self.select(d.get(self.seg_key), n.pop())
        crop = SpatialCrop(roi_slices=[slice(None), slice(None), slice(index, index + 1)])
        for key in keys:
            sliced = crop(d[key])
            affine = sliced.affine if isinstance(sliced, MetaTensor) else None
            sliced = self.squeeze(sliced)
            if isinstance(sliced, MetaTensor) and affine is not None and tuple(affine.shape) == (4, 4):
                sliced.affine = torch.as_tensor(slice_affine_2d(affine), dtype=affine.dtype, device=affine.device)
            d[key] = sliced
        if self.slice_key is not None:
            d[self.slice_key] = index
        return d


class CropAroundHeartd(MapTransform):
    """Crop (zero-padding where needed) a fixed-size window centred on the heart: ``(C, h, w)`` -> ``(C, *size)``.

    The centre is the centroid of the voxels of ``source_key`` whose value is in ``labels`` (LV, MYO, RV),
    rounded to a voxel; without that key or foreground, the image centre. The window always has exactly
    ``spatial_size`` (the input is padded by half the window on each side first), so the heart stays centred even
    near the border. Uses :class:`monai.transforms.BorderPad` and :class:`monai.transforms.SpatialCrop`.

    Args:
        keys: keys to crop.
        spatial_size: output spatial size.
        source_key: key of the mask that locates the heart.
        labels: foreground labels of the mask.
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        ValueError: a non-positive ``spatial_size``; at call time, an input whose number of spatial dimensions
            differs from ``spatial_size`` or keys with different spatial shapes.

    Example::

        >>> import torch
        >>> seg = torch.zeros(1, 40, 40)
        >>> seg[0, 30:34, 5:9] = 1
        >>> out = CropAroundHeartd(["seg"], spatial_size=(16, 16), source_key="seg")({"seg": seg})
        >>> tuple(out["seg"].shape), int(out["seg"].sum())
        ((1, 16, 16), 16)
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int = (128, 128),
        source_key: str = "seg",
        labels: Sequence[int] = (1, 2, 3),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in ensure_tuple(spatial_size))
        if any(s < 1 for s in self.spatial_size):
            raise ValueError(f"spatial_size must be positive, got {spatial_size}.")
        self.source_key = source_key
        self.labels = tuple(int(v) for v in ensure_tuple(labels))

    def centre(self, data: Mapping[Hashable, Any], shape: Sequence[int]) -> list[int]:
        """Voxel centre of the window for spatial ``shape``."""
        src = data.get(self.source_key)
        if src is not None:
            s = torch.as_tensor(src)[0]
            fg = torch.zeros_like(s, dtype=torch.bool)
            for lab in self.labels:
                fg |= s == lab
            idx = torch.nonzero(fg)
            if idx.numel():
                return [int(round(float(c))) for c in idx.double().mean(0)]
        return [int(n) // 2 for n in shape]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shape = d[keys[0]].shape[1:]
        if len(shape) != len(self.spatial_size):
            raise ValueError(
                f"CropAroundHeartd: spatial_size {self.spatial_size} does not match the {len(shape)}-D input "
                f"{source_filename(d[keys[0]], d, keys[0])} of shape {tuple(d[keys[0]].shape)}."
            )
        centre = self.centre(d, shape)
        border = [s // 2 + 1 for s in self.spatial_size]
        pad = BorderPad(spatial_border=[b for b in border for _ in (0, 1)], mode="constant")
        crop = SpatialCrop(roi_center=[c + b for c, b in zip(centre, border)], roi_size=self.spatial_size)
        for key in keys:
            if tuple(d[key].shape[1:]) != tuple(shape):
                raise ValueError(
                    f"CropAroundHeartd: {key!r} has spatial shape {tuple(d[key].shape[1:])}, {keys[0]!r} has "
                    f"{tuple(shape)}."
                )
            d[key] = crop(pad(d[key]))
        return d


# The steps that cardiac_preprocessing / cardiac_augmentation share with segmentation_preprocessing /
# segmentation_augmentation (data/segmentation.py): one definition, so the two pipelines load, normalise, resample
# and augment intensities the same way.
def load_frame(
    image_key: str, mask_key: str, frame: str | int, reader: Any, image_only: bool = True
) -> list[MapTransform]:
    """Load the image and its (optional) mask and select one frame of both -> ``(1, x, y, z)``."""
    return [
        LoadCardiacImaged(image_key, reader=reader, image_only=image_only),
        LoadCardiacImaged(mask_key, reader=reader, image_only=image_only, allow_missing_keys=True),
        SelectFramed((image_key, mask_key), frame=frame, allow_missing_keys=True),
    ]


def normalise_and_resample(
    image_key: str, mask_key: str, lower: float, upper: float, pixdim: Sequence[float]
) -> list[MapTransform]:
    """Intensity percentiles ``lower``-``upper`` -> [0, 1], then resampling to ``pixdim`` (bilinear / nearest)."""
    return [
        ScaleIntensityRangePercentilesd(image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
        Spacingd((image_key, mask_key), pixdim=tuple(pixdim), mode=("bilinear", "nearest"), padding_mode="border",
                 allow_missing_keys=True),
    ]  # fmt: skip


def interpolation_modes(keys: KeysCollection, image_key: str) -> tuple[str, ...]:
    """Interpolation of every key in a spatial step: bilinear for the image, nearest for the masks."""
    return tuple("bilinear" if k == image_key else "nearest" for k in ensure_tuple(keys))


def intensity_augmentation(image_key: str, prob: float, gamma: Sequence[float], noise_std: float) -> list[Any]:
    """Random gamma contrast and Gaussian noise, then clipping to [0, 1]."""
    return [
        RandAdjustContrastd(image_key, prob=prob, gamma=tuple(gamma)),
        RandGaussianNoised(image_key, prob=prob, mean=0.0, std=noise_std),
        ScaleIntensityRanged(image_key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def cardiac_preprocessing(
    spatial_size: Sequence[int] = (128, 128),
    pixdim: Sequence[float] = (1.25, 1.25),
    frame: str | int = "ed",
    reader: type[ImageReader] | ImageReader | str | None = None,
    image_only: bool = True,
    image_key: str = "image",
    seg_key: str = "seg",
    lower: float = 0.5,
    upper: float = 99.5,
    slice_labels: Sequence[int] = (1, 2),
    heart_labels: Sequence[int] = (1, 2, 3),
) -> Compose:
    """Deterministic preprocessing: datalist entry -> mid-ventricular 2-D slice of the chosen frame.

    Args:
        spatial_size: output in-plane size ``(H, W)``.
        pixdim: output in-plane spacing in mm.
        frame: ``"ed"``/``"es"`` (the entry key holding the frame index) or a fixed frame index.
        reader: image reader for :class:`LoadCardiacImaged` (``None``, ``"NibabelReader"``, ``"ITKReader"``, ...).
        image_only: False keeps the original header under ``<key>_meta_dict`` (not updated by later steps).
        image_key: key of the image path.
        seg_key: key of the mask path (None or absent: the middle slice and the image centre are used).
        lower: lower intensity percentile clipped to 0.
        upper: upper intensity percentile clipped to 1.
        slice_labels: labels the selected slice must contain (LV, MYO).
        heart_labels: labels whose centroid centres the crop (LV, MYO, RV).

    Returns:
        a :class:`monai.transforms.Compose` producing ``image``: float32 ``[1, H, W]`` in [0, 1] (a
        ``MetaTensor`` with the 2-D affine), ``seg``: float32 ``[1, H, W]`` label map of the same frame and slice
        (when the entry had one), ``slice_index`` (int); other keys (``label``, ``group``, ...) pass through.

    Example::

        from monai.data import Dataset, DataLoader
        ds = Dataset(load_mnms_datalist(root, "train"), transform=cardiac_preprocessing((128, 128)))
        batch = next(iter(DataLoader(ds, batch_size=8)))  # batch["image"]: [8, 1, 128, 128], batch["group"]: [8]
    """
    keys = (image_key, seg_key)
    return Compose([
        *load_frame(image_key, seg_key, frame, reader, image_only),
        SelectMidVentricularSliced(keys, seg_key=seg_key, labels=slice_labels, allow_missing_keys=True),
        *normalise_and_resample(image_key, seg_key, lower, upper, pixdim),
        CropAroundHeartd(keys, spatial_size=spatial_size, source_key=seg_key, labels=heart_labels,
                         allow_missing_keys=True),
        EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True),
    ])  # fmt: skip


def cardiac_augmentation(
    keys: Sequence[str] = ("image", "seg"),
    image_key: str = "image",
    prob: float = 0.5,
    rotate_range: float = math.pi / 12,
    zoom_range: Sequence[float] = (0.9, 1.1),
    flip_prob: float = 0.0,
    gamma: Sequence[float] = (0.7, 1.5),
    noise_std: float = 0.02,
) -> Compose:
    """Light random augmentation for training, applied after :func:`cardiac_preprocessing`.

    Rotation (``RandRotated``, +-``rotate_range`` rad) and zoom (``RandZoomd``) with bilinear interpolation for
    the image and nearest for the other keys, an optional flip (off by default: it swaps the LV-RV chirality),
    gamma contrast (``RandAdjustContrastd``), Gaussian noise (``RandGaussianNoised``), then clipping to [0, 1].
    Sizes are kept. Seed it with ``Compose.set_random_state`` or :func:`monai.utils.set_determinism`.

    Args:
        keys: keys transformed spatially (keys absent from an entry are skipped).
        image_key: the key whose intensities are augmented.
        prob: probability of each rotation, zoom, contrast and noise step.
        rotate_range: maximum absolute in-plane rotation in radians.
        zoom_range: ``(min_zoom, max_zoom)``.
        flip_prob: probability of a flip along the first spatial axis.
        gamma: range of the contrast gamma.
        noise_std: maximum standard deviation of the noise (intensities are in [0, 1]).

    Returns:
        a :class:`monai.transforms.Compose`.

    Example::

        train = Dataset(datalist, transform=Compose([cardiac_preprocessing((128, 128)), cardiac_augmentation()]))
    """
    modes = interpolation_modes(keys, image_key)
    return Compose([
        RandRotated(keys, range_x=rotate_range, prob=prob, mode=modes, padding_mode="zeros", keep_size=True,
                    allow_missing_keys=True),
        RandZoomd(keys, prob=prob, min_zoom=zoom_range[0], max_zoom=zoom_range[1], mode=modes,
                  padding_mode="constant", keep_size=True, allow_missing_keys=True),
        RandFlipd(keys, prob=flip_prob, spatial_axis=0, allow_missing_keys=True),
        *intensity_augmentation(image_key, prob, gamma, noise_std),
    ])  # fmt: skip
