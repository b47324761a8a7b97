"""Support code shared by the package's MONAI bundles (``bundles/``): dataset set-up, checkpoints, resume, tracking.

Everything here is plain functions and small classes called from bundle configs
(``"$monai_groupdistil.bundle.mnms_splits(...)"``), so that every bundle shares one implementation of its plumbing
(:py:func:`attach_resume`, :py:func:`run_parameters`, :py:func:`load_teacher`...) and each config keeps only what
is its own.
"""

from monai_groupdistil.bundle.checkpoints import dro_state_file, load_teacher, require_checkpoint, require_file
from monai_groupdistil.bundle.config import (
    TEACHER_METHODS,
    check_booleans,
    teacher_checkpoint,
    teacher_loss,
)
from monai_groupdistil.bundle.datasets import (
    find_mnms_root,
    group_counts,
    inference_datalist,
    mnms_splits,
    prepare_mnms_dataset,
    prepare_waterbirds_dataset,
    waterbirds_splits,
)
from monai_groupdistil.bundle.distributed import close_process_group
from monai_groupdistil.bundle.pretrained import load_pretrained
from monai_groupdistil.bundle.resume import (
    BestMetricState,
    RandomStates,
    RunSettings,
    attach_resume,
    check_resume_checkpoint,
    latest_checkpoint,
    usable_checkpoint,
)
from monai_groupdistil.bundle.run_lock import RunLock
from monai_groupdistil.bundle.tracking import WorstGroupHandler, run_parameters, track_run
from monai_groupdistil.engines.checkpoints import load_network, output_classes

__all__ = [
    "BestMetricState",
    "TEACHER_METHODS",
    "RandomStates",
    "RunLock",
    "RunSettings",
    "WorstGroupHandler",
    "attach_resume",
    "check_resume_checkpoint",
    "close_process_group",
    "dro_state_file",
    "check_booleans",
    "find_mnms_root",
    "group_counts",
    "inference_datalist",
    "latest_checkpoint",
    "load_network",
    "load_pretrained",
    "load_teacher",
    "mnms_splits",
    "output_classes",
    "prepare_mnms_dataset",
    "prepare_waterbirds_dataset",
    "require_checkpoint",
    "require_file",
    "run_parameters",
    "teacher_checkpoint",
    "teacher_loss",
    "track_run",
    "usable_checkpoint",
    "waterbirds_splits",
]
