"""Checkpoints that survive a kill at any instant, resume from the newest usable file, one run per checkpoint folder.

The bundle runs are the cardiac bundle's GroupDistil student on tiny data (32 x 32 slices, a frozen random teacher).
The kill test starts its training processes from a fork server that has imported this module once (a fork of this
threaded test process itself can crash), so that a dozen kills and resumes do not pay a dozen imports of MONAI:
each child is killed with SIGKILL at a random instant 0-80 ms after its validation (around the best-model and
per-epoch writes), and the next one resumes.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from monai_groupdistil.engines import (
    AtomicDiskSaver,
    BestMetricState,
    BestModelSaver,
    atomic_save,
    remove_temporary_files,
)
from monai_groupdistil.engines.checkpoint_saver import temporary_name
from scripts import RunLock, attach_resume, dro_state_file
from tests.bundle_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    TINY,
    Bundle,
    error_chain,
    make_tiny_data,
    one_thread,
    random_teacher,
    root_error,
)

CARDIAC = Bundle("cardiac_mri_groupdistil")
RUN = {**TINY[CARDIAC.name], "step_size": 5.0}
KILLS = 12
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module")
def cardiac(tmp_path_factory):
    base = tmp_path_factory.mktemp("checkpoint_safety")
    make_tiny_data(CARDIAC.name, base / "data")
    common = CARDIAC.run_overrides(base, **RUN)
    teacher = base / "teacher.pt"
    random_teacher(CARDIAC, common, teacher)
    return {"base": base, "common": common, "teacher": teacher}


def _overrides(cardiac: dict, folder: Path, **extra) -> dict:
    folder.mkdir(parents=True)
    (folder / "teacher.pt").symlink_to(cardiac["teacher"])
    return {**cardiac["common"], "ckpt_dir": str(folder), "output_dir": str(folder.parent / "eval"), **extra}


def _train(overrides: dict):
    wf = CARDIAC.workflow(CARDIAC.configs("train"), overrides)
    wf.run()
    wf.finalize()
    return wf


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


class _Records(logging.Handler):
    """The messages of a logger (pytest's caplog misses them: a bundle workflow reconfigures the root logger)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _Records:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _epoch_files(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("groupdistil_epoch=*.pt")), key=lambda n: int(n[18:-3]))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ kills at random instants


def _child(overrides: dict, conn: Any, error_file: str) -> None:
    """A training run that sends to the pipe end ``conn``: ``v`` when a validation has seen its last batch (its
    metrics and the best-model files come next), ``e`` at the end of an epoch just before the per-epoch checkpoint
    is written."""
    try:
        wf = CARDIAC.workflow(CARDIAC.configs("train"), overrides)

        def validated(engine: Engine) -> None:
            if engine.state.iteration == engine.state.epoch_length:
                conn.send_bytes(b"v")

        wf.parser.get_parsed_content("validate#evaluator").add_event_handler(Events.ITERATION_COMPLETED, validated)
        # after the validation handler, before the per-epoch checkpoint (attach_resume adds it when the run starts)
        wf.parser.get_parsed_content("train#trainer").add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: conn.send_bytes(b"e")
        )
        wf.run()
        wf.finalize()
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        os._exit(1)


def _wait_for(conn: Any, signal_byte: bytes) -> bool:
    while conn.poll(300):
        try:
            got = conn.recv_bytes()
        except EOFError:  # the child ended
            return False
        if got == signal_byte:
            return True
    return False


def test_training_killed_at_random_instants_around_the_writes_always_resumes(cardiac, tmp_path):
    """SIGKILL at a random instant 0-60 ms after a validation (when the best model and its DRO state are written) or
    after an epoch's end (when the per-epoch checkpoint is written), in the 1st or 2nd epoch of a run, twelve times,
    each run resuming the killed one: every file on disk loads after every kill (no damaged best model, DRO state
    or per-epoch checkpoint), every resume starts (the stale lock replaced, stray temporary files removed), and a
    last run completes with the newest two checkpoints."""
    folder = tmp_path / "ckpt"
    epochs = 2 * KILLS + 2  # more than the kills can reach: no killed run completes
    ov = _overrides(cardiac, folder, epochs=epochs)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once by the server, not by every child
    rng = random.Random(24)
    error_file = str(tmp_path / "child_error.txt")
    kills, partial_writes, progress = 0, 0, []
    for attempt in range(KILLS):
        read, write = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=({**ov, "resume": attempt > 0}, write, error_file))
        child.start()
        write.close()
        anchor = rng.choice([b"v", b"e"])
        reached = all(_wait_for(read, anchor) for _ in range(rng.randint(1, 2)))
        if reached:
            time.sleep(rng.uniform(0.0, 0.06))
            os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        read.close()
        error = Path(error_file).read_text() if Path(error_file).exists() else ""
        assert reached, f"run {attempt} ended before its kill (exit code {child.exitcode}):\n{error}"
        kills += child.exitcode == -signal.SIGKILL
        partial_writes += any("~groupdistil-tmp~" in p.name for p in folder.iterdir())
        for path in folder.glob("*.pt"):  # every complete file loads: an interrupted write never shows
            if "~groupdistil-tmp~" not in path.name:  # a temporary file (it keeps the suffix) is not a complete one
                _load(path)
        progress.append((anchor.decode(), _epoch_files(folder)[-1:]))
    assert kills >= 10, kills
    final = {**ov, "resume": True}
    wf = _train(final)
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == epochs
    assert _epoch_files(folder) == [f"groupdistil_epoch={epochs - 1}.pt", f"groupdistil_epoch={epochs}.pt"]
    network = wf.parser.get_parsed_content("network")
    assert _load(folder / "model.pt").keys() == network.state_dict().keys()  # the network alone
    assert set(_load(folder / "model_dro_state.pt")) == {"loss", "dro"}
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if "~groupdistil-tmp~" in n or n.endswith(".lock")], names  # strays, lock: gone
    last = _load(folder / f"groupdistil_epoch={epochs}.pt")
    assert last["trainer"]["iteration"] == epochs * last["trainer"]["epoch_length"]
    print(f"{kills} kills, {partial_writes} left a partial write; the newest per-epoch file after each: {progress}")


# ------------------------------------------------------------------ deterministic damage


@pytest.fixture(scope="module")
def uninterrupted(cardiac, tmp_path_factory):
    """Four epochs without interruption: the reference the resumed runs must reproduce."""
    folder = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    _train(_overrides(cardiac, folder, epochs=4))
    return folder


def test_resume_works_after_the_older_checkpoint_was_deleted(cardiac, uninterrupted, tmp_path):
    """The saved list of kept files names the deleted one; the next save must not need it."""
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=2)
    _train(ov)
    assert _epoch_files(folder) == ["groupdistil_epoch=1.pt", "groupdistil_epoch=2.pt"]
    (folder / "groupdistil_epoch=1.pt").unlink()
    _train({**ov, "epochs": 4, "resume": True})
    assert _epoch_files(folder) == ["groupdistil_epoch=3.pt", "groupdistil_epoch=4.pt"]
    assert _same(
        _load(folder / "groupdistil_epoch=4.pt")["model"], _load(uninterrupted / "groupdistil_epoch=4.pt")["model"]
    )
    assert _same(_load(folder / "model.pt"), _load(uninterrupted / "model.pt"))


def test_a_truncated_latest_checkpoint_is_skipped_with_a_warning_and_the_previous_one_used(
    cardiac, uninterrupted, tmp_path
):
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=3)
    _train(ov)
    latest = folder / "groupdistil_epoch=3.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a write cut short
    with _Records("monai_groupdistil.bundle") as log:
        wf = _train({**ov, "epochs": 4, "resume": True})
    skipped = [m for m in log.messages if "skipping" in m]
    assert len(skipped) == 1, log.messages
    assert f"checkpoint '{latest}' cannot be read: the file is damaged" in skipped[0]
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 4  # epochs 3 and 4 trained again from the epoch-2 checkpoint
    for epoch in (3, 4):  # as the uninterrupted run: the fallback is exact
        resumed, reference = (
            _load(folder / f"groupdistil_epoch={epoch}.pt"),
            _load(uninterrupted / f"groupdistil_epoch={epoch}.pt"),
        )
        assert _same(resumed["model"], reference["model"]), epoch
        assert torch.equal(resumed["loss"]["group_weights"], reference["loss"]["group_weights"])


def test_no_usable_checkpoint_is_refused_naming_every_file_and_nothing_is_written(cardiac, tmp_path):
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=2)
    _train(ov)
    (folder / "groupdistil_epoch=2.pt").write_bytes(b"")  # empty
    one = folder / "groupdistil_epoch=1.pt"
    one.write_bytes(one.read_bytes()[:1000])  # truncated
    before = _digest(folder)
    wf = CARDIAC.workflow(CARDIAC.configs("train"), {**ov, "epochs": 3, "resume": True})
    with pytest.raises(Exception) as info:
        wf.run()
    assert isinstance(root_error(info.value), ValueError)
    message = error_chain(info.value)
    assert f"none of the 2 checkpoint(s) groupdistil_epoch=<N>.pt in '{folder}' is usable" in message
    for path in (folder / "groupdistil_epoch=2.pt", one):
        assert f"checkpoint '{path}' cannot be read: the file is damaged" in message
    assert "Nothing was loaded or written." in message
    assert _digest(folder) == before  # byte for byte; the run lock was released


def test_stray_temporary_files_are_removed_at_the_next_start_and_nobody_elses(cardiac, tmp_path):
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stray = folder / f".model.pt~groupdistil-tmp~{socket.gethostname()}~{dead.pid}"
    stray.write_bytes(b"half a model")
    live = subprocess.Popen(["sleep", "60"])
    try:
        in_progress = folder / f".kd.pt~groupdistil-tmp~{socket.gethostname()}~{live.pid}"
        in_progress.write_bytes(b"being written")
        foreign = [folder / "tmpabc123", folder / "notes.txt", folder / ".model.pt.tmp"]
        for path in foreign:
            path.write_bytes(b"someone else's")
        _train(ov)
        assert not stray.exists() and in_progress.exists() and all(p.exists() for p in foreign)
    finally:
        live.kill()
        live.wait()
    assert remove_temporary_files(folder) == [in_progress]  # its writer is gone now


# ------------------------------------------------------------------ one run per folder


def _lock_text(pid: int, since: str = "2026-12-06 10:00:00 UTC") -> str:
    return f'{{"pid": {pid}, "host": "{socket.gethostname()}", "since": "{since}", "command": "train.json"}}'


def test_a_folder_in_use_by_a_live_run_is_refused_at_start(cardiac, tmp_path):
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=1)
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock = folder / "groupdistil.lock"
        lock.write_text(_lock_text(other.pid))
        before = _digest(folder)
        wf = CARDIAC.workflow(CARDIAC.configs("train"), ov)
        with pytest.raises(Exception) as info:
            wf.run()
        assert isinstance(root_error(info.value), RuntimeError)
        message = str(root_error(info.value))
        assert f"the checkpoint folder '{folder}' is in use by another run: process {other.pid} on host " in message
        assert f"{socket.gethostname()}, since 2026-12-06 10:00:00 UTC (train.json)" in message
        assert "another ckpt_dir" in message and f"delete '{lock}'" in message
        assert _digest(folder) == before  # the other run's lock and files untouched, nothing written
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_of_a_killed_run_is_replaced_with_a_warning_and_released_at_the_end(cardiac, tmp_path):
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / "groupdistil.lock").write_text(_lock_text(dead.pid))
    with _Records("monai_groupdistil.bundle") as log:
        _train(ov)
    warnings = [m for m in log.messages if "replacing the lock" in m]
    assert len(warnings) == 1 and f"pid {dead.pid}" in warnings[0] and "is not running" in warnings[0]
    assert (folder / "groupdistil_epoch=1.pt").is_file() and not (folder / "groupdistil.lock").exists()


def test_run_lock_is_exclusive_and_released_by_its_owner_only(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RuntimeError, match="is in use by another run"):
        # this process's own pid counts as a run that ended without releasing; another live pid does not
        other = subprocess.Popen(["sleep", "60"])
        try:
            (tmp_path / "groupdistil.lock").write_text(_lock_text(other.pid))
            RunLock(tmp_path).acquire()
        finally:
            other.kill()
            other.wait()
    first.release()  # the file is not its own any more: left alone
    assert (tmp_path / "groupdistil.lock").exists()
    (tmp_path / "groupdistil.lock").unlink()
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / "groupdistil.lock").is_file()
    assert not (tmp_path / "groupdistil.lock").exists()


def test_attach_resume_releases_the_lock_when_training_completes(tmp_path):
    trainer = Engine(lambda engine, batch: None)
    net = torch.nn.Linear(2, 2)
    checkpoint = Checkpoint(
        {"model": net, "trainer": trainer},
        AtomicDiskSaver(tmp_path, require_empty=False),
        filename_prefix="run",
        n_saved=2,
        global_step_transform=lambda engine, _: engine.state.epoch,
        filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
        include_self=True,
    )
    attach_resume(trainer, checkpoint)
    assert (tmp_path / "groupdistil.lock").is_file()
    trainer.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_epoch=2.pt", "run_epoch=3.pt"]


# ------------------------------------------------------------------ the savers


def test_atomic_save_replaces_the_file_and_leaves_hard_links_alone(tmp_path):
    target, link = tmp_path / "model.pt", tmp_path / "copy.pt"
    atomic_save({"w": torch.zeros(2)}, target)
    os.link(target, link)
    atomic_save({"w": torch.ones(2)}, target)
    assert torch.equal(_load(target)["w"], torch.ones(2)) and torch.equal(_load(link)["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir() if "~" in p.name] == []
    assert temporary_name(target).name.startswith(".model.pt~groupdistil-tmp~")
    with pytest.raises(OSError, match=r"could not write checkpoint '.*missing/model.pt'"):
        atomic_save({"w": torch.ones(2)}, tmp_path / "missing" / "model.pt")


def test_atomic_disk_saver_removes_a_dropped_file_only_after_the_next_write(tmp_path):
    saver = AtomicDiskSaver(tmp_path, require_empty=False)
    saver({"a": torch.zeros(1)}, "x_epoch=1.pt")
    saver.remove("x_epoch=1.pt")  # what Checkpoint does before it saves the next file
    assert (tmp_path / "x_epoch=1.pt").is_file()  # a kill now would leave it
    saver({"a": torch.ones(1)}, "x_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_epoch=2.pt"]
    saver.remove("gone.pt")  # deleted by hand meanwhile: no error
    saver({"a": torch.ones(1)}, "x_epoch=3.pt")


def test_atomic_disk_saver_keeps_a_dropped_file_noted_when_the_next_write_fails(tmp_path):
    saver = AtomicDiskSaver(tmp_path, require_empty=False)
    saver({"a": torch.zeros(1)}, "x_epoch=1.pt")
    saver.remove("x_epoch=1.pt")
    with pytest.raises(Exception, match="lambda"):  # torch.save cannot pickle a lambda
        saver({"a": lambda: 0}, "x_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_epoch=1.pt"]  # the only model, and no temporary file
    saver({"a": torch.ones(1)}, "x_epoch=3.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_epoch=3.pt"]  # removed once a file was written


def _evaluator(scores: list[float]) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.best_metric, engine.state.best_metric_epoch = -1, -1
    values = iter(scores)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: e.state.metrics.update(acc=next(values)))
    return engine


def test_best_model_saver_writes_the_network_alone_and_its_dro_state_and_only_a_strictly_better_finite_model(
    tmp_path, caplog
):
    from monai_groupdistil.handlers import GroupDROHandler
    from monai_groupdistil.losses import GroupDROLoss

    net = torch.nn.Linear(2, 2)
    loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups=2)
    dro = GroupDROHandler(loss, group_names=["a", "b"])
    saver = BestModelSaver(tmp_path, net, "model.pt", dro_state={"loss": loss, "dro": dro}, key_metric_name="acc")
    engine = _evaluator([0.5, 0.5, float("nan"), 0.5, 0.75, 0.9])
    saver.attach(engine)
    saved = []

    def record(e: Engine) -> None:
        saved.append(_load(tmp_path / "model.pt")["weight"].clone())

    engine.add_event_handler(Events.EPOCH_COMPLETED, record)
    with torch.no_grad():
        net.weight.fill_(1.0)
    engine.run([0], max_epochs=2)  # 0.5, then an equal 0.5: the first model is kept
    with torch.no_grad():
        net.weight.fill_(2.0)
    engine.run([0], max_epochs=4)  # NaN, 0.5: not better
    assert all(torch.equal(w, torch.ones(2, 2)) for w in saved)
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    with caplog.at_level(logging.WARNING):
        engine.run([0], max_epochs=5)  # 0.75 is better, but the network is not finite
    assert torch.equal(_load(tmp_path / "model.pt")["weight"], torch.ones(2, 2))
    assert any("not saving" in r.getMessage() and "NaN or infinite" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        net.weight.fill_(3.0)
    engine.run([0], max_epochs=6)  # 0.9
    assert torch.equal(_load(tmp_path / "model.pt")["weight"], torch.full((2, 2), 3.0))
    assert set(_load(tmp_path / "model.pt")) == {"weight", "bias"}
    assert set(_load(tmp_path / "model_dro_state.pt")) == {"loss", "dro"}
    assert saver.state_dict()["_saved"][0][0] == pytest.approx(0.9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_dro_state.pt"]


def test_a_failed_best_model_write_does_not_stand_as_the_best_score(tmp_path, monkeypatch):
    """The model file's write fails (a full disk) after its DRO state was written: the error propagates, and the
    next model better than the one on disk is saved, both files, although it is worse than the failed one."""
    from monai_groupdistil.engines import checkpoint_saver
    from monai_groupdistil.losses import GroupDROLoss

    net = torch.nn.Linear(2, 2)
    loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups=2)
    saver = BestModelSaver(tmp_path, net, "model.pt", dro_state={"loss": loss}, key_metric_name="acc")
    engine = _evaluator([0.5, 0.9])
    saver.attach(engine)
    with torch.no_grad():
        net.weight.fill_(1.0)
    engine.run([0], max_epochs=1)  # 0.5: saved
    real_save = checkpoint_saver.atomic_save

    def full_disk(obj, path):
        if Path(path).name == "model.pt":
            raise OSError("No space left on device")
        return real_save(obj, path)

    monkeypatch.setattr(checkpoint_saver, "atomic_save", full_disk)
    with torch.no_grad():
        net.weight.fill_(2.0)
        loss.group_weights.copy_(torch.tensor([0.9, 0.1]))
    with pytest.raises(OSError, match="No space left"):
        engine.run([0], max_epochs=2)  # 0.9: the model's write fails
    assert torch.equal(_load(tmp_path / "model.pt")["weight"], torch.ones(2, 2))
    assert saver.state_dict()["_saved"][0][0] == pytest.approx(0.5)  # the score of the files on disk
    monkeypatch.setattr(checkpoint_saver, "atomic_save", real_save)
    with torch.no_grad():
        net.weight.fill_(3.0)
        loss.group_weights.copy_(torch.tensor([0.3, 0.7]))
    engine = _evaluator([0.7])  # the next validation round (ignite does not continue a run that raised)
    saver.attach(engine)
    engine.run([0], max_epochs=1)  # 0.7: better than 0.5 on disk
    assert torch.equal(_load(tmp_path / "model.pt")["weight"], torch.full((2, 2), 3.0))
    assert torch.equal(_load(tmp_path / "model_dro_state.pt")["group_weights"], torch.tensor([0.3, 0.7]))  # one object
    assert saver.state_dict()["_saved"][0][0] == pytest.approx(0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_dro_state.pt"]


def test_best_metric_state_restores_the_best_model_saver(tmp_path):
    net = torch.nn.Linear(1, 1)
    (tmp_path / "model.pt").write_bytes(b"the best model of before the interruption")
    engine = _evaluator([0.75])
    saver = BestModelSaver(tmp_path, net, "model.pt", key_metric_name="acc")
    saver.attach(engine)
    BestMetricState(engine, saver, "model.pt").load_state_dict({"best_metric": 0.75, "best_metric_epoch": 2})
    engine.run([0], max_epochs=1)
    assert (tmp_path / "model.pt").read_bytes() == b"the best model of before the interruption"  # equal: kept
    engine = _evaluator([0.8])
    saver = BestModelSaver(tmp_path, net, "model.pt", key_metric_name="acc")
    saver.attach(engine)
    BestMetricState(engine, saver, "model.pt").load_state_dict({"best_metric": 0.75, "best_metric_epoch": 2})
    engine.run([0], max_epochs=1)
    assert set(_load(tmp_path / "model.pt")) == {"weight", "bias"}


# ------------------------------------------------------------------ files of the earlier layout


def test_evaluation_reads_a_best_model_file_of_the_earlier_layout(cardiac, tmp_path):
    """A ``model.pt`` holding ``{"model", "loss", "dro"}`` (before the DRO state had its own file) still evaluates,
    with its DRO weights restored."""
    folder = tmp_path / "ckpt"
    ov = _overrides(cardiac, folder, epochs=1)
    _train(ov)
    dro_state = _load(folder / "model_dro_state.pt")
    torch.save({"model": _load(folder / "model.pt"), **dro_state}, folder / "model.pt")
    (folder / "model_dro_state.pt").unlink()
    assert dro_state_file(folder / "model.pt") == str(folder / "model.pt")
    ev = CARDIAC.workflow(CARDIAC.configs("train", "evaluate"), ov, workflow_type="infer")
    ev.run()
    ev.finalize()
    assert torch.equal(ev.parser.get_parsed_content("loss").group_weights, dro_state["loss"]["group_weights"])
    (folder / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model_dro_state.pt' not found: the DRO state") as info:
        dro_state_file(folder / "model.pt")
    # e.g. evaluate.json with --method kd instead of kd.json: the loss is still GroupDistil's
    assert "evaluate it with its own config merged after train.json (e.g. configs/kd.json)" in str(info.value)
    (folder / "model_dro_state.pt").write_bytes(b"cut")
    with pytest.raises(ValueError, match=r"DRO-state file '.*model_dro_state.pt' cannot be read: the file is damaged"):
        dro_state_file(folder / "model.pt")
