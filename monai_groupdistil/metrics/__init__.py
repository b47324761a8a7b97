"""Group-robust evaluation metrics (torch and MONAI only)."""

from monai_groupdistil.metrics.group_accuracy import GroupAccuracy, compute_group_accuracy, per_sample_accuracy

__all__ = ["GroupAccuracy", "compute_group_accuracy", "per_sample_accuracy"]
