"""DistillationTrainer on real ignite engines with tiny networks: the loss call, the teacher and the batch checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import from_engine
from torch.utils.data import DataLoader

from monai_groupdistil.engines import DistillationTrainer, loss_keywords
from monai_groupdistil.handlers import GroupDROHandler
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss

NUM_GROUPS = 3


def make_data(n: int = 48, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    g = torch.arange(n) % NUM_GROUPS
    return [{"image": x[i], "label": y[i], "group": g[i], "id": i} for i in range(n)]


def make_teacher() -> torch.nn.Module:
    teacher = torch.nn.Linear(8, 2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[-3.0, -1.5] + [0.0] * 6, [3.0, 1.5] + [0.0] * 6]))
        teacher.bias.zero_()
    return teacher


def make_student(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def make_loss(kind: str):
    if kind == "erm":
        return torch.nn.CrossEntropyLoss()
    if kind == "groupdro":
        return GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), NUM_GROUPS, step_size=0.1)
    if kind == "kd":
        return DistillationLoss(temperature=2.0, alpha=0.5)
    return GroupDistillationLoss(NUM_GROUPS, temperature=2.0, alpha=0.5, step_size=0.1)


def record_losses(engine) -> list[float]:
    losses: list[float] = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append(float(from_engine("loss", first=True)(e.state.output)))
    )
    return losses


@pytest.mark.parametrize("kind", ["erm", "groupdro", "kd", "groupdistil"])
def test_students_train_and_reduce_loss(kind):
    loader = DataLoader(make_data(), batch_size=12)
    student, teacher, loss = make_student(), make_teacher(), make_loss(kind)
    teacher_before = [p.clone() for p in teacher.parameters()]
    handlers = [GroupDROHandler(loss)] if isinstance(loss, GroupDROLoss) else []
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=8,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.Adam(student.parameters(), 0.02),
        loss_function=loss,
        teacher=teacher if kind in ("kd", "groupdistil") else None,
        train_handlers=handlers,
    )
    losses = record_losses(trainer)
    trainer.run()
    assert len(losses) == 32
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    # the teacher never changes and stays in eval mode
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    if kind in ("kd", "groupdistil"):
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = trainer.state.output[0]  # decollated
    assert {"image", "label", "pred", "teacher_pred", "group", "loss"} <= set(out)
    assert (out["teacher_pred"] is not None) == (kind in ("kd", "groupdistil"))
    if isinstance(loss, GroupDROLoss):
        assert not torch.allclose(loss.group_weights, torch.full((NUM_GROUPS,), 1 / NUM_GROUPS))


def test_output_values_and_iteration_events():
    loader = DataLoader(make_data(12), batch_size=6)
    student, teacher = make_student(), make_teacher()
    loss = GroupDistillationLoss(NUM_GROUPS, step_size=0.0)
    trainer = DistillationTrainer(
        "cpu", 1, loader, student, torch.optim.SGD(student.parameters(), 0.0), loss, teacher=teacher, decollate=False
    )
    events = [getattr(IterationEvents, n) for n in ("FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED")]
    events.append(IterationEvents.MODEL_COMPLETED)
    fired = {e: 0 for e in events}
    for event in events:
        trainer.add_event_handler(event, lambda e, ev=event: fired.__setitem__(ev, fired[ev] + 1))
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append(dict(e.state.output)))
    trainer.run()
    assert all(count == 2 for count in fired.values()), fired
    batch = make_data(12)[6:]
    out = snapshots[-1]
    image = torch.stack([b["image"] for b in batch])
    assert torch.equal(out["image"], image)
    assert torch.equal(out["group"], torch.stack([b["group"] for b in batch]))
    assert torch.allclose(out["pred"], student(image))
    assert torch.equal(out["teacher_pred"], teacher(image).detach())
    expected = GroupDistillationLoss(NUM_GROUPS, step_size=0.0)(
        out["pred"], out["teacher_pred"], out["label"], out["group"]
    )
    assert torch.allclose(out["loss"], expected)


def test_teacher_forced_back_to_eval_mode():
    loader = DataLoader(make_data(12), batch_size=6)
    student = make_student()
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.9), torch.nn.Linear(8, 2))
    trainer = DistillationTrainer(
        "cpu", 1, loader, student, torch.optim.SGD(student.parameters(), 0.1), DistillationLoss(), teacher=teacher
    )
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: teacher.train())  # a handler that misbehaves
    outs = []
    trainer.add_event_handler(IterationEvents.LOSS_COMPLETED, lambda e: outs.append(e.state.output["teacher_pred"]))
    trainer.run()
    image = torch.stack([b["image"] for b in make_data(12)[6:]])
    teacher.eval()
    assert torch.equal(outs[-1], teacher(image).detach())  # no dropout: eval mode was used


def test_amp_runs():
    loader = DataLoader(make_data(), batch_size=12)
    student = make_student()
    trainer = DistillationTrainer(
        "cpu",
        3,
        loader,
        student,
        torch.optim.Adam(student.parameters(), 0.02),
        make_loss("groupdistil"),
        teacher=make_teacher(),
        amp=True,
    )
    losses = record_losses(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler/autocast warn that CUDA is absent
        trainer.run()
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])


def test_progress_bar(capsys):
    loader = DataLoader(make_data(12), batch_size=6)
    student = make_student()
    trainer = DistillationTrainer(
        "cpu", 1, loader, student, torch.optim.SGD(student.parameters(), 0.1), make_loss("erm"), progress_bar=True
    )
    trainer.run()
    assert "loss=" in capsys.readouterr().err


def test_missing_keys_are_named():
    data = [{k: v for k, v in d.items() if k != "group"} for d in make_data(12)]
    student = make_student()
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(data, batch_size=6), student, torch.optim.SGD(student.parameters(), 0.1),
        make_loss("groupdistil"), teacher=make_teacher(),
    )  # fmt: skip
    with pytest.raises(KeyError, match=r"no 'group' key; keys present: \['id', 'image', 'label'\]. Pass group_key="):
        trainer.run()
    data = [{k: v for k, v in d.items() if k != "label"} for d in make_data(12)]
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(data, batch_size=6), student, torch.optim.SGD(student.parameters(), 0.1), make_loss("erm")
    )
    with pytest.raises(KeyError, match=r"no 'label' key; keys present: \['group', 'id', 'image'\]") as raised:
        trainer.run()
    assert "group_key" not in str(raised.value)  # the hint belongs to the group key only


def test_group_names_instead_of_ids_are_named_with_what_to_do():
    data = [{**d, "group": f"H{d['group']}"} for d in make_data(12)]
    student = make_student()
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(data, batch_size=6), student, torch.optim.SGD(student.parameters(), 0.1), make_loss("erm")
    )
    with pytest.raises(
        TypeError,
        match=r"batch\['group'\] must hold integer group ids .* got \['H0', 'H1', 'H\d', 'H\d'\] .*MapGroupNamesd",
    ):
        trainer.run()


def test_tuple_batches_train_a_plain_loss_and_are_refused_for_a_group_loss():
    """(image, label) tuple batches work as in SupervisedTrainer; a group loss needs a dictionary with the ids."""
    data = [(d["image"], d["label"]) for d in make_data(12)]
    ours = make_student()
    DistillationTrainer(
        "cpu", 2, DataLoader(data, batch_size=6), ours, torch.optim.SGD(ours.parameters(), 0.1), make_loss("erm")
    ).run()
    monai = make_student()
    SupervisedTrainer(
        "cpu", 2, DataLoader(data, batch_size=6), monai, torch.optim.SGD(monai.parameters(), 0.1), make_loss("erm")
    ).run()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), monai.parameters()))
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(data, batch_size=6), ours, torch.optim.SGD(ours.parameters(), 0.1), make_loss("groupdro")
    )
    with pytest.raises(TypeError, match=r"a dictionary batch with keys \['image', 'label', 'group'\] is expected"):
        trainer.run()


def test_teacher_shape_mismatch_names_both_shapes():
    student = make_student()
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(make_data(12), batch_size=6), student, torch.optim.SGD(student.parameters(), 0.1),
        make_loss("groupdistil"), teacher=torch.nn.Linear(8, 3),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher output has shape \(6, 3\).*student output has shape \(6, 2\)"):
        trainer.run()


def test_teacher_without_teacher_logits_and_missing_teacher():
    student = make_student()
    with pytest.raises(
        ValueError, match="a `teacher` was given but the loss CrossEntropyLoss takes no `teacher_logits`"
    ):
        DistillationTrainer(
            "cpu", 1, [], student, torch.optim.SGD(student.parameters(), 0.1), make_loss("erm"), teacher=make_teacher()
        )
    with pytest.raises(ValueError, match="a `teacher_cache` was given without a `teacher`"):
        DistillationTrainer(
            "cpu", 1, [], student, torch.optim.SGD(student.parameters(), 0.1), make_loss("erm"), teacher_cache={}
        )
    # a distillation loss without teacher receives teacher_logits=None and says what it needs
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(make_data(12), batch_size=6), student, torch.optim.SGD(student.parameters(), 0.1),
        make_loss("groupdistil"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"required when alpha > 0 \(alpha=0.5\); .* pass the teacher network as"):
        trainer.run()


def test_loss_keywords_follow_the_forward_signature():
    assert loss_keywords(make_loss("erm")) == set()
    assert loss_keywords(make_loss("groupdro")) == {"groups"}
    assert loss_keywords(make_loss("kd")) == {"teacher_logits"}
    assert loss_keywords(make_loss("groupdistil")) == {"teacher_logits", "groups"}

    calls = []

    def plain_function_loss(input, target, groups):
        calls.append(groups.clone())
        return torch.nn.functional.cross_entropy(input, target)

    assert loss_keywords(plain_function_loss) == {"groups"}
    student = make_student()
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(make_data(12), batch_size=6), student, torch.optim.SGD(student.parameters(), 0.1),
        plain_function_loss,
    )  # fmt: skip
    trainer.run()
    assert [c.tolist() for c in calls] == [[0, 1, 2, 0, 1, 2]] * 2


def _final_parameters(trainer_class, **kwargs) -> torch.Tensor:
    student = make_student()
    trainer = trainer_class(
        device="cpu", max_epochs=3, train_data_loader=DataLoader(make_data(), batch_size=12, shuffle=False),
        network=student, optimizer=torch.optim.SGD(student.parameters(), 0.1), **kwargs,
    )  # fmt: skip
    trainer.run()
    return torch.cat([p.detach().flatten() for p in student.parameters()])


def test_erm_student_is_exactly_the_supervised_trainer_iteration():
    """One training path: with a plain loss the trainer is SupervisedTrainer, to the last bit."""
    ours = _final_parameters(DistillationTrainer, loss_function=torch.nn.CrossEntropyLoss())
    monai = _final_parameters(SupervisedTrainer, loss_function=torch.nn.CrossEntropyLoss())
    assert torch.equal(ours, monai)


def test_gradient_accumulation_is_supervised_trainer_s():
    """SupervisedTrainer's gradient accumulation applies to a distillation loss unchanged: with a loss that
    ignores the teacher (alpha 0) two accumulated half-batches equal one full batch."""
    full = _final_parameters(DistillationTrainer, loss_function=DistillationLoss(alpha=0.0), teacher=make_teacher())
    student = make_student()
    trainer = DistillationTrainer(
        device="cpu", max_epochs=3, train_data_loader=DataLoader(make_data(), batch_size=6, shuffle=False),
        network=student, optimizer=torch.optim.SGD(student.parameters(), 0.1),
        loss_function=DistillationLoss(alpha=0.0), teacher=make_teacher(), accumulation_steps=2,
    )  # fmt: skip
    trainer.run()
    accumulated = torch.cat([p.detach().flatten() for p in student.parameters()])
    assert torch.allclose(accumulated, full, atol=1e-6)


def test_group_balanced_sampler_draws_anew_every_epoch():
    from monai_groupdistil.data import GroupBalancedSampler

    data = make_data()
    sampler = GroupBalancedSampler([int(d["group"]) for d in data], seed=3)
    loader = DataLoader(data, batch_size=len(data), sampler=sampler)
    seen: list[list[int]] = []
    student = make_student()
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=3,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(list(iter(sampler))))
    trainer.run()
    expected = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        expected.append(list(iter(sampler)))
    assert seen == expected
    assert seen[0] != seen[1] != seen[2]
