"""Non-finite values stop DistillationTrainer for every method, naming the samples (issue 24, item 4).

A NaN image in one sample stops training with a ``FloatingPointError`` that names that sample's subject (and not
the others of its batch) before the backward pass: the network's parameters, the optimizer and the DRO weights are
those of the previous iteration. A non-finite teacher output and a non-finite loss are stopped the same way; the
subject comes from the batch key, the image's ``filename_or_obj`` meta data, or the batch position. One bundle-level
test runs the cardiac bundle's ERM config on a dataset with NaN voxels in one study.
"""

from __future__ import annotations

import doctest
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, MetaTensor
from torch.utils.data import DataLoader as TorchDataLoader

from monai_groupdistil.engines import DistillationTrainer
from monai_groupdistil.engines import trainer as trainer_module
from monai_groupdistil.engines.trainer import SUBJECT_KEYS, sample_names
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss
from monai_groupdistil.losses.checks import NonFiniteValueError
from tests.bundle_helpers import TINY, Bundle, make_tiny_data, one_thread  # noqa: F401 (one_thread: autouse)
from tests.test_engines import NUM_GROUPS, make_data, make_student, make_teacher

BATCH, BAD = 4, 5  # the NaN sample is the second of the second batch


def subject_data(n: int = 12, bad: int | None = BAD, value: float = float("nan")) -> list[dict]:
    """``make_data`` with a subject per sample ("S00", "S01", ...) and ``value`` in one voxel of sample ``bad``."""
    data = make_data(n)
    for d in data:
        d["subject"] = f"S{d['id']:02d}"
    if bad is not None:
        data[bad]["image"] = data[bad]["image"].clone().index_fill(0, torch.tensor([3]), value)
    return data


# method -> (loss, with a teacher): teacher ERM / ERM, teacher GroupDRO / GroupDRO, KD, GroupDistil, and the
# distillation losses without a teacher (alpha = 0)
METHODS = {
    "erm": (lambda: torch.nn.CrossEntropyLoss(), False),
    "group_dro": (lambda: GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), NUM_GROUPS, step_size=0.1), False),
    "kd": (lambda: DistillationLoss(temperature=2.0, alpha=0.5), True),
    "groupdistil": (lambda: GroupDistillationLoss(NUM_GROUPS, temperature=2.0, alpha=0.5, step_size=0.1), True),
    "kd_without_teacher": (lambda: DistillationLoss(alpha=0.0), False),
    "groupdistil_without_teacher": (lambda: GroupDistillationLoss(NUM_GROUPS, alpha=0.0, step_size=0.1), False),
}


def build(data: list[dict], loss, teacher=None, loader=TorchDataLoader, **kwargs) -> DistillationTrainer:
    student = make_student()
    return DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader(data, batch_size=BATCH),
        network=student,
        optimizer=torch.optim.Adam(student.parameters(), 0.05),
        loss_function=loss,
        teacher=teacher,
        **kwargs,
    )


def snapshot(trainer: DistillationTrainer) -> dict:
    """The trainable state after every completed iteration: parameters, optimizer moments and DRO weights."""
    saved: dict = {}

    def _save(engine):
        saved["iteration"] = engine.state.iteration
        saved["params"] = [p.detach().clone() for p in engine.network.parameters()]
        saved["optimizer"] = {
            k: v.clone() for i, s in engine.optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)
        }
        loss = engine.student_loss
        saved["dro"] = loss.group_weights.clone() if isinstance(loss, GroupDROLoss) else None

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _save)
    return saved


def assert_unchanged(trainer: DistillationTrainer, saved: dict) -> None:
    after = [p.detach() for p in trainer.network.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, saved["params"]))
    assert all(bool(torch.isfinite(p).all()) for p in after)
    moments = {k: v for i, s in trainer.optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)}
    assert moments.keys() == saved["optimizer"].keys()
    assert all(torch.equal(moments[k], saved["optimizer"][k]) for k in moments)
    if saved["dro"] is not None:
        assert torch.equal(trainer.student_loss.group_weights, saved["dro"])


def named_subjects(message: str) -> set[str]:
    return set(re.findall(r"subject '(S\d\d)'", message))


@pytest.mark.parametrize("method", list(METHODS))
def test_nan_image_stops_every_method_naming_its_subject_only(method):
    make_loss, with_teacher = METHODS[method]
    trainer = build(subject_data(), make_loss(), make_teacher() if with_teacher else None)
    saved = snapshot(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    message = str(info.value)
    assert (
        "the student's prediction holds NaN or infinite values for 1 of the 4 samples of iteration 2 (epoch 1), and "
        "the input image holds NaN or infinite values for 1 of the batch's samples: subject 'S05'. Training was "
        "stopped before the backward pass, so no optimizer step was taken with this batch. Check these samples' input "
        "images (and the files they are read from) for NaN or infinite values"
    ) in message
    assert named_subjects(message) == {f"S{BAD:02d}"}  # not S04, S06 or S07 of the same batch
    assert trainer.state.iteration == 2 and saved["iteration"] == 1
    assert_unchanged(trainer, saved)  # no optimizer step with the NaN batch


@pytest.mark.parametrize("method", ["erm", "groupdistil"])
def test_nan_in_the_first_batch_leaves_the_initial_network(method):
    make_loss, with_teacher = METHODS[method]
    trainer = build(subject_data(bad=1, value=float("inf")), make_loss(), make_teacher() if with_teacher else None)
    initial = [p.detach().clone() for p in trainer.network.parameters()]
    dro = trainer.student_loss.group_weights.clone() if isinstance(trainer.student_loss, GroupDROLoss) else None
    with pytest.raises(
        FloatingPointError, match=r"of iteration 1 \(epoch 1\), and the input image .* samples: subject 'S01'\."
    ):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(trainer.network.parameters(), initial))
    assert not trainer.optimizer.state  # Adam never stepped
    if dro is not None:
        assert torch.equal(trainer.student_loss.group_weights, dro)


def test_a_batch_norm_student_names_the_sample_whose_input_is_not_finite():
    """Batch normalisation in training spreads one sample's NaN to the whole batch's prediction: the sample whose
    input image is not finite is the one named."""
    torch.manual_seed(1)
    student = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=TorchDataLoader(subject_data(), batch_size=BATCH),
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), 0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    saved = snapshot(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    message = str(info.value)
    assert "prediction holds NaN or infinite values for 4 of the 4 samples of iteration 2 (epoch 1), and" in message
    assert named_subjects(message) == {"S05"} and "such as batch normalisation" in message
    assert_unchanged(trainer, saved)


def test_several_bad_samples_are_all_named():
    data = subject_data(bad=None)
    for i in (4, 6):
        data[i]["image"] = data[i]["image"].clone().fill_(float("nan"))
    trainer = build(data, torch.nn.CrossEntropyLoss())
    with pytest.raises(FloatingPointError, match="for 2 of the 4 samples of iteration 2") as info:
        trainer.run()
    assert named_subjects(str(info.value)) == {"S04", "S06"}


class SpikyTeacher(torch.nn.Module):
    """``make_teacher()`` whose output is infinite for the inputs whose last feature is 123 (finite inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_teacher()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.where((x[:, -1:] == 123.0), torch.full_like(out, float("inf")), out)


@pytest.mark.parametrize("method", ["kd", "groupdistil"])
def test_non_finite_teacher_output_is_named_as_the_teacher_s(method):
    data = subject_data(bad=None)
    data[9]["image"] = data[9]["image"].clone().index_fill(0, torch.tensor([7]), 123.0)
    trainer = build(data, METHODS[method][0](), SpikyTeacher())
    saved = snapshot(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    message = str(info.value)
    assert "the teacher's output holds NaN or infinite values for 1 of the 4 samples of iteration 3 (epoch 1): " in (
        message
    )
    assert named_subjects(message) == {"S09"} and "student's prediction are finite: check the teacher" in message
    assert_unchanged(trainer, saved)


def regression_data(bad_label: int | None) -> list[dict]:
    data = subject_data(bad=None)
    for d in data:
        d["label"] = d["image"][:2].clone()  # a regression target [2] of the student's output [2]
    if bad_label is not None:
        data[bad_label]["label"] = torch.tensor([float("nan"), 0.0])
    return data


def test_non_finite_loss_rows_name_their_subjects():
    """A per-sample loss (reduction "none") names the rows that are not finite: here a NaN label, finite outputs."""
    trainer = build(regression_data(BAD), torch.nn.MSELoss(reduction="none"))
    saved = snapshot(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    message = str(info.value)
    assert (
        "the loss holds NaN or infinite values for 1 of the 4 samples of iteration 2 (epoch 1), and the label holds "
        "NaN or infinite values for 1 of the batch's samples: subject 'S05'."
    ) in message
    assert named_subjects(message) == {"S05"} and "Check these samples' labels (and the files" in message
    assert_unchanged(trainer, saved)


def test_non_finite_loss_value_names_the_batch():
    """A reduced loss names every sample of its batch, with the value."""
    trainer = build(regression_data(BAD), torch.nn.MSELoss())
    saved = snapshot(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    assert str(info.value).startswith(
        "DistillationTrainer: the loss (nan) is NaN or infinite for the batch of iteration 2 (epoch 1), and the label "
        "holds NaN or infinite values for 1 of the batch's samples: subject 'S05'."
    )
    assert saved["iteration"] == 1
    assert_unchanged(trainer, saved)


def test_a_dro_loss_s_own_refusal_names_the_batch():
    """GroupDROLoss (and GroupDistillationLoss, which reduces the same way) refuses non-finite group losses with a
    ``NonFiniteValueError``; the trainer re-raises it naming the batch's subjects, the weights untouched."""
    per_sample = torch.nn.CrossEntropyLoss(reduction="none")
    calls = {"n": 0}

    def base(input, target):
        calls["n"] += 1
        out = per_sample(input, target)
        return out + float("inf") if calls["n"] == 2 else out

    loss = GroupDROLoss(base, NUM_GROUPS, step_size=0.1)
    trainer = build(subject_data(bad=None), loss)
    saved = snapshot(trainer)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    message = str(info.value)
    assert "the loss is NaN or infinite for the batch of iteration 2 (epoch 1), whose 4 samples are: subject 'S04'" in (
        message
    )
    assert "The loss refused the batch: per-group losses are not finite for groups" in message
    assert named_subjects(message) == {"S04", "S05", "S06", "S07"}
    assert isinstance(info.value.__cause__, NonFiniteValueError) and isinstance(info.value.__cause__, ValueError)
    assert_unchanged(trainer, saved)


def test_the_loss_refusal_is_a_value_error_subclass():
    loss = GroupDistillationLoss(NUM_GROUPS, alpha=0.5)
    student = torch.randn(4, 2).index_fill(0, torch.tensor([1]), float("nan"))
    with pytest.raises(NonFiniteValueError, match="input holds NaN or infinite values"):
        loss(student, torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 0]))


def test_files_name_the_samples_without_a_subject_key():
    """MONAI's meta data: the image's ``filename_or_obj`` (a ``MetaTensor`` collated by ``monai.data.DataLoader``)."""
    data = subject_data()
    for d in data:
        d["image"] = MetaTensor(d["image"], meta={"filename_or_obj": f"/data/case{d['id']:02d}.nii.gz"})
        del d["subject"], d["id"]
    trainer = build(data, torch.nn.CrossEntropyLoss(), loader=DataLoader)
    with pytest.raises(
        FloatingPointError, match=r"iteration 2 \(epoch 1\), and .* samples: file /data/case05\.nii\.gz\. "
    ):
        trainer.run()


def test_subject_and_file_are_both_named():
    data = subject_data()
    for d in data:
        d["image"] = MetaTensor(d["image"], meta={"filename_or_obj": f"/data/{d['subject']}_sa.nii.gz"})
    trainer = build(data, torch.nn.CrossEntropyLoss(), loader=DataLoader)
    with pytest.raises(FloatingPointError, match=r": subject 'S05' \(file /data/S05_sa\.nii\.gz\)\. "):
        trainer.run()


def test_subject_key_argument_and_position_fallback():
    data = subject_data()
    for d in data:
        d["patient"] = f"P{d['id']:03d}"
    trainer = build(data, torch.nn.CrossEntropyLoss(), subject_key="patient")
    with pytest.raises(FloatingPointError, match=r": patient 'P005'\. "):
        trainer.run()
    trainer = build(subject_data(), torch.nn.CrossEntropyLoss(), subject_key=None)  # no key, no meta data
    with pytest.raises(FloatingPointError, match=r": batch position 1\. "):
        trainer.run()
    trainer = build(subject_data(), torch.nn.CrossEntropyLoss(), subject_key=["missing", "id"])
    with pytest.raises(FloatingPointError, match=r": id '5'\. "):
        trainer.run()


def test_sample_names():
    assert SUBJECT_KEYS == ("subject", "id", "img_id")
    batch = {"img_id": torch.tensor([7, 8]), "image": torch.zeros(2, 3)}
    assert sample_names(batch, 2) == ["img_id '7'", "img_id '8'"]
    assert sample_names({"subject": ["a", "b", "c"]}, 2) == ["batch position 0", "batch position 1"]  # not per sample
    meta = {"image": MetaTensor(torch.zeros(1, 3), meta={"filename_or_obj": "/x.png"}), "subject": "s"}
    assert sample_names(meta, 1) == ["subject 's' (file /x.png)"]
    assert sample_names({"image_meta_dict": {"filename_or_obj": ["/a", "/b"]}}, 2, None) == ["file /a", "file /b"]
    assert sample_names((torch.zeros(2, 3), torch.zeros(2)), 2) == ["batch position 0", "batch position 1"]
    result = doctest.testmod(trainer_module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_long_lists_are_shortened():
    data = subject_data(n=48, bad=None)
    for d in data:
        d["image"] = d["image"].clone().fill_(float("nan"))
    student = make_student()
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=TorchDataLoader(data, batch_size=24),
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), 0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    with pytest.raises(FloatingPointError, match=r"for 24 of the 24 samples .*subject 'S19' and 4 more\. ") as info:
        trainer.run()
    assert "S20" not in str(info.value)


def test_check_finite_false_keeps_supervised_trainer_s_behaviour():
    trainer = build(subject_data(), torch.nn.CrossEntropyLoss(), check_finite=False)
    trainer.run()  # trains through: NaN weights, as SupervisedTrainer does
    assert trainer.state.iteration == 3
    assert not all(bool(torch.isfinite(p).all()) for p in trainer.network.parameters())


def test_finite_training_is_unchanged_by_the_checks():
    """The checks only read the values: the same run with and without them ends with the same parameters."""
    finals = []
    for check in (True, False):
        trainer = build(subject_data(bad=None), METHODS["groupdistil"][0](), make_teacher(), check_finite=check)
        trainer.run()
        finals.append(torch.cat([p.detach().flatten() for p in trainer.network.parameters()]))
    assert torch.equal(*finals)


def test_cardiac_bundle_run_with_a_nan_study_fails_naming_it(tmp_path):
    """The cardiac bundle's ERM run (the same engine as the teacher's, KD's and GroupDistil's) on a dataset with NaN
    voxels in one training study exits non-zero naming that study and only it, and writes no best-model file."""
    bundle = Bundle("cardiac_mri_groupdistil")
    make_tiny_data(bundle.name, tmp_path / "data")
    overrides = bundle.run_overrides(tmp_path, epochs=1, balanced_sampling=False, **TINY[bundle.name])
    config = bundle.workflow(bundle.configs("train", "erm"), overrides, initialize=False).parser
    train = config.get_parsed_content("splits")["train"]
    bad = train[len(train) // 2]
    image = nib.load(bad["image"])
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    voxels[voxels.shape[0] // 3 : voxels.shape[0] // 2, voxels.shape[1] // 3 : voxels.shape[1] // 2] = np.nan
    nib.save(nib.Nifti1Image(voxels, image.affine), bad["image"])

    out = bundle.run_cli(bundle.configs("train", "erm"), overrides, check=False)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("FloatingPointError: ")]
    assert errors, out.stderr[-3000:]
    message = errors[-1]
    assert "the student's prediction holds NaN or infinite values for " in message
    assert (
        f"the input image holds NaN or infinite values for 1 of the batch's samples: subject '{bad['subject']}' "
        in (message)
    )
    assert f"subject '{bad['subject']}' (file {bad['image']})" in message
    assert not [d["subject"] for d in train if d is not bad and f"'{d['subject']}'" in message]
    assert not (tmp_path / "models" / "erm.pt").exists()  # no best model: it would hold the NaN weights
