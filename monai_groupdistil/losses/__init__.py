"""Distillation and group-robust losses (torch and MONAI only; no ignite needed)."""

from monai_groupdistil.losses.checks import NonFiniteValueError
from monai_groupdistil.losses.distillation import DistillationLoss, PerSampleDiceCELoss, distillation_per_sample
from monai_groupdistil.losses.group_distillation import GroupDistillationLoss
from monai_groupdistil.losses.group_dro import GroupDROLoss

__all__ = [
    "DistillationLoss",
    "GroupDROLoss",
    "GroupDistillationLoss",
    "NonFiniteValueError",
    "PerSampleDiceCELoss",
    "distillation_per_sample",
]
