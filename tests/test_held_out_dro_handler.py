"""HeldOutGroupDROHandler on a real DistillationTrainer: when the weights move, by what, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch.utils.data import DataLoader

from monai_groupdistil.engines import DistillationTrainer
from monai_groupdistil.handlers import HeldOutGroupDROHandler
from monai_groupdistil.losses import GroupDistillationLoss, GroupDROLoss
from tests.test_handlers import G, make_data, make_student, make_teacher

T, ALPHA, ETA = 2.0, 0.5, 0.8


def held_out_batches(n: int = 30, seed: int = 7, batch_size: int = 8) -> DataLoader:
    return DataLoader(make_data(n, seed), batch_size=batch_size)


def build(weight_by: str = "ce", epochs: int = 3, interval: int = 1, epoch_level: bool = True, loader=None):
    student = make_student(5)
    loss = GroupDistillationLoss(G, T, ALPHA, step_size=ETA, weight_by=weight_by, update="held_out")
    handler = HeldOutGroupDROHandler(
        loss, held_out_batches() if loader is None else loader, interval=interval, epoch_level=epoch_level
    )
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=DataLoader(make_data(), batch_size=9),
        network=student,
        optimizer=torch.optim.Adam(student.parameters(), 0.01),
        loss_function=loss,
        teacher=make_teacher(),
        train_handlers=[handler],
    )
    return trainer, student, loss


def expected_step(student, teacher, weights: torch.Tensor, weight_by: str) -> torch.Tensor:
    """One exponentiated-gradient step from the held-out group means, computed by hand (eval mode, float64)."""
    data = make_data(30, 7)
    x = torch.stack([d["image"] for d in data]).double()
    y = torch.stack([d["label"] for d in data])
    g = torch.stack([d["group"] for d in data])
    with torch.no_grad():
        s, t = copy.deepcopy(student).double().eval()(x), teacher.double()(x)
    kd = T**2 * (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1)
    ce = F.cross_entropy(s, y, reduction="none")
    per_sample = {"ce": ce, "kd": kd, "loss": ALPHA * kd + (1 - ALPHA) * ce}[weight_by]
    means = torch.stack([per_sample[g == k].mean() for k in range(G)])
    new = weights.double() * torch.exp(ETA * means)
    return new / new.sum()


@pytest.mark.parametrize("weight_by", ["ce", "kd", "loss"])
def test_weights_move_once_per_epoch_by_the_held_out_step(weight_by):
    trainer, student, loss = build(weight_by)
    per_iteration, after_epoch = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: per_iteration.append(loss.group_weights.clone()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: after_epoch.append(loss.group_weights.clone()))
    trainer.run()
    epochs = [per_iteration[i : i + 4] for i in range(0, 12, 4)]  # 36 samples / 9 = 4 iterations per epoch
    assert all(torch.equal(w, epoch[0]) for epoch in epochs for w in epoch)  # no move inside an epoch
    assert torch.equal(epochs[0][0], torch.full((G,), 1.0 / G))  # uniform before the first held-out step
    assert torch.equal(after_epoch[0], epochs[1][0]) and torch.equal(after_epoch[1], epochs[2][0])
    assert len({tuple(w.tolist()) for w in after_epoch}) == 3  # a step at every epoch's end
    assert student.training  # the held-out pass put the network back in training mode


@pytest.mark.parametrize("weight_by", ["ce", "kd", "loss"])
def test_each_step_equals_the_hand_computation_on_the_network_of_that_epoch(weight_by):
    trainer, student, loss = build(weight_by, epochs=2)
    teacher, expected, got = make_teacher(), [], []
    # the handler was attached at construction, so at EPOCH_COMPLETED it steps first; the weights before its step
    # are those at the last ITERATION_COMPLETED, with the network of that moment
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(every=4),
        lambda e: expected.append(expected_step(student, teacher, loss.group_weights.clone(), weight_by)),
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: got.append(loss.group_weights.clone()))
    trainer.run()
    assert len(got) == len(expected) == 2
    for want, have in zip(expected, got):
        torch.testing.assert_close(have.double(), want, rtol=1e-5, atol=1e-6)


def test_iteration_level_interval():
    trainer, _, loss = build("ce", epochs=1, interval=2, epoch_level=False)
    weights = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(loss.group_weights.clone()))
    trainer.run()
    assert torch.equal(weights[0], torch.full((G,), 1.0 / G))
    assert not torch.equal(weights[1], weights[0]) and torch.equal(weights[2], weights[1])
    assert not torch.equal(weights[3], weights[2])


def test_resume_continues_the_held_out_trajectory(tmp_path):
    straight, _, loss_straight = build("ce", epochs=4)
    straight.run()
    first, student, loss = build("ce", epochs=2)
    CheckpointSaver(
        str(tmp_path),
        {"net": student, "opt": first.optimizer, "trainer": first, "loss": loss},
        save_final=True,
        final_filename="ckpt.pt",
    ).attach(first)
    first.run()
    resumed, student2, loss2 = build("ce", epochs=4)
    CheckpointLoader(
        str(tmp_path / "ckpt.pt"), {"net": student2, "opt": resumed.optimizer, "trainer": resumed, "loss": loss2}
    ).attach(resumed)
    resumed.run()
    torch.testing.assert_close(loss2.group_weights, loss_straight.group_weights)


def test_bad_construction():
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(TypeError, match="a GroupDROLoss is expected, got CrossEntropyLoss"):
        HeldOutGroupDROHandler(ce, held_out_batches())
    with pytest.raises(ValueError, match="update='batch'.*build it with update='held_out'"):
        HeldOutGroupDROHandler(GroupDROLoss(ce, G), held_out_batches())
    with pytest.raises(ValueError, match="interval must be an integer >= 1, got 0"):
        HeldOutGroupDROHandler(GroupDROLoss(ce, G, update="held_out"), held_out_batches(), interval=0)


def test_bad_held_out_data_raises_and_leaves_the_weights_untouched():
    no_group = [{k: v for k, v in d.items() if k != "group"} for d in make_data(10, 1)]
    trainer, _, loss = build("ce", epochs=1, loader=DataLoader(no_group, batch_size=5))
    with pytest.raises(KeyError, match="the batch has no 'group' key; .* Pass group_key="):
        trainer.run()
    assert torch.equal(loss.group_weights, torch.full((G,), 1.0 / G))
    bad_ids = [dict(d, group=torch.tensor(G + 2)) for d in make_data(10, 1)]
    trainer, _, loss = build("ce", epochs=1, loader=DataLoader(bad_ids, batch_size=5))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, num_groups\)"):
        trainer.run()
    assert torch.equal(loss.group_weights, torch.full((G,), 1.0 / G))
    trainer, _, loss = build("ce", epochs=1, loader=[])
    with pytest.raises(ValueError, match="gave no batch"):
        trainer.run()
