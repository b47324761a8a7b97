# ruff: noqa: F401 -- re-exports: the names the bundle configs call
"""The Waterbirds bundle's own code (the model zoo's ``scripts/`` folder): the Waterbirds data set-up and its
synthetic stand-in, the natural-image transforms, pretrained weights, the teacher, resume and tracking.

This file is the bundle's own. The modules it imports are written once, in the repository's
``bundles/shared/scripts/``, and ``python scripts/sync_bundle_configs.py`` copies here the ones this file imports
(and the ones those import). The configs call the code as ``"$scripts.waterbirds_splits(...)"`` and import it from
the working directory, so run the commands from the bundle folder. This is bundle plumbing, not API: a pipeline of
your own imports ``monai_groupdistil`` instead.
"""

from monai_groupdistil.engines.checkpoints import output_classes

from .checkpoints import dro_state_file, file_digest, load_teacher, require_checkpoint
from .config import check_booleans, teacher_checkpoint, teacher_loss
from .distributed import close_process_group
from .natural_transforms import natural_image_augmentation, natural_image_datalist, natural_image_preprocessing
from .pretrained import load_pretrained
from .resume import RunSettings, attach_resume
from .synthetic_waterbirds import make_synthetic_waterbirds
from .tracking import WorstGroupHandler, loss_parameters, run_parameters, track_run
from .waterbirds_datasets import prepare_waterbirds_dataset, waterbirds_splits
