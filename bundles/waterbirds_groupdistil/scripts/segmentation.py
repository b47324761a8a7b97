"""Cardiac segmentation data: ED/ES short-axis frames with their masks (1 LV, 2 MYO, 3 RV), as 3-D volumes and
as the 2-D slices a 2-D network trains on.

From subject entries of :func:`~monai_groupdistil.data.load_mnms_datalist` (4-D cines and masks, ED/ES frame
indices) or :func:`~monai_groupdistil.data.load_mnms2_datalist` (separate ED and ES files),
:func:`segmentation_frames` makes one entry per subject and frame. :func:`segmentation_preprocessing` turns an entry
into a preprocessed 3-D frame ``[1, H, W, Z]`` (intensity percentiles of the whole frame, in-plane resampling to
``pixdim``, in-plane crop or pad to ``spatial_size`` about the image centre; the slice axis is left as it is), so the
same chain serves training, evaluation (a 2-D network slice by slice through ``monai.inferers.SliceInferer``) and
inference (inverted with ``monai.transforms.Invertd`` to write masks in the input's space).
:class:`SegmentationSliceDataset` cuts the preprocessed frames into their 2-D slices once and serves them, with an
optional random augmentation, for training.

Bad masks are refused by :class:`CheckSegmentationd`, naming the file: labels outside ``0..3``, a mask whose shape
differs from its image, and (for training and evaluation) a frame without any labelled voxel.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import Dataset, MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    ResizeWithPadOrCropd,
)
from monai.utils import ensure_tuple

from .cardiac_transforms import (
    intensity_augmentation,
    interpolation_modes,
    load_frame,
    normalise_and_resample,
    source_filename,
)

__all__ = [
    "SEG_LABELS",
    "SEG_STRUCTURES",
    "CheckSegmentationd",
    "SegmentationSliceDataset",
    "segmentation_augmentation",
    "segmentation_frames",
    "segmentation_preprocessing",
    "volume_slices",
]

SEG_LABELS = ("background", "LV", "MYO", "RV")
"""Label values of the M&Ms and M&Ms-2 masks: 0 background, 1 LV blood pool, 2 myocardium, 3 RV."""
SEG_STRUCTURES = SEG_LABELS[1:]
"""The segmented structures (the channels of the per-structure metrics)."""

_PASSED_ON = ("group", "group_name", "subject", "vendor", "centre", "pathology", "split")


def segmentation_frames(
    subjects: Sequence[Mapping[str, Any]], frames: Sequence[str] = ("ed", "es"), require_masks: bool = True
) -> list[dict[str, Any]]:
    """One datalist entry per subject and frame (ED, ES) from M&Ms or M&Ms-2 subject entries.

    Args:
        subjects: entries of ``load_mnms_datalist`` (``image``/``seg`` 4-D paths, ``ed``/``es`` frame indices) or
            of ``load_mnms2_datalist`` (``ed_image``, ``es_image``, ``ed_seg``, ``es_seg``: one 3-D file per frame).
        frames: the frames to take, ``"ed"`` and/or ``"es"``.
        require_masks: a subject without the mask of a frame is an error (training, evaluation); when False it
            gets an entry without ``label`` (inference).

    Returns:
        entries with ``image`` (path), ``label`` (mask path; absent when there is none and ``require_masks`` is
        False), ``frame_index`` (the frame in that file: the ED/ES index of an M&Ms cine, 0 for an M&Ms-2 file),
        ``frame`` (``"ed"``/``"es"``), ``case`` (``<subject>_<frame>``) and the subject's ``group``,
        ``group_name``, ``subject``, ``vendor``, ``centre``, ``pathology`` and ``split`` when present. Frames of
        one subject stay together, so a split made on subjects is never a split of one subject's slices.

    Raises:
        ValueError: an unknown frame, or (``require_masks``) a subject without the mask of a frame, naming the
            subject and its image.

    Example::

        subjects = load_mnms_datalist("/data/OpenDataset", split="train")
        train = segmentation_frames(subjects)  # two entries (ED, ES) per subject
    """
    frames = tuple(str(f).lower() for f in ensure_tuple(frames))
    bad = [f for f in frames if f not in ("ed", "es")]
    if bad or not frames:
        raise ValueError(f"frames must be 'ed' and/or 'es', got {frames!r}.")
    out = []
    for subject in subjects:
        for frame in frames:
            if f"{frame}_image" in subject:  # M&Ms-2: one file per frame
                image, mask, index = subject[f"{frame}_image"], subject.get(f"{frame}_seg"), 0
            else:
                image, mask, index = subject["image"], subject.get("seg"), subject.get(frame)
            name = subject.get("subject", image)
            if image is None:
                raise ValueError(f"subject {name}: no {frame.upper()} image.")
            if index is None:
                raise ValueError(f"subject {name} ({image}): no {frame!r} frame index in its entry.")
            if mask is None and require_masks:
                raise ValueError(
                    f"subject {name}: image {image} has no mask at {frame.upper()} (frame {index}); training and "
                    "evaluation need the ground truth at ED and ES. Leave the subject out of the datalist or add its "
                    "mask (M&Ms: <code>_sa_gt.nii.gz; M&Ms-2: NNN_SA_ED_gt.nii.gz / NNN_SA_ES_gt.nii.gz)."
                )
            entry: dict[str, Any] = {"image": image, "frame_index": int(index), "frame": frame}
            if mask is not None:
                entry["label"] = mask
            entry.update({k: subject[k] for k in _PASSED_ON if k in subject})
            entry["case"] = f"{name}_{frame}"
            out.append(entry)
    return out


class CheckSegmentationd(MapTransform):
    """Refuse bad masks, naming the file: labels outside ``0 .. num_classes - 1``, a spatial shape other than the
    image's, and (``require_foreground``) a mask without any labelled voxel.

    Run it after :class:`~scripts.SelectFramed` (so the foreground check is the frame's); a missing
    mask key is skipped.

    Args:
        keys: the mask key(s).
        image_key: the image the masks must match.
        num_classes: labels must lie in ``[0, num_classes)`` (4: background, LV, MYO, RV).
        require_foreground: a mask without any label > 0 is an error (the ED/ES frames are annotated).
        allow_missing_keys: don't raise when a key is absent.

    Raises:
        ValueError: for any of the above; the message names the mask file, its frame and what was expected.

    Example::

        >>> import torch
        >>> check = CheckSegmentationd("label")
        >>> _ = check({"image": torch.zeros(1, 4, 4, 2), "label": torch.ones(1, 4, 4, 2)})  # passes
        >>> check({"image": torch.zeros(1, 4, 4, 2), "label": torch.full((1, 4, 4, 2), 5.0)})
        Traceback (most recent call last):
        ...
        ValueError: mask data['label'] holds label(s) [5] outside 0-3 (expected 0 background, 1 LV, 2 MYO, 3 RV).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        num_classes: int = len(SEG_LABELS),
        require_foreground: bool = True,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.num_classes = int(num_classes)
        self.require_foreground = bool(require_foreground)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key)
        frame = f" (frame {d['frame_index']})" if "frame_index" in d else ""
        for key in self.key_iterator(d):
            mask = d[key]
            name = source_filename(mask, d, key)
            if image is not None and tuple(mask.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"mask {name} has spatial shape {tuple(mask.shape[1:])}{frame}, its image "
                    f"{source_filename(image, d, self.image_key)} has {tuple(image.shape[1:])}; a mask must have its "
                    "image's shape."
                )
            values = torch.unique(torch.as_tensor(mask))
            bad = [int(v) if float(v).is_integer() else v for v in values.tolist()]
            bad = [v for v in bad if not isinstance(v, int) or not 0 <= v < self.num_classes]
            if bad:
                raise ValueError(
                    f"mask {name}{frame} holds label(s) {bad[:5]} outside 0-{self.num_classes - 1} "
                    f"(expected 0 background, 1 LV, 2 MYO, 3 RV)."
                )
            if self.require_foreground and not bool((values > 0).any()):
                raise ValueError(
                    f"mask {name}{frame} has no labelled voxel; training and evaluation need the ground truth of "
                    "the frame (is the ED/ES index right?)."
                )
        return d


def segmentation_preprocessing(
    spatial_size: Sequence[int] = (96, 96),
    pixdim: Sequence[float] = (2.0, 2.0),
    frame: str | int = "frame_index",
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int = len(SEG_LABELS),
    require_foreground: bool = True,
    lower: float = 0.5,
    upper: float = 99.5,
    reader: Any = None,
) -> Compose:
    """Deterministic, invertible preprocessing of one frame: entry -> ``image``/``label`` ``[1, H, W, Z]``.

    The chain::

        LoadCardiacImaged                  image and (optional) mask, 3-D or 4-D NIfTI; a None mask is dropped
        SelectFramed                       the frame ``data[frame]`` of a 4-D file -> (1, x, y, z)
        CheckSegmentationd                 mask labels in 0..3, mask shape = image shape, a labelled voxel
        ScaleIntensityRangePercentilesd    0.5-99.5 percentiles of the whole frame -> [0, 1]
        Spacingd                           in-plane spacing ``pixdim`` (bilinear / nearest); slice spacing kept
        ResizeWithPadOrCropd               in-plane ``spatial_size`` about the image centre; slices kept
        EnsureTyped                        float32

    ``Spacingd`` and ``ResizeWithPadOrCropd`` are recorded in the ``MetaTensor``'s applied operations, so
    ``Invertd`` maps a prediction back to the input frame's grid (shape and affine).

    Args:
        spatial_size: in-plane output size ``(H, W)``.
        pixdim: in-plane output spacing in mm.
        frame: entry key of the frame index (``"frame_index"`` in :func:`segmentation_frames` entries) or an index.
        image_key: key of the image path.
        label_key: key of the mask path (absent or None: image only, e.g. inference).
        num_classes: number of mask labels including background.
        require_foreground: refuse a mask without labelled voxels.
        lower: lower intensity percentile mapped to 0.
        upper: upper intensity percentile mapped to 1.
        reader: image reader of :class:`~scripts.LoadCardiacImaged`.

    Returns:
        a :class:`monai.transforms.Compose`.

    Raises:
        ValueError: when ``spatial_size`` or ``pixdim`` does not have two (in-plane) values.

    Example::

        volumes = Dataset(segmentation_frames(subjects), transform=segmentation_preprocessing((96, 96)))
        volumes[0]["image"].shape  # torch.Size([1, 96, 96, Z])
    """
    size = tuple(int(s) for s in ensure_tuple(spatial_size))
    spacing = tuple(float(p) for p in ensure_tuple(pixdim))
    if len(size) != 2 or len(spacing) != 2:
        raise ValueError(f"spatial_size and pixdim must have 2 values (in-plane), got {spatial_size} and {pixdim}.")
    keys = (image_key, label_key)
    return Compose([
        *load_frame(image_key, label_key, frame, reader),
        CheckSegmentationd(label_key, image_key=image_key, num_classes=num_classes,
                           require_foreground=require_foreground),
        *normalise_and_resample(image_key, label_key, lower, upper, (*spacing, -1.0)),
        ResizeWithPadOrCropd(keys, spatial_size=(*size, -1), allow_missing_keys=True),
        EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True),
    ])  # fmt: skip


def volume_slices(
    item: Mapping[str, Any],
    image_key: str = "image",
    label_key: str = "label",
    foreground_only: bool = True,
) -> list[dict[str, Any]]:
    """The 2-D slices ``[1, H, W]`` of a preprocessed frame ``[1, H, W, Z]``, with the entry's other keys.

    Args:
        item: a preprocessed entry (``image`` and ``label`` ``[1, H, W, Z]``).
        image_key: key of the image.
        label_key: key of the mask.
        foreground_only: keep only the slices whose mask has a labelled voxel (the annotated, cardiac slices).

    Returns:
        one dict per slice: ``image``, ``label`` (plain float32 tensors ``[1, H, W]``), ``slice_index`` and the
        entry's other non-tensor keys (``group``, ``subject``, ``case``...).

    Raises:
        ValueError: when the image is not ``[1, H, W, Z]``.

    Example::

        >>> import torch
        >>> label = torch.zeros(1, 8, 8, 3)
        >>> label[0, 2:4, 2:4, 1] = 1
        >>> slices = volume_slices({"image": torch.rand(1, 8, 8, 3), "label": label, "group": 2})
        >>> [(s["slice_index"], s["group"], tuple(s["image"].shape)) for s in slices]
        [(1, 2, (1, 8, 8))]
    """
    image, label = item[image_key], item.get(label_key)
    if image.ndim != 4:
        raise ValueError(f"volume_slices: expected {image_key!r} of shape [1, H, W, Z], got {tuple(image.shape)}.")
    extra = {k: v for k, v in item.items() if k not in (image_key, label_key) and not isinstance(v, torch.Tensor)}
    plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    plain_label = None
    if label is not None:
        plain_label = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    out = []
    for z in range(image.shape[-1]):
        entry = {**extra, image_key: plain[..., z].clone(), "slice_index": z}
        if plain_label is not None:
            entry[label_key] = plain_label[..., z].clone()
            if foreground_only and not bool((entry[label_key] > 0).any()):
                continue
        out.append(entry)
    return out


def segmentation_augmentation(
    keys: Sequence[str] = ("image", "label"),
    image_key: str = "image",
    prob: float = 0.5,
    rotate_range: float = math.pi / 12,
    scale_range: float = 0.1,
    gamma: Sequence[float] = (0.7, 1.5),
    noise_std: float = 0.02,
) -> Compose:
    """Random augmentation of a 2-D training slice and its mask, in one resampling.

    ``RandAffined`` (rotation within +-``rotate_range`` rad and scaling within +-``scale_range``, bilinear for the
    image, nearest for the mask), gamma contrast (``RandAdjustContrastd``), Gaussian noise (``RandGaussianNoised``),
    then clipping to [0, 1]. Sizes are kept; the outputs are float32 tensors without metadata (a training slice
    needs none). Rotation and scaling are one affine resampling, unlike the separate rotation and zoom of
    :func:`~scripts.cardiac_augmentation`, because resampling dominates the cost of a slice.

    Args:
        keys: keys transformed spatially (the image first, then masks).
        image_key: the key whose intensities are augmented.
        prob: probability of each of the affine, contrast and noise steps.
        rotate_range: maximum absolute rotation in radians.
        scale_range: maximum relative scaling.
        gamma: range of the contrast gamma.
        noise_std: maximum standard deviation of the noise (intensities are in [0, 1]).

    Returns:
        a :class:`monai.transforms.Compose`.

    Example::

        train = SegmentationSliceDataset(frames, segmentation_preprocessing(), segmentation_augmentation(prob=0.5))
        train[0]["image"].shape  # torch.Size([1, 96, 96]), a new random augmentation at every access
    """
    # one resampling instead of rotation + zoom takes about half the time per slice; plain tensors (track_meta=False)
    # collate faster than MetaTensors
    return Compose([
        RandAffined(keys, prob=prob, rotate_range=rotate_range, scale_range=scale_range,
                    mode=interpolation_modes(keys, image_key), padding_mode="zeros", allow_missing_keys=True),
        *intensity_augmentation(image_key, prob, gamma, noise_std),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ])  # fmt: skip


class SegmentationSliceDataset(Dataset):
    """2-D training slices of preprocessed 3-D frames, computed once, served with an optional augmentation.

    Every frame entry goes through ``transform`` (e.g. :func:`segmentation_preprocessing`) once, at construction;
    its slices (by default those with a labelled voxel) are kept in memory, and ``slice_transform`` (e.g.
    :func:`segmentation_augmentation`) runs on each slice when
    it is drawn. One pass over the volumes replaces one file read per slice.

    Args:
        data: frame entries (:func:`segmentation_frames`).
        transform: the deterministic per-frame preprocessing.
        slice_transform: the per-slice (random) transform, or None.
        foreground_only: keep only slices with a labelled voxel.
        image_key: key of the image.
        label_key: key of the mask.

    Raises:
        ValueError: when no slice is left (e.g. empty data).

    Example::

        train = SegmentationSliceDataset(segmentation_frames(subjects), segmentation_preprocessing((96, 96)),
                                         segmentation_augmentation())
        DataLoader(train, batch_size=16, shuffle=True)  # batches of image/label [16, 1, 96, 96], group [16]
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Any,
        slice_transform: Any = None,
        foreground_only: bool = True,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        slices: list[dict[str, Any]] = []
        for entry in data:
            item = transform(dict(entry)) if transform is not None else dict(entry)
            slices += volume_slices(item, image_key, label_key, foreground_only)
        if not slices:
            raise ValueError(
                f"SegmentationSliceDataset: no slice in {len(data)} frame(s) (foreground_only={foreground_only})."
            )
        self.volumes = len(data)
        super().__init__(slices, transform=slice_transform)
