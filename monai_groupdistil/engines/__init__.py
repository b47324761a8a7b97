"""Ignite/MONAI engines for distillation and group-robust training (need pytorch-ignite)."""

from monai_groupdistil.engines.checkpoint_saver import (
    AtomicDiskSaver,
    BestModelSaver,
    atomic_save,
    dro_state_filename,
    remove_temporary_files,
)
from monai_groupdistil.engines.checkpoints import load_network, load_teacher, output_classes, read_checkpoint
from monai_groupdistil.engines.resume_state import BestMetricState, RandomStates
from monai_groupdistil.engines.teacher_cache import TeacherOutputCache, has_random_transforms, run_teacher
from monai_groupdistil.engines.trainer import (
    GROUP,
    SUBJECT_KEYS,
    TEACHER_PRED,
    DistillationTrainer,
    loss_keywords,
    sample_names,
)

__all__ = [
    "AtomicDiskSaver",
    "BestMetricState",
    "BestModelSaver",
    "RandomStates",
    "DistillationTrainer",
    "TeacherOutputCache",
    "atomic_save",
    "dro_state_filename",
    "has_random_transforms",
    "load_network",
    "load_teacher",
    "output_classes",
    "read_checkpoint",
    "remove_temporary_files",
    "loss_keywords",
    "run_teacher",
    "sample_names",
    "GROUP",
    "SUBJECT_KEYS",
    "TEACHER_PRED",
]
