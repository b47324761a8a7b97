"""Data: the M&Ms / M&Ms-2 and Waterbirds datalists with their groups, group-balanced sampling, group names, a
group-stratified split, and a dataset and loader that set failing items aside (inference that keeps what it can).

The bundles' transforms and synthetic data generators are bundle code, in ``bundles/shared/scripts/``.

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
from monai_groupdistil.data.samplers import GroupBalancedSampler
from monai_groupdistil.data.skip_failed import FAILURE_KEY, SkipFailedDataset, SkipFailedLoader, SkipNonFinited
from monai_groupdistil.data.splits import split_by_group
from monai_groupdistil.data.waterbirds import (
    WATERBIRDS_COLUMNS,
    WATERBIRDS_GROUP_NAMES,
    WATERBIRDS_SPLITS,
    load_waterbirds_datalist,
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
    "split_by_group",
    "FAILURE_KEY",
    "SkipFailedDataset",
    "SkipFailedLoader",
    "SkipNonFinited",
    "GroupBalancedSampler",
    "WATERBIRDS_COLUMNS",
    "WATERBIRDS_GROUP_NAMES",
    "WATERBIRDS_SPLITS",
    "load_waterbirds_datalist",
]
