"""MONAI's ``--tracking mlflow`` on both bundles: parameters, metrics and artifacts read back with the MLflow client.

Each bundle trains 2 tiny epochs and evaluates with ``tracking="mlflow"`` (what ``python -m monai.bundle run ...
--tracking mlflow`` passes to ``ConfigWorkflow``), into a local SQLite store ``<output_dir>/mlruns.db``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow  # the mlflow extra, installed by the test command (scripts/setup_env.sh)
import pytest
import torch

from monai_groupdistil.bundle import WorstGroupHandler, run_parameters, track_run
from monai_groupdistil.data import make_synthetic_mnms
from tests.bundle_helpers import Bundle

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

CASES = {
    "cardiac_mri_groupdistil": {"spatial_size": [32, 32], "pixdim": [4.0, 4.0]},
    "waterbirds_groupdistil": {
        "synthetic_images": 24,
        "synthetic_image_size": 32,
        "spatial_size": [32, 32],
        "resize": [36, 36],
    },
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _workflow(bundle: Bundle, configs: list[str], overrides: dict, workflow_type: str):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=configs, meta_file=bundle.meta, workflow_type=workflow_type, tracking="mlflow", **overrides
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module", params=list(CASES))
def tracked(request, tmp_path_factory):
    name = request.param
    bundle = Bundle(name)
    base = tmp_path_factory.mktemp(name)
    if name.startswith("cardiac"):
        make_synthetic_mnms(base / "data", n_subjects=24, seed=1, matrix_scale=0.5, n_frames=4)
    ov = bundle.run_overrides(base, epochs=2, batch_size=4, step_size=5.0, **CASES[name])
    (base / "models").mkdir()
    teacher = bundle.workflow(bundle.configs("train"), ov, initialize=False).parser.get_parsed_content("teacher_def")
    torch.save({"model": teacher.state_dict()}, base / "models" / "teacher.pt")  # a frozen random teacher
    train = _workflow(bundle, bundle.configs("train"), ov, "train")
    _workflow(bundle, bundle.configs("train", "evaluate"), ov, "infer")
    client = mlflow.MlflowClient(f"sqlite:///{base}/eval/mlruns.db")
    experiment = client.get_experiment_by_name(name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    return {
        "name": name,
        "base": base,
        "overrides": ov,
        "client": client,
        "runs": runs,
        "group_names": train.parser.get_parsed_content("group_names"),
        "epoch_length": train.parser.get_parsed_content("train#trainer").state.epoch_length,
    }


def _run(tracked: dict, evaluation: bool):
    [run] = [r for name, r in tracked["runs"].items() if ("_evaluate_" in name) == evaluation]
    return run


def test_training_run_records_parameters_by_name(tracked):
    run = _run(tracked, evaluation=False)
    assert run.info.run_name.startswith("groupdistil_") and run.info.status == "FINISHED"
    params = run.data.params
    expected = {
        "bundle": tracked["name"],
        "method": "groupdistil",
        "seed": "0",
        "epochs": "2",
        "batch_size": "4",
        "dataset_dir": tracked["overrides"]["dataset_dir"],
        "group_names": str(tracked["group_names"]),
        "resume": "False",
        "use_dro": "True",
        "loss": "GroupDistillationLoss",
        "loss.temperature": "4.0",
        "loss.alpha": "0.5",
        "loss.step_size": "5.0",
        "loss.absent_groups": Bundle(tracked["name"]).raw_config("train")["absent_groups"],
        "loss.num_groups": "4",
    }
    assert {k: params.get(k) for k in expected} == expected
    assert int(params["train_samples"]) > 0 and "group_counts" in params
    assert params["torch_num_threads"] == str(torch.get_num_threads()) and params["torch_version"] == torch.__version__


def test_training_run_records_loss_group_accuracies_worst_group_and_dro_weights(tracked):
    client, run = tracked["client"], _run(tracked, evaluation=False)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    assert len(history["train_loss"]) == 2 * tracked["epoch_length"]  # every iteration
    assert all(math.isfinite(m.value) for m in history["train_loss"])
    names = tracked["group_names"]
    for step in (1, 2):  # every validation round
        accuracies = [next(m.value for m in history[f"group_accuracy/{n}"] if m.step == step) for n in names]
        present = [a for a in accuracies if not math.isnan(a)]  # a group without validation samples is NaN
        worst = next(m.value for m in history["worst_group_accuracy"] if m.step == step)
        index = next(m.value for m in history["worst_group_index"] if m.step == step)
        assert present and worst == min(present) and int(index) == accuracies.index(min(present))
    checkpoint = torch.load(Path(tracked["overrides"]["ckpt_dir"]) / "groupdistil_epoch=2.pt", weights_only=True)
    for g, n in enumerate(names):  # the DRO weights at the end of each epoch; the last one is the checkpoint's
        last = max(history[f"dro_weight/{n}"], key=lambda m: m.step)
        assert last.step == 2 and last.value == float(checkpoint["loss"]["group_weights"][g])
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert len(artifacts) == 1 and artifacts[0].startswith("config_") and artifacts[0].endswith(".json")


def test_evaluation_run_records_the_report_files_and_plots(tracked, tmp_path):
    client, run = tracked["client"], _run(tracked, evaluation=True)
    assert run.info.status == "FINISHED" and run.data.params["method"] == "groupdistil"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"group_report.csv", "metrics.json", "group_accuracy.png", "dro_weights.png"} <= names
    report = Path(tracked["overrides"]["output_dir"]) / "groupdistil"
    for file in ("metrics.json", "group_report.csv"):
        local = client.download_artifacts(run.info.run_id, file, str(tmp_path))
        assert Path(local).read_bytes() == (report / file).read_bytes()
    metrics = json.loads((report / "metrics.json").read_text())
    assert run.data.metrics["worst_group_accuracy"] == metrics["worst_group_accuracy"]
    assert tracked["group_names"][int(run.data.metrics["worst_group_index"])] == metrics["worst_group"]


def test_run_parameters_record_each_methods_own_loss_arguments():
    params = run_parameters(torch.nn.CrossEntropyLoss(label_smoothing=0.1), {"method": "erm", "spatial_size": (2, 3)})
    assert params["loss"] == "CrossEntropyLoss" and params["loss.label_smoothing"] == 0.1
    assert params["method"] == "erm" and params["spatial_size"] == [2, 3]
    assert "loss.temperature" not in params


def test_track_run_only_touches_mlflow_handlers_and_repairs_the_config_path(tmp_path):
    from monai.handlers import MLFlowHandler, StatsHandler

    uri = "http://127.0.0.1:9"  # a server URI: the client connects only when it logs, which this test does not
    broken = f"{tmp_path} + '/config_20261202_101010.json'"  # how MONAI 1.6 joins a plain output_dir
    handler, stats = MLFlowHandler(tracking_uri=uri, artifacts=broken), StatsHandler()
    assert track_run([stats, handler], {"seed": 0}, [str(tmp_path / "report")]) == 1
    assert handler.experiment_param == {"seed": 0}
    assert handler.artifacts == (f"{tmp_path}/config_20261202_101010.json", str(tmp_path / "report"))
    assert not hasattr(stats, "experiment_param") and track_run([stats], {"seed": 0}) == 0


def test_worst_group_handler_skips_empty_groups_and_takes_the_first_on_a_tie():
    from types import SimpleNamespace

    handler = WorstGroupHandler(["A", "B", "C"])
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}))
    for values, expected in [((0.5, 0.25, 0.25), 1.0), ((float("nan"), 0.5, 0.75), 1.0), ((1.0, 1.0, 1.0), 0.0)]:
        engine.state.metrics = {f"group_accuracy/{n}": v for n, v in zip("ABC", values)}
        handler(engine)
        assert engine.state.metrics["worst_group_index"] == expected
    engine.state.metrics = {"worst_group_index": 2.0}  # no per-group value this round: no stale index left
    handler(engine)
    assert "worst_group_index" not in engine.state.metrics
    losses = WorstGroupHandler(["A", "B"], metric_prefix="group_loss/", higher_is_better=False)
    engine.state.metrics = {"group_loss/A": 0.1, "group_loss/B": 0.9}
    losses(engine)
    assert engine.state.metrics["worst_group_index"] == 1.0
