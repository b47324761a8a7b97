# ruff: noqa: F401 -- re-exports: the names the bundle configs call
"""The cardiac segmentation bundle's own code (the model zoo's ``scripts/`` folder): the M&Ms / M&Ms-2 data set-up
and its synthetic stand-in, the slice dataset and transforms, the teacher, resume and tracking.

This file is the bundle's own. The modules it imports are written once, in the repository's
``bundles/shared/scripts/``, and ``python scripts/sync_bundle_configs.py`` copies here the ones this file imports
(and the ones those import). The configs call the code as ``"$scripts.segmentation_datasets.seg_splits(...)"`` and
import it from the working directory, so run the commands from the bundle folder. This is bundle plumbing, not API:
a pipeline of your own imports ``monai_groupdistil`` instead.
"""

from .checkpoints import dro_state_file, file_digest, load_teacher, require_checkpoint
from .config import check_booleans, teacher_checkpoint, teacher_loss
from .distributed import close_process_group
from .resume import RunSettings, attach_resume
from .segmentation import (
    SegmentationSliceDataset,
    segmentation_augmentation,
    segmentation_frames,
    segmentation_preprocessing,
)
from .segmentation_datasets import prepare_seg_dataset, seg_inference_datalist, seg_splits
from .synthetic import make_synthetic_mnms
from .tracking import WorstGroupHandler, loss_parameters, run_parameters, track_run
