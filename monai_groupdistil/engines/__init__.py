"""Ignite/MONAI engines for distillation and group-robust training (need pytorch-ignite)."""

from monai_groupdistil.engines.adapters import GroupDistillationLossAdapter, GroupPrepareBatch
from monai_groupdistil.engines.teacher_cache import TeacherOutputCache, has_random_transforms, run_teacher
from monai_groupdistil.engines.trainer import GROUP, TEACHER_PRED, DistillationTrainer, compute_distillation_loss

__all__ = [
    "DistillationTrainer",
    "GroupDistillationLossAdapter",
    "GroupPrepareBatch",
    "TeacherOutputCache",
    "has_random_transforms",
    "run_teacher",
    "compute_distillation_loss",
    "GROUP",
    "TEACHER_PRED",
]
