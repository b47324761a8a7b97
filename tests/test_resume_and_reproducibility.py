"""Exact resume of a killed bundle training run, refusal of foreign checkpoints, and run-to-run reproducibility.

The cardiac runs go through the command line as a user's would (tiny generated data, 32x32 slices, 3 epochs):
two identical runs (reproducibility), and one killed with SIGKILL once its epoch-1 checkpoint exists, then
restarted with ``--resume True`` (resume). The other bundles are resumed in-process.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monai_groupdistil.data.waterbirds import WATERBIRDS_GROUP_NAMES
from monai_groupdistil.engines.resume_state import RandomStates
from scripts import RunSettings, check_resume_checkpoint, latest_checkpoint, make_synthetic_mnms
from tests.bundle_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    ENV,
    TINY,
    Bundle,
    cli_args,
    error_chain,
    make_tiny_data,
    one_thread,
    random_teacher,
    report_rows,
    root_error,
)

CARDIAC = Bundle("cardiac_mri_groupdistil")
CARDIAC_RUN = {"epochs": 3, "spatial_size": [32, 32], "pixdim": [4.0, 4.0], "batch_size": 4, "step_size": 5.0}
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


def _folder(base: Path, name: str, teacher: Path) -> Path:
    folder = base / name
    folder.mkdir()
    (folder / teacher.name).symlink_to(teacher)  # the name the run's teacher_method reads
    return folder


def _train_command(overrides: dict) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(CARDIAC.configs("train"))]
    return cmd + ["--meta_file", CARDIAC.meta, *cli_args(overrides)]


def _evaluate(bundle: Bundle, overrides: dict) -> Path:
    wf = bundle.workflow(bundle.configs("train", "evaluate"), overrides, workflow_type="infer")
    wf.run()
    wf.finalize()
    return Path(overrides["output_dir"]) / "groupdistil"


@pytest.fixture(scope="module")
def cardiac(tmp_path_factory):
    """Runs A and B (the same command), and C (killed after its first epoch checkpoint, then resumed)."""
    base = tmp_path_factory.mktemp("cardiac_ops")
    make_synthetic_mnms(base / "data", n_subjects=24, seed=1, matrix_scale=0.5, n_frames=4)
    common = CARDIAC.run_overrides(base, **CARDIAC_RUN)
    teacher = base / "teacher.pt"
    random_teacher(CARDIAC, common, teacher)
    runs = {}
    for name in ("A", "B"):
        ov = {**common, "ckpt_dir": str(_folder(base, name, teacher)), "output_dir": str(base / f"eval_{name}")}
        out = subprocess.run(_train_command(ov), capture_output=True, text=True, timeout=600, env=ENV, cwd=CARDIAC.root)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = {"overrides": ov, "report": _evaluate(CARDIAC, ov)}
    ov = {**common, "ckpt_dir": str(_folder(base, "C", teacher)), "output_dir": str(base / "eval_C")}
    first = Path(ov["ckpt_dir"]) / "groupdistil_epoch=1.pt"
    with open(base / "C.log", "w") as log:
        proc = subprocess.Popen(_train_command(ov), stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=CARDIAC.root)
        deadline = time.monotonic() + 600
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    killed_at = sorted(p.name for p in Path(ov["ckpt_dir"]).glob("groupdistil_epoch=*.pt"))
    resumed = subprocess.run(
        _train_command({**ov, "resume": True}), capture_output=True, text=True, timeout=600, env=ENV, cwd=CARDIAC.root
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs["C"] = {"overrides": ov, "returncode": proc.returncode, "killed_at": killed_at, "log": resumed.stdout}
    return {"base": base, "common": common, "teacher": teacher, "runs": runs}


def _load(folder: str | Path, name: str) -> dict:
    return torch.load(Path(folder) / name, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(cardiac):
    c, a = cardiac["runs"]["C"], cardiac["runs"]["A"]
    assert c["returncode"] == -signal.SIGKILL  # killed, not finished
    assert "groupdistil_epoch=3.pt" not in c["killed_at"] and "groupdistil_epoch=1.pt" in c["killed_at"]
    assert "resuming from" in c["log"] and "groupdistil_epoch=" in c["log"]
    # the last epoch, and the best model the run selected (the network alone, its DRO state beside it)
    for name in ("groupdistil_epoch=3.pt", "model_dro_state.pt"):
        resumed, uninterrupted = _load(c["overrides"]["ckpt_dir"], name), _load(a["overrides"]["ckpt_dir"], name)
        _assert_same_tensors(resumed["loss"], uninterrupted["loss"])  # DRO weights, running losses
        assert torch.equal(resumed["dro"]["weight_history"], uninterrupted["dro"]["weight_history"])
    last_c, last_a = (
        _load(c["overrides"]["ckpt_dir"], "groupdistil_epoch=3.pt"),
        _load(a["overrides"]["ckpt_dir"], "groupdistil_epoch=3.pt"),
    )
    _assert_same_tensors(last_c["model"], last_a["model"])
    _assert_same_tensors(_load(c["overrides"]["ckpt_dir"], "model.pt"), _load(a["overrides"]["ckpt_dir"], "model.pt"))
    last = _load(c["overrides"]["ckpt_dir"], "groupdistil_epoch=3.pt")
    assert last["trainer"]["iteration"] == 3 * last["trainer"]["epoch_length"]
    assert not torch.allclose(last["loss"]["group_weights"], torch.full((4,), 0.25))  # the weights moved
    assert last["dro"]["weight_history"].shape[0] == last["trainer"]["iteration"]  # no iteration lost or repeated
    kept = sorted(p.name for p in Path(c["overrides"]["ckpt_dir"]).glob("groupdistil_epoch=*.pt"))
    assert kept == ["groupdistil_epoch=2.pt", "groupdistil_epoch=3.pt"]  # the two latest, the older ones removed


def test_the_same_command_gives_the_same_report_twice(cardiac):
    a, b = cardiac["runs"]["A"], cardiac["runs"]["B"]
    metrics_a = json.loads((a["report"] / "metrics.json").read_text())
    metrics_b = json.loads((b["report"] / "metrics.json").read_text())
    assert metrics_a == metrics_b and metrics_a["samples"] > 0
    assert report_rows(a["report"]) == report_rows(b["report"])
    for name in ("model_dro_state.pt", "groupdistil_epoch=3.pt"):
        ckpt_a, ckpt_b = _load(a["overrides"]["ckpt_dir"], name), _load(b["overrides"]["ckpt_dir"], name)
        assert torch.equal(ckpt_a["loss"]["group_weights"], ckpt_b["loss"]["group_weights"])
    _assert_same_tensors(_load(a["overrides"]["ckpt_dir"], "model.pt"), _load(b["overrides"]["ckpt_dir"], "model.pt"))
    last_a = _load(a["overrides"]["ckpt_dir"], "groupdistil_epoch=3.pt")
    _assert_same_tensors(last_a["model"], _load(b["overrides"]["ckpt_dir"], "groupdistil_epoch=3.pt")["model"])


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"group_by": "centre"}, ["settings: group_names is ['A', 'B', 'C', 'D'] in the checkpoint", "loss: "]),
        (
            {"network_def#block_inplanes": [8, 16, 32, 64]},
            ["model: conv1.weight: checkpoint (16, 1, 7, 7) vs network (8, 1, 7, 7)"],
        ),
        ({"absent_groups": "ema"}, ["loss: ", "absent_groups"]),  # the bundle's default is "zero"
        # hyper-parameters that no tensor shape reveals: a resumed run would silently differ from the interrupted one
        # (the optimizer's saved state would even replace the run's weight decay and learning rate)
        ({"alpha": 0.9}, ["hyper_parameters: loss.alpha is 0.5 in the checkpoint, 0.9 in this run"]),
        ({"weight_decay": 0.5}, ["hyper_parameters: weight_decay is 0.0 in the checkpoint, 0.5 in this run"]),
        ({"learning_rate": 0.01}, ["hyper_parameters: learning_rate is 0.001 in the checkpoint, 0.01 in this run"]),
        ({"balanced_sampling": False}, ["hyper_parameters: balanced_sampling is True in the checkpoint, False"]),
        ({"dro_warmup": 5}, ["hyper_parameters: dro_warmup is 0 in the checkpoint, 5 in this run"]),
    ],
)
def test_a_checkpoint_of_another_configuration_is_refused_and_left_as_it_was(cardiac, tmp_path, override, expected):
    message = _refused_resume(cardiac, tmp_path, override)
    for text in expected:
        assert text in message, text


def test_a_checkpoint_distilled_from_another_teacher_is_refused(cardiac, tmp_path):
    teacher = torch.load(cardiac["teacher"], map_location="cpu", weights_only=True)
    first = next(iter(teacher["model"]))
    teacher["model"][first] = teacher["model"][first] + 0.01  # the same architecture, other weights
    other = tmp_path / "other_teacher.pt"
    torch.save(teacher, other)
    message = _refused_resume(cardiac, tmp_path, {"teacher_ckpt": str(other)})
    was, now = (hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (cardiac["teacher"], other))
    assert f"hyper_parameters: teacher is '{was}' in the checkpoint, '{now}' in this run" in message


def _refused_resume(cardiac, tmp_path: Path, override: dict) -> str:
    """Resume a copy of run A's checkpoints with ``override``: it must be refused, leaving every file as it was."""
    source = Path(cardiac["runs"]["A"]["overrides"]["ckpt_dir"])
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    before = _digest(folder)
    ov = {**cardiac["runs"]["A"]["overrides"], "ckpt_dir": str(folder), "output_dir": str(tmp_path / "eval")}
    wf = CARDIAC.workflow(CARDIAC.configs("train"), {**ov, **override, "resume": True})
    with pytest.raises(Exception) as info:
        wf.run()
    assert isinstance(root_error(info.value), ValueError)
    message = error_chain(info.value)
    assert f"cannot resume from '{folder}/groupdistil_epoch=3.pt': it was written by another configuration" in message
    assert "Nothing was loaded or written." in message
    assert _digest(folder) == before  # byte for byte, no file added or removed
    return message


def test_resume_without_a_checkpoint_starts_from_epoch_zero_and_a_fresh_run_replaces_old_checkpoints(cardiac, tmp_path):
    ov = {
        **cardiac["common"],
        "ckpt_dir": str(_folder(tmp_path, "ckpt", cardiac["teacher"])),
        "output_dir": str(tmp_path / "eval"),
        "epochs": 1,
    }
    stale = Path(ov["ckpt_dir"]) / "groupdistil_epoch=7.pt"
    stale.write_bytes(b"left by an earlier run")
    (Path(ov["ckpt_dir"]) / "kd_epoch=7.pt").write_bytes(b"another method's")
    wf = CARDIAC.workflow(CARDIAC.configs("train"), ov)  # resume false: a new run
    wf.run()
    wf.finalize()
    names = sorted(p.name for p in Path(ov["ckpt_dir"]).iterdir())
    assert names == ["groupdistil_epoch=1.pt", "kd_epoch=7.pt", "model.pt", "model_dro_state.pt", "teacher.pt"]
    empty = _folder(tmp_path, "empty", cardiac["teacher"])
    wf = CARDIAC.workflow(CARDIAC.configs("train"), {**ov, "ckpt_dir": str(empty), "resume": True})
    wf.run()
    wf.finalize()
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 1
    first = _load(empty, "groupdistil_epoch=1.pt")
    _assert_same_tensors(first["model"], _load(ov["ckpt_dir"], "groupdistil_epoch=1.pt")["model"])


SETTINGS = {
    "waterbirds_groupdistil": ("classes", ["landbird", "waterbird"], list(WATERBIRDS_GROUP_NAMES)),
    "cardiac_mri_seg_groupdistil": ("structures", ["LV", "MYO", "RV"], ["A", "B", "C", "D"]),
}


@pytest.mark.parametrize(
    "name, method, extra",
    [
        ("waterbirds_groupdistil", "groupdistil", {}),  # the student
        ("waterbirds_groupdistil", "group_dro", {"balanced_sampling": True}),  # a baseline, the sampler
        ("waterbirds_groupdistil", "erm", {}),
        ("cardiac_mri_seg_groupdistil", "groupdistil", {}),  # slices, per-slice augmentation
    ],
)
def test_resumes_exactly_in_process(tmp_path, name, method, extra):
    bundle = Bundle(name)
    make_tiny_data(name, tmp_path / "data")
    common = bundle.run_overrides(tmp_path, **{**TINY[name], "step_size": 5.0, "epochs": 2, **extra})
    configs = bundle.configs("train") if method == "groupdistil" else bundle.configs("train", method)
    teacher = random_teacher(bundle, {**common, "ckpt_dir": str(tmp_path)})  # teacher.pt or teacher_group_dro.pt
    whole = {**common, "ckpt_dir": str(_folder(tmp_path, "whole", teacher))}
    parts = {**common, "ckpt_dir": str(_folder(tmp_path, "parts", teacher))}
    for ov in (whole, {**parts, "epochs": 1}, {**parts, "resume": True}):
        wf = bundle.workflow(configs, ov)
        wf.run()
        wf.finalize()
    last, best = f"{method}_epoch=2.pt", "model.pt" if method == "groupdistil" else f"{method}.pt"
    _assert_same_tensors(_load(whole["ckpt_dir"], best), _load(parts["ckpt_dir"], best))  # the network alone
    for file in (last, best.replace(".pt", "_dro_state.pt")) if method != "erm" else (last,):
        a, b = _load(whole["ckpt_dir"], file), _load(parts["ckpt_dir"], file)
        _assert_same_tensors(a["loss"], b["loss"])  # the DRO state of groupdistil and group_dro
    a, b = _load(whole["ckpt_dir"], last), _load(parts["ckpt_dir"], last)
    _assert_same_tensors(a["model"], b["model"])
    a, b = _load(whole["ckpt_dir"], last), _load(parts["ckpt_dir"], last)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    assert ("dro" in a) == (method != "erm") and a["trainer"]["iteration"] == 2 * a["trainer"]["epoch_length"]
    if "dro" in a:  # the handler's history goes on where it stopped
        assert torch.equal(a["dro"]["weight_history"], b["dro"]["weight_history"])
        assert b["dro"]["weight_history"].shape[0] == b["trainer"]["iteration"]
    assert len(b["random_states"]["ranks"][0]["transforms"]) > 0  # the random crops', flips' or affines' states
    key, values, groups = SETTINGS[name]
    assert b["settings"] == {"method": method, key: values, "group_names": groups}


def test_check_resume_checkpoint_names_the_differences_of_its_parts(tmp_path):
    net = torch.nn.Linear(3, 2)
    settings = RunSettings({"method": "kd", "group_names": ["a", "b"]})
    torch.save({"model": net.state_dict(), "settings": settings.state_dict()}, tmp_path / "kd_epoch=4.pt")
    torch.save({"model": net.state_dict()}, tmp_path / "kd_epoch=10.pt")
    assert latest_checkpoint(tmp_path, "kd").name == "kd_epoch=10.pt"  # by number, not by name
    assert latest_checkpoint(tmp_path, "groupdistil") is None
    check_resume_checkpoint(tmp_path / "kd_epoch=4.pt", {"model": torch.nn.Linear(3, 2), "settings": settings})
    other = RunSettings({"method": "kd", "group_names": ["a", "b", "c"]})
    with pytest.raises(ValueError) as info:
        check_resume_checkpoint(tmp_path / "kd_epoch=4.pt", {"model": torch.nn.Linear(4, 2), "settings": other})
    message = str(info.value)
    assert "model: weight: checkpoint (2, 3) vs network (2, 4)" in message
    assert "settings: group_names is ['a', 'b'] in the checkpoint, ['a', 'b', 'c'] in this run" in message
    with pytest.raises(ValueError, match=r"the checkpoint has no \['settings'\]"):
        check_resume_checkpoint(tmp_path / "kd_epoch=10.pt", {"model": net, "settings": settings})


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    transform = Compose([RandFlipd("image", prob=0.5), RandGaussianNoised("image", prob=0.5)])
    transform.set_random_state(3)
    states = RandomStates([transform])
    torch.save({"random_states": states.state_dict()}, tmp_path / "s.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1), transform.transforms[1].R.rand())
    random.random(), np.random.rand(), torch.rand(3), transform.transforms[1].R.rand(5)  # move every generator on
    states.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["random_states"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert transform.transforms[1].R.rand() == expected[3]
    fewer = RandomStates([Compose([RandFlipd("image", prob=0.5)])])
    with pytest.raises(ValueError, match=r"random states of 4 randomizable transform\(s\) .* in the checkpoint, 2"):
        fewer.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["random_states"])


def test_best_metric_state_keeps_a_resumed_run_from_replacing_a_better_best_model(tmp_path):
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver

    from monai_groupdistil.engines.resume_state import BestMetricState

    def evaluator_with(score: float):
        engine = Engine(lambda e, b: None)
        engine.state.best_metric, engine.state.best_metric_epoch = -1, -1
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(acc=score))
        saver = CheckpointSaver(
            str(tmp_path),
            {"model": torch.nn.Linear(1, 1)},
            save_key_metric=True,
            key_metric_name="acc",
            key_metric_filename="model.pt",
            key_metric_greater_or_equal=True,
        )
        saver.attach(engine)
        return engine, saver

    (tmp_path / "model.pt").write_bytes(b"the best model of before the interruption")
    engine, saver = evaluator_with(0.5)
    BestMetricState(engine, saver, "model.pt").load_state_dict({"best_metric": 0.75, "best_metric_epoch": 2})
    assert (engine.state.best_metric, engine.state.best_metric_epoch) == (0.75, 2)
    engine.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").read_bytes() == b"the best model of before the interruption"  # 0.5 < 0.75
    engine, saver = evaluator_with(0.75)
    BestMetricState(engine, saver, "model.pt").load_state_dict({"best_metric": 0.75, "best_metric_epoch": 2})
    engine.run([0], max_epochs=1)
    assert "weight" in torch.load(tmp_path / "model.pt", weights_only=True)  # an equal score replaces it (>=)
    assert BestMetricState(engine).state_dict() == {"best_metric": 0.75, "best_metric_epoch": 2}
