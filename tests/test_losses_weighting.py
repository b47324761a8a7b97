"""What drives the group weights: ``weight_by`` of GroupDistillationLoss and the held-out update of the losses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from monai_groupdistil.losses import GroupDistillationLoss, GroupDROLoss
from tests.loss_reference import ReferenceGroupDRO, kd_value, per_sample_kd
from tests.test_losses import CONFIGS, _batch, _nested


def _reference_terms(student, teacher, target, temperature, alpha):
    """Per-sample objective, T^2 * KL and CE from the loop reference (classification or dense)."""
    flat_target = target.flatten(1).tolist() if student.ndim > 2 else target.tolist()
    s, t = _nested(student), _nested(teacher)
    return {
        "loss": per_sample_kd(s, t, flat_target, temperature, alpha),
        "kd": per_sample_kd(s, t, None, temperature, 1.0),
        "ce": per_sample_kd(s, t, flat_target, temperature, 0.0),
    }


@pytest.mark.parametrize("absent_groups", ["ema", "zero"])
@pytest.mark.parametrize("config", CONFIGS[::2])
@pytest.mark.parametrize("spatial", [(), (2, 3)])
@pytest.mark.parametrize("weight_by", ["ce", "kd", "loss"])
def test_weight_by_drives_the_update_and_the_objective_stays_the_whole_loss(weight_by, spatial, config, absent_groups):
    temperature, alpha = 3.0, 0.6
    loss = GroupDistillationLoss(3, temperature, alpha, absent_groups=absent_groups, weight_by=weight_by, **config)
    ref = ReferenceGroupDRO(num_groups=3, absent_groups=absent_groups, **config)
    for step in range(6):
        absent = (step % 3,) if step in (0, 1, 2, 4) else ()
        student, teacher, target, groups = _batch(10 + step, spatial=spatial, absent=absent)
        value = loss(student, teacher, target, groups)
        terms = _reference_terms(student, teacher, target, temperature, alpha)
        ref.step(terms[weight_by], groups.tolist())  # the update from the chosen quantity
        objective, _ = ref.group_means(terms["loss"], groups.tolist())

        want = sum(ref.q[g] * (objective[g] + ref.adj_term[g]) for g in range(3))
        assert math.isclose(value.item(), want, rel_tol=1e-6, abs_tol=1e-9), step
        assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(loss.ema_group_losses.double(), torch.tensor(ref.ema, dtype=torch.float64), atol=1e-5)
        driving, _ = ref.group_means(terms[weight_by], groups.tolist())
        assert torch.allclose(loss.last_group_losses.double(), torch.tensor(driving, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(loss.group_weights, torch.full((3,), 1 / 3))


def test_an_unsure_teacher_makes_its_group_look_easy_to_the_kd_signal_but_not_to_cross_entropy():
    """Group 0: a confident, right teacher and a student still learning it (large KD term, small CE). Group 1: an
    unsure teacher (flat logits) that the student mimics (KD term ~0, CE ~log 3): the group the student gets wrong.
    "loss" and "kd" move the weight to group 0; "ce" to group 1."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    one_hot = torch.nn.functional.one_hot(labels, 3).double()
    teacher = torch.cat([one_hot[:3] * 8.0, torch.zeros(3, 3, dtype=torch.float64)])
    student = torch.cat([one_hot[:3] * 2.0, one_hot[3:].roll(1, dims=1) * 0.1])
    weights = {}
    for weight_by in ("loss", "kd", "ce"):
        loss = GroupDistillationLoss(2, temperature=4.0, alpha=0.9, step_size=0.5, weight_by=weight_by)
        for _ in range(20):
            loss(student, teacher, labels, groups)
        weights[weight_by] = loss.group_weights[1].item()
    assert weights["loss"] < 0.01 and weights["kd"] < 0.01, weights
    assert weights["ce"] > 0.99, weights


def test_weighting_losses_are_the_chosen_quantity():
    student, teacher, target, _ = _batch(3, spatial=(2, 2))
    terms = _reference_terms(student, teacher, target, 2.0, 0.3)
    for weight_by in ("loss", "kd", "ce"):
        loss = GroupDistillationLoss(3, temperature=2.0, alpha=0.3, weight_by=weight_by)
        got = loss.weighting_losses(student, target, teacher)
        assert torch.allclose(got, torch.tensor(terms[weight_by], dtype=torch.float64), atol=1e-9), weight_by
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    dro = GroupDROLoss(ce, 3)
    assert torch.allclose(dro.weighting_losses(student, target), ce(student, target).flatten(1).mean(1))


def test_weight_by_needs_the_input_of_its_quantity():
    student, teacher, target, groups = _batch(4)
    with pytest.raises(ValueError, match="target is required when the cross entropy drives the weights"):
        GroupDistillationLoss(3, alpha=1.0, weight_by="ce")(student, teacher, None, groups)
    with pytest.raises(ValueError, match="teacher_logits are required when the distillation term drives"):
        GroupDistillationLoss(3, alpha=0.0, weight_by="kd")(student, None, target, groups)
    # alpha = 1 with "ce": the objective is pure KD, the weights follow the cross entropy
    loss = GroupDistillationLoss(3, alpha=1.0, weight_by="ce", step_size=1.0)
    loss(student, teacher, target, groups)
    ce = torch.nn.functional.cross_entropy(student, target, reduction="none")
    means = torch.stack([ce[groups == g].mean() for g in range(3)])
    assert torch.allclose(loss.group_weights.double(), torch.softmax(means, 0), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight_by": "accuracy"}, r"weight_by must be one of \('loss', 'ce', 'kd'\), got 'accuracy'"),
        ({"update": "epoch"}, r"update must be one of \('batch', 'held_out'\), got 'epoch'"),
    ],
)
def test_bad_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupDistillationLoss(2, **kwargs)
    if "update" in kwargs:
        with pytest.raises(ValueError, match=message):
            GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), 2, **kwargs)


@pytest.mark.parametrize("rule", [{"weight_by": "ce"}, {"update": "held_out"}])
def test_a_checkpoint_of_another_rule_is_refused_and_nothing_is_loaded(rule):
    trained = GroupDistillationLoss(3, step_size=0.5)
    trained(*_batch(7))
    other = GroupDistillationLoss(3, step_size=0.5, **rule)
    before = copy.deepcopy(other.state_dict())
    name, value = next(iter(rule.items()))
    with pytest.raises(ValueError, match=f"trained with {name}='(loss|batch)' but this loss has {name}='{value}'"):
        other.load_state_dict(trained.state_dict())
    assert torch.equal(other.group_weights, before["group_weights"])


# ---------------------------------------------------------------- the held-out update


@pytest.mark.parametrize("weight_by", ["loss", "ce"])
def test_held_out_update_moves_the_weights_only_through_update_weights(weight_by):
    temperature, alpha = 2.0, 0.5
    loss = GroupDistillationLoss(3, temperature, alpha, step_size=0.7, weight_by=weight_by, update="held_out")
    ref = ReferenceGroupDRO(num_groups=3, step_size=0.7)
    for step in range(4):
        student, teacher, target, groups = _batch(40 + step)  # a training batch: applies the current weights
        value = loss(student, teacher, target, groups)
        objective, _ = ref.group_means(_reference_terms(student, teacher, target, temperature, alpha)["loss"], groups)
        assert math.isclose(value.item(), sum(q * m for q, m in zip(ref.q, objective)), rel_tol=1e-6)  # float32 q
        assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-7)
        held_student, held_teacher, held_target, held_groups = _batch(80 + step, batch=20, absent=(step % 3,))
        with torch.no_grad():
            held = loss.weighting_losses(held_student, held_target, held_teacher)
        loss.update_weights(held, held_groups)
        terms = _reference_terms(held_student, held_teacher, held_target, temperature, alpha)
        ref.step(terms[weight_by], held_groups.tolist())
        assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(loss.ema_group_losses.double(), torch.tensor(ref.ema, dtype=torch.float64), atol=1e-6)
    assert not torch.allclose(loss.group_weights, torch.full((3,), 1 / 3))


def test_update_weights_of_a_group_dro_loss_against_the_reference_in_eval_mode():
    loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), 3, step_size=0.4, update="held_out").eval()
    ref = ReferenceGroupDRO(num_groups=3, step_size=0.4, absent_groups="ema")
    for step in range(3):
        student, _, target, groups = _batch(60 + step, absent=(2,) if step == 1 else ())
        values = loss.weighting_losses(student, target)
        loss.update_weights(values, groups)
        ref.step(values.tolist(), groups.tolist())
        assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize(
    "losses,groups,error,message",
    [
        (torch.ones(4), torch.tensor([0, 1, 5, 0]), ValueError, r"ids must lie in \[0, num_groups\) = \[0, 3\)"),
        (torch.ones(4), torch.tensor([0.0, 1.5, 2.0, 0.0]), ValueError, "groups holds non-integral values"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), torch.tensor([0, 1, 2, 0]), ValueError, "not finite"),
        (torch.ones(4), torch.tensor([0, 1, 2]), ValueError, r"groups must have shape \[B\] = \(4,\)"),
        (torch.ones(0), torch.zeros(0, dtype=torch.long), ValueError, "non-empty batch"),
    ],
)
def test_update_weights_refuses_bad_input_and_leaves_the_state_untouched(losses, groups, error, message):
    loss = GroupDistillationLoss(3, step_size=0.5, update="held_out")
    loss.update_weights(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]))
    state = copy.deepcopy(loss.state_dict())
    with pytest.raises(error, match=message):
        loss.update_weights(losses, groups)
    for key in ("group_weights", "ema_group_losses", "ema_initialized"):
        assert torch.equal(loss.state_dict()[key], state[key]), key


def test_reference_kd_value_is_the_raw_terms():
    """The reference's alpha = 1 and alpha = 0 values are T^2 * KL and CE (what the tests above rely on)."""
    s, t = [1.0, -0.5, 0.2], [0.3, 0.1, -1.0]
    p_t = torch.softmax(torch.tensor(t) / 2, 0)
    kl = float((p_t * (p_t.log() - torch.log_softmax(torch.tensor(s) / 2, 0))).sum())
    assert math.isclose(kd_value(s, t, None, 2.0, 1.0), 4 * kl, rel_tol=1e-6)
    assert math.isclose(kd_value(s, t, 2, 2.0, 0.0), -float(torch.log_softmax(torch.tensor(s), 0)[2]), rel_tol=1e-6)


@pytest.mark.parametrize("weight_by", ["ce", "kd"])
def test_a_non_finite_objective_is_refused_whatever_drives_the_weights(weight_by):
    """With "ce" an infinite teacher logit leaves the signal finite but the objective infinite: still an error."""
    loss = GroupDistillationLoss(3, step_size=0.5, weight_by=weight_by)
    loss(*_batch(5))
    state = copy.deepcopy(loss.state_dict())
    student, teacher, target, groups = _batch(6)
    bad_teacher = teacher.index_fill(0, torch.tensor([1]), float("inf"))
    with pytest.raises(ValueError, match="teacher_logits holds NaN or infinite values"):
        loss(student, bad_teacher, target, groups)
    for key in ("group_weights", "ema_group_losses", "ema_initialized"):
        assert torch.equal(loss.state_dict()[key], state[key]), key
