"""Group-robust evaluation metrics (torch and MONAI only): per-group accuracy and any per-sample metric per group."""

from monai_groupdistil.metrics.group_accuracy import GroupAccuracy, compute_group_accuracy, per_sample_accuracy
from monai_groupdistil.metrics.group_metric import GroupMetric, per_sample_values, summarise_group_values

__all__ = [
    "GroupAccuracy",
    "GroupMetric",
    "compute_group_accuracy",
    "per_sample_accuracy",
    "per_sample_values",
    "summarise_group_values",
]
