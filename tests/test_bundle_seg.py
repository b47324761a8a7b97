"""Bad input through the segmentation bundle (``bundles/cardiac_mri_seg_groupdistil``), run as a user runs it
(``ConfigWorkflow`` of ``train.json``) on tiny generated data with one training subject's mask spoiled: every
error names the file and what is wrong with it.

The behaviour the segmentation bundle shares with the classification bundles is tested in ``test_bundles.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_helpers import TINY, Bundle, error_chain, make_tiny_data, one_thread, root_error  # noqa: F401 (an autouse fixture)

SEG = Bundle("cardiac_mri_seg_groupdistil")
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny dataset and one of its training subjects (its entry of the bundle's ``splits``)."""
    base = tmp_path_factory.mktemp("seg_bad_input")
    make_tiny_data(SEG.name, base / "data")
    overrides = SEG.run_overrides(base, epochs=1, **TINY[SEG.name])
    subject = SEG.workflow(SEG.configs("train"), overrides).parser.get_parsed_content("splits")["train"][0]
    return {"data": base / "data", "overrides": overrides, "subject": subject}


def _spoil(tiny: dict, tmp_path: Path, change) -> tuple[dict, Path]:
    """A copy of the dataset whose training subject's mask ``change(mask, ed_frame)`` rewrote (None: removed);
    returns the overrides of a run on it and the mask file."""
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    mask_file = Path(str(tiny["subject"]["label"]).replace(str(tiny["data"]), str(data)))
    mask = nib.load(mask_file)
    new = change(np.asarray(mask.dataobj).copy(), tiny["subject"]["frame_index"])
    mask_file.unlink()
    if new is not None:
        nib.save(nib.Nifti1Image(new, mask.affine, mask.header), str(mask_file))
    folders = {f"{k}_dir": str(tmp_path / k) for k in ("ckpt", "output", "log")}
    return {**tiny["overrides"], **folders, "dataset_dir": str(data)}, mask_file


def _run_error(overrides: dict) -> BaseException:
    with pytest.raises(Exception) as info:
        wf = SEG.workflow(SEG.configs("train", "train_teacher"), overrides)
        wf.run()
    return info.value


def _set_label(value: int):
    def change(mask: np.ndarray, frame: int) -> np.ndarray:
        mask[0, 0, 0, frame] = value
        return mask

    return change


def test_mask_label_outside_0_to_3_is_named_with_its_file_and_value(tiny, tmp_path):
    overrides, mask_file = _spoil(tiny, tmp_path, _set_label(7))
    error = _run_error(overrides)
    assert isinstance(root_error(error), ValueError)
    message = str(root_error(error))
    assert f"mask {mask_file} (frame {tiny['subject']['frame_index']}) holds label(s) [7] outside 0-3" in message
    assert "(expected 0 background, 1 LV, 2 MYO, 3 RV)" in message
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())  # nothing trained


def test_mask_of_another_shape_than_its_image_is_named_with_both_shapes(tiny, tmp_path):
    overrides, mask_file = _spoil(tiny, tmp_path, lambda mask, frame: mask[:-2])  # two columns fewer
    error = _run_error(overrides)
    assert isinstance(root_error(error), ValueError)
    message = str(root_error(error))
    image_file = Path(str(mask_file).replace("_sa_gt.nii.gz", "_sa.nii.gz"))
    shape = nib.load(image_file).shape  # the 4-D cine: (x, y, z, t)
    short = (shape[0] - 2, *shape[1:])
    assert f"mask {mask_file} has shape {short}, its image {image_file} has {shape}" in message, message


def test_training_image_without_a_mask_at_ed_is_named(tiny, tmp_path):
    """A mask with no labelled voxel at the subject's ED/ES frame: the mask file and the frame are named."""

    def clear(mask: np.ndarray, frame: int) -> np.ndarray:
        mask[..., frame] = 0
        return mask

    overrides, mask_file = _spoil(tiny, tmp_path, clear)
    error = _run_error(overrides)
    assert isinstance(root_error(error), ValueError)
    message = str(root_error(error))
    assert f"mask {mask_file} (frame {tiny['subject']['frame_index']}) has no labelled voxel" in message
    assert "the ED/ES index right?" in message


def test_training_image_without_its_mask_file_is_named(tiny, tmp_path):
    """No ground-truth file at all for a training subject: its image and frame are named before anything runs."""
    overrides, mask_file = _spoil(tiny, tmp_path, lambda mask, frame: None)
    error = _run_error(overrides)
    assert isinstance(root_error(error), ValueError)
    message = error_chain(error)
    image = str(tiny["subject"]["image"]).replace(str(tiny["data"]), overrides["dataset_dir"])
    assert f"image {image} has no mask at " in message and "need the ground truth at ED and ES" in message
    assert not mask_file.exists()
