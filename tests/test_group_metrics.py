"""GroupMetric, GroupMetricHandler and GroupMetricReportHandler against independent computations."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import AsDiscreted
from scipy import ndimage

from monai_groupdistil.handlers import (
    GroupAccuracyHandler,
    GroupMetricHandler,
    GroupMetricReportHandler,
    batch_spacing,
)
from monai_groupdistil.metrics import GroupMetric, per_sample_accuracy, summarise_group_values

NAMES = ["A", "B", "C", "D"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def nan_equal(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


# ------------------------------------------------------------------ summarise_group_values / GroupMetric


def test_summary_by_hand_with_nan_values_and_an_empty_group():
    values = torch.tensor([[1.0, 0.5], [0.0, float("nan")], [0.4, 0.6], [0.2, 0.2]])
    groups = torch.tensor([0, 0, 1, 1])
    r = summarise_group_values(values, groups, num_groups=3, group_counts=[1, 3, 6])
    # group 0: channel 0 mean(1, 0) = 0.5, channel 1 only 0.5 (NaN left out); group 1: 0.3, 0.4
    assert r["per_group_channel"][0].tolist() == pytest.approx([0.5, 0.5])
    assert r["per_group_channel"][1].tolist() == pytest.approx([0.3, 0.4])
    assert all(math.isnan(v) for v in r["per_group_channel"][2].tolist())
    assert r["per_group"][:2].tolist() == pytest.approx([0.5, 0.35]) and math.isnan(float(r["per_group"][2]))
    assert r["counts"].tolist() == [2, 2, 0]
    assert r["worst_group_id"] == 1 and r["worst_group"] == pytest.approx(0.35)
    assert r["mean_group"] == pytest.approx(0.425)
    assert r["overall_channel"].tolist() == pytest.approx([0.4, 1.3 / 3])
    assert r["overall"] == pytest.approx((0.4 + 1.3 / 3) / 2)
    assert r["weighted"] == pytest.approx((1 * 0.5 + 3 * 0.35) / 4)  # the empty group is left out
    low = summarise_group_values(values, groups, num_groups=3, higher_is_better=False)
    assert low["worst_group_id"] == 0 and low["worst_group"] == pytest.approx(0.5)


def test_summary_errors():
    with pytest.raises(ValueError, match=r"groups holds ids in \[0, 2\]; ids must lie in \[0, num_groups\) = \[0, 2\)"):
        summarise_group_values(torch.ones(3, 1), torch.tensor([0, 1, 2]), num_groups=2)
    with pytest.raises(ValueError, match=r"group_counts must have one value per group \(2\), got 3 values"):
        summarise_group_values(torch.ones(2, 1), torch.tensor([0, 1]), num_groups=2, group_counts=[1, 2, 3])


def _one_hot(labels: torch.Tensor, classes: int = 4) -> torch.Tensor:
    """[B, *spatial] -> [B, C, *spatial]."""
    return torch.nn.functional.one_hot(labels.long(), classes).movedim(-1, 1).float()


def _dice_numpy(pred: np.ndarray, label: np.ndarray, c: int) -> float:
    p, g = pred == c, label == c
    if not g.any():
        return float("nan")
    return 2.0 * float((p & g).sum()) / float(p.sum() + g.sum())


def test_group_metric_wraps_monai_dice_and_buffers_over_batches():
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (6, 8, 8), generator=gen)
    pred = torch.where(torch.rand(6, 8, 8, generator=gen) < 0.7, label, torch.randint(0, 4, (6, 8, 8), generator=gen))
    label[5][label[5] == 3] = 0  # no RV in the last sample: NaN (ignore_empty), left out of the means
    groups = torch.tensor([0, 1, 1, 2, 2, 2])
    metric = GroupMetric(DiceMetric(include_background=False, reduction="none"), num_groups=4)
    metric(_one_hot(pred[:4]), _one_hot(label[:4]), groups=groups[:4])
    metric(list(_one_hot(pred[4:])), list(_one_hot(label[4:])), groups=[int(g) for g in groups[4:]])  # decollated
    r = metric.aggregate()
    expected = np.array([[_dice_numpy(pred[i].numpy(), label[i].numpy(), c) for c in (1, 2, 3)] for i in range(6)])
    assert math.isnan(expected[5, 2])
    for g in range(3):
        for c in range(3):
            assert nan_equal(float(r["per_group_channel"][g, c]), float(np.nanmean(expected[groups.numpy() == g, c])))
    assert r["counts"].tolist() == [1, 2, 3, 0]
    metric.reset()
    with pytest.raises(RuntimeError, match="aggregate\\(\\) called before any batch was added"):
        metric.aggregate()


def test_group_metric_refuses_a_metric_without_per_sample_values():
    def batch_mean(y_pred, y):
        return (y_pred == y).float().mean()

    metric = GroupMetric(batch_mean, num_groups=2)
    x = _one_hot((torch.arange(16).reshape(1, 4, 4) % 4).repeat(3, 1, 1))  # every class in every sample
    with pytest.raises(ValueError, match=r"function gave values of shape \(\) for a batch of 3; a per-sample metric"):
        metric(x, x, groups=torch.tensor([0, 1, 0]))
    # a MONAI cumulative metric gives per-sample values whatever its reduction (applied only in its aggregate())
    reducing = GroupMetric(DiceMetric(include_background=False, reduction="mean"), num_groups=2)
    values, _ = reducing(x, x, groups=torch.tensor([0, 1, 0]))
    assert values.shape == (3, 3) and torch.all(values == 1)


# ------------------------------------------------------------------ handlers on a real evaluator


class Lookup(torch.nn.Module):
    """'Network' that returns precomputed logits stored in the input's second channel... kept simple: the input is
    the one-hot prediction itself, so the evaluator's pred is known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 10.0


def _volume_data(n: int = 8, seed: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = torch.zeros(10, 10, 3, dtype=torch.long)
        label[2:8, 2:8] = 2
        label[3:7, 3:7] = 1
        label[0:2, :, :] = 3
        pred = label.clone()
        flips = torch.rand(10, 10, 3, generator=gen) < 0.1 * (1 + i % 4)  # groups differ in quality
        pred[flips] = torch.randint(0, 4, (int(flips.sum()),), generator=gen)
        affine = torch.diag(torch.tensor([1.5, 1.5, 8.0, 1.0]))
        items.append({
            "image": MetaTensor(_one_hot(pred[None])[0], affine=affine),
            "label": MetaTensor(label[None].float(), affine=affine),
            "group": i % 4,
            "case": f"case{i}",
        })  # fmt: skip
    return items


def test_dice_and_hd95_handlers_on_an_evaluator_match_an_independent_computation(tmp_path):
    data = _volume_data()
    dice = GroupMetricHandler(
        DiceMetric(include_background=False, reduction="none"),
        num_groups=4, group_names=NAMES, metric_name="dice", channel_names=["LV", "MYO", "RV"],
    )  # fmt: skip
    hd = GroupMetricHandler(
        HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none"),
        num_groups=4, group_names=NAMES, metric_name="hd95", channel_names=["LV", "MYO", "RV"],
        higher_is_better=False, metric_kwargs=batch_spacing("label"),
    )  # fmt: skip
    report = GroupMetricReportHandler(
        tmp_path / "report", num_groups=4, group_names=NAMES, channel_names=["LV", "MYO", "RV"],
        metrics={"dice": DiceMetric(include_background=False, reduction="none"),
                 "hd95": HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")},
        lower_is_better=["hd95"], metric_kwargs={"hd95": batch_spacing("label")}, overlays=2,
    )  # fmt: skip
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(data, batch_size=3),
        network=Lookup(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=4),
        key_val_metric={"val_worst_dice": dice},
        additional_metrics={"val_worst_hd95": hd},
        val_handlers=[report],
    )
    evaluator.run()
    metrics = evaluator.state.metrics
    preds = [d["image"].argmax(0).numpy() for d in data]
    labels = [d["label"][0].long().numpy() for d in data]
    ref_dice = np.array([[_dice_numpy(p, g, c) for c in (1, 2, 3)] for p, g in zip(preds, labels)])
    groups = np.array([d["group"] for d in data])
    per_group = [np.nanmean(ref_dice[groups == g], axis=0) for g in range(4)]
    for g, name in enumerate(NAMES):
        assert metrics[f"group_dice/{name}"] == pytest.approx(float(np.mean(per_group[g])))
        assert metrics[f"group_dice/{name}/MYO"] == pytest.approx(float(per_group[g][1]))
    worst = min(range(4), key=lambda g: float(np.mean(per_group[g])))
    assert metrics["val_worst_dice"] == metrics["worst_group_dice"] == pytest.approx(float(np.mean(per_group[worst])))
    assert metrics["dice/LV"] == pytest.approx(float(np.nanmean(ref_dice[:, 0])))

    # HD95 in mm (spacing 1.5, 1.5, 8.0 from the affine), with scipy's distance transform as reference
    def hd95(p: np.ndarray, g: np.ndarray) -> float:
        def surface(m):
            return m & ~ndimage.binary_erosion(m)

        ps, gs = surface(p), surface(g)
        d_to_g = ndimage.distance_transform_edt(~gs, sampling=(1.5, 1.5, 8.0))[ps]
        d_to_p = ndimage.distance_transform_edt(~ps, sampling=(1.5, 1.5, 8.0))[gs]
        return max(np.percentile(d_to_g, 95), np.percentile(d_to_p, 95))

    ref_hd = np.array([[hd95(p == c, g == c) for c in (1, 2, 3)] for p, g in zip(preds, labels)])
    hd_group = [float(np.mean(ref_hd[groups == g], axis=0).mean()) for g in range(4)]
    for g, name in enumerate(NAMES):
        assert metrics[f"group_hd95/{name}"] == pytest.approx(hd_group[g], rel=1e-5)
    assert metrics["val_worst_hd95"] == pytest.approx(max(hd_group), rel=1e-5)  # the worst distance is the largest

    # the report: one row per group and structure (and the mean), the same values as the handlers
    with open(tmp_path / "report" / "group_report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["group", "name", "structure", "samples", "dice", "hd95"]
    assert [(r["name"], r["structure"]) for r in rows] == [(n, s) for n in NAMES for s in ("LV", "MYO", "RV", "mean")]
    for r in rows:
        g = NAMES.index(r["name"])
        key = f"group_dice/{r['name']}" + ("" if r["structure"] == "mean" else f"/{r['structure']}")
        assert float(r["dice"]) == pytest.approx(metrics[key]) and int(r["samples"]) == int((groups == g).sum())
    summary = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert summary["worst_group"] == NAMES[worst] and summary["samples"] == len(data)
    assert summary["worst_group_dice"] == pytest.approx(metrics["worst_group_dice"])
    assert summary["per_group_hd95"]["B"]["mean"] == pytest.approx(hd_group[1], rel=1e-5)
    for name in ("group_dice.png", "worst_group_cases.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC


def test_group_accuracy_handler_is_a_group_metric_handler_with_the_accuracy_keys():
    handler = GroupAccuracyHandler(num_groups=2, group_names=["x", "y"])
    assert isinstance(handler, GroupMetricHandler) and handler.metric_name == "accuracy"
    generic = GroupMetricHandler(per_sample_accuracy, num_groups=2, group_names=["x", "y"], metric_name="accuracy")
    data = [{"image": torch.tensor([float(i % 3), 1.0]), "label": i % 2, "group": i % 2} for i in range(10)]
    results = []
    for h in (handler, generic):
        ev = SupervisedEvaluator(
            device="cpu", val_data_loader=DataLoader(data, batch_size=4), network=torch.nn.Identity(),
            key_val_metric={"worst": h},
        )  # fmt: skip
        ev.run()
        results.append(ev.state.metrics)
    for key in ("worst", "accuracy", "mean_group_accuracy", "worst_group_accuracy", "group_accuracy/x"):
        assert results[0][key] == pytest.approx(results[1][key]), key


def test_the_key_metric_is_never_overwritten_by_another_value_of_the_handler():
    """The keys a handler writes besides its name are exactly ``written_keys()``; naming the metric after one of
    them (e.g. "accuracy", the overall value, written after the worst group's) is refused when it is attached."""
    data = [{"image": torch.tensor([float(i % 3), 1.0]), "label": i % 2, "group": i % 2} for i in range(10)]
    handler = GroupAccuracyHandler(num_groups=2, group_names=["x", "y"], group_counts=[3, 1])
    ev = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(data, batch_size=4), network=torch.nn.Identity(),
        key_val_metric={"worst": handler},
    )  # fmt: skip
    ev.run()
    assert set(ev.state.metrics) == {"worst", "worst_group_accuracy", *handler.written_keys()}
    assert ev.state.metrics["worst"] == min(ev.state.metrics["group_accuracy/x"], ev.state.metrics["group_accuracy/y"])
    for name in ("accuracy", "mean_group_accuracy", "group_accuracy/y", "weighted_accuracy"):
        clash = GroupAccuracyHandler(num_groups=2, group_names=["x", "y"], group_counts=[3, 1])
        with pytest.raises(ValueError, match=f"the metric name '{name}' is also the key of another value"):
            SupervisedEvaluator(
                device="cpu", val_data_loader=DataLoader(data, batch_size=4), network=torch.nn.Identity(),
                key_val_metric={name: clash},
            )  # fmt: skip
    dice = GroupMetricHandler(lambda p, y: p, 2, metric_name="dice", channel_names=["LV"], prefix="val_")
    assert "val_dice/LV" in dice.written_keys() and "val_group_dice/group1/LV" in dice.written_keys()


def test_group_counts_are_checked_when_the_metric_is_built():
    for counts, message in (
        ([10, 20, 30], r"group_counts must have one value per group \(2\), got 3 values"),
        ([-30, 50], r"group_counts must be >= 0 for every group and finite, got \[-30.0, 50.0\]"),
        ([1, float("nan")], "group_counts must be >= 0 for every group and finite"),
    ):
        with pytest.raises(ValueError, match=message):
            GroupMetric(per_sample_accuracy, 2, group_counts=counts)
        with pytest.raises(ValueError, match=message):
            GroupAccuracyHandler(num_groups=2, group_counts=counts)
        with pytest.raises(ValueError, match=message):
            summarise_group_values(torch.ones(2, 1), torch.tensor([0, 1]), num_groups=2, group_counts=counts)


def test_report_argument_errors(tmp_path):
    dice = {"dice": DiceMetric(reduction="none")}
    with pytest.raises(ValueError, match="metrics must name at least one metric"):
        GroupMetricReportHandler(tmp_path, 2, {})
    with pytest.raises(ValueError, match=r"key_metric 'hd' is not one of the metrics \['dice'\]"):
        GroupMetricReportHandler(tmp_path, 2, dice, key_metric="hd")
    with pytest.raises(ValueError, match=r"lower_is_better names \['hd'\], which are not metrics"):
        GroupMetricReportHandler(tmp_path, 2, dice, lower_is_better=["hd"])
    with pytest.raises(ValueError, match="group_names has 1 names but num_groups is 2"):
        GroupMetricHandler(per_sample_accuracy, 2, group_names=["a"])
