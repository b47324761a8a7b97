# ruff: noqa: F401 -- re-exports: the names the bundle configs call
"""The bundles' own code (the model zoo's ``scripts/`` folder): data set-up, transforms, synthetic data, resume.

Edit the modules here, in ``bundles/shared/scripts/``; ``python scripts/sync_bundle_configs.py`` copies into each
bundle's ``scripts/`` the modules that the bundle's own ``scripts/__init__.py`` imports, and the modules those import,
so each bundle folder is self-contained and holds only its own code, as a zoo bundle does. This ``__init__.py`` is
not copied: it imports every module, for the tests and benchmarks. The configs call the code as
``"$scripts.mnms_splits(...)"`` and import it from the working directory, so run the commands from the bundle folder.
This is bundle plumbing, not API: a pipeline of your own imports ``monai_groupdistil`` instead.
"""

from monai_groupdistil.engines.checkpoints import load_network, output_classes

from .cardiac_transforms import (
    CropAroundHeartd,
    LoadCardiacImaged,
    SelectFramed,
    SelectMidVentricularSliced,
    cardiac_augmentation,
    cardiac_preprocessing,
    slice_affine_2d,
)
from .checkpoints import dro_state_file, file_digest, load_teacher, require_checkpoint, require_file
from .config import TEACHER_METHODS, check_booleans, teacher_checkpoint, teacher_loss
from .datasets import group_counts
from .distributed import close_process_group
from .mnms_datasets import find_mnms_root, inference_datalist, mnms_splits, prepare_mnms_dataset
from .natural_transforms import natural_image_augmentation, natural_image_datalist, natural_image_preprocessing
from .pretrained import load_pretrained
from .resume import RunSettings, attach_resume, check_resume_checkpoint, latest_checkpoint, usable_checkpoint
from .run_lock import RunLock
from .segmentation import (
    SEG_LABELS,
    SEG_STRUCTURES,
    CheckSegmentationd,
    SegmentationSliceDataset,
    segmentation_augmentation,
    segmentation_frames,
    segmentation_preprocessing,
    volume_slices,
)
from .segmentation_datasets import prepare_seg_dataset, seg_inference_datalist, seg_splits
from .synthetic import PATHOLOGY_PROFILES, VENDOR_PROFILES, make_synthetic_mnms
from .synthetic_waterbirds import make_synthetic_waterbirds
from .tracking import WorstGroupHandler, loss_parameters, run_parameters, track_run
from .waterbirds_datasets import prepare_waterbirds_dataset, waterbirds_splits
