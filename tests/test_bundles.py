"""Bundle-level tests of the three bundles of ``bundles/`` on tiny generated data (1 epoch, 32 x 32 inputs).

Every test that holds for every bundle is parametrized over the bundles (the module-scoped ``work`` fixture: the
tiny dataset and the folders of one run per bundle; ``trained``: teacher, GroupDistil student and evaluation through
the command line); a test of one bundle's own behaviour (its inference outputs, its data, its pretrained weights)
selects its bundle with ``indirect`` parametrization. Runs that train write into their own folders, so every test can
run alone.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import pydoc
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_groupdistil.data.waterbirds import WATERBIRDS_GROUP_NAMES, load_waterbirds_datalist
from monai_groupdistil.engines.checkpoint_saver import temporary_name
from monai_groupdistil.losses import GroupDROLoss
from tests.bundle_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    BOOLEAN_USES,
    BUNDLES,
    CLASSIFICATION,
    ENV,
    SCHEMA,
    SPELLINGS,
    TEACHER_CHECKPOINTS,
    TINY,
    TORCHRUN,
    Bundle,
    cli_args,
    error_chain,
    make_tiny_data,
    one_thread,
    own_folders,
    report_rows,
    root_error,
)

CARDIAC, SEG, WATERBIRDS = "cardiac_mri_groupdistil", "cardiac_mri_seg_groupdistil", "waterbirds_groupdistil"
VENDORS, STRUCTURES = ["A", "B", "C", "D"], ["LV", "MYO", "RV"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# per bundle: group names, report columns, key metric and the plots of the report
_CLASSIFICATION_COLUMNS = ["group", "name", "samples", "accuracy", "mean_loss"]
REPORT = {
    CARDIAC: (VENDORS, _CLASSIFICATION_COLUMNS, "accuracy", ["group_accuracy.png"]),
    SEG: (
        VENDORS,
        ["group", "name", "structure", "samples", "dice", "hd95"],
        "dice",
        ["group_dice.png", "worst_group_cases.png"],
    ),
    WATERBIRDS: (list(WATERBIRDS_GROUP_NAMES), _CLASSIFICATION_COLUMNS, "accuracy", ["group_accuracy.png"]),
}
# method -> (override config after train.json, checkpoint name); "groupdistil" is train.json alone
METHODS = {
    "teacher": ("train_teacher", "teacher.pt"),
    "groupdistil": (None, "model.pt"),
    "erm": ("erm", "erm.pt"),
    "kd": ("kd", "kd.pt"),
    "group_dro": ("group_dro", "group_dro.pt"),
}
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module", params=BUNDLES)
def work(request, tmp_path_factory):
    """One bundle, its tiny dataset and the folders of one run."""
    bundle = Bundle(request.param)
    base = tmp_path_factory.mktemp(request.param)
    make_tiny_data(request.param, base / "data")
    overrides = bundle.run_overrides(base, epochs=1, teacher_epochs=1, **TINY[request.param])
    return {"bundle": bundle, "name": request.param, "base": base, "overrides": overrides}


@pytest.fixture(scope="module")
def trained(work):
    """Teacher, GroupDistil student (a large DRO step size, so the weights move) and evaluation, through the CLI."""
    b, ov = work["bundle"], work["overrides"]
    b.run_cli(b.configs("train", "train_teacher"), ov)
    b.run_cli(b.configs("train"), {**ov, "step_size": 5.0})
    evaluation = b.run_cli(b.configs("train", "evaluate"), ov)
    return {**work, "evaluate_stdout": evaluation.stdout}


def _configs(b: Bundle, method: str) -> list[str]:
    override = METHODS[method][0]
    return b.configs("train") if override is None else b.configs("train", override)


def _group_rows(rows: list[dict]) -> list[dict]:
    """One row per group: the classification report's rows, the segmentation report's ``mean`` rows."""
    return [r for r in rows if r.get("structure", "mean") == "mean"]


# ------------------------------------------------------------------ the three runs of a bundle


def test_teacher_student_evaluate_through_the_cli(trained):
    b, ov, name = trained["bundle"], trained["overrides"], trained["name"]
    groups, columns, metric, plots = REPORT[name]
    ckpt = Path(ov["ckpt_dir"])
    wf = b.workflow(b.configs("train", "evaluate"), ov, workflow_type="infer")
    # the best-model files hold the network alone, as the model zoo expects; the teacher has the teacher's
    # architecture, the student the student's (strict loading)
    teacher_ckpt = Path(wf.parser.get_parsed_content("teacher_ckpt"))  # the default teacher_method's checkpoint
    assert teacher_ckpt.parent == ckpt
    wf.parser.get_parsed_content("teacher_def").load_state_dict(torch.load(teacher_ckpt, weights_only=True))
    wf.parser.get_parsed_content("network_def").load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    # a cross-entropy teacher has no DRO state, a GroupDRO teacher (the segmentation bundle's default) has one
    teacher_method = b.raw_config("train")["teacher_method"]
    assert teacher_ckpt.name == TEACHER_CHECKPOINTS[teacher_method]
    assert (ckpt / teacher_ckpt.name.replace(".pt", "_dro_state.pt")).is_file() is (teacher_method == "group_dro")
    checkpoint = torch.load(ckpt / "model_dro_state.pt", weights_only=True)  # the student's, of the same epoch
    assert set(checkpoint) == {"loss", "dro"}
    weights = checkpoint["loss"]["group_weights"]
    assert weights.shape == (4,) and abs(float(weights.sum()) - 1) < 1e-5 and bool((weights > 0).all())
    assert not torch.allclose(weights, torch.full((4,), 0.25), atol=1e-3)  # a large step size moved them
    report = Path(ov["output_dir"]) / "groupdistil"
    assert f"per-group report: {report}" in trained["evaluate_stdout"]
    rows = report_rows(report)
    assert list(rows[0]) == columns
    assert [r["name"] for r in _group_rows(rows)] == groups and [r["group"] for r in _group_rows(rows)] == list("0123")
    test_split = wf.parser.get_parsed_content("splits")["test"]
    assert [int(r["samples"]) for r in _group_rows(rows)] == [
        sum(d["group"] == g for d in test_split) for g in range(4)
    ]
    metrics = json.loads((report / "metrics.json").read_text())
    assert {metric, f"mean_group_{metric}", f"worst_group_{metric}", "worst_group"} <= set(metrics)
    assert metrics["samples"] == len(test_split) == sum(int(r["samples"]) for r in _group_rows(rows))
    values = {r["name"]: float(r[metric]) for r in _group_rows(rows) if int(r["samples"])}
    assert metrics[f"worst_group_{metric}"] == pytest.approx(min(values.values()))
    assert metrics["worst_group"] == min(values, key=values.get)
    for plot in [*plots, "dro_weights.png"]:
        assert (report / plot).read_bytes()[:8] == PNG_MAGIC, plot
    if name == WATERBIRDS:  # the bundle generated the synthetic stand-in in the release layout
        assert (Path(ov["dataset_dir"]) / "metadata.csv").is_file()
        assert len(load_waterbirds_datalist(ov["dataset_dir"], "all")) == TINY[name]["synthetic_images"]


def _dice(pred: np.ndarray, label: np.ndarray, c: int) -> float:
    p, g = pred == c, label == c
    return float("nan") if not g.any() else 2.0 * float((p & g).sum()) / float(p.sum() + g.sum())


@pytest.mark.parametrize("work", [SEG], indirect=True)
def test_segmentation_report_against_an_independent_dice(trained):
    """The saved student segments every test volume slice by slice; Dice per volume and vendor with numpy."""
    from scripts import segmentation_preprocessing

    b, ov = trained["bundle"], trained["overrides"]
    rows = report_rows(Path(ov["output_dir"]) / "groupdistil")
    assert [(r["name"], r["structure"]) for r in rows] == [(v, s) for v in VENDORS for s in [*STRUCTURES, "mean"]]
    wf = b.workflow(b.configs("train", "evaluate"), ov, workflow_type="infer")
    splits, net = wf.parser.get_parsed_content("splits"), wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=True))
    net.eval()
    preprocessing = segmentation_preprocessing(TINY[SEG]["spatial_size"], TINY[SEG]["pixdim"])
    per_vendor: dict[int, list] = {}
    for entry in splits["test"]:
        item = preprocessing(dict(entry))
        with torch.no_grad():
            pred = net(item["image"].as_tensor().permute(3, 0, 1, 2)).argmax(1).permute(1, 2, 0).numpy()
        per_vendor.setdefault(entry["group"], []).append([_dice(pred, item["label"][0].numpy(), c) for c in (1, 2, 3)])
    for row in rows:
        g = VENDORS.index(row["name"])
        if g not in per_vendor:
            assert row["samples"] == "0" and np.isnan(float(row["dice"]))
            continue
        values = np.nanmean(np.array(per_vendor[g]), axis=0)
        expected = (
            float(np.mean(values)) if row["structure"] == "mean" else float(values[STRUCTURES.index(row["structure"])])
        )
        assert int(row["samples"]) == len(per_vendor[g])
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-5), row


def test_evaluate_workflow_checkpoint_loader_restores_the_dro_state(trained, tmp_path):
    """evaluate.json's CheckpointLoaders put the best model's saved DRO weights (``model_dro_state.pt``) back into
    the loss and the history into the DRO handler (the handler's state holds the history only)."""
    b, name = trained["bundle"], trained["name"]
    ov = {**trained["overrides"], "output_dir": str(tmp_path / "eval")}
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model_dro_state.pt", weights_only=True)
    saved = checkpoint["loss"]["group_weights"]
    assert set(checkpoint["dro"]) == {"group_names", "iterations", "weight_history", "loss_history"}
    assert checkpoint["dro"]["group_names"] == REPORT[name][0]
    ev = b.workflow(b.configs("train", "evaluate"), ov, workflow_type="infer")
    loss, dro = ev.parser.get_parsed_content("loss"), ev.parser.get_parsed_content("train#dro_handler")
    assert ev.parser.get_parsed_content("dro_state_dict") == {"loss": loss, "dro": dro}
    assert dro.loss is loss and torch.allclose(loss.group_weights, torch.full((4,), 0.25)) and not dro.weight_history
    ev.run()
    ev.finalize()
    assert torch.equal(loss.group_weights, saved) and not torch.allclose(saved, torch.full((4,), 0.25))
    assert len(dro.weight_history) == len(checkpoint["dro"]["weight_history"]) > 0
    assert torch.allclose(dro.weight_history[-1], loss.group_weights, atol=1e-6)
    assert (tmp_path / "eval" / "groupdistil" / "dro_weights.png").stat().st_size > 0  # drawn from the restored history


@pytest.mark.parametrize("method", list(METHODS))
def test_every_training_config_through_config_workflow(trained, method, tmp_path):
    """Each overlay sets its method and loss; the checkpoint name, use_dro, save_dict and handlers follow."""
    b = trained["bundle"]
    configs, ckpt = _configs(b, method), METHODS[method][1]
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=None if method == "teacher" else trained)
    wf = b.workflow(configs, ov)
    assert wf.check_properties() == []
    dro = method in ("groupdistil", "group_dro")
    if method == "teacher" and b.raw_config("train")["teacher_method"] == "group_dro":  # the segmentation bundle's
        ckpt, dro = TEACHER_CHECKPOINTS["group_dro"], True
    assert wf.parser.get_parsed_content("ckpt_name") == ckpt and wf.parser.get_parsed_content("use_dro") is dro
    handlers = [type(h).__name__ for h in wf.parser.get_parsed_content("train#handlers")]
    assert None not in wf.parser.get_parsed_content("train#handlers")
    assert handlers == ["ValidationHandler", *(["GroupDROHandler", "ParamSchedulerHandler"] if dro else [])] + [
        "StatsHandler",
        "TensorBoardStatsHandler",
    ]
    assert set(wf.parser.get_parsed_content("save_dict")) == ({"model", "loss", "dro"} if dro else {"model", "loss"})
    wf.run()
    wf.finalize()
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / ckpt, weights_only=True)  # the network alone
    network = wf.parser.get_parsed_content("network")
    assert checkpoint.keys() == network.state_dict().keys()
    dro_state = Path(ov["ckpt_dir"]) / ckpt.replace(".pt", "_dro_state.pt")
    assert dro_state.is_file() == dro
    if dro:
        assert set(torch.load(dro_state, weights_only=True)) == {"loss", "dro"}
    ev = b.workflow([*configs, *b.configs("evaluate")], ov)  # a train-type workflow, as the model zoo checks it
    assert ev.check_properties() == []
    ev.run()
    ev.finalize()
    run_name = wf.parser.get_parsed_content("method")  # teacher_group_dro for the segmentation bundle's teacher
    rows = report_rows(Path(ov["output_dir"]) / run_name)
    assert [r["name"] for r in _group_rows(rows)] == REPORT[trained["name"]][0]


def test_dro_warmup_is_a_param_scheduler_on_the_losss_step_size(work, tmp_path):
    """dro_warmup iterations at step size 0, then step_size (MONAI's ParamSchedulerHandler, linear)."""
    from ignite.engine import Events

    b = work["bundle"]
    ov = own_folders(work["overrides"], tmp_path)
    wf = b.workflow(b.configs("train", "group_dro"), {**ov, "dro_warmup": 2, "step_size": 0.5, "epochs": 2})
    trainer, loss = wf.parser.get_parsed_content("train#trainer"), wf.parser.get_parsed_content("loss")
    steps = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.output[0]["dro_step_size"]))
    wf.run()
    wf.finalize()
    assert len(steps) == 2 * trainer.state.epoch_length >= 4
    assert steps == [0.0, 0.0] + [0.5] * (len(steps) - 2) and loss.step_size == 0.5


def test_the_group_dro_baseline_takes_the_group_dro_step_size(work):
    """group_dro.json trains with GroupDRO's own step size (``group_dro_step_size``, that of the GroupDRO teacher),
    not GroupDistil's ``step_size``; ``--step_size`` given for the run still sets it."""
    b, ov = work["bundle"], {**work["overrides"], "num_groups": 4}
    train = b.raw_config("train")
    configs = b.configs("train", "group_dro")
    loss = b.workflow(configs, ov, initialize=False).parser.get_parsed_content("loss")
    assert loss.step_size == train["group_dro_step_size"]
    assert (
        b.workflow(b.configs("train"), ov, initialize=False).parser.get_parsed_content("loss").step_size
        == (train["step_size"])
    )
    wf = b.workflow(configs, {**ov, "group_dro_step_size": 0.3}, initialize=False)
    assert wf.parser.get_parsed_content("loss").step_size == 0.3
    wf = b.workflow(configs, {**ov, "step_size": 0.7}, initialize=False)
    assert wf.parser.get_parsed_content("loss").step_size == 0.7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_gpu_train_through_config_workflow(trained, tmp_path, monkeypatch):
    """multi_gpu_train.json in this process as a one-process group (the environment torchrun would set)."""
    import ignite.distributed as idist
    import torch.distributed as dist
    from monai.data import DistributedSampler
    from torch.nn.parallel import DistributedDataParallel

    from monai_groupdistil.data import GroupBalancedSampler

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    b = trained["bundle"]
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
    wf = None
    try:
        wf = b.workflow(b.configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0, "balanced_sampling": True})
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert wf.check_properties() == []
        assert isinstance(wf.parser.get_parsed_content("network"), DistributedDataParallel)
        sampler = wf.parser.get_parsed_content("train#sampler")
        assert isinstance(sampler, GroupBalancedSampler) and (sampler.num_replicas, sampler.rank) == (1, 0)
        assert type(wf.parser.get_parsed_content("validate#sampler")) is DistributedSampler
        wf.run()
    finally:
        if wf is not None:
            wf.finalize()
        if dist.is_initialized():  # initialisation failed half-way
            dist.destroy_process_group()
    assert not dist.is_initialized()  # finalize destroyed the process group
    assert idist.model_name() == "serial"  # and told ignite, so later workflows in this process run undistributed
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=True)
    assert checkpoint and not any(k.startswith("module.") for k in checkpoint)  # saved without the DDP wrapper
    dro_state = torch.load(Path(ov["ckpt_dir"]) / "model_dro_state.pt", weights_only=True)
    assert not torch.allclose(dro_state["loss"]["group_weights"], torch.full((4,), 0.25))


def test_multi_process_training_with_torchrun(trained, tmp_path):
    b = trained["bundle"]
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
    b.run_cli(b.configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0}, runner=TORCHRUN)
    checkpoint = torch.load(tmp_path / "ckpt" / "model.pt", weights_only=True)
    assert checkpoint and not any(k.startswith("module.") for k in checkpoint)  # saved without the DDP wrapper
    weights = torch.load(tmp_path / "ckpt" / "model_dro_state.pt", weights_only=True)["loss"]["group_weights"]
    assert abs(float(weights.sum()) - 1) < 1e-5 and not torch.allclose(weights, torch.full((4,), 0.25), atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_conformance_commands(trained, tmp_path):
    """The model zoo's commands, as a user types them: ``python -m monai.bundle verify_metadata`` (local schema),
    ``verify_net_in_out`` and ``ckpt_export``; the TorchScript model gives the checkpoint's output."""
    b = trained["bundle"]
    inference = str(b.config_dir / "inference.json")
    base = [sys.executable, "-m", "monai.bundle"]

    def command(*args: str) -> str:
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=b.root)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    assert "metadata is verified with no error" in command(
        "verify_metadata", "--meta_file", b.meta, "--filepath", SCHEMA
    )
    common = ["--meta_file", b.meta, "--config_file", inference, "--bundle_root", str(b.root)]
    assert "data shape of network is verified with no error" in command("verify_net_in_out", "network_def", *common)
    ckpt, ts = Path(trained["overrides"]["ckpt_dir"]) / "model.pt", tmp_path / "model.ts"
    command("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), *common)  # no key_in_ckpt
    scripted = torch.jit.load(str(ts))
    wf = b.workflow(b.configs("inference"), {"bundle_root": str(b.root)}, "infer", initialize=False)
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    net.eval()
    data_format = json.loads(Path(b.meta).read_text())["network_data_format"]
    image, pred = data_format["inputs"]["image"], data_format["outputs"]["pred"]
    x = torch.rand(2, image["num_channels"], *image["spatial_shape"])
    with torch.no_grad():
        out = scripted(x)
        assert out.shape[:2] == (2, pred["num_channels"]) and torch.allclose(out, net(x), atol=1e-5)


@pytest.mark.parametrize(
    "name, pred_type, keys",
    [(n, "logits", ("worst_group_accuracy", "accuracy")) for n in CLASSIFICATION]
    + [(SEG, "image", ("worst_group_dice", "dice"))],
)
def test_metadata_describes_the_outputs_and_measured_metrics(name, pred_type, keys):
    b = Bundle(name)
    meta = json.loads(Path(b.meta).read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    classes = len(b.raw_config("train").get("classes", [])) or len(b.raw_config("train")["structures"]) + 1
    assert pred["type"] == pred_type and pred["num_channels"] == classes
    if name in CLASSIFICATION:
        assert pred["value_range"] == []
        post = meta["network_data_format"]["post_processed_outputs"]["pred"]
        assert post["type"] == "probabilities" and post["value_range"] == [0, 1]
    metrics = meta["eval_metrics"]
    readme = (b.root / "docs" / "README.md").read_text()
    if name == WATERBIRDS:  # measured on the real release only: the README says so
        assert all(metrics[k] == "see docs/README.md" for k in keys)
        return
    for key in keys:
        assert isinstance(metrics[key], float) and 0 < metrics[key] <= 1 and f"{metrics[key]:.3f}" in readme, key


# ------------------------------------------------------------------ inference (each bundle's own outputs)


@pytest.mark.parametrize("work", [CARDIAC], indirect=True)
def test_cardiac_inference_writes_one_row_per_study(trained, tmp_path):
    b, ov = trained["bundle"], trained["overrides"]
    studies = sorted((Path(ov["dataset_dir"]) / "OpenDataset" / "Testing").glob("*/*_sa.nii.gz"))
    out_file = tmp_path / "pred.csv"
    overrides = {k: ov[k] for k in ("bundle_root", "ckpt_dir", "spatial_size", "pixdim")}
    folder = tmp_path / "studies"
    folder.mkdir()
    for s in studies:
        (folder / s.name).symlink_to(s)
    wf = b.workflow(
        b.configs("inference"), {**overrides, "dataset_dir": str(folder), "output_file": str(out_file)}, "infer"
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


@pytest.mark.parametrize("work", [WATERBIRDS], indirect=True)
def test_waterbirds_inference_on_the_release_and_on_a_folder(trained, tmp_path):
    b, ov = trained["bundle"], trained["overrides"]
    common = {k: ov[k] for k in ("bundle_root", "ckpt_dir", "spatial_size", "resize")}
    # the release: the test split by default, identified by img_id
    out_file = tmp_path / "release.csv"
    wf = b.workflow(
        b.configs("inference"), {**common, "dataset_dir": ov["dataset_dir"], "output_file": str(out_file)}, "infer"
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
    wf = b.workflow(
        b.configs("inference"), {**common, "dataset_dir": str(folder), "output_file": str(out_file)}, "infer"
    )
    wf.run()
    wf.finalize()
    with open(out_file, newline="") as f:
        ids = sorted(r["img_id"] for r in csv.DictReader(f))
    assert ids == ["sub0/bird0.jpg", "sub0/bird2.jpg", "sub1/bird1.jpg"]


@pytest.mark.parametrize("work", [SEG], indirect=True)
def test_segmentation_inference_writes_masks_with_the_shape_and_affine_of_the_input(trained, tmp_path):
    b, ov = trained["bundle"], trained["overrides"]
    folder = tmp_path / "studies"
    folder.mkdir()
    cines = sorted((Path(ov["dataset_dir"]) / "OpenDataset" / "Testing").glob("*/*_sa.nii.gz"))[:2]
    for s in cines:
        (folder / s.name).symlink_to(s)
    cine = nib.load(cines[0])
    oblique = cine.affine.copy()
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1]])  # rotated in-plane
    nib.save(nib.Nifti1Image(np.asarray(cine.dataobj)[..., 1], oblique), str(folder / "volume3d.nii.gz"))
    overrides = {k: ov[k] for k in ("bundle_root", "ckpt_dir", "spatial_size", "pixdim")}
    (tmp_path / "masks").mkdir()
    stale = temporary_name(tmp_path / "masks" / "killed_seg.nii.gz")  # a killed run's partial mask: removed at start
    stale.write_bytes(b"partial")
    outputs = {"output_dir": str(tmp_path / "eval"), "mask_dir": str(tmp_path / "masks")}  # not the bundle folder
    wf = b.workflow(b.configs("inference"), {**overrides, "dataset_dir": str(folder), **outputs}, "infer")
    assert not stale.exists()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    assert (tmp_path / "eval" / "failures.csv").read_text().splitlines() == ["subject,file,reason"]  # none failed
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == sorted([*(s.name.replace(".nii.gz", "_seg.nii.gz") for s in cines), "volume3d_seg.nii.gz"])
    for source in sorted(folder.iterdir()):
        image, mask = nib.load(source), nib.load(tmp_path / "masks" / source.name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == image.shape[:3] and np.allclose(mask.affine, image.affine, atol=1e-5), source.name
        values = set(np.unique(np.asarray(mask.dataobj)).tolist())
        assert values <= {0, 1, 2, 3} and mask.get_data_dtype() == np.uint8


# ------------------------------------------------------------------ the teacher: its own run, its method


def test_missing_teacher_names_the_file_and_the_command_that_trains_it(work, tmp_path):
    """The student's run stops before training (the CLI's, for the cardiac bundle; in-process for the others); the
    command in the message (with this run's other overrides) trains the teacher, after which the same student run
    works."""
    b = work["bundle"]
    ov = own_folders(work["overrides"], tmp_path)
    if work["name"] == CARDIAC:
        out = b.run_cli(b.configs("train"), ov, check=False)
        assert out.returncode != 0 and "Epoch" not in out.stdout + out.stderr  # nothing was trained
        message = out.stderr
    else:
        wf = b.workflow(b.configs("train"), ov)
        with pytest.raises(Exception) as info:
            wf.run()
        assert isinstance(root_error(info.value), FileNotFoundError)
        message = error_chain(info.value)
    assert not any((tmp_path / "ckpt").iterdir())  # no checkpoint: nothing was trained
    # the default teacher_method's checkpoint and command (the segmentation bundle's default teacher is GroupDRO's)
    teacher_method = b.raw_config("train")["teacher_method"]
    name = TEACHER_CHECKPOINTS[teacher_method]
    assert f"teacher checkpoint '{tmp_path}/ckpt/{name}' not found. Train the teacher first" in message
    files = "['configs/train.json','configs/train_teacher.json']"
    command = f'cd {b.root} && python -m monai.bundle run --config_file "{files}" --meta_file configs/metadata.json'
    command += f" --ckpt_dir {tmp_path}/ckpt"
    command += f" --teacher_method {teacher_method}"
    assert f"\n\n    {command}\n\n" in message
    others = {k: v for k, v in ov.items() if k not in ("bundle_root", "ckpt_dir")}
    path = os.pathsep.join([str(Path(sys.executable).parent), ENV.get("PATH", "")])  # "python" is this Python
    full = command + " " + shlex.join(cli_args(others))
    taught = subprocess.run(full, shell=True, capture_output=True, text=True, timeout=600, env={**ENV, "PATH": path})
    assert taught.returncode == 0, taught.stderr[-3000:]
    log = "teacher" if teacher_method == "erm" else f"teacher_{teacher_method}"
    assert (tmp_path / "ckpt" / name).is_file() and (tmp_path / "log" / log).is_dir()
    wf = b.workflow(b.configs("train"), ov)  # the student run that failed now works
    wf.run()
    wf.finalize()
    assert (tmp_path / "ckpt" / "model.pt").is_file() and (tmp_path / "log" / "groupdistil").is_dir()


def test_group_dro_teacher_is_configured_and_saved_apart(work, tmp_path):
    b, ov = work["bundle"], own_folders(work["overrides"], tmp_path)  # no teacher trained there
    erm = b.workflow(b.configs("train", "train_teacher"), {**ov, "teacher_method": "erm"}, initialize=False)
    assert not isinstance(erm.parser.get_parsed_content("loss"), GroupDROLoss)
    assert erm.parser.get_parsed_content("ckpt_name") == "teacher.pt" and not erm.parser.get_parsed_content("use_dro")
    robust = b.workflow(
        b.configs("train", "train_teacher"), {**ov, "teacher_method": "group_dro", "group_dro_step_size": 0.3}
    )
    loss = robust.parser.get_parsed_content("loss")
    assert isinstance(loss, GroupDROLoss) and loss.step_size == 0.3 and robust.parser.get_parsed_content("use_dro")
    assert loss.absent_groups == b.raw_config("train")["absent_groups"]  # the run's rule
    assert loss.num_groups == robust.parser.get_parsed_content("num_groups")
    handlers = robust.parser.get_parsed_content("train#handlers")
    assert any(type(h).__name__ == "GroupDROHandler" for h in handlers)  # the teacher's DRO weights are managed
    assert robust.parser.get_parsed_content("ckpt_name") == "teacher_group_dro.pt"
    student = b.workflow(b.configs("train"), {**ov, "teacher_method": "group_dro"}, initialize=False)
    assert student.parser.get_parsed_content("teacher_ckpt") == f"{ov['ckpt_dir']}/teacher_group_dro.pt"
    with pytest.raises(Exception) as info:
        student.parser.get_parsed_content("teacher")
    assert isinstance(root_error(info.value), FileNotFoundError)
    assert "--teacher_method group_dro" in str(root_error(info.value))


def test_a_missing_teacher_of_either_method_is_named_with_the_command_for_that_method(work, tmp_path):
    """Whichever teacher the bundle defaults to, a student run of either ``teacher_method`` names that method's
    checkpoint and a command that trains that teacher (``--teacher_method`` always written)."""
    b, ov = work["bundle"], own_folders(work["overrides"], tmp_path)
    for method, name in TEACHER_CHECKPOINTS.items():
        student = b.workflow(b.configs("train"), {**ov, "teacher_method": method}, initialize=False)
        with pytest.raises(Exception) as info:
            student.parser.get_parsed_content("teacher")
        error = root_error(info.value)
        assert isinstance(error, FileNotFoundError), method
        assert f"teacher checkpoint '{tmp_path}/ckpt/{name}' not found" in str(error)
        assert f"--ckpt_dir {tmp_path}/ckpt --teacher_method {method}\n" in str(error)


def test_unknown_teacher_method_is_named(work):
    b = work["bundle"]
    wf = b.workflow(
        b.configs("train", "train_teacher"), {**work["overrides"], "teacher_method": "dro"}, initialize=False
    )
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), ValueError)
    assert "teacher_method must be one of ('erm', 'group_dro'), got 'dro'" in error_chain(info.value)


def test_student_distils_from_the_group_dro_teacher(work, tmp_path):
    """A GroupDRO teacher trained by train_teacher.json is the one the GroupDistil student loads (nothing else is); it
    trains with ``group_dro_step_size`` to the end (the DRO warm-up's scheduler sets the loss's step size at every
    iteration, to the run's ``step_size``, which train_teacher.json sets to ``group_dro_step_size``)."""
    from ignite.engine import Events

    b = work["bundle"]
    robust = {**own_folders(work["overrides"], tmp_path), "teacher_method": "group_dro"}
    teacher_run = b.workflow(b.configs("train", "train_teacher"), {**robust, "group_dro_step_size": 5.0})
    steps = []
    teacher_run.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.output[0]["dro_step_size"])
    )
    teacher_run.run()
    teacher_run.finalize()
    assert steps and set(steps) == {5.0} and teacher_run.parser.get_parsed_content("loss").step_size == 5.0
    saved = torch.load(tmp_path / "ckpt" / "teacher_group_dro.pt", map_location="cpu", weights_only=True)
    dro_state = torch.load(tmp_path / "ckpt" / "teacher_group_dro_dro_state.pt", map_location="cpu", weights_only=True)
    weights = dro_state["loss"]["group_weights"]
    assert not torch.equal(weights, torch.full_like(weights, 1 / len(weights)))  # the teacher's DRO weights moved
    assert "dro" in dro_state and not (tmp_path / "ckpt" / "teacher.pt").exists()
    assert (tmp_path / "ckpt" / "teacher_group_dro_epoch=1.pt").is_file()  # its own resume prefix
    student = b.workflow(b.configs("train"), {**robust, "step_size": 0.5})
    assert student.parser.get_parsed_content("loss").step_size == 0.5
    teacher = student.parser.get_parsed_content("teacher")
    for name, value in teacher.state_dict().items():
        assert torch.equal(value.cpu(), saved[name]), name


@pytest.mark.parametrize("work", list(CLASSIFICATION), indirect=True)
def test_student_with_other_class_count_is_refused(trained):
    b = trained["bundle"]
    classes = len(b.raw_config("train")["classes"])
    with pytest.raises(Exception) as info:
        b.workflow(b.configs("train"), {**trained["overrides"], "network_def#num_classes": classes + 1}).run()
    assert f"predicts {classes} classes but the student predicts {classes + 1}" in error_chain(info.value)


# ------------------------------------------------------------------ ids, settings given on the command line


def test_ids_shared_by_every_bundle():
    """The same override works on every bundle: the ids they share have values of the same type."""
    shared = ["bundle_root", "dataset_dir", "ckpt_dir", "output_dir", "log_dir", "device", "epochs", "teacher_epochs"]
    shared += ["num_workers", "temperature", "alpha", "step_size", "seed", "batch_size", "learning_rate", "augment"]
    shared += ["balanced_sampling", "use_dro", "resume", "experiment_name", "run_name", "teacher_method"]
    shared += ["teacher_weight_decay", "teacher_balanced_sampling"]
    shared += ["group_dro_step_size", "dro_warmup", "absent_groups", "spatial_size", "method", "ckpt_name"]
    shared += ["resume_dict", "tracking_params", "save_dict", "preprocessing", "augmentation"]
    configs = {name: Bundle(name).raw_config("train") for name in BUNDLES}
    for key in shared:
        types = {name: type(config.get(key, KeyError)) for name, config in configs.items()}
        assert len(set(types.values())) == 1 and KeyError not in types.values(), (key, types)
    cardiac, seg = configs[CARDIAC], configs[SEG]
    for key in ("synthetic_subjects", "group_by", "pixdim"):
        assert type(cardiac[key]) is type(seg[key]), key
    for name, config in configs.items():  # the overlays set only what differs
        b = Bundle(name)
        for overlay in ("erm", "kd", "group_dro"):
            own = {"method", "teacher", "loss"} | ({"step_size"} if overlay == "group_dro" else set())
            assert set(b.raw_config(overlay)) <= own, (name, overlay)
        assert not {"ckpt_name", "save_dict", "use_dro"} & set(b.raw_config("train_teacher")), name
        assert not [k for k in config if "teacher_overrides" in k or "train_teacher_" in k], name
    # the segmentation student has at most one eighth of the teacher's parameters
    wf = Bundle(SEG).workflow(Bundle(SEG).configs("train"), {"bundle_root": str(Bundle(SEG).root)}, initialize=False)
    count = lambda name: sum(p.numel() for p in wf.parser.get_parsed_content(name).parameters())  # noqa: E731
    assert count("network_def") * 8 <= count("teacher_def")


def test_preprocessing_parameters_are_ids(work):
    """The preprocessing and augmentation components take their parameters from ids a user can override."""
    b, ov, name = work["bundle"], work["overrides"], work["name"]
    size = [24, 24]

    def probs(overrides: dict) -> list[float]:
        wf = b.workflow(b.configs("train"), {**ov, **overrides}, initialize=False)
        return [t.prob for t in wf.parser.get_parsed_content("augmentation").transforms if hasattr(t, "prob")]

    if name != WATERBIRDS:
        default = probs({})
        assert 0.5 in default and probs({"augmentation#prob": 1.0}) == [1.0 if p == 0.5 else p for p in default]
        wf = b.workflow(b.configs("train"), {**ov, "preprocessing#upper": 90.0}, initialize=False)
        chain = wf.parser.get_parsed_content("preprocessing").flatten().transforms
        scalers = [t.scaler for t in chain if hasattr(t, "scaler")]
        assert [(s.lower, s.upper) for s in scalers] == [(0.5, 90.0)]
    else:
        wf = b.workflow(b.configs("train"), {**ov, "augmentation#flip_prob": 1.0, "preprocessing#mode": "bilinear"})
        assert [t.prob for t in wf.parser.get_parsed_content("augmentation").transforms if hasattr(t, "prob")] == [1.0]
        modes = [getattr(t, "mode", None) for t in wf.parser.get_parsed_content("preprocessing").transforms]
        assert "bilinear" in [m if isinstance(m, str) else (m[0] if m else None) for m in modes]
    wf = b.workflow(b.configs("train"), {**ov, "spatial_size": size})
    item = wf.parser.get_parsed_content("validate#dataset")[0]
    assert list(item["image"].shape[1:3]) == size


def test_every_boolean_id_is_a_plain_value_and_a_string_is_refused(work):
    """The configs use boolean ids as plain values (``"_disabled_": "$not @augment"``); ``fire`` passes ``--augment
    false`` as the string "false", which Python reads as true, so ``initialize`` refuses every non-boolean first."""
    b, ov = work["bundle"], work["overrides"]
    # teacher_balanced_sampling decides the teacher run's sampler (tests/test_bundle_teacher_ids.py)
    assert set(BOOLEAN_USES) | {"resume", "teacher_balanced_sampling"} == set(b.boolean_ids())
    for spelling, expected in SPELLINGS:
        if isinstance(spelling, str):
            continue
        wf = b.workflow(b.configs("train"), {**ov, **dict.fromkeys(BOOLEAN_USES, spelling)})
        for key, (item, decision) in BOOLEAN_USES.items():
            assert bool(decision(wf.parser.get_parsed_content(item))) is expected, (key, spelling)
        if work["name"] == WATERBIRDS:  # random crops replace the centre crop
            crops = [type(t).__name__ for t in wf.parser.get_parsed_content("train#base_preprocessing").transforms]
            assert ("CenterSpatialCropd" in crops) is not expected
    for key in (*BOOLEAN_USES, "resume", "teacher_balanced_sampling"):
        for spelling in ("false", "no", "maybe"):
            with pytest.raises(Exception) as info:
                b.workflow(b.configs("train"), {**ov, key: spelling})
            assert isinstance(root_error(info.value), ValueError)
            assert f"'{key}' must be a boolean, got '{spelling}' (str): write --{key} False (or 0)" in error_chain(
                info.value
            )


def _loss_typos(name: str) -> list[tuple[str, str, str | None]]:
    erm = ("erm", "dice_wieght", "dice_weight") if name == SEG else ("erm", "label_smooting", "label_smoothing")
    return [
        (name, "train", "temprature", "temperature"),
        (name, "kd", "alpah", "alpha"),
        (name, "group_dro", "step", "step_size"),
        (name, *erm),
        (name, "train_teacher", "not_an_argument", None),
    ]


@pytest.mark.parametrize("name, config, typo, meant", [c for n in BUNDLES for c in _loss_typos(n)])
def test_unknown_loss_argument_is_named(name, config, typo, meant):
    """Each loss is a plain ``_target_``: an unknown argument stops with the loss's own TypeError naming it."""
    b = Bundle(name)
    configs = b.configs("train") if config == "train" else b.configs("train", config)
    wf = b.workflow(configs, {"bundle_root": str(b.root), f"loss#{typo}": 2.0, "num_groups": 4}, initialize=False)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), TypeError)
    target = b.raw_config(config)["loss"]["_target_"]
    assert f"got an unexpected keyword argument '{typo}'" in str(root_error(info.value))
    assert target.rsplit(".", 1)[-1] in str(root_error(info.value))
    if meant:
        assert meant in inspect.signature(pydoc.locate(target)).parameters


@pytest.mark.parametrize("name", BUNDLES)
def test_a_bad_loss_value_is_named(name):
    b = Bundle(name)
    wf = b.workflow(b.configs("train"), {"bundle_root": str(b.root), "alpha": 2, "num_groups": 4}, initialize=False)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), ValueError) and "alpha" in str(root_error(info.value))


@pytest.mark.parametrize("config", ["train", "group_dro"])
def test_absent_groups_reaches_the_dro_loss_and_a_bad_value_is_named(work, config):
    b, ov = work["bundle"], {**work["overrides"], "num_groups": 4}
    configs = b.configs("train") if config == "train" else b.configs("train", config)
    default = b.raw_config("train")["absent_groups"]  # the sweep's winner (docs/results.md)
    assert b.workflow(configs, ov, initialize=False).parser.get_parsed_content("loss").absent_groups == default
    for rule in ("ema", "zero"):
        wf = b.workflow(configs, {**ov, "absent_groups": rule}, initialize=False)
        assert wf.parser.get_parsed_content("loss").absent_groups == rule
    wf = b.workflow(configs, {**ov, "absent_groups": "skip"}, initialize=False)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), ValueError)
    assert "absent_groups must be one of ('ema', 'zero'), got 'skip'" in error_chain(info.value)


# ------------------------------------------------------------------ the bundle's own data, bad input


@pytest.mark.parametrize("work", [CARDIAC, SEG], indirect=True)
def test_initialize_generates_the_synthetic_dataset_in_an_empty_dataset_dir(work, tmp_path):
    b = work["bundle"]
    data = tmp_path / "data"
    data.mkdir()
    wf = b.workflow(b.configs("train"), {**work["overrides"], "dataset_dir": str(data), "synthetic_subjects": 12})
    root = data / "OpenDataset"
    assert (root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv").is_file()
    splits = wf.parser.get_parsed_content("splits")
    entries = [d for part in ("train", "val", "test") for d in splits[part]]
    subjects = {d["subject"] for d in entries}
    assert len(subjects) == 12 and len(entries) == 12 * (2 if work["name"] == SEG else 1)  # ED and ES frames
    split_of = {}
    for part in ("train", "val", "test"):
        assert splits[part]
        for d in splits[part]:
            assert split_of.setdefault(d["subject"], part) == part  # a subject's frames stay in one split
    assert all(Path(d["image"]).is_file() and str(d["image"]).startswith(str(root)) for d in entries)
    assert splits["group_names"] == VENDORS and sum(splits["group_counts"]) == len(splits["train"])


_NOT_A_RELEASE = {
    CARDIAC: ["is neither empty nor an M&Ms release", "OpenDataset"],
    SEG: ["is neither empty nor an M&Ms or M&Ms-2 release", "OpenDataset", "MnM2"],
    WATERBIRDS: ["is neither empty nor a Waterbirds release", "no 'metadata.csv' in it"],
}


def test_dataset_dir_that_is_not_a_release(work, tmp_path):
    b = work["bundle"]
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(Exception) as info:
        b.workflow(b.configs("train", "train_teacher"), {**work["overrides"], "dataset_dir": str(tmp_path)})
    assert isinstance(root_error(info.value), ValueError)
    message = error_chain(info.value)
    assert f"dataset_dir '{tmp_path}' " in message
    for text in _NOT_A_RELEASE[work["name"]]:
        assert text in message, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing generated over the user's files


def test_evaluate_without_a_trained_model(work, tmp_path):
    b = work["bundle"]
    with pytest.raises(Exception) as info:
        b.workflow(b.configs("train", "evaluate"), {**work["overrides"], "ckpt_dir": str(tmp_path)}, "infer")
    assert isinstance(root_error(info.value), FileNotFoundError)
    message = error_chain(info.value)
    assert f"'{tmp_path}/model.pt' not found: the trained model; run the training config first" in message


# ------------------------------------------------------------------ Waterbirds: pretrained weights


@pytest.mark.parametrize("work", [WATERBIRDS], indirect=True)
def test_pretrained_weights_initialise_the_student_but_not_its_classifier(work, tmp_path):
    b = work["bundle"]
    source = b.workflow(b.configs("train"), work["overrides"], initialize=False).parser.get_parsed_content(
        "network_def"
    )
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 128), torch.randn(1000)  # an ImageNet classifier
    path = tmp_path / "imagenet_like.pt"
    torch.save(state, path)
    wf = b.workflow(b.configs("train"), {**work["overrides"], "pretrained_weights": str(path)}, initialize=False)
    net = wf.parser.get_parsed_content("network")
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.layer4[0].bn2.running_var, state["layer4.0.bn2.running_var"])
    assert net.fc.weight.shape == (2, 128)


@pytest.mark.parametrize("work", [WATERBIRDS], indirect=True)
def test_pretrained_teacher_weights_go_to_the_teacher_config(work, tmp_path):
    b = work["bundle"]
    path = tmp_path / "teacher_init.pt"
    overrides = {**work["overrides"], "teacher_pretrained_weights": str(path)}
    wf = b.workflow(b.configs("train", "train_teacher"), overrides, initialize=False)
    assert wf.parser.get_parsed_content("pretrained_weights") == str(path)
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("network")
    assert isinstance(root_error(info.value), FileNotFoundError)
    assert f"pretrained weights '{path}' not found" in error_chain(info.value)
