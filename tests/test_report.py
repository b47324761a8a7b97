"""GroupReportHandler on a real SupervisedEvaluator: CSV rows, JSON summary and plots."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.engines import SupervisedEvaluator
from monai.utils import OptionalImportError
from torch.utils.data import DataLoader

from monai_groupdistil import visualize
from monai_groupdistil.engines import DistillationTrainer
from monai_groupdistil.handlers import GroupDROHandler, GroupReportHandler
from monai_groupdistil.losses import GroupDistillationLoss
from monai_groupdistil.visualize import plot_dro_weights, plot_group_accuracy

G = 4
NAMES = ["A", "B", "C", "D"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_data(n: int, seed: int, groups=(0, 1, 2)) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    g = torch.tensor(groups)[torch.arange(n) % len(groups)]
    return [{"image": x[i], "label": y[i], "group": g[i]} for i in range(n)]


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 2)


def run_report(tmp_path, dro=None, plots=True) -> tuple[GroupReportHandler, torch.nn.Module, list[dict]]:
    net, data = make_net(), make_data(22, seed=1)  # group D ("3") has no sample
    report = GroupReportHandler(tmp_path / "eval", G, NAMES, dro_handler=dro, plots=plots)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(data, batch_size=5), network=net, val_handlers=[report]
    )
    evaluator.run()
    return report, net, data


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_and_json_hold_the_hand_computed_rows(tmp_path):
    report, net, data = run_report(tmp_path)
    x, y, g = (torch.stack([d[k] for d in data]) for k in ("image", "label", "group"))
    with torch.no_grad():
        logits = net(x)
    correct = (logits.argmax(1) == y).double()
    ce = F.cross_entropy(logits, y, reduction="none").double()

    rows = read_rows(tmp_path / "eval" / "group_report.csv")
    assert list(rows[0]) == ["group", "name", "samples", "accuracy", "mean_loss"]
    assert [r["name"] for r in rows] == NAMES and [int(r["group"]) for r in rows] == [0, 1, 2, 3]
    per_group = []
    for k, row in enumerate(rows[:3]):
        mask = g == k
        assert int(row["samples"]) == int(mask.sum())
        assert float(row["accuracy"]) == pytest.approx(float(correct[mask].mean()))
        assert float(row["mean_loss"]) == pytest.approx(float(ce[mask].mean()), rel=1e-6)
        per_group.append(float(correct[mask].mean()))
    assert (
        rows[3]["samples"] == "0" and math.isnan(float(rows[3]["accuracy"])) and math.isnan(float(rows[3]["mean_loss"]))
    )

    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["accuracy"] == pytest.approx(float(correct.mean()))
    assert summary["mean_group_accuracy"] == pytest.approx(sum(per_group) / 3)
    assert summary["worst_group_accuracy"] == pytest.approx(min(per_group))
    assert summary["worst_group"] == NAMES[per_group.index(min(per_group))]
    assert summary["samples"] == 22 and summary["per_group_accuracy"]["D"] is None
    assert summary["mean_loss"] == pytest.approx(float(ce.mean()), rel=1e-6)
    assert report.summary == summary
    assert (tmp_path / "eval" / "group_accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "eval" / "dro_weights.png").exists()  # no DRO history given


def test_dro_weight_plot_from_a_training_history(tmp_path):
    student, loss = make_net(), GroupDistillationLoss(G, step_size=0.5)
    dro = GroupDROHandler(loss, group_names=NAMES)
    trainer = DistillationTrainer(
        "cpu", 2, DataLoader(make_data(20, seed=2, groups=(0, 1, 2, 3)), batch_size=5), student,
        torch.optim.SGD(student.parameters(), 0.1), loss, teacher=make_net(5), train_handlers=[dro],
    )  # fmt: skip
    trainer.run()
    run_report(tmp_path, dro=dro)
    for name in ("group_report.csv", "metrics.json", "group_accuracy.png", "dro_weights.png"):
        assert (tmp_path / "eval" / name).exists(), name
    assert (tmp_path / "eval" / "dro_weights.png").read_bytes()[:8] == PNG_MAGIC


def test_evaluator_rerun_resets_the_accumulated_samples(tmp_path):
    net, data = make_net(), make_data(12, seed=3)
    report = GroupReportHandler(tmp_path, G, NAMES, plots=False)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(data, batch_size=5), network=net, val_handlers=[report]
    )
    evaluator.run()
    evaluator.run()
    assert json.loads((tmp_path / "metrics.json").read_text())["samples"] == 12
    assert sum(int(r["samples"]) for r in read_rows(tmp_path / "group_report.csv")) == 12


@pytest.fixture
def no_matplotlib(monkeypatch):
    """monai_groupdistil.visualize as imported where matplotlib is not installed (reloaded in place, so the plot
    functions the handlers imported see it too), restored afterwards."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    importlib.reload(visualize)
    yield
    monkeypatch.undo()
    importlib.reload(visualize)
    assert visualize.has_matplotlib


def test_without_matplotlib_csv_json_written_and_plots_skipped(tmp_path, no_matplotlib):
    assert not visualize.has_matplotlib
    with pytest.raises(OptionalImportError, match=r"needs matplotlib.*install it with `pip install matplotlib`"):
        plot_group_accuracy([0.5], ["a"], tmp_path / "x.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_report(tmp_path)
    assert any("plots skipped" in str(w.message) and "pip install matplotlib" in str(w.message) for w in caught)
    assert (tmp_path / "eval" / "group_report.csv").exists() and (tmp_path / "eval" / "metrics.json").exists()
    assert not (tmp_path / "eval" / "group_accuracy.png").exists()


def test_package_imports_without_matplotlib():
    """A fresh interpreter where matplotlib cannot be imported: the package, its handlers and visualize import, and
    a plot call raises MONAI's OptionalImportError naming matplotlib."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import monai_groupdistil.handlers, monai_groupdistil.visualize as v\n"
        "from monai.utils import OptionalImportError\n"
        "try:\n    v.plot_dro_weights([[0.5, 0.5]], ['a', 'b'], 'never.png')\n"
        "except OptionalImportError as err:\n    print('raised:', str(err).splitlines()[0])\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("raised: plotting needs matplotlib (`from matplotlib.figure import Figure` failed)")


def test_the_weights_of_a_single_iteration_are_drawn(tmp_path):
    """One iteration is one point per group: drawn as a marker (a line through one point draws nothing)."""
    from matplotlib.image import imread

    plot_dro_weights([[0.7, 0.3]], ["a", "b"], tmp_path / "one.png")
    pixels = imread(tmp_path / "one.png")[..., :3]
    blue = abs(pixels - torch.tensor([0x1F, 0x77, 0xB4]).numpy() / 255).max(-1) < 0.05  # the first group's colour
    width = blue.shape[1]
    assert (
        blue[:, int(0.35 * width) : int(0.65 * width)].sum() > 20
    )  # at the point, in the middle (the legend: a corner)


def test_plot_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"weights must be \[T, 2\], got \(5, 3\)"):
        plot_dro_weights(torch.rand(5, 3), ["a", "b"], tmp_path / "w.png")
    with pytest.raises(ValueError, match="group_names has 2 names but num_groups is 4"):
        GroupReportHandler(tmp_path, 4, ["a", "b"])


def test_docstring_examples_run():
    import doctest

    from monai_groupdistil.handlers import group_report_handler

    result = doctest.testmod(group_report_handler)
    assert result.attempted > 0 and result.failed == 0, result


def test_a_failed_write_leaves_the_earlier_report_whole(tmp_path, monkeypatch):
    net, data = make_net(), make_data(12, seed=3)
    report = GroupReportHandler(tmp_path, G, NAMES, plots=False)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(data, batch_size=5), network=net, val_handlers=[report]
    )
    evaluator.run()
    before = (tmp_path / "metrics.json").read_text()
    monkeypatch.setattr(report, "summarise", lambda results: {"samples": 12, "not_json": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        evaluator.run()
    assert (tmp_path / "metrics.json").read_text() == before  # not truncated by the failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group_report.csv", "metrics.json"]  # no temporary file
