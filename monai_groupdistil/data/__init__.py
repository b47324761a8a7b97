"""Data layer: M&Ms / M&Ms-2 datalists with vendor and centre groups, a synthetic multi-vendor cine generator in
the M&Ms layout, ED/ES segmentation frames and slices, cardiac preprocessing transforms, group-balanced sampling,
the Waterbirds datalist, its synthetic stand-in and ImageNet-style preprocessing for natural images, and a dataset
and loader that set failing items aside (inference that keeps what it can).

Log messages (counts of left-out or skipped subjects, group sizes) go to the ``monai_groupdistil.data`` logger.
"""

from __future__ import annotations

from monai_groupdistil.data.groups import MapGroupNamesd
from monai_groupdistil.data.mnms import (
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
from monai_groupdistil.data.natural_transforms import (
    natural_image_augmentation,
    natural_image_datalist,
    natural_image_preprocessing,
)
from monai_groupdistil.data.samplers import GroupBalancedSampler
from monai_groupdistil.data.segmentation import (
    SEG_LABELS,
    SEG_STRUCTURES,
    CheckSegmentationd,
    SegmentationSliceDataset,
    segmentation_augmentation,
    segmentation_frames,
    segmentation_preprocessing,
    volume_slices,
)
from monai_groupdistil.data.skip_failed import FAILURE_KEY, SkipFailedDataset, SkipFailedLoader, SkipNonFinited
from monai_groupdistil.data.splits import split_by_group
from monai_groupdistil.data.synthetic import VENDOR_PROFILES, make_synthetic_mnms
from monai_groupdistil.data.transforms import (
    CropAroundHeartd,
    LoadCardiacImaged,
    SelectFramed,
    SelectMidVentricularSliced,
    cardiac_augmentation,
    cardiac_preprocessing,
    slice_affine_2d,
)
from monai_groupdistil.data.waterbirds import (
    WATERBIRDS_COLUMNS,
    WATERBIRDS_GROUP_NAMES,
    WATERBIRDS_SPLITS,
    load_waterbirds_datalist,
    make_synthetic_waterbirds,
)

__all__ = [
    "MapGroupNamesd",
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
    "VENDOR_PROFILES",
    "make_synthetic_mnms",
    "SEG_LABELS",
    "SEG_STRUCTURES",
    "CheckSegmentationd",
    "SegmentationSliceDataset",
    "segmentation_augmentation",
    "segmentation_frames",
    "segmentation_preprocessing",
    "volume_slices",
    "split_by_group",
    "FAILURE_KEY",
    "SkipFailedDataset",
    "SkipFailedLoader",
    "SkipNonFinited",
    "GroupBalancedSampler",
    "LoadCardiacImaged",
    "SelectFramed",
    "SelectMidVentricularSliced",
    "CropAroundHeartd",
    "cardiac_preprocessing",
    "cardiac_augmentation",
    "slice_affine_2d",
    "WATERBIRDS_COLUMNS",
    "WATERBIRDS_GROUP_NAMES",
    "WATERBIRDS_SPLITS",
    "load_waterbirds_datalist",
    "make_synthetic_waterbirds",
    "natural_image_preprocessing",
    "natural_image_augmentation",
    "natural_image_datalist",
]
