# ruff: noqa: F401 -- re-exports: the names the bundle configs call
"""The cardiac classification bundle's own code (the model zoo's ``scripts/`` folder): the M&Ms data set-up and its
synthetic stand-in, the cardiac transforms, the teacher, resume and tracking.

This file is the bundle's own. The modules it imports are written once, in the repository's
``bundles/shared/scripts/``, and ``python scripts/sync_bundle_configs.py`` copies here the ones this file imports
(and the ones those import). The configs call the code as ``"$scripts.mnms_splits(...)"`` and import it from the
working directory, so run the commands from the bundle folder. This is bundle plumbing, not API: a pipeline of your
own imports ``monai_groupdistil`` instead.
"""

from monai_groupdistil.engines.checkpoints import output_classes

from .cardiac_transforms import cardiac_augmentation, cardiac_preprocessing
from .checkpoints import dro_state_file, file_digest, load_teacher, require_checkpoint
from .config import check_booleans, teacher_checkpoint, teacher_loss
from .distributed import close_process_group
from .mnms_datasets import inference_datalist, mnms_splits, prepare_mnms_dataset
from .resume import RunSettings, attach_resume
from .synthetic import make_synthetic_mnms
from .tracking import WorstGroupHandler, loss_parameters, run_parameters, track_run
