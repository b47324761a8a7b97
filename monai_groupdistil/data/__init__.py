"""Data layer: M&Ms / M&Ms-2 datalists with vendor and centre groups, a synthetic multi-vendor cine generator in
the M&Ms layout, ED/ES segmentation frames and slices, cardiac preprocessing transforms, group-balanced sampling,
and the Waterbirds datalist, its synthetic stand-in and ImageNet-style preprocessing for natural images.

Log messages (counts of left-out or skipped subjects, group sizes) go to the ``monai_groupdistil.data`` logger.
Names are imported lazily, so ``python -m monai_groupdistil.data.synthetic`` and the datalist loaders do not
import torch or MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "mnms": (
        "MNMS_CLASSES",
        "MNMS2_CLASSES",
        "MNMS_CSV_COLUMNS",
        "MNMS_CSV_NAME",
        "MNMS_VENDORS",
        "MNMS_VENDOR_NAMES",
        "load_mnms_datalist",
        "load_mnms2_datalist",
        "mnms_group_names",
        "mnms2_group_names",
    ),
    "synthetic": ("VENDOR_PROFILES", "make_synthetic_mnms"),
    "segmentation": (
        "SEG_LABELS",
        "SEG_STRUCTURES",
        "CheckSegmentationd",
        "SegmentationSliceDataset",
        "segmentation_augmentation",
        "segmentation_frames",
        "segmentation_preprocessing",
        "volume_slices",
    ),
    "splits": ("split_by_group",),
    "samplers": ("GroupBalancedSampler",),
    "transforms": (
        "LoadCardiacImaged",
        "SelectFramed",
        "SelectMidVentricularSliced",
        "CropAroundHeartd",
        "cardiac_preprocessing",
        "cardiac_augmentation",
        "slice_affine_2d",
    ),
    "waterbirds": (
        "WATERBIRDS_COLUMNS",
        "WATERBIRDS_GROUP_NAMES",
        "WATERBIRDS_SPLITS",
        "load_waterbirds_datalist",
        "make_synthetic_waterbirds",
    ),
    "natural_transforms": ("natural_image_preprocessing", "natural_image_augmentation", "natural_image_datalist"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for static analysis and IDEs
    from monai_groupdistil.data.mnms import (  # noqa: F401
        MNMS2_CLASSES,
        MNMS_CLASSES,
        MNMS_CSV_COLUMNS,
        MNMS_CSV_NAME,
        MNMS_VENDOR_NAMES,
        MNMS_VENDORS,
        load_mnms2_datalist,
        load_mnms_datalist,
        mnms2_group_names,
        mnms_group_names,
    )
    from monai_groupdistil.data.natural_transforms import (  # noqa: F401
        natural_image_augmentation,
        natural_image_datalist,
        natural_image_preprocessing,
    )
    from monai_groupdistil.data.samplers import GroupBalancedSampler  # noqa: F401
    from monai_groupdistil.data.segmentation import (  # noqa: F401
        SEG_LABELS,
        SEG_STRUCTURES,
        CheckSegmentationd,
        SegmentationSliceDataset,
        segmentation_augmentation,
        segmentation_frames,
        segmentation_preprocessing,
        volume_slices,
    )
    from monai_groupdistil.data.splits import split_by_group  # noqa: F401
    from monai_groupdistil.data.synthetic import VENDOR_PROFILES, make_synthetic_mnms  # noqa: F401
    from monai_groupdistil.data.transforms import (  # noqa: F401
        CropAroundHeartd,
        LoadCardiacImaged,
        SelectFramed,
        SelectMidVentricularSliced,
        cardiac_augmentation,
        cardiac_preprocessing,
        slice_affine_2d,
    )
    from monai_groupdistil.data.waterbirds import (  # noqa: F401
        WATERBIRDS_COLUMNS,
        WATERBIRDS_GROUP_NAMES,
        WATERBIRDS_SPLITS,
        load_waterbirds_datalist,
        make_synthetic_waterbirds,
    )
