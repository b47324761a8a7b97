"""Bundle-level tests of bundles/waterbirds_groupdistil on a tiny synthetic stand-in (24 images, 32 px, 1 epoch).

Every test can run alone: the teacher/student/evaluation CLI chain is a module-scoped fixture that the tests needing
its checkpoints request, and runs that train write into their own folders.
"""

from __future__ import annotations

import csv
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_groupdistil.data.waterbirds import WATERBIRDS_GROUP_NAMES, load_waterbirds_datalist
from tests.bundle_helpers import (
    BOOLEAN_USES,
    ENV,
    SCHEMA,
    SPELLINGS,
    Bundle,
    error_chain,
    own_folders,
    report_rows,
    root_error,
)

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


@pytest.fixture(scope="module")
def trained(work):
    """Teacher, GroupDistil student (a large DRO step size, so the weights move) and evaluation, through the CLI;
    the bundle generates the synthetic stand-in in the empty data folder on the first run."""
    ov = work["overrides"]
    run_cli(_configs("train", "train_teacher"), ov)
    run_cli(_configs("train"), {**ov, "step_size": 5.0})
    evaluation = run_cli(_configs("train", "evaluate"), ov)
    return {**work, "evaluate_stdout": evaluation.stdout}


def test_teacher_student_evaluate_through_the_cli(trained):
    ov = trained["overrides"]
    # the bundle generated the synthetic stand-in in the release layout
    assert (Path(ov["dataset_dir"]) / "metadata.csv").is_file()
    assert len(load_waterbirds_datalist(ov["dataset_dir"], "all")) == TINY["synthetic_images"]
    teacher = torch.load(Path(ov["ckpt_dir"]) / "teacher.pt", weights_only=False)
    assert teacher["model"]["layer1.1.conv1.weight"].shape[0] == 32  # the larger [2, 2, 2, 2] network

    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert {"model", "loss", "dro"} <= set(checkpoint)
    assert (
        checkpoint["model"]["conv1.weight"].shape == (16, 3, 7, 7)
        and "layer1.1.conv1.weight" not in checkpoint["model"]
    )
    weights = checkpoint["loss"]["group_weights"]
    assert weights.shape == (4,) and abs(float(weights.sum()) - 1) < 1e-5 and bool((weights > 0).all())
    assert not torch.allclose(weights, torch.full((4,), 0.25), atol=1e-3)  # a large step size moved them

    report = Path(ov["output_dir"]) / "groupdistil"
    assert f"per-group report: {report}" in trained["evaluate_stdout"]
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


def test_checkpoint_restores_dro_weights(trained):
    from monai_groupdistil.handlers import GroupDROHandler
    from monai_groupdistil.losses import GroupDistillationLoss

    path = Path(trained["overrides"]["ckpt_dir"]) / "model.pt"
    checkpoint = torch.load(path, weights_only=False)
    rule = WATERBIRDS.raw_config("train")["absent_groups"]  # the run's rule: a loss of another rule refuses it
    loss = GroupDistillationLoss(num_groups=4, step_size=5.0, absent_groups=rule)
    assert torch.allclose(loss.group_weights, torch.full((4,), 0.25))
    loss.load_state_dict(checkpoint["loss"])
    assert torch.equal(loss.group_weights, checkpoint["loss"]["group_weights"])
    # the DRO handler's state restores the same weights into a fresh loss, plus the per-iteration history
    fresh = GroupDistillationLoss(num_groups=4, absent_groups=rule)
    handler = GroupDROHandler(fresh, group_names=list(WATERBIRDS_GROUP_NAMES))
    handler.load_state_dict(checkpoint["dro"])
    assert torch.allclose(fresh.group_weights, loss.group_weights)
    assert handler.weight_history and torch.allclose(handler.weight_history[-1], loss.group_weights, atol=1e-6)
    assert checkpoint["dro"]["group_names"] == list(WATERBIRDS_GROUP_NAMES)


@pytest.mark.parametrize("baseline", ["erm", "kd", "group_dro"])
def test_baselines_through_config_workflow(trained, baseline, tmp_path):
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
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


def test_student_trains_its_missing_teacher_through_config_workflow(trained, tmp_path):
    """train_teacher_if_missing runs train_teacher.json through ConfigWorkflow, then trains the student."""
    ov = own_folders(trained["overrides"], tmp_path)
    teacher_wf = workflow(_configs("train", "train_teacher"), ov)
    assert teacher_wf.check_properties() == []
    assert teacher_wf.parser.get_parsed_content("use_dro") is False
    wf = workflow(_configs("train"), {**ov, "train_teacher_if_missing": "yes", "augment": "false"})  # fire's strings
    assert wf.check_properties() == []
    assert wf.parser.get_parsed_content("train_teacher_fn").keywords["augment"] == "false"
    wf.run()
    wf.finalize()
    assert (tmp_path / "ckpt" / "teacher.pt").is_file() and (tmp_path / "ckpt" / "model.pt").is_file()
    assert (tmp_path / "log" / "teacher").is_dir() and (tmp_path / "log" / "groupdistil").is_dir()


def test_inference_on_the_release_and_on_a_folder(trained, tmp_path):
    ov = trained["overrides"]
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


def test_multi_process_training_with_torchrun(trained, tmp_path):
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle"]
    run_cli(_configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0}, runner=runner)
    checkpoint = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper
    weights = checkpoint["loss"]["group_weights"]
    assert abs(float(weights.sum()) - 1) < 1e-5 and not torch.allclose(weights, torch.full((4,), 0.25), atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_conformance_commands(trained, tmp_path):
    ov = trained["overrides"]
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


def test_pretrained_weights_initialise_the_student_but_not_its_classifier(trained, tmp_path):
    source = workflow(_configs("train"), trained["overrides"]).parser.get_parsed_content("network_def")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)  # an ImageNet classifier
    path = tmp_path / "imagenet_like.pt"
    torch.save(state, path)
    wf = workflow(_configs("train"), {**trained["overrides"], "pretrained_weights": str(path)})
    net = wf.parser.get_parsed_content("network")
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.layer4[0].bn2.running_var, state["layer4.0.bn2.running_var"])
    assert net.fc.weight.shape == (2, 128)


def test_pretrained_teacher_weights_go_to_the_teacher_config(trained, tmp_path):
    path = tmp_path / "teacher_init.pt"
    wf = workflow(_configs("train", "train_teacher"), {**trained["overrides"], "teacher_pretrained_weights": str(path)})
    assert wf.parser.get_parsed_content("pretrained_weights") == str(path)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("network")
    assert isinstance(root_error(info.value), FileNotFoundError)
    assert f"pretrained weights '{path}' not found" in error_chain(info.value)


# ------------------------------------------------------------------ bad input


def test_dataset_dir_that_is_not_a_release(work, tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(Exception) as info:
        workflow(_configs("train", "train_teacher"), {**work["overrides"], "dataset_dir": str(tmp_path)})
    assert isinstance(root_error(info.value), ValueError)
    message = error_chain(info.value)
    assert f"dataset_dir '{tmp_path}' is neither empty nor a Waterbirds release" in message
    assert "no 'metadata.csv' in it" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing generated over the user's files


def test_missing_teacher_says_how_to_train_it_with_this_runs_settings(trained, tmp_path):
    ov = {**own_folders(trained["overrides"], tmp_path), "train_teacher_if_missing": "False"}
    with pytest.raises(Exception) as info:
        workflow(_configs("train"), ov).run()
    message = error_chain(info.value)
    assert isinstance(root_error(info.value), FileNotFoundError)
    assert not (tmp_path / "ckpt" / "teacher.pt").exists()
    assert "teacher checkpoint" in message and "not found" in message and "train_teacher_if_missing" in message
    command = message.split("Train the teacher first", 1)[1].split("\n\n")[1].strip()
    assert "configs/train_teacher.json" in command
    for key in ("ckpt_dir", "dataset_dir", "log_dir", "output_dir"):
        assert f"--{key} {ov[key]}" in command, key
    for key, shown in [("device", "cpu"), ("spatial_size", '"[32, 32]"'), ("resize", '"[36, 36]"')]:
        assert f"--{key} {shown}" in command, key
    for key in ("synthetic_images", "synthetic_image_size", "batch_size", "teacher_epochs"):
        assert f"--{key} {TINY[key]}" in command, key


def test_evaluate_without_a_trained_model(trained, tmp_path):
    with pytest.raises(Exception) as info:
        workflow(_configs("train", "evaluate"), {**trained["overrides"], "ckpt_dir": str(tmp_path)}, "infer")
    assert isinstance(root_error(info.value), FileNotFoundError)
    message = error_chain(info.value)
    assert f"'{tmp_path}/model.pt' not found: the trained model; run the training config first" in message


# ------------------------------------------------------------------ settings given on the command line


def test_every_boolean_id_reads_every_spelling(trained, tmp_path):
    assert set(BOOLEAN_USES) | {"train_teacher_if_missing"} == set(WATERBIRDS.boolean_ids())
    ov = trained["overrides"]
    for spelling, expected in SPELLINGS:
        wf = workflow(_configs("train"), {**ov, **dict.fromkeys(BOOLEAN_USES, spelling)})
        for key, (item, decision) in BOOLEAN_USES.items():
            assert decision(wf.parser.get_parsed_content(item)) is expected, (key, spelling)
        crops = [type(t).__name__ for t in wf.parser.get_parsed_content("train#base_preprocessing").transforms]
        assert ("CenterSpatialCropd" in crops) is not expected  # random crops replace the centre crop
    for spelling in ("false", "False", "0", "no", 0):  # a missing teacher is not trained
        wf = workflow(_configs("train"), {**ov, "ckpt_dir": str(tmp_path), "train_teacher_if_missing": spelling})
        with pytest.raises(Exception) as info:
            wf.parser.get_parsed_content("teacher")
        assert isinstance(root_error(info.value), FileNotFoundError), spelling
    uses = {**BOOLEAN_USES, "train_teacher_if_missing": ("teacher", None)}
    for key, (item, _) in uses.items():
        wf = workflow(_configs("train"), {**ov, key: "maybe"})
        with pytest.raises(Exception) as info:
            wf.parser.get_parsed_content(item)
        assert isinstance(root_error(info.value), ValueError)
        assert f"'{key}' must be a boolean, got 'maybe'" in error_chain(info.value)


def test_teacher_run_gets_every_setting_it_shares_with_train_json():
    """Derived from the config files: every setting of train.json that train_teacher.json reads is passed on."""
    shared = WATERBIRDS.teacher_shared_ids()
    assert {"resize", "crop_scale", "weight_decay", "teacher_pretrained_weights", "log_dir", "augment"} <= shared
    assert "pretrained_weights" not in shared  # train_teacher.json sets it from teacher_pretrained_weights
    assert set(WATERBIRDS.raw_config("train")["teacher_overrides"]) == shared
    values = {key: f"<{key}>" for key in shared}  # a distinct value each, so a mix-up shows
    wf = workflow(_configs("train"), values, initialize=False)
    assert wf.parser.get_parsed_content("train_teacher_fn").keywords == values
    command = wf.parser.get_parsed_content("train_teacher_command")
    for key in shared:
        assert f'--{key} "<{key}>"' in command, key


@pytest.mark.parametrize(
    "config, typo, meant",
    [("train", "temprature", "temperature"), ("kd", "alpah", "alpha"), ("group_dro", "step", "step_size")],
)
def test_unknown_loss_argument_is_named_with_the_valid_ones(work, config, typo, meant):
    configs = _configs("train") if config == "train" else _configs("train", config)
    wf = workflow(configs, {**work["overrides"], f"loss#{typo}": 2.0})
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), TypeError)
    message = str(root_error(info.value))
    loss_class = wf.parser.get_parsed_content("loss#_target_").__wrapped__
    name, valid = f"{loss_class.__module__}.{loss_class.__qualname__}", list(inspect.signature(loss_class).parameters)
    assert f"'loss' ({name}) got unknown argument(s) '{typo}' (did you mean '{meant}'?)" in message
    assert f"The valid arguments of {name} are: {', '.join(valid)}." in message
    assert f"(e.g. --loss#{meant} 2.0)" in message


@pytest.mark.parametrize("config", ["train", "group_dro"])
def test_absent_groups_reaches_the_dro_loss_and_a_bad_value_is_named(work, config):
    configs = _configs("train") if config == "train" else _configs("train", config)
    default = WATERBIRDS.raw_config("train")["absent_groups"]  # the sweep's winner (docs/results.md)
    assert workflow(configs, work["overrides"]).parser.get_parsed_content("loss").absent_groups == default
    for rule in ("ema", "zero"):
        loss = workflow(configs, {**work["overrides"], "absent_groups": rule}).parser.get_parsed_content("loss")
        assert loss.absent_groups == rule
    wf = workflow(configs, {**work["overrides"], "absent_groups": "skip"})
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), ValueError)
    assert "absent_groups must be one of ('ema', 'zero'), got 'skip'" in error_chain(info.value)
