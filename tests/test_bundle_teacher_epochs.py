"""``teacher_epochs`` is the length of a teacher run (``train.json`` + ``train_teacher.json``): ``--epochs`` is the
students' length and does not change it."""

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


def test_the_teacher_trainer_runs_teacher_epochs(tmp_path):
    """Through ConfigWorkflow: with epochs=3 and teacher_epochs=2 the teacher config's trainer has max_epochs 2."""
    bundle = Bundle("cardiac_mri_groupdistil")
    make_tiny_data(bundle.name, tmp_path / "data")
    ov = bundle.run_overrides(tmp_path, **TINY[bundle.name], epochs=3, teacher_epochs=2)
    wf = bundle.workflow(bundle.configs("train", "train_teacher"), ov)
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.max_epochs == 2
