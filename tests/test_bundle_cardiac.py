"""Bundle-level tests of bundles/cardiac_mri_groupdistil on tiny generated data (1 epoch, 32x32 slices)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_groupdistil.data import make_synthetic_mnms
from tests.bundle_helpers import SCHEMA, Bundle, report_rows

CARDIAC = Bundle("cardiac_mri_groupdistil")
BUNDLE, CONFIGS, META = CARDIAC.root, CARDIAC.config_dir, CARDIAC.meta
_configs, run_cli, workflow, _report_rows = CARDIAC.configs, CARDIAC.run_cli, CARDIAC.workflow, report_rows
TINY = {"epochs": 1, "teacher_epochs": 1, "spatial_size": [32, 32], "pixdim": [4.0, 4.0], "batch_size": 4}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny M&Ms-layout dataset and the folders of one bundle run."""
    base = tmp_path_factory.mktemp("cardiac_bundle")
    make_synthetic_mnms(base / "data", n_subjects=24, seed=1, matrix_scale=0.5, n_frames=4)
    return {"base": base, "overrides": CARDIAC.run_overrides(base, **TINY)}


def test_teacher_student_evaluate_through_the_cli(work):
    ov = work["overrides"]
    run_cli(_configs("train", "train_teacher"), ov)
    assert (Path(ov["ckpt_dir"]) / "teacher.pt").is_file()
    run_cli(_configs("train"), {**ov, "step_size": 5.0})
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert {"model", "loss", "dro"} <= set(checkpoint)
    weights = checkpoint["loss"]["group_weights"]
    assert weights.shape == (4,) and abs(float(weights.sum()) - 1) < 1e-5
    assert not torch.allclose(weights, torch.full((4,), 0.25))  # a large step size moved them
    out = run_cli(_configs("train", "evaluate"), ov)
    report = Path(ov["output_dir"]) / "groupdistil"
    assert f"per-group report: {report}" in out.stdout
    rows = _report_rows(report)
    assert [r["name"] for r in rows] == ["A", "B", "C", "D"]
    assert list(rows[0]) == ["group", "name", "samples", "accuracy", "mean_loss"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"accuracy", "mean_group_accuracy", "worst_group_accuracy", "worst_group"} <= set(metrics)
    assert sum(int(r["samples"]) for r in rows) == metrics["samples"]
    assert (report / "group_accuracy.png").stat().st_size > 0 and (report / "dro_weights.png").stat().st_size > 0


def test_checkpoint_restores_dro_weights(work):
    from monai_groupdistil.losses import GroupDistillationLoss

    path = Path(work["overrides"]["ckpt_dir"]) / "model.pt"
    if not path.is_file():
        pytest.skip("needs the student checkpoint of test_teacher_student_evaluate_through_the_cli")
    checkpoint = torch.load(path, weights_only=False)
    loss = GroupDistillationLoss(num_groups=4)
    loss.load_state_dict(checkpoint["loss"])
    assert torch.equal(loss.group_weights, checkpoint["loss"]["group_weights"])
    history = checkpoint["dro"]
    last = history["weight_history"][-1] if "weight_history" in history else None
    if last is not None:
        assert torch.allclose(torch.as_tensor(last, dtype=torch.float32), loss.group_weights, atol=1e-6)


# method -> (override config after train.json, checkpoint name); "groupdistil" is train.json alone
METHODS = {
    "teacher": ("train_teacher", "teacher.pt"),
    "groupdistil": (None, "model.pt"),
    "erm": ("erm", "erm.pt"),
    "kd": ("kd", "kd.pt"),
    "group_dro": ("group_dro", "group_dro.pt"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_training_config_through_config_workflow(work, method):
    override, ckpt = METHODS[method]
    configs = _configs("train") if override is None else _configs("train", override)
    ov = {**work["overrides"]}
    if not (Path(ov["ckpt_dir"]) / "teacher.pt").is_file():
        ov["train_teacher_if_missing"] = True
    wf = workflow(configs, ov)
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / ckpt, weights_only=False)
    assert "model" in checkpoint
    assert ("dro" in checkpoint) == (method in ("groupdistil", "group_dro"))
    ev = workflow([*configs, *_configs("evaluate")], ov, workflow_type="infer")
    assert ev.check_properties() == []
    ev.run()
    ev.finalize()
    assert len(_report_rows(Path(ov["output_dir"]) / method)) == 4


def test_inference_writes_one_row_per_study(work, tmp_path):
    ov = work["overrides"]
    if not (Path(ov["ckpt_dir"]) / "model.pt").is_file():
        pytest.skip("needs the student checkpoint")
    studies = sorted((Path(ov["dataset_dir"]) / "OpenDataset" / "Testing").glob("*/*_sa.nii.gz"))
    out_file = tmp_path / "pred.csv"
    overrides = {k: ov[k] for k in ("bundle_root", "ckpt_dir", "spatial_size", "pixdim")}
    folder = tmp_path / "studies"
    folder.mkdir()
    for s in studies:
        (folder / s.name).symlink_to(s)
    wf = workflow(
        _configs("inference"), {**overrides, "dataset_dir": str(folder), "output_file": str(out_file)}, "infer"
    )
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    with open(out_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["subject", "predicted_class", "prob_NOR", "prob_HCM", "prob_DCM"]
    assert sorted(r["subject"] for r in rows) == sorted(s.name[: -len(".nii.gz")] for s in studies)
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("NOR", "HCM", "DCM")]
        assert abs(sum(probs) - 1) < 1e-4 and r["predicted_class"] == ("NOR", "HCM", "DCM")[probs.index(max(probs))]


def test_multi_process_training_with_torchrun(work, tmp_path):
    ov = {**work["overrides"], "ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "logs")}
    teacher = Path(work["overrides"]["ckpt_dir"]) / "teacher.pt"
    if not teacher.is_file():
        pytest.skip("needs the teacher checkpoint")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "teacher.pt").symlink_to(teacher)
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle"]
    run_cli(_configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0}, runner=runner)
    checkpoint = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper
    assert not torch.allclose(checkpoint["loss"]["group_weights"], torch.full((4,), 0.25))


def test_conformance_commands(work, tmp_path):
    ov = work["overrides"]
    base = [sys.executable, "-m", "monai.bundle"]
    out = subprocess.run(
        base + ["verify_metadata", "--meta_file", META, "--filepath", SCHEMA],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "metadata is verified with no error" in (out.stdout + out.stderr), out.stderr
    common = ["--meta_file", META, "--config_file", str(CONFIGS / "inference.json")]
    out = subprocess.run(
        base + ["verify_net_in_out", "network_def", *common], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "data shape of network is verified with no error" in (out.stdout + out.stderr), (
        out.stderr
    )
    if not (Path(ov["ckpt_dir"]) / "model.pt").is_file():
        pytest.skip("needs the student checkpoint")
    ts = tmp_path / "model.ts"
    out = subprocess.run(
        base
        + [
            "ckpt_export",
            "network_def",
            "--filepath",
            str(ts),
            "--ckpt_file",
            str(Path(ov["ckpt_dir"]) / "model.pt"),
            "--key_in_ckpt",
            "model",
            *common,
            "--bundle_root",
            str(BUNDLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    scripted = torch.jit.load(str(ts))
    net = workflow(_configs("inference"), {"bundle_root": str(BUNDLE)}, "infer").parser.get_parsed_content(
        "network_def"
    )
    net.load_state_dict(torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)["model"])
    net.eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


# ------------------------------------------------------------------ bad input


def test_dataset_dir_that_is_not_a_release(work, tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    out = run_cli(_configs("train", "train_teacher"), {**work["overrides"], "dataset_dir": str(tmp_path)}, check=False)
    assert out.returncode != 0
    assert "is neither empty nor an M&Ms release" in out.stderr and "OpenDataset" in out.stderr


def test_missing_teacher_says_how_to_train_it(work, tmp_path):
    out = run_cli(_configs("train"), {**work["overrides"], "ckpt_dir": str(tmp_path)}, check=False)
    assert out.returncode != 0
    assert "teacher checkpoint" in out.stderr and "not found" in out.stderr
    assert "configs/train_teacher.json" in out.stderr and "train_teacher_if_missing" in out.stderr


def test_student_with_other_class_count_is_refused(work):
    if not (Path(work["overrides"]["ckpt_dir"]) / "teacher.pt").is_file():
        pytest.skip("needs the teacher checkpoint")
    with pytest.raises(Exception) as info:
        wf = workflow(_configs("train"), {**work["overrides"], "network_def#num_classes": 4})
        wf.run()
    assert "predicts 3 classes but the student predicts 4" in _chain(info.value)


def test_unknown_loss_argument_is_named(work):
    with pytest.raises(Exception) as info:
        wf = workflow(_configs("train"), {**work["overrides"], "loss#temprature": 2.0})
        wf.run()
    assert "temprature" in _chain(info.value)


def _chain(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)
