"""The teacher's own ids: ``teacher_epochs`` is the length of a teacher run (``train.json`` + ``train_teacher.json``),
``teacher_weight_decay`` its optimiser's weight decay and ``teacher_balanced_sampling`` its sampler; ``--epochs``,
``--weight_decay`` and ``--balanced_sampling`` are the students' and do not change them."""

from __future__ import annotations

import pytest

from tests.bundle_helpers import BUNDLES, TEACHER_CHECKPOINTS, TINY, Bundle, make_tiny_data, one_thread  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


@pytest.mark.parametrize("name", BUNDLES)
def test_epochs_does_not_override_teacher_epochs_in_teacher_runs(name, tmp_path):
    bundle = Bundle(name)
    ov = bundle.run_overrides(tmp_path, epochs=3, teacher_epochs=2)
    teacher = bundle.workflow(bundle.configs("train", "train_teacher"), ov, initialize=False).parser
    assert teacher.get_parsed_content("train#trainer#max_epochs") == 2
    assert teacher.get_parsed_content("tracking_params")["epochs"] == 2  # what MLflow records
    student = bundle.workflow(bundle.configs("train"), ov, initialize=False).parser
    assert student.get_parsed_content("train#trainer#max_epochs") == 3
    assert student.get_parsed_content("tracking_params")["epochs"] == 3


@pytest.mark.parametrize("name", BUNDLES)
def test_weight_decay_does_not_override_teacher_weight_decay_in_teacher_runs(name, tmp_path):
    bundle = Bundle(name)
    ov = bundle.run_overrides(tmp_path, weight_decay=0.25, teacher_weight_decay=0.75)
    teacher = bundle.workflow(bundle.configs("train", "train_teacher"), ov, initialize=False).parser
    assert [g["weight_decay"] for g in teacher.get_parsed_content("optimizer").param_groups] == [0.75]
    assert teacher.get_parsed_content("tracking_params")["weight_decay"] == 0.75  # what MLflow records
    student = bundle.workflow(bundle.configs("train"), ov, initialize=False).parser
    assert [g["weight_decay"] for g in student.get_parsed_content("optimizer").param_groups] == [0.25]
    assert student.get_parsed_content("tracking_params")["weight_decay"] == 0.25


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("teacher_sampling", [True, False])
def test_balanced_sampling_does_not_override_teacher_balanced_sampling_in_teacher_runs(
    name, teacher_sampling, tmp_path
):
    bundle = Bundle(name)
    ov = bundle.run_overrides(
        tmp_path, balanced_sampling=not teacher_sampling, teacher_balanced_sampling=teacher_sampling
    )
    teacher = bundle.workflow(bundle.configs("train", "train_teacher"), ov, initialize=False).parser
    assert (teacher.get_parsed_content("train#sampler") is not None) is teacher_sampling  # GroupBalancedSampler
    assert teacher.get_parsed_content("tracking_params")["balanced_sampling"] is teacher_sampling
    student = bundle.workflow(bundle.configs("train"), ov, initialize=False).parser
    assert (student.get_parsed_content("train#sampler") is not None) is not teacher_sampling


# each bundle's default teacher, the benchmark's teacher of the setting family (the READMEs say which):
# teacher_method, teacher_weight_decay, teacher_balanced_sampling
DEFAULT_TEACHERS = {
    "cardiac_mri_groupdistil": ("erm", 0.0, False),
    "waterbirds_groupdistil": ("erm", 0.0, False),
    "cardiac_mri_seg_groupdistil": ("group_dro", 1.0, True),  # since 0.8.0, the segmentation benchmark's choice
}


@pytest.mark.parametrize("name", BUNDLES)
def test_each_bundle_trains_its_documented_default_teacher(name, tmp_path):
    """Without overrides the teacher run trains the bundle's default teacher (its checkpoint name) with the
    optimiser's weight decay of ``teacher_weight_decay`` and the sampler of ``teacher_balanced_sampling``, whatever
    the students' (the segmentation bundle: 1.0 for its GroupDRO teacher, 0 for its students; the classification
    bundles: natural sampling for their teachers, the balanced sampler for their students); the student run reads
    that checkpoint."""
    method, decay, balanced = DEFAULT_TEACHERS[name]
    bundle = Bundle(name)
    teacher = bundle.workflow(
        bundle.configs("train", "train_teacher"), bundle.run_overrides(tmp_path), initialize=False
    )
    parser = teacher.parser
    assert parser.get_parsed_content("ckpt_name") == TEACHER_CHECKPOINTS[method]
    assert [g["weight_decay"] for g in parser.get_parsed_content("optimizer").param_groups] == [decay]
    assert (parser.get_parsed_content("train#sampler") is not None) is balanced
    student = bundle.workflow(bundle.configs("train"), bundle.run_overrides(tmp_path), initialize=False).parser
    assert student.get_parsed_content("teacher_ckpt").endswith("/" + parser.get_parsed_content("ckpt_name"))


def test_the_teacher_trainer_runs_teacher_epochs(tmp_path):
    """Through ConfigWorkflow: with epochs=3 and teacher_epochs=2 the teacher config's trainer has max_epochs 2."""
    bundle = Bundle("cardiac_mri_groupdistil")
    make_tiny_data(bundle.name, tmp_path / "data")
    ov = bundle.run_overrides(tmp_path, **TINY[bundle.name], epochs=3, teacher_epochs=2)
    wf = bundle.workflow(bundle.configs("train", "train_teacher"), ov)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 2
