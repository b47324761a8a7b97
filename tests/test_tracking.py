"""MONAI's ``--tracking mlflow`` on every bundle: parameters, metrics and artifacts read back with the MLflow client.

Each bundle trains 2 tiny epochs and evaluates with ``tracking="mlflow"`` (what ``python -m monai.bundle run ...
--tracking mlflow`` passes to ``ConfigWorkflow``), into a local SQLite store ``<output_dir>/mlruns.db``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import mlflow  # the mlflow extra, installed by the test command (scripts/setup_env.sh)
import pytest
import torch

from scripts import WorstGroupHandler, run_parameters, track_run
from scripts.tracking import mlflow_request_settings
from tests.bundle_helpers import BUNDLES, TINY, Bundle, error_chain, make_tiny_data, one_thread, random_teacher  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
# per bundle: the key metric and the plot of the per-group report
METRIC = {name: ("dice", "group_dice.png") if "seg" in name else ("accuracy", "group_accuracy.png") for name in BUNDLES}
REQUEST_VARIABLES = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module", autouse=True)
def mlflow_environment():
    """The bundles' runs set MLflow's request variables in this process: start without them, restore them after."""
    with pytest.MonkeyPatch.context() as mp:
        for name in REQUEST_VARIABLES:
            mp.setenv(name, "x")  # recorded, so that the original (set or not) comes back afterwards
            mp.delenv(name)
        yield


def _workflow(bundle: Bundle, configs: list[str], overrides: dict, workflow_type: str):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=configs, meta_file=bundle.meta, workflow_type=workflow_type, tracking="mlflow", **overrides
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module", params=BUNDLES)
def tracked(request, tmp_path_factory):
    name = request.param
    bundle = Bundle(name)
    base = tmp_path_factory.mktemp(name)
    make_tiny_data(name, base / "data")
    ov = bundle.run_overrides(base, **{**TINY[name], "epochs": 2, "step_size": 5.0})
    (base / "models").mkdir()
    random_teacher(bundle, ov)  # a frozen random teacher, where the run reads it
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
        "batch_size": str(TINY[tracked["name"]]["batch_size"]),
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


def test_training_run_records_loss_group_metrics_worst_group_and_dro_weights(tracked):
    client, run = tracked["client"], _run(tracked, evaluation=False)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    iterations = 2 * tracked["epoch_length"]
    assert [m.step for m in sorted(history["loss"], key=lambda m: m.step)] == list(range(1, iterations + 1))
    assert all(math.isfinite(m.value) for m in history["loss"])  # every iteration
    names, metric = tracked["group_names"], METRIC[tracked["name"]][0]
    for step in (1, 2):  # every validation round
        values = [next(m.value for m in history[f"group_{metric}/{n}"] if m.step == step) for n in names]
        present = [a for a in values if not math.isnan(a)]  # a group without validation samples is NaN
        worst = next(m.value for m in history[f"worst_group_{metric}"] if m.step == step)
        index = next(m.value for m in history["worst_group_index"] if m.step == step)
        assert present and worst == min(present) and int(index) == values.index(min(present))
    checkpoint = torch.load(Path(tracked["overrides"]["ckpt_dir"]) / "groupdistil_epoch=2.pt", weights_only=True)
    weights = checkpoint["dro"]["weight_history"]  # the handler's history: the weights after every iteration
    assert weights.shape == (iterations, len(names))
    for g, n in enumerate(names):  # the DRO weights of every iteration; the last one is the checkpoint's
        logged = sorted(history[f"dro_weight/{n}"], key=lambda m: m.step)
        assert [m.step for m in logged] == list(range(1, iterations + 1))
        assert [m.value for m in logged] == pytest.approx(weights[:, g].tolist(), abs=1e-7)
        assert logged[-1].value == pytest.approx(float(checkpoint["loss"]["group_weights"][g]), abs=1e-7)
        assert len(history[f"group_count/{n}"]) == len(history[f"group_loss/{n}"]) == iterations
    assert {m.value for m in history["dro_step_size"]} == {5.0}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert len(artifacts) == 1 and artifacts[0].startswith("config_") and artifacts[0].endswith(".json")


def test_evaluation_run_records_the_report_files_and_plots(tracked, tmp_path):
    client, run = tracked["client"], _run(tracked, evaluation=True)
    assert run.info.status == "FINISHED" and run.data.params["method"] == "groupdistil"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    metric, plot = METRIC[tracked["name"]]
    assert {"group_report.csv", "metrics.json", plot, "dro_weights.png"} <= names
    report = Path(tracked["overrides"]["output_dir"]) / "groupdistil"
    for file in ("metrics.json", "group_report.csv"):
        local = client.download_artifacts(run.info.run_id, file, str(tmp_path))
        assert Path(local).read_bytes() == (report / file).read_bytes()
    metrics = json.loads((report / "metrics.json").read_text())
    assert run.data.metrics[f"worst_group_{metric}"] == pytest.approx(metrics[f"worst_group_{metric}"])
    assert tracked["group_names"][int(run.data.metrics["worst_group_index"])] == metrics["worst_group"]


def test_run_parameters_record_each_methods_own_loss_arguments():
    params = run_parameters(torch.nn.CrossEntropyLoss(label_smoothing=0.1), {"method": "erm", "spatial_size": (2, 3)})
    assert params["loss"] == "CrossEntropyLoss" and params["loss.label_smoothing"] == 0.1
    assert params["method"] == "erm" and params["spatial_size"] == [2, 3]
    assert "loss.temperature" not in params
    splits = {"train": [{}] * 3, "val": [{}], "test": [{}] * 2, "group_names": ["a", "b"], "group_counts": [2, 1]}
    params = run_parameters(torch.nn.CrossEntropyLoss(), {"seed": 1}, splits)
    assert (params["train_samples"], params["val_samples"], params["test_samples"]) == (3, 1, 2)
    assert params["group_names"] == ["a", "b"] and params["group_counts"] == [2, 1] and params["seed"] == 1


def test_loss_parameters_are_the_same_in_every_process_and_include_the_inner_losss():
    """The resume check compares these between the interrupted run and the resuming one, two processes: no memory
    address may enter them; a loss module inside the loss (GroupDROLoss's loss_fn) has its own recorded."""
    import subprocess
    import sys

    code = (
        "import functools, torch, torch.nn.functional as F, monai\n"
        "from scripts.tracking import loss_parameters\n"
        "from monai_groupdistil.losses import GroupDROLoss, PerSampleDiceCELoss\n"
        "print(loss_parameters(GroupDROLoss(functools.partial(F.cross_entropy, reduction='none'), 2)))\n"
        "print(loss_parameters(monai.losses.DiceLoss(other_act=torch.tanh, smooth_nr=1e-5)))\n"
        "print(loss_parameters(GroupDROLoss(PerSampleDiceCELoss(dice_weight=5.0), 2)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "bundles" / "shared")}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
            for _ in range(2)]  # fmt: skip
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and " at 0x" not in runs[0].stdout
    partial, dice, nested = (eval(line) for line in runs[0].stdout.splitlines())  # noqa: S307 (our own output)
    assert partial["loss.loss_fn"] == "partial(torch.nn.functional.cross_entropy, reduction='none')"
    assert dice["loss.other_act"].endswith(".tanh")
    assert nested["loss.loss_fn"] == "PerSampleDiceCELoss" and nested["loss.loss_fn.dice_weight"] == 5.0


def test_track_run_only_touches_mlflow_handlers_and_repairs_the_config_path(tmp_path):
    from monai.handlers import MLFlowHandler, StatsHandler

    uri = "http://127.0.0.1:9"  # a server URI: the client connects only when it logs, which this test does not
    broken = f"{tmp_path} + '/config_20261202_101010.json'"  # how MONAI 1.6 joins a plain output_dir
    handler, stats = MLFlowHandler(tracking_uri=uri, artifacts=broken), StatsHandler()
    assert track_run([stats, handler], {"seed": 0}, [str(tmp_path / "report")]) == 1
    assert handler.experiment_param == {"seed": 0}
    assert handler.artifacts == (f"{tmp_path}/config_20261202_101010.json", str(tmp_path / "report"))
    assert not hasattr(stats, "experiment_param") and track_run([stats], {"seed": 0}) == 0
    from monai_groupdistil.handlers import iteration_scalars

    assert track_run([handler, None], output_transform=iteration_scalars) == 1  # a disabled handler is skipped
    assert handler.output_transform is iteration_scalars and handler.experiment_param == {"seed": 0}


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


@pytest.fixture
def silent_server():
    """The URI of a local TCP server that accepts connections and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])  # held open, never read from or answered
            except socket.timeout:
                continue
            except OSError:
                break

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_a_tracking_server_that_never_answers_fails_the_run_within_the_bounded_wait(silent_server, tmp_path, caplog):
    """A tracking URI that accepts connections but never answers: the run fails after 2 requests of 1 s each (not
    MLflow's 8 of 120 s), with MLflow's error naming the URI; the ids are in the environment and logged."""
    bundle = Bundle("cardiac_mri_groupdistil")
    make_tiny_data(bundle.name, tmp_path / "data")
    ov = bundle.run_overrides(tmp_path, **TINY[bundle.name], epochs=1, teacher_epochs=1)
    ov.update(tracking_uri=silent_server, mlflow_request_timeout=1, mlflow_max_retries=1)
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=bundle.configs("train", "train_teacher"),
        meta_file=bundle.meta,
        workflow_type="train",
        tracking="mlflow",
        **ov,
    )
    wf.initialize()
    wf.parser.get_parsed_content("train#trainer")  # the data are cached here, outside the timed part
    bundle_logger = logging.getLogger("monai_groupdistil.bundle")
    bundle_logger.addHandler(caplog.handler)  # the bundle's logging.conf replaced the root logger's handlers
    start = time.monotonic()
    try:
        with pytest.raises(Exception) as info, caplog.at_level(logging.INFO, logger="monai_groupdistil.bundle"):
            wf.run()
    finally:
        bundle_logger.removeHandler(caplog.handler)
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 15.0, elapsed  # one request and one retry, each given up after 1 s
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    message = error_chain(info.value)
    assert silent_server in message and "timed out" in message.lower(), message
    logged = [r.getMessage() for r in caplog.records if "MLflow requests wait" in r.getMessage()]
    assert logged == [
        "MLflow requests wait at most 1 s and are retried 1 times (bundle ids mlflow_request_timeout, "
        "mlflow_max_retries; exported variables win)"
    ], caplog.text
    assert not (tmp_path / "models" / "teacher.pt").exists()  # it failed at the trainer's start


def _chain(err: BaseException) -> list[BaseException]:
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def test_mlflow_request_settings_keep_what_the_user_exported(monkeypatch):
    """The bundle ids set MLflow's variables; a value exported before wins; a value set by an earlier run is replaced;
    values out of range are refused naming the id."""
    assert mlflow_request_settings(15, 2) == {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    }
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "15" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert mlflow_request_settings(30, 0) == {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # exported by the user
    assert mlflow_request_settings(15, 2)["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert mlflow_request_settings(None, None) == {}
    for timeout, retries, expected in [(0, 2, "mlflow_request_timeout must be"), (1.5, 2, "mlflow_request_timeout")]:
        with pytest.raises(ValueError, match=expected):
            mlflow_request_settings(timeout, retries)
    for retries, expected in [(-1, "mlflow_max_retries must be a whole number >= 0"), (11, "at most 10"), (True, "")]:
        with pytest.raises(ValueError, match=expected):
            mlflow_request_settings(15, retries)


def test_track_run_sets_the_request_settings_only_with_an_mlflow_handler(monkeypatch):
    from monai.handlers import MLFlowHandler, StatsHandler

    for name in REQUEST_VARIABLES[:2]:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    assert track_run([StatsHandler()], request_timeout=7, max_retries=3) == 0
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # no tracking: nothing set
    handler = MLFlowHandler(tracking_uri="http://127.0.0.1:9")
    assert track_run([handler], request_timeout=7, max_retries=3) == 1
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert handler.client.tracking_uri == "http://127.0.0.1:9"  # the client still answers as before
