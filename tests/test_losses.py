"""Values, trajectories, gradients, state and bad input of the distillation and group-DRO losses."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from monai.losses import DiceCELoss

from monai_groupdistil.losses import (
    DistillationLoss,
    GroupDistillationLoss,
    GroupDROLoss,
    PerSampleDiceCELoss,
)
from monai_groupdistil.losses.checks import NonFiniteValueError
from monai_groupdistil.losses.distillation import soft_dice_per_sample
from tests.loss_reference import ReferenceGroupDRO, per_sample_kd


def _batch(seed, batch=12, classes=4, spatial=(), num_groups=3, absent=()):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, *spatial, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(batch, classes, *spatial, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, classes, (batch, *spatial), generator=gen)
    allowed = [g for g in range(num_groups) if g not in absent]
    groups = torch.tensor(allowed)[torch.randint(0, len(allowed), (batch,), generator=gen)]
    return student, teacher, target, groups


def _call(loss, student, teacher, target, groups):
    """Call a group loss with the groups, a plain distillation loss without them."""
    return loss(student, teacher, target, groups) if isinstance(loss, GroupDROLoss) else loss(student, teacher, target)


def _nested(t: torch.Tensor):
    return t.flatten(2).tolist() if t.ndim > 2 else t.tolist()


# ---------------------------------------------------------------- DistillationLoss


@pytest.mark.parametrize("spatial", [(), (3, 4)])
@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.5), (1.0, 0.0), (2.5, 1.0), (0.5, 0.3)])
def test_distillation_per_sample_matches_reference(spatial, temperature, alpha):
    student, teacher, target, _ = _batch(0, batch=5, spatial=spatial)
    got = DistillationLoss(temperature, alpha, reduction="none")(student, teacher, target)
    flat_target = target.flatten(1).tolist() if spatial else target.tolist()
    want = per_sample_kd(_nested(student), _nested(teacher), flat_target, temperature, alpha)
    assert got.shape == (5,)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-10)
    mean = DistillationLoss(temperature, alpha)(student, teacher, target)
    total = DistillationLoss(temperature, alpha, reduction="sum")(student, teacher, target)
    assert math.isclose(mean.item(), sum(want) / 5, rel_tol=1e-10)
    assert math.isclose(total.item(), sum(want), rel_tol=1e-10)


def test_distillation_target_forms_agree():
    student, teacher, target, _ = _batch(1, batch=4, spatial=(2, 3))
    loss = DistillationLoss(reduction="none")
    base = loss(student, teacher, target)
    assert torch.equal(loss(student, teacher, target.unsqueeze(1)), base)
    assert torch.equal(loss(student, teacher, target.float()), base)
    assert torch.allclose(
        DistillationLoss(alpha=1.0)(student, teacher), DistillationLoss(alpha=1.0)(student, teacher, target)
    )


def test_distillation_gradcheck():
    student, teacher, target, _ = _batch(2, batch=3, classes=3)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = DistillationLoss(temperature=2.0, alpha=0.7)
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, target), (student, teacher))


@pytest.mark.parametrize("spatial", [(), (2, 3)])
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.4, 1.0])
def test_gradients_first_and_second_order(spatial, alpha):
    """Autograd through the formula: first and second derivatives for the student (teacher fixed) and for a teacher
    trained jointly, and for the group loss with non-uniform frozen weights."""
    student, teacher, target, groups = _batch(3, batch=4, classes=3, spatial=spatial)
    student.requires_grad_(True)
    loss = DistillationLoss(temperature=2.0, alpha=alpha, reduction="none")
    weights = torch.linspace(0.5, 2.0, 4, dtype=torch.float64)  # a non-uniform upstream gradient
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, target) * weights, (student,))
    assert torch.autograd.gradgradcheck(lambda s: loss(s, teacher, target) * weights, (student,))
    trained_teacher = teacher.clone().requires_grad_(alpha > 0)
    if alpha > 0:
        assert torch.autograd.gradcheck(lambda s, t: loss(s, t, target) * weights, (student, trained_teacher))
    group_loss = GroupDistillationLoss(2, temperature=2.0, alpha=alpha, step_size=0.5)
    group_loss.group_weights.copy_(torch.tensor([0.3, 0.7]))
    assert torch.autograd.gradcheck(lambda s: group_loss.eval()(s, teacher, target, groups % 2), (student,))
    assert torch.autograd.gradgradcheck(lambda s: group_loss.eval()(s, teacher, target, groups % 2), (student,))


def test_retained_graph_and_meta_tensors():
    from monai.data import MetaTensor

    student, teacher, target, _ = _batch(4, batch=6, classes=5)
    student = MetaTensor(student).requires_grad_(True)
    value = DistillationLoss(temperature=3.0, alpha=0.6)(student, MetaTensor(teacher), MetaTensor(target))
    value.backward(retain_graph=True)
    first = student.grad.clone()
    value.backward()  # the saved tensors were not modified by the first pass
    assert torch.allclose(student.grad, 2 * first)
    reference = student.detach().as_tensor().requires_grad_(True)
    DistillationLoss(temperature=3.0, alpha=0.6)(reference, teacher.requires_grad_(True), target).backward()
    assert torch.allclose(first, reference.grad, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"reduction": "avg"}, "avg"),
    ],
)
def test_distillation_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


def test_distillation_bad_inputs():
    loss = DistillationLoss()
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="target is required when alpha < 1"):
        loss(s, t)
    with pytest.raises(ValueError, match=r"different class counts: input has C=3 .* teacher_logits has C=5"):
        loss(s, torch.randn(4, 5), y)
    with pytest.raises(ValueError, match=r"teacher_logits must have the shape of input \(4, 3\), got \(3, 3\)"):
        loss(s, torch.randn(3, 3), y)
    with pytest.raises(
        ValueError, match=r"class indices of shape \(4,\) or \(4, 1\), or one-hot labels of shape \(4, 3\)"
    ):
        loss(s, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        loss(s, t, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="non-integral"):
        loss(s, t, torch.tensor([0.5, 1, 2, 0]))
    with pytest.raises(TypeError, match="target must be a tensor of class indices or one-hot labels"):
        loss(s, t, torch.tensor([True, False, True, True]))
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        loss(torch.ones(4, 3, dtype=torch.long), t, y)
    with pytest.raises(ValueError, match="empty batch"):
        loss(torch.randn(0, 3), torch.randn(0, 3), torch.zeros(0, dtype=torch.long))


def test_soft_dice_and_dice_ce_per_sample_against_a_direct_computation():
    """The soft Dice term: 1 - (2 sum(p y) + eps) / (sum p + sum y + eps) per class, averaged over the classes."""
    student, teacher, target, groups = _batch(60, batch=4, classes=3, spatial=(5, 6))
    probs = torch.softmax(student, 1)
    onehot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).double()
    inter, total = (probs * onehot).flatten(2).sum(2), (probs + onehot).flatten(2).sum(2)
    dice = (1 - (2 * inter + 1e-5) / (total + 1e-5)).mean(1)
    ce = torch.nn.functional.cross_entropy(student, target, reduction="none").flatten(1).mean(1)
    assert torch.allclose(soft_dice_per_sample(student, target), dice, atol=1e-12)
    assert torch.allclose(PerSampleDiceCELoss(0.5, reduction="none")(student, target), ce + 0.5 * dice, atol=1e-12)
    kd = DistillationLoss(2.0, 0.3, reduction="none")(student, teacher, target)
    got = DistillationLoss(2.0, 0.3, dice_weight=0.5, reduction="none")(student, teacher, target)
    assert torch.allclose(got, kd + 0.5 * dice, atol=1e-12)
    assert torch.allclose(DistillationLoss(alpha=0.0, reduction="none")(student, None, target), ce, atol=1e-12)
    wrapped = GroupDROLoss(PerSampleDiceCELoss(reduction="none"), num_groups=3, step_size=0.0)
    means = [(ce + dice)[groups == g].mean() for g in range(3) if (groups == g).any()]
    assert math.isclose(wrapped(student, target, groups).item(), sum(means).item() / 3, rel_tol=1e-9)
    group_loss = GroupDistillationLoss(3, 2.0, 0.3, step_size=0.0, dice_weight=0.5)
    means = [(kd + 0.5 * dice)[groups == g].mean() for g in range(3) if (groups == g).any()]
    assert math.isclose(group_loss(student, teacher, target, groups).item(), sum(means).item() / 3, rel_tol=1e-9)


def test_dice_terms_refuse_bad_input():
    with pytest.raises(ValueError, match=r"dice_weight > 0 needs dense logits \[B, C, \*spatial\], got shape \(4, 3\)"):
        DistillationLoss(dice_weight=1.0)(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"input must be dense logits"):
        PerSampleDiceCELoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\] .* C=4"):
        PerSampleDiceCELoss()(torch.randn(2, 4, 3, 3), torch.tensor([0, 4]).view(2, 1, 1).expand(2, 3, 3))
    with pytest.raises(ValueError, match="teacher_logits are required when alpha > 0"):
        DistillationLoss(alpha=0.5)(torch.randn(4, 3), None, torch.tensor([0, 1, 2, 0]))


# ---------------------------------------------------------------- group DRO: values and trajectories

CONFIGS = [
    {"step_size": 0.5},
    {"step_size": 0.2, "normalize_loss": True},
    {"step_size": 0.3, "adjustment": [1.0, 0.0, 2.0], "group_counts": [50, 10, 4]},
    {"step_size": 0.1, "adjustment": 0.5, "group_counts": [50, 10, 4], "normalize_loss": True, "gamma": 0.3},
]


@pytest.mark.parametrize("absent_groups", ["ema", "zero"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("spatial", [(), (2, 3)])
def test_group_distillation_trajectory_matches_reference(config, spatial, absent_groups):
    temperature, alpha = 3.0, 0.6
    loss = GroupDistillationLoss(
        num_groups=3, temperature=temperature, alpha=alpha, absent_groups=absent_groups, **config
    )
    ref = ReferenceGroupDRO(num_groups=3, absent_groups=absent_groups, **config)
    for step in range(6):
        absent = (step % 3,) if step in (0, 1, 2, 4) else ()  # some steps lack a group (group 0 unseen at first)
        student, teacher, target, groups = _batch(10 + step, spatial=spatial, absent=absent)
        value = loss(student, teacher, target, groups)
        flat_target = target.flatten(1).tolist() if spatial else target.tolist()
        per_sample = per_sample_kd(_nested(student), _nested(teacher), flat_target, temperature, alpha)
        want = ref.step(per_sample, groups.tolist())
        assert math.isclose(value.item(), want, rel_tol=1e-6, abs_tol=1e-9), step
        assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(loss.ema_group_losses.double(), torch.tensor(ref.ema, dtype=torch.float64), atol=1e-5)
        means, counts = ref.group_means(per_sample, groups.tolist())
        assert loss.last_group_counts.tolist() == counts
        assert torch.allclose(loss.last_group_losses.double(), torch.tensor(means, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(loss.group_weights, torch.full((3,), 1 / 3))  # the weights really moved


@pytest.mark.parametrize("absent_groups", ["ema", "zero"])
def test_group_dro_wraps_any_per_sample_loss(absent_groups):
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    loss = GroupDROLoss(ce, num_groups=3, step_size=0.4, absent_groups=absent_groups)
    ref = ReferenceGroupDRO(num_groups=3, step_size=0.4, absent_groups=absent_groups)
    for step in range(5):
        student, _, target, groups = _batch(30 + step, absent=(2,) if step == 3 else ())
        value = loss(student, target, groups)
        want = ref.step(per_sample_kd(_nested(student), _nested(student), target.tolist(), 1.0, 0.0), groups.tolist())
        assert math.isclose(value.item(), want, rel_tol=1e-6)
        assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-6)


def test_dense_group_dro_averages_voxels():
    loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups=2, step_size=0.0)
    student, _, target, groups = _batch(3, batch=4, classes=3, spatial=(5, 5), num_groups=2)
    per_voxel = torch.nn.functional.cross_entropy(student, target, reduction="none").flatten(1).mean(1)
    contrib = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), 2, 0.0, reduction="none")(
        student, target, groups
    )
    value = loss(student, target, groups)
    means = [per_voxel[groups == g].mean() if (groups == g).any() else torch.tensor(0.0) for g in range(2)]
    assert math.isclose(value.item(), 0.5 * float(means[0]) + 0.5 * float(means[1]), rel_tol=1e-9)
    assert math.isclose(contrib.mean().item(), value.item(), rel_tol=1e-9)


@pytest.mark.parametrize("config", CONFIGS)
def test_reductions_are_monai_s_mean_sum_and_none_of_per_sample_values(config):
    """ "none" gives per-sample values whose mean is the robust loss ("mean", what SupervisedTrainer's .mean() of
    them gives too) and whose sum is "sum" (B times it), with and without the adjustment."""
    mean_loss = GroupDistillationLoss(num_groups=3, **config)
    none_loss = GroupDistillationLoss(num_groups=3, reduction="none", **config)
    sum_loss = GroupDistillationLoss(num_groups=3, reduction="sum", **config)
    ref = ReferenceGroupDRO(num_groups=3, **config)
    for step in range(3):
        student, teacher, target, groups = _batch(50 + step, absent=(1,))
        value = mean_loss(student, teacher, target, groups)
        want = ref.step(per_sample_kd(_nested(student), _nested(teacher), target.tolist(), 4.0, 0.5), groups.tolist())
        assert math.isclose(value.item(), want, rel_tol=1e-6)
        values = none_loss(student, teacher, target, groups)
        assert values.shape == (12,)
        assert math.isclose(values.mean().item(), value.item(), rel_tol=1e-9)
        assert math.isclose(sum_loss(student, teacher, target, groups).item(), 12 * value.item(), rel_tol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda rule: GroupDistillationLoss(4, step_size=0.1, absent_groups=rule),
        lambda rule: GroupDROLoss(lambda x, y: x.sum(1), 4, step_size=0.1, absent_groups=rule),
    ],
)
def test_a_group_missing_from_most_batches_is_not_down_weighted_for_its_absence(make):
    """Identical per-sample losses everywhere; group 3 is present in one batch of four. With "ema" the weights stay
    uniform (absence alone never moves a weight); with "zero" (the reference rule) group 3's weight falls."""
    weights = {}
    for rule in ("ema", "zero"):
        loss = make(rule)
        for step in range(400):
            groups = torch.tensor([0, 1, 2, 3] if step % 4 == 0 else [0, 1, 2, 0])
            if isinstance(loss, GroupDistillationLoss):  # equal logits in every sample: equal losses
                logits = torch.tensor([[2.0, 0.0, -1.0]]).expand(4, 3)
                loss(logits, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), groups)
            else:
                loss(torch.full((4, 1), 0.7), None, groups)
        weights[rule] = loss.group_weights.clone()
    assert torch.allclose(weights["ema"], torch.full((4,), 0.25), atol=1e-6), weights["ema"]
    assert weights["zero"][3] < 0.05 and weights["zero"][:3].min() > 0.3, weights["zero"]


def test_a_weight_that_underflows_stays_positive_and_recovers_when_its_group_is_worst():
    """A large step drives group 1's weight below what float32 can hold; in exact arithmetic it stays positive, so
    it must not be rounded to 0 for good: it is floored at finfo.tiny and rises again once group 1 is the worst."""
    loss = GroupDROLoss(lambda x, y: x.sum(1), 2, step_size=50.0)
    groups = torch.tensor([0, 1])
    for _ in range(3):  # group 0 is worse by 1: log q_1 - log q_0 falls by 50 per step (to -150 in exact arithmetic)
        loss(torch.tensor([[1.0], [0.0]]), None, groups)
    tiny = torch.finfo(torch.float32).tiny
    assert loss.group_weights[1] == tiny and loss.group_weights[0] == 1.0  # exp(-150) < tiny: floored, not 0
    # now group 1 is the worst by 1: its log-weight rises by 50 per step from log(tiny), as computed independently
    log_ratio = math.log(tiny)  # log q_1 - log q_0 (q_0 = 1)
    for _ in range(2):
        loss(torch.tensor([[0.0], [1.0]]), None, groups)
        log_ratio += 50.0
    expected = 1.0 / (1.0 + math.exp(-log_ratio))  # q_1 = sigmoid(log q_1 - log q_0)
    assert loss.group_weights[1] == pytest.approx(expected, rel=1e-4) and expected > 0.99


def test_absent_rule_uses_the_mean_of_present_groups_before_a_group_was_seen():
    loss = GroupDROLoss(lambda x, y: x.sum(1), 3, step_size=1.0)
    loss(torch.tensor([[1.0], [3.0]]), None, torch.tensor([0, 1]))  # group 2 never seen: it enters with (1 + 3) / 2
    expected = torch.softmax(torch.tensor([1.0, 3.0, 2.0]), 0)
    assert torch.allclose(loss.group_weights, expected, atol=1e-6)
    assert loss.ema_initialized.tolist() == [True, True, False] and loss.ema_group_losses.tolist() == [1.0, 3.0, 0.0]
    loss(torch.tensor([[5.0]]), None, torch.tensor([2]))  # groups 0 and 1 absent: their running losses 1 and 3
    expected = torch.softmax(expected.log() + torch.tensor([1.0, 3.0, 5.0]), 0)
    assert torch.allclose(loss.group_weights, expected, atol=1e-6)


# ---------------------------------------------------------------- gradients, modes, state


def test_gradcheck_eval_mode_with_nonuniform_weights():
    loss = GroupDistillationLoss(num_groups=3, temperature=2.0, alpha=0.4, adjustment=1.0, group_counts=[4, 5, 6])
    loss.group_weights.copy_(torch.tensor([0.2, 0.5, 0.3]))
    loss.eval()
    student, teacher, target, groups = _batch(4, batch=5, classes=3, absent=(2,))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, target, groups), (student, teacher))
    assert torch.equal(loss.group_weights, torch.tensor([0.2, 0.5, 0.3]))


def test_training_gradient_uses_updated_weights():
    loss = GroupDistillationLoss(num_groups=3, step_size=1.0)
    student, teacher, target, groups = _batch(5)
    student.requires_grad_(True)
    loss(student, teacher, target, groups).backward()
    q = loss.group_weights.double()
    per_sample = DistillationLoss(reduction="none")
    s2 = student.detach().clone().requires_grad_(True)
    values = per_sample(s2, teacher, target)
    explicit = sum(q[g] * values[groups == g].mean() for g in range(3) if (groups == g).any())
    explicit.backward()
    assert torch.allclose(student.grad, s2.grad, atol=1e-12)


@pytest.mark.parametrize("kind", ["objective", "none", "group_dro"])
def test_losses_run_under_torch_compile(kind):
    """Traced by torch.compile (the eager backend: no compiler needed), the losses give the eager values, gradients
    and weights over several steps, including steps where every group is present and already seen."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        if kind == "group_dro":
            loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), 3, step_size=0.5)
        else:
            loss = GroupDistillationLoss(3, step_size=0.5, reduction="mean" if kind == "objective" else "none")
        plain = DistillationLoss(reduction="none")

        def both(s, t, y, g, loss=loss, plain=plain):
            value = loss(s, y, g) if kind == "group_dro" else loss(s, t, y, g)
            return value.sum() + plain(s, t, y).sum()

        fn = torch.compile(both, backend="eager") if compiled else both
        trajectory = []
        for step in range(4):
            student, teacher, target, groups = _batch(9 + step, batch=6, classes=3)
            groups = torch.tensor([0, 1, 2, 0, 1, 2]) if step else groups
            s = student.clone().requires_grad_(True)
            value = fn(s, teacher, target, groups)
            value.backward()
            trajectory += [value.detach(), s.grad, loss.group_weights.clone(), loss.ema_group_losses.clone()]
        results.append(trajectory)
    for eager, traced in zip(*results):
        assert torch.allclose(eager, traced, atol=1e-12)


@pytest.mark.parametrize("alpha", [1e-6, 1e-3, 0.5, 1.0])
@pytest.mark.parametrize("spatial", [(), (4, 4)])
def test_half_precision_values_and_gradients_for_any_alpha(alpha, spatial):
    """float16 logits: no overflow when (1 - alpha) / (alpha * T^2) is large, values and gradients within float16
    precision of the float64 computation, and float32 DRO coefficients (float16 would round them)."""
    student, teacher, target, groups = _batch(40, batch=6, classes=5, spatial=spatial)
    student, teacher = student * 5, teacher * 5  # confident logits: cross entropies of ~20
    kwargs = dict(num_groups=3, temperature=4.0, alpha=alpha, step_size=0.5)
    got = DistillationLoss(4.0, alpha, reduction="none")(student.half(), teacher.half(), target)
    want = DistillationLoss(4.0, alpha, reduction="none")(student, teacher, target)
    assert got.dtype == torch.float16
    assert torch.allclose(got.double(), want, rtol=5e-3, atol=5e-3), (got, want)
    grads, values = [], []
    for dtype in (torch.float16, torch.float64):
        s = student.to(dtype).requires_grad_(True)
        loss = GroupDistillationLoss(**kwargs)
        value = loss(s, teacher.to(dtype), target, groups)
        value.backward()
        assert value.dtype == dtype
        values.append(value.double())
        grads.append(s.grad.double())
    assert torch.isfinite(grads[0]).all()
    assert torch.allclose(values[0], values[1], rtol=5e-3)
    scale = grads[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 5e-3 * scale, (grads[0] - grads[1]).abs().max() / scale


def test_group_dro_on_half_precision_losses():
    """Half-precision per-sample losses are reduced in float32 and the result keeps their dtype."""
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    per_sample = torch.nn.CrossEntropyLoss(reduction="none")
    logits, labels = torch.randn(7, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    half_loss = GroupDROLoss(per_sample, num_groups=3, step_size=0.3)
    value = half_loss(logits.half(), labels, groups)
    reference = GroupDROLoss(per_sample, num_groups=3, step_size=0.3)(logits.double(), labels, groups)
    assert value.dtype == torch.float16
    assert math.isclose(value.item(), reference.item(), rel_tol=2e-3)
    contributions = GroupDROLoss(per_sample, num_groups=3, step_size=0.3, reduction="none")(
        logits.half(), labels, groups
    )
    assert contributions.dtype == torch.float16
    assert math.isclose(contributions.double().mean().item(), reference.item(), rel_tol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_losses_under_autocast_compute_in_float32(dtype):
    """Under torch.autocast the losses return float32 (as autocast does for torch's losses), equal to the float32
    computation on the same logits, with float32 gradients cast back to the input's dtype."""
    student, teacher, target, groups = _batch(41, batch=8, classes=4)
    student, teacher = student.to(dtype), teacher.to(dtype)
    for make in (lambda: GroupDistillationLoss(3, step_size=0.5), lambda: DistillationLoss(alpha=0.3)):
        s = student.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = make()
            value = _call(loss, s, teacher, target, groups)
        value.backward()
        reference_input = student.float().clone().requires_grad_(True)
        loss = make()
        reference = _call(loss, reference_input, teacher.float(), target, groups)
        reference.backward()
        assert value.dtype == torch.float32
        assert torch.allclose(value, reference, rtol=1e-6, atol=1e-7)
        assert s.grad.dtype == dtype
        assert torch.allclose(s.grad.float(), reference_input.grad.to(dtype).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float16),
    ],
)
def test_student_and_teacher_of_different_dtypes(student_dtype, teacher_dtype, autocast):
    """Logits of two dtypes are computed in their promoted dtype (float32 for two half precisions, and under
    autocast), as torch promotes them in the composite formula; the gradient has the student's dtype."""
    student, teacher, target, groups = _batch(46, batch=8, classes=5)
    teacher = teacher.to(teacher_dtype)
    for make in (lambda: GroupDistillationLoss(3, step_size=0.5), lambda: DistillationLoss(alpha=0.3)):
        s = student.to(student_dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = make()
            value = _call(loss, s, teacher, target, groups)
        value.backward()
        reference_input = student.to(student_dtype).double().requires_grad_(True)
        loss = make()
        reference = _call(loss, reference_input, teacher.double(), target, groups)
        reference.backward()
        assert value.dtype == torch.float32
        assert math.isclose(value.item(), reference.item(), rel_tol=1e-5)
        assert s.grad.dtype == student_dtype
        tolerance = 1e-2 if student_dtype in (torch.float16, torch.bfloat16) else 1e-5
        assert torch.allclose(s.grad.double(), reference_input.grad, rtol=tolerance, atol=tolerance * 1e-2)


@pytest.mark.parametrize("spatial", [(), (2, 3)])
def test_ignored_index_is_refused_like_any_out_of_range_label(spatial):
    """-100 (torch's default ignore_index) is not a class: every path refuses it and the weights stay as they were."""
    student, teacher, target, groups = _batch(42, batch=5, classes=3, spatial=spatial)
    target.view(-1)[1] = -100
    loss = GroupDistillationLoss(3, step_size=0.5)
    for trainable_teacher in (False, True):
        t = teacher.clone().requires_grad_(trainable_teacher)
        with pytest.raises(ValueError, match=r"class indices in \[-100, 2\] .* must lie in \[0, 3\)"):
            DistillationLoss()(student, t, target)
        with pytest.raises(ValueError, match=r"class indices in \[-100, 2\] .* must lie in \[0, 3\)"):
            loss(student, t, target, groups)
    assert torch.equal(loss.group_weights, torch.full((3,), 1 / 3)) and not loss.ema_initialized.any()


@pytest.mark.parametrize("spatial", [(), (2, 3)])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_second_backward_through_a_freed_graph_raises(spatial, alpha):
    """As for torch's own operations, a second backward pass without retain_graph raises instead of accumulating
    the gradient again."""
    student, teacher, target, groups = _batch(43, batch=4, classes=3, spatial=spatial)
    student.requires_grad_(True)
    for loss in (GroupDistillationLoss(3, alpha=alpha), DistillationLoss(alpha=alpha)):
        value = _call(loss, student, teacher, target, groups)
        value.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            value.backward()


def test_normalize_loss_divides_by_a_negative_total_too():
    """FACTS: A <- A / sum(A) whatever the sign of the sum (a per-sample loss may be negative)."""
    loss = GroupDROLoss(lambda x, y: x.sum(dim=1), num_groups=3, step_size=0.4, normalize_loss=True)
    reference = ReferenceGroupDRO(num_groups=3, step_size=0.4, normalize_loss=True)
    gen = torch.Generator().manual_seed(47)
    for _ in range(4):
        values = torch.randn(9, 1, generator=gen, dtype=torch.float64) - 2.0  # mostly negative losses
        groups = torch.tensor([0, 1, 2] * 3)
        got = loss(values, torch.zeros(9), groups)
        want = reference.step(values.flatten().tolist(), groups.tolist())
        assert math.isclose(got.item(), want, rel_tol=1e-6)  # the weights are stored in float32
        assert torch.allclose(loss.group_weights.double(), torch.tensor(reference.q, dtype=torch.float64), atol=1e-7)


def test_bfloat16_state_buffers():
    """After module.to(torch.bfloat16) the buffers are bfloat16 (no numpy dtype): the loss still trains, and its
    weights follow the float32 module's within bfloat16 rounding."""
    low, full = GroupDistillationLoss(3, step_size=0.5).to(torch.bfloat16), GroupDistillationLoss(3, step_size=0.5)
    assert low.group_weights.dtype == torch.bfloat16
    for seed in (48, 49, 50):
        batch = _batch(seed)
        low(*batch)
        full(*batch)
    assert low.group_weights.dtype == torch.bfloat16 and low.ema_group_losses.dtype == torch.bfloat16
    assert torch.allclose(low.group_weights.float(), full.group_weights, atol=1e-2)
    assert torch.allclose(low.ema_group_losses.float(), full.ema_group_losses, rtol=2e-2)
    assert torch.equal(low.last_group_counts, full.last_group_counts)


def test_pickled_module_continues_the_trajectory():
    import pickle

    kwargs = dict(num_groups=3, step_size=0.5, adjustment=[1.0, 0.0, 2.0], group_counts=[10, 20, 30])
    loss, reference = GroupDistillationLoss(**kwargs), GroupDistillationLoss(**kwargs)
    for seed in (43, 44):
        batch = _batch(seed, absent=(1,))
        loss(*batch)
        reference(*batch)
    restored = pickle.loads(pickle.dumps(loss))
    for seed in (45, 46):
        batch = _batch(seed)
        assert torch.equal(restored(*batch), reference(*batch))
    assert torch.equal(restored.group_weights, reference.group_weights)
    assert torch.equal(restored.ema_group_losses, reference.ema_group_losses)


def test_eval_mode_freezes_weights_and_ema():
    loss = GroupDistillationLoss(num_groups=3, step_size=1.0)
    student, teacher, target, groups = _batch(6)
    loss(student, teacher, target, groups)
    weights, ema = loss.group_weights.clone(), loss.ema_group_losses.clone()
    loss.eval()
    value = loss(*_batch(7))
    assert torch.equal(loss.group_weights, weights) and torch.equal(loss.ema_group_losses, ema)
    s, t, y, g = _batch(7)
    manual = sum(weights[k].double() * DistillationLoss(reduction="none")(s, t, y)[g == k].mean() for k in range(3))
    assert math.isclose(value.item(), manual.item(), rel_tol=1e-6)
    assert loss.last_group_counts.sum().item() == 12


def test_state_dict_round_trip_restores_trajectory():
    def run(loss, steps):
        return [loss(*_batch(100 + s)).item() for s in steps]

    straight = GroupDistillationLoss(num_groups=3, step_size=0.7)
    values_straight = run(straight, range(6))
    first = GroupDistillationLoss(num_groups=3, step_size=0.7)
    run(first, range(3))
    state = first.state_dict()
    assert set(state) == {"group_weights", "ema_group_losses", "ema_initialized", "_extra_state"}
    assert state["_extra_state"] == {"absent_groups": "ema", "update": "batch", "weight_by": "loss"}
    resumed = GroupDistillationLoss(num_groups=3, step_size=0.7)
    resumed.load_state_dict(state)
    assert values_straight[3:] == run(resumed, range(3, 6))
    assert torch.equal(resumed.group_weights, straight.group_weights)
    assert torch.equal(resumed.ema_group_losses, straight.ema_group_losses)


def test_load_refuses_other_group_count_other_absent_rule_and_bad_weights():
    loss = GroupDistillationLoss(num_groups=3)
    with pytest.raises(ValueError, match=r"trained with absent_groups='zero' but this loss has absent_groups='ema'"):
        trained = GroupDistillationLoss(num_groups=3, step_size=0.5, absent_groups="zero")
        trained(*_batch(210))
        loss.load_state_dict(trained.state_dict())
    older = {k: v for k, v in trained.state_dict().items() if k != "_extra_state"}  # a checkpoint of version 0.x
    GroupDistillationLoss(num_groups=3, absent_groups="zero").load_state_dict(older)
    with pytest.raises(ValueError, match=r"DRO weights for 4 groups .* num_groups=3"):
        loss.load_state_dict(GroupDistillationLoss(num_groups=4).state_dict())
    bad = loss.state_dict()
    bad["group_weights"] = torch.tensor([0.5, float("nan"), 0.5])
    with pytest.raises(ValueError, match="not a probability vector"):
        loss.load_state_dict(bad)
    assert torch.equal(loss.group_weights, torch.full((3,), 1 / 3)) and not loss.ema_initialized.any()


def test_float32_and_extreme_losses_keep_weights_finite():
    loss = GroupDistillationLoss(num_groups=2, step_size=5.0)
    student = torch.tensor([[80.0, -80.0], [0.0, 0.0]])
    teacher = torch.tensor([[-80.0, 80.0], [0.0, 0.0]])
    loss(student, teacher, torch.tensor([1, 0]), torch.tensor([0, 1]))
    assert torch.isfinite(loss.group_weights).all()
    assert math.isclose(loss.group_weights.sum().item(), 1.0, rel_tol=1e-6)
    assert loss.group_weights[0] > 0.99


def test_very_negative_losses_do_not_underflow_the_update():
    """exp(step * L) underflows to 0 for every group when all losses are very negative; the update is shift-free."""
    loss = GroupDROLoss(lambda x, y: x.sum(dim=1), num_groups=2, step_size=1.0)
    values = torch.tensor([[-1000.0], [-1001.0]])
    loss(values, torch.zeros(2), torch.tensor([0, 1]))
    expected = torch.softmax(torch.tensor([-1000.0, -1001.0], dtype=torch.float64), 0)
    assert torch.allclose(loss.group_weights.double(), expected, atol=1e-6)


# ---------------------------------------------------------------- bad input leaves the weights untouched


def _fresh_trained_loss():
    loss = GroupDistillationLoss(num_groups=3, step_size=0.5)
    loss(*_batch(200))
    return loss


BAD_CALLS = [
    ("groups above range", lambda s, t, y, g: (s, t, y, g + 3), ValueError, r"ids must lie in \[0, num_groups\)"),
    ("negative groups", lambda s, t, y, g: (s, t, y, g - 5), ValueError, r"ids must lie in \[0, num_groups\)"),
    ("non-integral groups", lambda s, t, y, g: (s, t, y, g + 0.5), ValueError, "groups holds non-integral values"),
    ("bool groups", lambda s, t, y, g: (s, t, y, g > 0), TypeError, "groups must be a tensor of integer group ids"),
    ("groups shape", lambda s, t, y, g: (s, t, y, g[:5]), ValueError, r"groups must have shape \[B\] = \(12,\)"),
    ("target shape", lambda s, t, y, g: (s, t, y[:5], g), ValueError, "target must hold class indices of shape"),
    ("teacher shape", lambda s, t, y, g: (s, t[:5], y, g), ValueError, "teacher_logits must have the shape"),
    ("teacher classes", lambda s, t, y, g: (s, torch.randn(12, 7), y, g), ValueError, "different class counts"),
    (
        "nan input",
        lambda s, t, y, g: (s.index_fill(0, torch.tensor([2]), float("nan")), t, y, g),
        ValueError,
        "input holds NaN or infinite values",
    ),
    (
        "inf teacher",
        lambda s, t, y, g: (s, t.index_fill(0, torch.tensor([0]), float("inf")), y, g),
        ValueError,
        "teacher_logits holds NaN or infinite values",
    ),
    ("empty batch", lambda s, t, y, g: (s[:0], t[:0], y[:0], g[:0]), ValueError, "empty batch"),
    ("label above range", lambda s, t, y, g: (s, t, y + 4, g), ValueError, r"class indices in \[4, 7\] .* C=4"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_and_leave_weights_untouched(name, mutate, error, message):
    loss = _fresh_trained_loss()
    state = copy.deepcopy(loss.state_dict())
    with pytest.raises(error, match=message):
        loss(*mutate(*_batch(201)))
    assert loss.state_dict()["_extra_state"] == state.pop("_extra_state")
    for key, value in state.items():
        assert torch.equal(loss.state_dict()[key], value), key


def test_group_dro_non_finite_per_group_losses_and_wrong_loss_shape():
    loss = GroupDROLoss(lambda x, y: x.sum(1) * float("inf"), num_groups=2)
    with pytest.raises(ValueError, match=r"per-group losses are not finite for groups \[0, 1\]"):
        loss(torch.ones(4, 2), torch.zeros(4), torch.tensor([0, 1, 0, 1]))
    assert torch.equal(loss.group_weights, torch.full((2,), 0.5))
    scalar = GroupDROLoss(torch.nn.CrossEntropyLoss(), num_groups=2)
    with pytest.raises(ValueError, match="reduction='none'"):
        scalar(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"num_groups": 0}, ValueError, "num_groups must be an integer >= 1"),
        ({"num_groups": 2.5}, ValueError, "num_groups must be an integer >= 1"),
        ({"num_groups": 2, "temperature": 0}, ValueError, "temperature must be a finite number > 0"),
        ({"num_groups": 2, "alpha": 2}, ValueError, r"alpha must lie in \[0, 1\]"),
        ({"num_groups": 2, "step_size": -0.1}, ValueError, "step_size must be a finite number >= 0"),
        ({"num_groups": 2, "gamma": 0}, ValueError, r"gamma must lie in \(0, 1\]"),
        ({"num_groups": 2, "adjustment": 1.0}, ValueError, "needs group_counts"),
        ({"num_groups": 2, "adjustment": [1.0], "group_counts": [3, 4]}, ValueError, r"adjustment must have one value"),
        ({"num_groups": 2, "adjustment": 1.0, "group_counts": [3]}, ValueError, "group_counts must have one value"),
        ({"num_groups": 2, "adjustment": [1.0, 0.0], "group_counts": [0, 4]}, ValueError, r"is 0 for groups \[0\]"),
        ({"num_groups": 2, "adjustment": -1.0, "group_counts": [3, 4]}, ValueError, "adjustment must be >= 0"),
        ({"num_groups": 2, "absent_groups": "mean"}, ValueError, r"absent_groups must be one of \('ema', 'zero'\)"),
        ({"num_groups": 2, "dice_weight": -1}, ValueError, "dice_weight must be a finite number >= 0"),
    ],
)
def test_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        GroupDistillationLoss(**kwargs)


def test_step_size_attribute_is_validated():
    loss = GroupDistillationLoss(num_groups=2)
    loss.step_size = 0.25
    assert loss.step_size == 0.25
    with pytest.raises(ValueError, match="step_size"):
        loss.step_size = float("nan")
    assert loss.step_size == 0.25


def test_distillation_hyper_parameters_are_settable_and_validated():
    """Assigning temperature, alpha or dice_weight (as a ParamSchedulerHandler does) changes the loss computed, as
    constructing it with that value would; a bad value is refused with its name and the old value kept."""
    student, teacher, labels, groups = _batch(5)
    for cls, call in (
        (DistillationLoss, lambda loss: loss(student, teacher, labels)),
        (lambda **kw: GroupDistillationLoss(3, **kw).eval(), lambda loss: loss(student, teacher, labels, groups)),
    ):
        changed = cls(temperature=4.0, alpha=0.5)
        changed.temperature, changed.alpha = 1.0, 0.9
        assert (changed.temperature, changed.alpha) == (1.0, 0.9)
        assert torch.equal(call(changed), call(cls(temperature=1.0, alpha=0.9)))
        assert not torch.equal(call(changed), call(cls(temperature=4.0, alpha=0.5)))
        for name, value, message in (
            ("alpha", 7.0, r"alpha must lie in \[0, 1\], got 7.0"),
            ("temperature", 0.0, "temperature must be a finite number > 0"),
            ("dice_weight", -1.0, "dice_weight must be a finite number >= 0"),
        ):
            before = getattr(changed, name)
            with pytest.raises(ValueError, match=message):
                setattr(changed, name, value)
            assert getattr(changed, name) == before


def test_losses_import_without_ignite():
    code = (
        "import sys; sys.modules['ignite'] = None\n"
        "from monai_groupdistil.losses import GroupDistillationLoss\n"
        "import torch\n"
        "print(GroupDistillationLoss(2)(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), "
        "torch.tensor([0, 1])).item() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_every_subpackage_imports_without_ignite_and_names_it_when_used():
    """ignite goes through MONAI's optional_import: the package imports without it (a class built on an ignite
    class included), and using such a class says that ignite is missing."""
    code = (
        "import sys; sys.modules['ignite'] = None\n"
        "import monai_groupdistil.engines, monai_groupdistil.handlers, monai_groupdistil.metrics\n"
        "from monai_groupdistil.engines import AtomicDiskSaver\n"
        "try:\n    AtomicDiskSaver('/tmp')\nexcept Exception as err:\n    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OptionalImportError") and "ignite" in out.stdout, out.stdout


def test_state_stays_consistent_across_copies_and_dtype_changes():
    loss = GroupDistillationLoss(num_groups=3, step_size=0.7)
    ref = ReferenceGroupDRO(num_groups=3, step_size=0.7)
    temperature, alpha = 4.0, 0.5

    def step(module, seed):
        s, t, y, g = _batch(seed)
        module(s, t, y, g)
        ref.step(per_sample_kd(_nested(s), _nested(t), y.tolist(), temperature, alpha), g.tolist())

    step(loss, 300)
    clone = copy.deepcopy(loss)
    clone(*_batch(999))  # the copy moves on; the original must not
    assert torch.allclose(loss.group_weights.double(), torch.tensor(ref.q, dtype=torch.float64), atol=1e-6)
    loss.double()  # new buffers: the cached numpy views must follow
    assert loss.group_weights.dtype == torch.float64
    step(loss, 301)
    assert torch.allclose(loss.group_weights, torch.tensor(ref.q, dtype=torch.float64), atol=1e-6)
    restored = GroupDistillationLoss(num_groups=3, step_size=0.7)
    restored(*_batch(302))  # state it then loads over, in place
    restored.load_state_dict(loss.state_dict())
    step(loss, 303)
    s, t, y, g = _batch(303)
    restored(s, t, y, g)
    assert torch.allclose(restored.group_weights.double(), loss.group_weights, atol=1e-6)
    assert not torch.allclose(clone.group_weights.double(), loss.group_weights, atol=1e-3)


# ---------------------------------------------------------------- one rule for labels and group ids


def test_one_hot_targets_and_whole_number_float_ids_give_the_values_of_indices():
    student, teacher, target, groups = _batch(300, spatial=(3, 2))
    one_hot = torch.nn.functional.one_hot(target, 4).movedim(-1, 1).float()
    reference = GroupDistillationLoss(3, step_size=0.5)
    same = GroupDistillationLoss(3, step_size=0.5)
    for _ in range(2):
        want = reference(student, teacher, target, groups)
        got = same(student, teacher, one_hot, groups.double())
        assert torch.equal(got, want)
    assert torch.equal(same.group_weights, reference.group_weights)
    assert torch.equal(DistillationLoss()(student, teacher, one_hot), DistillationLoss()(student, teacher, target))
    with pytest.raises(ValueError, match=r"target has the shape of input \(12, 4, 3, 2\) but is not one-hot"):
        same(student, teacher, one_hot * 2, groups)


def test_a_loss_called_as_supervised_trainer_calls_it_says_what_to_use():
    from monai.engines import SupervisedTrainer

    data = [{"image": torch.randn(3), "label": torch.tensor(i % 2), "group": torch.tensor(i % 2)} for i in range(4)]
    for loss, call in [
        (GroupDistillationLoss(2), r"call loss\(input, teacher_logits, target, groups\)"),
        (GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), 2), r"call loss\(input, target, groups\)"),
        (DistillationLoss(), r"was the loss called as loss\(pred, label\)"),
    ]:
        net = torch.nn.Linear(3, 2)
        trainer = SupervisedTrainer(
            "cpu", 1, torch.utils.data.DataLoader(data, batch_size=4), net, torch.optim.SGD(net.parameters(), 0.1), loss
        )
        with pytest.raises(TypeError, match=f"{call}.*DistillationTrainer"):
            trainer.run()
        if isinstance(loss, GroupDROLoss):
            assert torch.equal(loss.group_weights, torch.full((2,), 0.5))


def test_a_checkpoint_with_bad_running_losses_or_buffer_shapes_is_refused_before_anything_is_written():
    """torch copies a state dict's buffers one by one: every one is checked first, so a refused checkpoint leaves
    the loss as it was."""
    loss = GroupDistillationLoss(num_groups=3, step_size=0.5)
    bad = loss.state_dict()
    bad["ema_group_losses"] = torch.tensor([float("nan"), 1.0, 1.0])
    bad["ema_initialized"] = torch.tensor([True, True, True])
    with pytest.raises(ValueError, match=r"running group losses \('ema_group_losses'\) are not finite: \[nan, 1.0"):
        loss.load_state_dict(bad)
    shaped = loss.state_dict()
    shaped["group_weights"] = torch.tensor([0.6, 0.3, 0.1])  # a valid vector, then a damaged buffer
    shaped["ema_group_losses"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"'ema_group_losses' has shape \(4,\), this loss needs \(3,\)"):
        loss.load_state_dict(shaped)
    assert torch.equal(loss.group_weights, torch.full((3,), 1 / 3))
    assert torch.equal(loss.ema_group_losses, torch.zeros(3)) and not loss.ema_initialized.any()


def test_a_half_precision_loss_reloads_its_own_checkpoint_with_many_groups():
    """The weights of a float16 loss are floored at float16's smallest normal number, so with many groups they sum
    to a little more than 1; its own checkpoint is still a probability vector to it, a vector summing to 1.2 not."""
    groups = 1000
    loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), groups, step_size=5.0).half()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        logits = torch.randn(64, 4, generator=gen) * 3
        loss(logits.half(), torch.randint(0, 4, (64,), generator=gen), torch.randint(0, groups, (64,), generator=gen))
    total = float(loss.group_weights.double().sum())
    assert total - 1 > 1e-3  # the floor at work: the former check refused this checkpoint
    resumed = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), groups).half()
    resumed.load_state_dict(loss.state_dict())
    assert torch.equal(resumed.group_weights, loss.group_weights)
    bad = loss.state_dict()
    for factor in (1.2, 0.9):  # the floor's slack is above 1 only
        bad["group_weights"] = loss.state_dict()["group_weights"] * factor
        with pytest.raises(ValueError, match="not a probability vector"):
            GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), groups).half().load_state_dict(bad)
    bad["group_weights"] = torch.zeros(groups, dtype=torch.long).index_fill_(0, torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="not a probability vector"):  # integers: no weights of this loss
        GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), groups).half().load_state_dict(bad)


def test_a_bfloat16_loss_reloads_every_checkpoint_of_its_own_training():
    """bfloat16 rounds each weight by up to 0.2 %: three weights of 1/3 sum to 1.002, and the trained weights to
    other sums within bfloat16's eps of 1. Every checkpoint of its own training reloads; a sum of 1.05 does not."""
    loss = GroupDistillationLoss(3, step_size=0.5).to(torch.bfloat16)
    sums = []
    for seed in range(40):
        if seed:
            loss(*(t.to(torch.bfloat16) if t.is_floating_point() else t for t in _batch(seed)))
        state = loss.state_dict()
        sums.append(float(state["group_weights"].double().sum()))
        resumed = GroupDistillationLoss(3, step_size=0.5).to(torch.bfloat16)
        resumed.load_state_dict(state)
        assert torch.equal(resumed.group_weights, loss.group_weights)
    assert max(abs(x - 1) for x in sums) > 1e-3  # beyond the float32 tolerance: the former check refused these
    bad = loss.state_dict()
    bad["group_weights"] = bad["group_weights"] * 1.05
    with pytest.raises(ValueError, match="not a probability vector"):
        GroupDistillationLoss(3).to(torch.bfloat16).load_state_dict(bad)


def test_a_float16_sum_that_overflows_is_refused_and_leaves_the_weights_as_they_were():
    """4096 samples of cross entropy about 25 sum to about 1e5, beyond float16's 65504: the call raises (the trainer
    then stops before the backward pass) and the weights and running losses stay those of before the call."""
    batch = 4096
    student = torch.zeros(batch, 3, dtype=torch.float16)
    student[:, 0], student[::2, 0] = 30.0, 20.0  # confidently wrong: cross entropy 20-30 per sample
    labels, groups = torch.ones(batch, dtype=torch.long), torch.arange(batch) % 2
    loss = GroupDistillationLoss(2, alpha=0.0, reduction="sum", step_size=1.0)
    loss(student[:8], None, labels[:8], groups[:8])  # a finite call moves the weights first
    state = {k: v.clone() for k, v in loss.state_dict().items() if isinstance(v, torch.Tensor)}
    last = (loss.last_group_losses.clone(), loss.last_group_counts.clone())  # the statistics of the finite call
    with pytest.raises(NonFiniteValueError, match="reduction='sum' overflows float16 .* the DRO weights are left"):
        loss(student, None, labels, groups)
    assert all(torch.equal(v, loss.state_dict()[k]) for k, v in state.items())
    assert torch.equal(loss.last_group_losses, last[0]) and torch.equal(loss.last_group_counts, last[1])
    mean = GroupDistillationLoss(2, alpha=0.0, step_size=1.0)  # the mean of finite values cannot overflow
    assert bool(mean(student, None, labels, groups).isfinite())
    in_float32 = GroupDistillationLoss(2, alpha=0.0, reduction="sum", step_size=1.0)
    value = in_float32(student.float(), None, labels, groups)
    assert 65504 < float(value) < 30 * batch


def test_without_a_teacher_bad_groups_and_non_finite_input_are_reported():
    """alpha 0 needs no teacher_logits; the errors of the group statistics still name the culprit."""
    loss = GroupDistillationLoss(num_groups=2, alpha=0.0)
    target = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, num_groups\) = \[0, 2\)\. Set num_groups"):
        loss(torch.randn(4, 3), None, target, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(NonFiniteValueError, match="^input holds NaN or infinite values; per-group losses"):
        loss(torch.full((4, 3), float("nan")), None, target, torch.tensor([0, 1, 1, 0]))
    assert torch.equal(loss.group_weights, torch.full((2,), 0.5))


def test_misuses_are_named_with_what_to_do():
    student, teacher, target, groups = _batch(5)
    with pytest.raises(TypeError, match=r"got the class CrossEntropyLoss: construct it first, e\.g\. Cross"):
        GroupDROLoss(torch.nn.CrossEntropyLoss, num_groups=3)
    loss = GroupDistillationLoss(num_groups=3)
    with pytest.raises(TypeError, match=r"teacher_logits holds integers and groups is missing: .*loss\(input, target"):
        loss(student, target, groups)  # the teacher's logits left out
    with pytest.raises(TypeError, match=r"takes \(input, target, teacher_logits\).*swap them"):
        loss.weighting_losses(student, teacher, target)  # the order of forward
    assert torch.allclose(
        loss.weighting_losses(student, target, teacher), loss.loss_fn(student, teacher, target).flatten()
    )
    with pytest.raises(ValueError, match=r"got \(12,\); for one binary logit per sample \[B\], pass two classes"):
        loss(student[:, 0], teacher[:, 0], target, groups)
    dice = GroupDROLoss(DiceCELoss(to_onehot_y=True, softmax=True), num_groups=3)
    with pytest.raises(
        ValueError, match=r"reduction='none' \(MONAI's DiceCELoss has no 'none' reduction: use .*PerSampleDiceCELoss"
    ):
        dice(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 1, 8, 8)), torch.tensor([0, 1, 2, 0]))
