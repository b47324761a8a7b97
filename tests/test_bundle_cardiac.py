"""Bundle-level tests of bundles/cardiac_mri_groupdistil on tiny generated data (1 epoch, 32x32 slices).

Every test can run alone: the expensive runs (the tiny data, the teacher/student/evaluation CLI chain) are
module-scoped fixtures that the tests needing them request, and runs that train write their checkpoints into their
own folders, so no test depends on another one having run first.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monai_groupdistil.data import make_synthetic_mnms
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

CARDIAC = Bundle("cardiac_mri_groupdistil")
BUNDLE, CONFIGS, META = CARDIAC.root, CARDIAC.config_dir, CARDIAC.meta
_configs, run_cli, workflow, _report_rows = CARDIAC.configs, CARDIAC.run_cli, CARDIAC.workflow, report_rows
TINY = {"epochs": 1, "teacher_epochs": 1, "spatial_size": [32, 32], "pixdim": [4.0, 4.0], "batch_size": 4}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle"]
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
    """A tiny M&Ms-layout dataset and the folders of one bundle run."""
    base = tmp_path_factory.mktemp("cardiac_bundle")
    make_synthetic_mnms(base / "data", n_subjects=24, seed=1, matrix_scale=0.5, n_frames=4)
    return {"base": base, "overrides": CARDIAC.run_overrides(base, **TINY)}


@pytest.fixture(scope="module")
def trained(work):
    """Teacher, GroupDistil student (a large DRO step size, so the weights move) and evaluation, through the CLI."""
    ov = work["overrides"]
    run_cli(_configs("train", "train_teacher"), ov)
    run_cli(_configs("train"), {**ov, "step_size": 5.0})
    evaluation = run_cli(_configs("train", "evaluate"), ov)
    return {**work, "evaluate_stdout": evaluation.stdout}


def test_teacher_student_evaluate_through_the_cli(trained):
    ov = trained["overrides"]
    assert (Path(ov["ckpt_dir"]) / "teacher.pt").is_file()
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert {"model", "loss", "dro"} <= set(checkpoint)
    weights = checkpoint["loss"]["group_weights"]
    assert weights.shape == (4,) and abs(float(weights.sum()) - 1) < 1e-5
    assert not torch.allclose(weights, torch.full((4,), 0.25))  # a large step size moved them
    report = Path(ov["output_dir"]) / "groupdistil"
    assert f"per-group report: {report}" in trained["evaluate_stdout"]
    rows = _report_rows(report)
    assert [r["name"] for r in rows] == ["A", "B", "C", "D"]
    assert list(rows[0]) == ["group", "name", "samples", "accuracy", "mean_loss"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert {"accuracy", "mean_group_accuracy", "worst_group_accuracy", "worst_group"} <= set(metrics)
    assert sum(int(r["samples"]) for r in rows) == metrics["samples"]
    assert (report / "group_accuracy.png").stat().st_size > 0 and (report / "dro_weights.png").stat().st_size > 0


def test_evaluate_workflow_checkpoint_loader_restores_the_dro_state(trained, tmp_path):
    """evaluate.json's own CheckpointLoader puts the saved DRO weights back into the workflow's loss and handler."""
    ov = {**trained["overrides"], "output_dir": str(tmp_path / "eval")}
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    saved = checkpoint["loss"]["group_weights"]
    ev = workflow(_configs("train", "evaluate"), ov, workflow_type="infer")
    loss, dro = ev.parser.get_parsed_content("loss"), ev.parser.get_parsed_content("train#handlers#1")
    assert dro.loss is loss and torch.allclose(loss.group_weights, torch.full((4,), 0.25)) and not dro.weight_history
    ev.run()
    ev.finalize()
    assert torch.equal(loss.group_weights, saved) and not torch.allclose(saved, torch.full((4,), 0.25))
    assert len(dro.weight_history) == len(checkpoint["dro"]["weight_history"]) > 0
    assert torch.allclose(dro.weight_history[-1], loss.group_weights, atol=1e-6)
    assert (tmp_path / "eval" / "groupdistil" / "dro_weights.png").stat().st_size > 0  # drawn from the restored history


# method -> (override config after train.json, checkpoint name); "groupdistil" is train.json alone
METHODS = {
    "teacher": ("train_teacher", "teacher.pt"),
    "groupdistil": (None, "model.pt"),
    "erm": ("erm", "erm.pt"),
    "kd": ("kd", "kd.pt"),
    "group_dro": ("group_dro", "group_dro.pt"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_training_config_through_config_workflow(trained, method, tmp_path):
    override, ckpt = METHODS[method]
    configs = _configs("train") if override is None else _configs("train", override)
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=None if method == "teacher" else trained)
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

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
    wf = None
    try:
        wf = workflow(_configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0, "balanced_sampling": "false"})
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert wf.check_properties() == []
        assert isinstance(wf.parser.get_parsed_content("network"), DistributedDataParallel)
        assert isinstance(wf.parser.get_parsed_content("train#sampler"), DistributedSampler)
        wf.run()
    finally:
        if wf is not None:
            wf.finalize()
        if dist.is_initialized():  # initialisation failed half-way
            dist.destroy_process_group()
    assert not dist.is_initialized()  # finalize destroyed the process group
    assert idist.model_name() == "serial"  # and told ignite, so later workflows in this process run undistributed
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper
    assert not torch.allclose(checkpoint["loss"]["group_weights"], torch.full((4,), 0.25))


def test_multi_process_training_with_torchrun(trained, tmp_path):
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
    run_cli(_configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0}, runner=TORCHRUN)
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper
    assert not torch.allclose(checkpoint["loss"]["group_weights"], torch.full((4,), 0.25))


def test_inference_writes_one_row_per_study(trained, tmp_path):
    ov = trained["overrides"]
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
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_metadata_describes_logits_and_measured_metrics():
    meta = json.loads(Path(META).read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["type"] == "logits" and pred["value_range"] == [] and pred["num_channels"] == 3
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert post["type"] == "probabilities" and post["value_range"] == [0, 1]
    metrics = meta["eval_metrics"]
    for key in ("worst_group_accuracy", "accuracy"):
        assert isinstance(metrics[key], float) and 0 <= metrics[key] <= 1
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert f"{metrics['worst_group_accuracy']:.3f}" in readme and f"{metrics['accuracy']:.3f}" in readme


# ------------------------------------------------------------------ the bundle's own data and settings


def test_initialize_generates_the_synthetic_dataset_in_an_empty_dataset_dir(work, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    wf = workflow(_configs("train"), {**work["overrides"], "dataset_dir": str(data), "synthetic_subjects": 12})
    root = data / "OpenDataset"
    assert (root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv").is_file()
    splits = wf.parser.get_parsed_content("splits")
    entries = [d for part in ("train", "val", "test") for d in splits[part]]
    assert len(entries) == len({d["subject"] for d in entries}) == 12
    assert all(splits[part] for part in ("train", "val", "test"))
    assert all(Path(d["image"]).is_file() and str(d["image"]).startswith(str(root)) for d in entries)
    assert splits["group_names"] == ["A", "B", "C", "D"] and sum(splits["group_counts"]) == len(splits["train"])


def test_every_boolean_id_reads_every_spelling(trained, tmp_path):
    assert set(BOOLEAN_USES) | {"train_teacher_if_missing"} == set(CARDIAC.boolean_ids())
    ov = trained["overrides"]
    for spelling, expected in SPELLINGS:
        wf = workflow(_configs("train"), {**ov, **dict.fromkeys(BOOLEAN_USES, spelling)})
        for key, (item, decision) in BOOLEAN_USES.items():
            assert decision(wf.parser.get_parsed_content(item)) is expected, (key, spelling)
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


def test_teacher_run_gets_every_setting_it_shares_with_train_json(work):
    """Derived from the config files: every setting of train.json that train_teacher.json reads is passed on."""
    shared = CARDIAC.teacher_shared_ids()
    assert {"ckpt_dir", "dataset_dir", "log_dir", "batch_size", "augment", "balanced_sampling", "device"} <= shared
    assert set(CARDIAC.raw_config("train")["teacher_overrides"]) == shared
    values = {key: f"<{key}>" for key in shared}  # a distinct value each, so a mix-up shows
    wf = workflow(_configs("train"), values, initialize=False)
    train_teacher = wf.parser.get_parsed_content("train_teacher_fn")
    assert train_teacher.keywords == values
    assert train_teacher.args[0] == ["<bundle_root>/configs/train.json", "<bundle_root>/configs/train_teacher.json"]
    command = wf.parser.get_parsed_content("train_teacher_command")
    for key in shared:
        assert f'--{key} "<{key}>"' in command, key


def test_missing_teacher_message_gives_a_command_that_makes_the_student_run_work(work, tmp_path):
    ov = {**own_folders(work["overrides"], tmp_path), "train_teacher_if_missing": "false"}  # fire's string
    out = run_cli(_configs("train"), ov, check=False)
    assert out.returncode != 0
    assert not (tmp_path / "ckpt" / "teacher.pt").exists() and "Epoch" not in out.stdout + out.stderr  # not trained
    assert f"teacher checkpoint '{tmp_path}/ckpt/teacher.pt' not found" in out.stderr
    assert "train_teacher_if_missing" in out.stderr
    command = re.search(r"Train the teacher first.*?:\n\n    (.+)\n", out.stderr).group(1)
    assert "configs/train_teacher.json" in command
    for key, shown in [
        ("ckpt_dir", ov["ckpt_dir"]),
        ("dataset_dir", ov["dataset_dir"]),
        ("log_dir", ov["log_dir"]),
        ("output_dir", ov["output_dir"]),
        ("device", "cpu"),
        ("spatial_size", '"[32, 32]"'),
        ("pixdim", '"[4.0, 4.0]"'),
        ("batch_size", "4"),
        ("teacher_epochs", "1"),
        ("progress_bar", "False"),
    ]:
        assert f"--{key} {shown}" in command, key
    path = os.pathsep.join([str(Path(sys.executable).parent), ENV.get("PATH", "")])  # "python" is this Python
    taught = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600, env={**ENV, "PATH": path})
    assert taught.returncode == 0, taught.stderr[-3000:]
    assert (tmp_path / "ckpt" / "teacher.pt").is_file() and (tmp_path / "log" / "teacher").is_dir()
    wf = workflow(_configs("train"), ov)  # the student run that failed now works
    wf.run()
    wf.finalize()
    assert (tmp_path / "ckpt" / "model.pt").is_file()


def test_train_teacher_if_missing_trains_it_into_the_runs_own_ckpt_dir(work, tmp_path):
    ov = {**own_folders(work["overrides"], tmp_path), "val_interval": 1, "balanced_sampling": "no", "use_dro": "no"}
    wf = workflow(_configs("train"), {**ov, "train_teacher_if_missing": "true"})
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    teacher = torch.load(tmp_path / "ckpt" / "teacher.pt", weights_only=False)
    assert teacher["model"]["layer1.1.conv1.weight"].shape[0] == 32  # the teacher architecture, [2, 2, 2, 2]
    assert set(torch.load(tmp_path / "ckpt" / "model.pt", weights_only=False)) == {"model", "loss"}  # no DRO handler
    assert (tmp_path / "log" / "teacher").is_dir() and (tmp_path / "log" / "groupdistil").is_dir()  # log_dir passed on


# ------------------------------------------------------------------ bad input


def test_dataset_dir_that_is_not_a_release(work, tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    out = run_cli(_configs("train", "train_teacher"), {**work["overrides"], "dataset_dir": str(tmp_path)}, check=False)
    assert out.returncode != 0
    assert "is neither empty nor an M&Ms release" in out.stderr and "OpenDataset" in out.stderr


def test_student_with_other_class_count_is_refused(trained):
    with pytest.raises(Exception) as info:
        wf = workflow(_configs("train"), {**trained["overrides"], "network_def#num_classes": 4})
        wf.run()
    assert "predicts 3 classes but the student predicts 4" in error_chain(info.value)


@pytest.mark.parametrize(
    "config, typo, meant",
    [
        ("train", "temprature", "temperature"),
        ("kd", "alpah", "alpha"),
        ("group_dro", "step", "step_size"),
        ("erm", "label_smooting", "label_smoothing"),
        ("train_teacher", "not_an_argument", None),
    ],
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
    assert f"'loss' ({name}) got unknown argument(s) '{typo}'" in message
    assert f"The valid arguments of {name} are: {', '.join(valid)}." in message
    if meant:
        assert f"(did you mean '{meant}'?)" in message and f"(e.g. --loss#{meant} 2.0)" in message
    assert "Correct the argument's name in the override" in message


@pytest.mark.parametrize("config", ["train", "group_dro"])
def test_absent_groups_reaches_the_dro_loss_and_a_bad_value_is_named(work, config):
    configs = _configs("train") if config == "train" else _configs("train", config)
    default = CARDIAC.raw_config("train")["absent_groups"]  # the sweep's winner (docs/results.md)
    assert workflow(configs, work["overrides"]).parser.get_parsed_content("loss").absent_groups == default
    for rule in ("ema", "zero"):
        loss = workflow(configs, {**work["overrides"], "absent_groups": rule}).parser.get_parsed_content("loss")
        assert loss.absent_groups == rule
    wf = workflow(configs, {**work["overrides"], "absent_groups": "skip"})
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("loss")
    assert isinstance(root_error(info.value), ValueError)
    assert "absent_groups must be one of ('ema', 'zero'), got 'skip'" in error_chain(info.value)
