"""Distillation and group-robust losses (torch and MONAI only; no ignite needed)."""

from monai_groupdistil.losses.dice import PerSampleDiceCELoss, soft_dice_per_sample
from monai_groupdistil.losses.distillation import DistillationLoss, distillation_per_sample
from monai_groupdistil.losses.group_distillation import GroupDistillationLoss
from monai_groupdistil.losses.group_dro import ABSENT_GROUP_RULES, GroupDROLoss

__all__ = [
    "ABSENT_GROUP_RULES",
    "DistillationLoss",
    "GroupDROLoss",
    "GroupDistillationLoss",
    "PerSampleDiceCELoss",
    "distillation_per_sample",
    "soft_dice_per_sample",
]
