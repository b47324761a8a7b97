"""Bundle-level tests of bundles/waterbirds_groupdistil on a tiny synthetic stand-in (24 images, 32 px, 1 epoch)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_groupdistil.data.waterbirds import WATERBIRDS_GROUP_NAMES, load_waterbirds_datalist
from tests.bundle_helpers import ENV, SCHEMA, Bundle, report_rows

WATERBIRDS = Bundle("waterbirds_groupdistil")
ROOT, BUNDLE, CONFIGS, META = WATERBIRDS.root.parents[1], WATERBIRDS.root, WATERBIRDS.config_dir, WATERBIRDS.meta
_configs, run_cli, workflow, _report_rows = WATERBIRDS.configs, WATERBIRDS.run_cli, WATERBIRDS.workflow, report_rows
TINY = {
    "epochs": 1,
    "teacher_epochs": 1,
    "synthetic_images": 24,
    "synthetic_image_size": 32,
    "spatial_size": [32, 32],
    "resize": [36, 36],
    "batch_size": 4,
}
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process workflows use one thread too (the machine's cores are shared); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folders of one bundle run; the bundle generates the tiny synthetic stand-in in the empty data folder."""
    base = tmp_path_factory.mktemp("waterbirds_bundle")
    return {"base": base, "overrides": WATERBIRDS.run_overrides(base, **TINY)}


def _need(path: Path, what: str) -> None:
    if not path.is_file():
        pytest.skip(f"needs {what} ({path.name}) of test_teacher_student_evaluate_through_the_cli")


def test_teacher_student_evaluate_through_the_cli(work):
    ov = work["overrides"]
    run_cli(_configs("train", "train_teacher"), ov)
    # the bundle generated the synthetic stand-in in the release layout
    assert (Path(ov["dataset_dir"]) / "metadata.csv").is_file()
    assert len(load_waterbirds_datalist(ov["dataset_dir"], "all")) == TINY["synthetic_images"]
    teacher = torch.load(Path(ov["ckpt_dir"]) / "teacher.pt", weights_only=False)
    assert teacher["model"]["layer1.1.conv1.weight"].shape[0] == 32  # the larger [2, 2, 2, 2] network

    run_cli(_configs("train"), {**ov, "step_size": 5.0})
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert {"model", "loss", "dro"} <= set(checkpoint)
    assert (
        checkpoint["model"]["conv1.weight"].shape == (16, 3, 7, 7)
        and "layer1.1.conv1.weight" not in checkpoint["model"]
    )
    weights = checkpoint["loss"]["group_weights"]
    assert weights.shape == (4,) and abs(float(weights.sum()) - 1) < 1e-5 and bool((weights > 0).all())
    assert not torch.allclose(weights, torch.full((4,), 0.25), atol=1e-3)  # a large step size moved them

    out = run_cli(_configs("train", "evaluate"), ov)
    report = Path(ov["output_dir"]) / "groupdistil"
    assert f"per-group report: {report}" in out.stdout
    rows = _report_rows(report)
    assert list(rows[0]) == ["group", "name", "samples", "accuracy", "mean_loss"]
    assert [r["name"] for r in rows] == list(WATERBIRDS_GROUP_NAMES) and [r["group"] for r in rows] == list("0123")
    test_split = load_waterbirds_datalist(ov["dataset_dir"], "test")
    assert [int(r["samples"]) for r in rows] == [sum(d["group"] == g for d in test_split) for g in range(4)]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["samples"] == len(test_split)
    accuracies = [float(r["accuracy"]) for r in rows if int(r["samples"])]
    assert metrics["worst_group_accuracy"] == pytest.approx(min(accuracies))
    assert (report / "group_accuracy.png").stat().st_size > 0 and (report / "dro_weights.png").stat().st_size > 0


def test_checkpoint_restores_dro_weights(work):
    from monai_groupdistil.handlers import GroupDROHandler
    from monai_groupdistil.losses import GroupDistillationLoss

    path = Path(work["overrides"]["ckpt_dir"]) / "model.pt"
    _need(path, "the student checkpoint")
    checkpoint = torch.load(path, weights_only=False)
    loss = GroupDistillationLoss(num_groups=4, step_size=5.0)
    assert torch.allclose(loss.group_weights, torch.full((4,), 0.25))
    loss.load_state_dict(checkpoint["loss"])
    assert torch.equal(loss.group_weights, checkpoint["loss"]["group_weights"])
    # the DRO handler's state restores the same weights into a fresh loss, plus the per-iteration history
    fresh = GroupDistillationLoss(num_groups=4)
    handler = GroupDROHandler(fresh, group_names=list(WATERBIRDS_GROUP_NAMES))
    handler.load_state_dict(checkpoint["dro"])
    assert torch.allclose(fresh.group_weights, loss.group_weights)
    assert handler.weight_history and torch.allclose(handler.weight_history[-1], loss.group_weights, atol=1e-6)
    assert checkpoint["dro"]["group_names"] == list(WATERBIRDS_GROUP_NAMES)


@pytest.mark.parametrize("baseline", ["erm", "kd", "group_dro"])
def test_baselines_through_config_workflow(work, baseline):
    ov = {**work["overrides"]}
    if not (Path(ov["ckpt_dir"]) / "teacher.pt").is_file():
        ov["train_teacher_if_missing"] = True
    wf = workflow(_configs("train", baseline), ov)
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / f"{baseline}.pt", weights_only=False)
    assert "model" in checkpoint
    assert ("dro" in checkpoint) == (baseline == "group_dro")
    ev = workflow(_configs("train", baseline, "evaluate"), ov, workflow_type="infer")
    assert ev.check_properties() == []
    ev.run()
    ev.finalize()
    rows = _report_rows(Path(ov["output_dir"]) / baseline)
    assert [r["name"] for r in rows] == list(WATERBIRDS_GROUP_NAMES)


def test_student_trains_its_missing_teacher_through_config_workflow(work, tmp_path):
    """train_teacher_if_missing runs train_teacher.json through ConfigWorkflow, then trains the student."""
    ov = {**work["overrides"], "ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "logs")}
    teacher_wf = workflow(_configs("train", "train_teacher"), ov)
    assert teacher_wf.check_properties() == []
    assert teacher_wf.parser.get_parsed_content("use_dro") is False
    wf = workflow(_configs("train"), {**ov, "train_teacher_if_missing": True})
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    assert (tmp_path / "models" / "teacher.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()
    assert (tmp_path / "logs" / "teacher").is_dir() and (tmp_path / "logs" / "groupdistil").is_dir()


def test_inference_on_the_release_and_on_a_folder(work, tmp_path):
    ov = work["overrides"]
    _need(Path(ov["ckpt_dir"]) / "model.pt", "the student checkpoint")
    common = {k: ov[k] for k in ("bundle_root", "ckpt_dir", "spatial_size", "resize")}
    # the release: the test split by default, identified by img_id
    out_file = tmp_path / "release.csv"
    wf = workflow(
        _configs("inference"), {**common, "dataset_dir": ov["dataset_dir"], "output_file": str(out_file)}, "infer"
    )
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    with open(out_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["img_id", "predicted_class", "prob_landbird", "prob_waterbird"]
    assert [r["img_id"] for r in rows] == [d["img_id"] for d in load_waterbirds_datalist(ov["dataset_dir"], "test")]
    for r in rows:
        probs = [float(r["prob_landbird"]), float(r["prob_waterbird"])]
        assert abs(sum(probs) - 1) < 1e-4 and r["predicted_class"] == ("landbird", "waterbird")[probs.index(max(probs))]
    # a plain folder of images (nested, any name): one row per image, identified by its relative path
    folder = tmp_path / "photos"
    images = load_waterbirds_datalist(ov["dataset_dir"], "val")[:3]
    for i, d in enumerate(images):
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"bird{i}.jpg").symlink_to(d["image"])
    out_file = tmp_path / "folder.csv"
    wf = workflow(_configs("inference"), {**common, "dataset_dir": str(folder), "output_file": str(out_file)}, "infer")
    wf.run()
    wf.finalize()
    with open(out_file, newline="") as f:
        ids = sorted(r["img_id"] for r in csv.DictReader(f))
    assert ids == ["sub0/bird0.jpg", "sub0/bird2.jpg", "sub1/bird1.jpg"]


def test_multi_process_training_with_torchrun(work, tmp_path):
    ov = {**work["overrides"], "ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "logs")}
    teacher = Path(work["overrides"]["ckpt_dir"]) / "teacher.pt"
    _need(teacher, "the teacher checkpoint")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "teacher.pt").symlink_to(teacher)
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle"]
    run_cli(_configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0}, runner=runner)
    checkpoint = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper
    weights = checkpoint["loss"]["group_weights"]
    assert abs(float(weights.sum()) - 1) < 1e-5 and not torch.allclose(weights, torch.full((4,), 0.25), atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_conformance_commands(work, tmp_path):
    ov = work["overrides"]
    base = [sys.executable, "-m", "monai.bundle"]
    out = subprocess.run(
        base + ["verify_metadata", "--meta_file", META, "--filepath", SCHEMA],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert out.returncode == 0 and "metadata is verified with no error" in (out.stdout + out.stderr), out.stderr
    common = ["--meta_file", META, "--config_file", str(CONFIGS / "inference.json")]
    out = subprocess.run(
        base + ["verify_net_in_out", "network_def", *common], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert out.returncode == 0 and "data shape of network is verified with no error" in (out.stdout + out.stderr), (
        out.stderr
    )
    ckpt = Path(ov["ckpt_dir"]) / "model.pt"
    _need(ckpt, "the student checkpoint")
    ts = tmp_path / "model.ts"
    export = ["ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--key_in_ckpt", "model"]
    out = subprocess.run(
        base + export + [*common, "--bundle_root", str(BUNDLE)], capture_output=True, text=True, timeout=300, env=ENV
    )
    assert out.returncode == 0, out.stderr[-3000:]
    scripted = torch.jit.load(str(ts))
    net = workflow(_configs("inference"), {"bundle_root": str(BUNDLE)}, "infer").parser.get_parsed_content(
        "network_def"
    )
    net.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert scripted(x).shape == (2, 2)
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


# ------------------------------------------------------------------ pretrained weights


def test_pretrained_weights_initialise_the_student_but_not_its_classifier(work, tmp_path):
    source = workflow(_configs("train"), work["overrides"]).parser.get_parsed_content("network_def")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)  # an ImageNet classifier
    path = tmp_path / "imagenet_like.pt"
    torch.save(state, path)
    wf = workflow(_configs("train"), {**work["overrides"], "pretrained_weights": str(path)})
    net = wf.parser.get_parsed_content("network")
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.layer4[0].bn2.running_var, state["layer4.0.bn2.running_var"])
    assert net.fc.weight.shape == (2, 128)


def test_pretrained_teacher_weights_go_to_the_teacher_config(work, tmp_path):
    path = tmp_path / "teacher_init.pt"
    wf = workflow(_configs("train", "train_teacher"), {**work["overrides"], "teacher_pretrained_weights": str(path)})
    assert wf.parser.get_parsed_content("pretrained_weights") == str(path)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("network")
    assert isinstance(_root(info.value), FileNotFoundError)
    assert f"pretrained weights '{path}' not found" in _chain(info.value)


# ------------------------------------------------------------------ bad input


def test_dataset_dir_that_is_not_a_release(work, tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(Exception) as info:
        workflow(_configs("train", "train_teacher"), {**work["overrides"], "dataset_dir": str(tmp_path)})
    assert isinstance(_root(info.value), ValueError)
    message = _chain(info.value)
    assert f"dataset_dir '{tmp_path}' is neither empty nor a Waterbirds release" in message
    assert "no 'metadata.csv' in it" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing generated over the user's files


def test_missing_teacher_says_how_to_train_it(work, tmp_path):
    with pytest.raises(Exception) as info:
        workflow(_configs("train"), {**work["overrides"], "ckpt_dir": str(tmp_path)}).run()
    message = _chain(info.value)
    assert isinstance(_root(info.value), FileNotFoundError)
    assert "teacher checkpoint" in message and "not found" in message
    assert "configs/train_teacher.json" in message and "train_teacher_if_missing" in message


def test_evaluate_without_a_trained_model(work, tmp_path):
    with pytest.raises(Exception) as info:
        workflow(_configs("train", "evaluate"), {**work["overrides"], "ckpt_dir": str(tmp_path)}, "infer")
    assert isinstance(_root(info.value), FileNotFoundError)
    assert f"'{tmp_path}/model.pt' not found: the trained model; run the training config first" in _chain(info.value)


def _chain(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def _root(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err
