"""compute_group_accuracy / GroupAccuracy against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from monai_groupdistil.metrics import GroupAccuracy, compute_group_accuracy

# 7 samples, 4 groups; group 3 has no sample
LOGITS = torch.tensor(
    [[2.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [5, 0, 0]]
)
LABELS = torch.tensor([0, 1, 1, 2, 1, 2, 0])  # correct: 1, 1, 0, 0, 1, 1, 1
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 2])
# by hand: group 0: 2/2 = 1.0; group 1: 0/2 = 0.0; group 2: 3/3 = 1.0; group 3: no sample
HAND_PER_GROUP = [1.0, 0.0, 1.0, float("nan")]


def assert_per_group(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        assert (math.isnan(a) and math.isnan(e)) or a == pytest.approx(e)


def test_hand_computation_with_absent_group():
    result = compute_group_accuracy(LOGITS, LABELS, GROUPS, num_groups=4)
    assert_per_group(result["per_group"], HAND_PER_GROUP)
    assert result["counts"].tolist() == [2, 2, 3, 0]
    assert result["worst_group"] == 0.0 and result["worst_group_id"] == 1
    assert result["mean_group"] == pytest.approx(2.0 / 3.0)  # mean over the 3 groups with samples
    assert result["overall"] == pytest.approx(5.0 / 7.0)


def test_weighted_average_by_training_share():
    result = compute_group_accuracy(LOGITS, LABELS, GROUPS, num_groups=4, group_counts=[10, 30, 60, 100])
    # the absent group is dropped from the weights: (10 * 1 + 30 * 0 + 60 * 1) / 100
    assert result["weighted"] == pytest.approx(0.7)


def test_list_inputs_and_index_predictions_match_tensors():
    ref = compute_group_accuracy(LOGITS, LABELS, GROUPS, num_groups=4)
    as_lists = compute_group_accuracy(list(LOGITS), [int(v) for v in LABELS], [int(g) for g in GROUPS], num_groups=4)
    indices = compute_group_accuracy(LOGITS.argmax(1)[:, None], LABELS[:, None], GROUPS, num_groups=4)
    onehot = compute_group_accuracy(LOGITS, torch.nn.functional.one_hot(LABELS, 3), GROUPS, num_groups=4)
    for other in (as_lists, indices, onehot):
        assert_per_group(other["per_group"], HAND_PER_GROUP)
        assert other["overall"] == ref["overall"]


def test_dense_outputs_count_correct_voxels():
    pred = torch.zeros(2, 2, 2, 2)
    pred[:, 1] = 1.0  # predicts class 1 everywhere
    label = torch.tensor([[[[1, 1], [1, 0]]], [[[0, 0], [0, 0]]]])  # [B, 1, H, W]
    result = compute_group_accuracy(pred, label, torch.tensor([0, 1]), num_groups=2)
    assert_per_group(result["per_group"], [0.75, 0.0])
    assert result["overall"] == pytest.approx(0.375)


def test_aggregate_before_any_batch_raises():
    metric = GroupAccuracy(num_groups=2)
    with pytest.raises(RuntimeError, match="before any batch"):
        metric.aggregate()


def test_cumulative_metric_over_batches_equals_one_call():
    metric = GroupAccuracy(num_groups=4)
    metric(LOGITS[:3], LABELS[:3], groups=GROUPS[:3])
    metric(list(LOGITS[3:]), list(LABELS[3:]), groups=list(GROUPS[3:]))
    result = metric.aggregate()
    assert_per_group(result["per_group"], HAND_PER_GROUP)
    assert result["overall"] == pytest.approx(5.0 / 7.0)
    metric.reset()
    metric(LOGITS[:2], LABELS[:2], groups=GROUPS[:2])
    assert_per_group(metric.aggregate()["per_group"], [1.0, float("nan"), float("nan"), float("nan")])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"groups holds ids in \[0, 2\]; ids must lie in \[0, num_groups\) = \[0, 2\)"):
        compute_group_accuracy(LOGITS, LABELS, GROUPS, num_groups=2)
    with pytest.raises(ValueError, match=r"groups must have shape \[B\] = \(7,\)"):
        compute_group_accuracy(LOGITS, LABELS, GROUPS[:3], num_groups=4)
    with pytest.raises(ValueError, match="groups holds non-integral values"):
        compute_group_accuracy(LOGITS, LABELS, GROUPS.float() + 0.5, num_groups=4)
    with pytest.raises(ValueError, match="do not describe the same samples"):
        compute_group_accuracy(LOGITS, LABELS[:3], GROUPS, num_groups=4)
    with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
        GroupAccuracy(num_groups=0)


def test_docstring_examples():
    import doctest

    from monai_groupdistil.engines import teacher_cache
    from monai_groupdistil.metrics import group_accuracy, group_metric

    for module in (group_accuracy, group_metric, teacher_cache):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)
