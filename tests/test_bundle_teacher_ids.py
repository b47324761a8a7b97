"""The teacher's own ids: ``teacher_epochs`` is the length of a teacher run (``train.json`` + ``train_teacher.json``)
and ``teacher_weight_decay`` its optimiser's weight decay; ``--epochs`` and ``--weight_decay`` are the students' and do
not change them."""

from __future__ import annotations

import pytest

from tests.bundle_helpers import BUNDLES, TINY, Bundle, make_tiny_data, one_thread  # noqa: F401 (an autouse fixture)

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
def test_the_default_teacher_weight_decay_is_the_bundles_value(name, tmp_path):
    """Without overrides the teacher's optimiser takes ``teacher_weight_decay`` from ``train.json``, whatever the
    students' ``weight_decay`` (the segmentation bundle: 1.0 for its GroupDRO teacher, 0 for its students)."""
    bundle = Bundle(name)
    raw = bundle.raw_config("train")
    teacher = bundle.workflow(
        bundle.configs("train", "train_teacher"), bundle.run_overrides(tmp_path), initialize=False
    )
    decays = [g["weight_decay"] for g in teacher.parser.get_parsed_content("optimizer").param_groups]
    assert decays == [raw["teacher_weight_decay"]]


def test_the_teacher_trainer_runs_teacher_epochs(tmp_path):
    """Through ConfigWorkflow: with epochs=3 and teacher_epochs=2 the teacher config's trainer has max_epochs 2."""
    bundle = Bundle("cardiac_mri_groupdistil")
    make_tiny_data(bundle.name, tmp_path / "data")
    ov = bundle.run_overrides(tmp_path, **TINY[bundle.name], epochs=3, teacher_epochs=2)
    wf = bundle.workflow(bundle.configs("train", "train_teacher"), ov)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 2
