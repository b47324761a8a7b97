"""The bundle id ``teacher_method`` (``erm`` or ``group_dro``), for both classification bundles."""

from __future__ import annotations

import pytest
import torch

from monai_groupdistil.data import make_synthetic_mnms
from monai_groupdistil.losses import GroupDROLoss
from tests.bundle_helpers import Bundle, error_chain, root_error

BUNDLES = {
    "cardiac_mri_groupdistil": {"epochs": 1, "teacher_epochs": 1, "spatial_size": [32, 32], "pixdim": [4.0, 4.0]},
    "waterbirds_groupdistil": {
        "epochs": 1,
        "teacher_epochs": 1,
        "synthetic_images": 24,
        "synthetic_image_size": 32,
        "spatial_size": [32, 32],
        "resize": [36, 36],
    },
}
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def bundle(request, tmp_path_factory):
    name = request.param
    base = tmp_path_factory.mktemp(name)
    if name == "cardiac_mri_groupdistil":
        make_synthetic_mnms(base / "data", n_subjects=24, seed=1, matrix_scale=0.5, n_frames=4)
    return Bundle(name), Bundle(name).run_overrides(base, batch_size=4, **BUNDLES[name])


def test_group_dro_teacher_is_configured_and_saved_apart(bundle):
    b, overrides = bundle
    ckpt_dir = overrides["ckpt_dir"]
    erm = b.workflow(b.configs("train", "train_teacher"), overrides)
    assert type(erm.parser.get_parsed_content("loss")) is torch.nn.CrossEntropyLoss
    assert erm.parser.get_parsed_content("ckpt_name") == "teacher.pt"
    robust = b.workflow(
        b.configs("train", "train_teacher"), {**overrides, "teacher_method": "group_dro", "teacher_step_size": 0.3}
    )
    loss = robust.parser.get_parsed_content("loss")
    assert isinstance(loss, GroupDROLoss) and loss.step_size == 0.3
    assert loss.absent_groups == b.raw_config("train")["absent_groups"]  # the run's rule
    assert loss.num_groups == robust.parser.get_parsed_content("num_groups")
    handlers = robust.parser.get_parsed_content("train#handlers")
    assert any(type(h).__name__ == "GroupDROHandler" for h in handlers)  # the teacher's DRO weights are managed
    assert robust.parser.get_parsed_content("ckpt_name") == "teacher_group_dro.pt"
    student = b.workflow(b.configs("train"), {**overrides, "teacher_method": "group_dro"}, initialize=False)
    assert student.parser.get_parsed_content("teacher_ckpt") == f"{ckpt_dir}/teacher_group_dro.pt"


def test_unknown_teacher_method_is_named(bundle):
    b, overrides = bundle
    wf = b.workflow(b.configs("train", "train_teacher"), {**overrides, "teacher_method": "dro"}, initialize=False)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), ValueError)
    assert "teacher_method must be one of ('erm', 'group_dro'), got 'dro'" in error_chain(info.value)


def test_student_distils_from_the_group_dro_teacher_through_the_cli(bundle):
    """A GroupDRO teacher trained by the CLI is the one the GroupDistil student loads (and nothing else is)."""
    b, overrides = bundle
    robust = {**overrides, "teacher_method": "group_dro", "step_size": 0.5}
    b.run_cli(b.configs("train", "train_teacher"), robust)
    saved = torch.load(f"{overrides['ckpt_dir']}/teacher_group_dro.pt", map_location="cpu", weights_only=True)
    weights = saved["loss"]["group_weights"]
    assert not torch.equal(weights, torch.full_like(weights, 1 / len(weights)))  # the teacher's DRO weights moved
    student = b.workflow(b.configs("train"), robust)
    teacher = student.parser.get_parsed_content("teacher")
    for name, value in teacher.state_dict().items():
        assert torch.equal(value.cpu(), saved["model"][name]), name
