"""GroupDROHandler and GroupAccuracyHandler on real ignite engines: logged values, warm-up and schedules through
ParamSchedulerHandler, checkpoint save/load/resume, model selection, and a two-process run."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.handlers import (
    CheckpointLoader,
    CheckpointSaver,
    ParamSchedulerHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from torch.utils.data import DataLoader

from monai_groupdistil.engines import DistillationTrainer
from monai_groupdistil.handlers import GroupAccuracyHandler, GroupDROHandler, GroupReportHandler, iteration_scalars
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss
from monai_groupdistil.metrics import compute_group_accuracy
from tests.distributed_helpers import exit_worker, init_gloo

G = 3
NAMES = ["siemens", "philips", "ge"]
T, ALPHA, ETA = 2.0, 0.5, 0.5


def make_data(n: int = 36, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    g = torch.randint(0, G, (n,), generator=gen)
    y = ((x[:, 0] + 0.3 * g) > 0.2).long()
    return [{"image": x[i], "label": y[i], "group": g[i]} for i in range(n)]


def make_teacher() -> torch.nn.Module:
    teacher = torch.nn.Linear(8, 2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[-2.0] + [0.0] * 7, [2.0] + [0.0] * 7]))
        teacher.bias.zero_()
    return teacher


def make_student(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def build(max_epochs: int, handlers=(), warmup: int = 0, schedule=None, num_groups: int = G, seed: int = 3):
    student = make_student(seed)
    loss = GroupDistillationLoss(num_groups, temperature=T, alpha=ALPHA, step_size=ETA)
    names = NAMES if num_groups == G else None
    dro = GroupDROHandler(loss, group_names=names)
    if warmup or schedule is not None:  # step size 0 during the warm-up, then schedule(iteration) or ETA

        def step_size(current_step: int) -> float:
            if current_step <= warmup:
                return 0.0
            return ETA if schedule is None else schedule(current_step)

        setter = lambda value: setattr(loss, "step_size", value)  # noqa: E731
        handlers = [ParamSchedulerHandler(setter, step_size, {}, event=Events.ITERATION_STARTED), *handlers]
    opt = torch.optim.Adam(student.parameters(), 0.01)
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(make_data(), batch_size=9),
        network=student,
        optimizer=opt,
        loss_function=loss,
        teacher=make_teacher(),
        train_handlers=[dro, *handlers],
    )
    return trainer, student, opt, loss, dro


def hand_dro(captured: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Independent group-DRO replay (FACTS sections 1 and 2) on the captured batches: (weights, group losses)."""
    q = torch.full((G,), 1.0 / G, dtype=torch.float64)
    out = []
    for c in captured:
        s, t, y, g = c["pred"].double(), c["teacher_pred"].double(), c["label"], c["group"]
        kd = T**2 * (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1)
        per_sample = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s, y, reduction="none")
        losses = torch.zeros(G, dtype=torch.float64)
        for k in range(G):
            if (g == k).any():
                losses[k] = per_sample[g == k].mean()
        q = q * torch.exp(ETA * losses)
        q = q / q.sum()
        out.append((q.clone(), losses))
    return out


def test_logged_weights_equal_the_loss_module_and_the_hand_computation(capsys):
    trainer, _, _, loss, dro = build(2)
    captured, logged = [], []
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED,
        lambda e: captured.append(
            {k: e.state.output[k].detach().clone() for k in ("pred", "teacher_pred", "label", "group")}
        ),
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(iteration_scalars(e.state.output)))
    StatsHandler(name="dro_stats", output_transform=iteration_scalars).attach(trainer)
    trainer.run()
    assert len(logged) == 8
    replay = GroupDistillationLoss(G, temperature=T, alpha=ALPHA, step_size=ETA)
    for c, m, (q_hand, l_hand) in zip(captured, logged, hand_dro(captured)):
        replay(c["pred"], c["teacher_pred"], c["label"], c["group"])
        weights = torch.tensor([m[f"dro_weight/{n}"] for n in NAMES])
        group_losses = torch.tensor([m[f"group_loss/{n}"] for n in NAMES])
        counts = [m[f"group_count/{n}"] for n in NAMES]
        assert torch.equal(weights, replay.group_weights)  # the very same values as the loss module's
        assert torch.equal(group_losses, replay.last_group_losses)
        assert counts == torch.bincount(c["group"], minlength=G).tolist()
        torch.testing.assert_close(weights.double(), q_hand, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(group_losses.double(), l_hand, rtol=1e-5, atol=1e-6)
        assert m["dro_step_size"] == ETA
    assert torch.equal(
        torch.stack(dro.weight_history),
        torch.stack([torch.tensor([m[f"dro_weight/{n}"] for n in NAMES]) for m in logged]),
    )
    printed = capsys.readouterr()
    assert "dro_weight/siemens" in printed.out + printed.err and "group_loss/ge" in printed.out + printed.err


def test_tensorboard_picks_up_the_weights(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tb = TensorBoardStatsHandler(log_dir=str(tmp_path), output_transform=iteration_scalars)
    trainer, _, _, loss, dro = build(2, handlers=[tb])
    trainer.run()
    tb.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {f"dro_weight/{n}" for n in NAMES} <= set(tags)
    philips = acc.Scalars("dro_weight/philips")  # every iteration
    assert [e.step for e in philips] == list(range(1, 9))
    assert [e.value for e in philips] == pytest.approx([float(w[1]) for w in dro.weight_history])
    assert philips[-1].value == pytest.approx(float(loss.group_weights[1]))
    assert len(acc.Scalars("loss")) == 8


def test_warmup_keeps_uniform_weights_then_schedule():
    trainer, _, _, _, dro = build(3, warmup=5, schedule=lambda it: 0.1 * it)
    steps = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: steps.append(e.state.output[0]["dro_step_size"]))
    trainer.run()
    assert steps[:5] == [0.0] * 5
    assert steps[5:] == pytest.approx([0.1 * it for it in range(6, 13)])
    uniform = torch.full((G,), 1.0 / G)
    assert all(torch.equal(w, uniform) for w in dro.weight_history[:5])
    assert not torch.allclose(dro.weight_history[5], uniform)
    assert dro.iterations == list(range(1, 13))


def test_checkpoint_resume_reproduces_the_weight_trajectory(tmp_path):
    schedule = lambda it: 0.05 * it  # noqa: E731
    # straight run: 4 epochs x 4 iterations
    trainer, student, _, loss, dro = build(4, warmup=3, schedule=schedule)
    trainer.run()
    straight_history, straight_params = (
        torch.stack(dro.weight_history),
        [p.detach().clone() for p in student.parameters()],
    )

    # first 2 epochs, saved by CheckpointSaver
    trainer, student, opt, loss, dro = build(2, warmup=3, schedule=schedule)
    save_dict = {"network": student, "optimizer": opt, "trainer": trainer, "loss": loss, "dro": dro}
    CheckpointSaver(str(tmp_path), save_dict, save_final=True, final_filename="ckpt.pt").attach(trainer)
    trainer.run()
    assert len(dro.weight_history) == 8

    # fresh objects (another seed, so the network must come from the checkpoint), CheckpointLoader, 2 more epochs
    trainer, student, opt, loss, dro = build(4, warmup=3, schedule=schedule, seed=99)
    load_dict = {"network": student, "optimizer": opt, "trainer": trainer, "loss": loss, "dro": dro}
    CheckpointLoader(str(tmp_path / "ckpt.pt"), load_dict).attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 16
    resumed = torch.stack(dro.weight_history)
    assert resumed.shape == straight_history.shape == (16, G)
    assert torch.equal(resumed, straight_history)
    assert all(torch.equal(a, b) for a, b in zip(straight_params, student.parameters()))
    assert dro.iterations == list(range(1, 17))


def test_checkpoint_with_another_group_count_is_refused(tmp_path):
    trainer, student, opt, loss, dro = build(1)
    CheckpointSaver(str(tmp_path), {"loss": loss, "dro": dro}, save_final=True, final_filename="ckpt.pt").attach(
        trainer
    )
    trainer.run()
    trainer4, _, _, loss4, dro4 = build(2, num_groups=4)
    CheckpointLoader(str(tmp_path / "ckpt.pt"), {"loss": loss4, "dro": dro4}).attach(trainer4)
    with pytest.raises(ValueError, match=r"DRO weights for 3 groups \(shape \(3,\)\) but this loss has num_groups=4"):
        trainer4.run()
    with pytest.raises(ValueError, match=r"DRO history of shape \(4, 3\) but this run has 4 groups"):
        dro4.load_state_dict(dro.state_dict())
    assert torch.equal(loss4.group_weights, torch.full((4,), 0.25))  # nothing was loaded
    assert dro4.weight_history == []


def test_the_dro_weights_are_saved_once_by_the_loss():
    """One owner: the handler's checkpoint holds the history only; the weights (and the absent_groups rule) are
    the loss's state, which refuses a checkpoint of another rule."""
    trained = GroupDistillationLoss(num_groups=3, step_size=0.5, absent_groups="zero")
    dro = GroupDROHandler(trained)
    trained(torch.randn(6, 4), torch.randn(6, 4), torch.randint(0, 4, (6,)), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert set(dro.state_dict()) == {"group_names", "iterations", "weight_history", "loss_history"}
    other = GroupDistillationLoss(num_groups=3, absent_groups="ema")
    with pytest.raises(ValueError, match=r"trained with absent_groups='zero' but this loss has absent_groups='ema'"):
        other.load_state_dict(trained.state_dict())
    assert torch.equal(other.group_weights, torch.full((3,), 1 / 3)) and not other.ema_initialized.any()
    same = GroupDistillationLoss(num_groups=3, absent_groups="zero")
    same.load_state_dict(trained.state_dict())
    assert torch.equal(same.group_weights, trained.group_weights)


def test_mid_epoch_checkpoint_restores_the_state_but_restarts_the_epoch_loader(tmp_path):
    """The documented limit of resuming from a checkpoint saved mid-epoch (exact resume needs epoch-level
    checkpoints, see test_checkpoint_resume_reproduces_the_weight_trajectory): the DRO state is restored exactly,
    but ignite restarts the interrupted epoch's loader, so the batches (and weights) after the resume differ."""

    def capture_images(trainer) -> list[torch.Tensor]:
        images: list[torch.Tensor] = []
        trainer.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda e: images.append(e.state.output["image"]))
        return images

    # uninterrupted run: 2 epochs x 4 iterations, saving a checkpoint every 6 iterations (mid-epoch 2)
    trainer, student, opt, loss, dro = build(2)
    save_dict = {"network": student, "optimizer": opt, "trainer": trainer, "loss": loss, "dro": dro}
    CheckpointSaver(str(tmp_path), save_dict, epoch_level=False, save_interval=6).attach(trainer)
    straight_images = capture_images(trainer)
    trainer.run()
    straight = torch.stack(dro.weight_history)
    ckpt = tmp_path / "checkpoint_iteration=6.pt"
    assert straight.shape == (8, G) and ckpt.exists()

    trainer, student, opt, loss, dro = build(2, seed=99)
    load_dict = {"network": student, "optimizer": opt, "trainer": trainer, "loss": loss, "dro": dro}
    CheckpointLoader(str(ckpt), load_dict).attach(trainer)
    resumed_images = capture_images(trainer)
    trainer.run()
    resumed = torch.stack(dro.weight_history)
    assert trainer.state.iteration == 8 and dro.iterations == list(range(1, 9)) and len(resumed_images) == 2
    assert torch.equal(resumed[:6], straight[:6])  # the DRO state at the checkpoint is restored exactly
    # ...but iterations 7-8 see the epoch's first two batches (straight run: iterations 1-2), not its last two
    assert torch.equal(resumed_images[0], straight_images[0]) and torch.equal(resumed_images[1], straight_images[1])
    assert not torch.equal(resumed_images[0], straight_images[6])
    assert not torch.equal(resumed[6:], straight[6:])


def test_uniform_weights_equal_plain_kd_only_for_equal_group_sizes():
    """Warm-up (step size 0, uniform weights) gives the mean of the per-group mean losses: plain KD exactly when
    every group has the same number of samples in the batch, something else otherwise."""
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 2), torch.randn(6, 2), torch.randint(0, 2, (6,))
    plain = DistillationLoss(temperature=T, alpha=ALPHA)(s, t, y)
    uniform = GroupDistillationLoss(G, temperature=T, alpha=ALPHA, step_size=0.0)
    equal_sizes = uniform(s, t, y, torch.tensor([0, 1, 2, 0, 1, 2]))
    torch.testing.assert_close(equal_sizes, plain)
    assert torch.equal(uniform.group_weights, torch.full((G,), 1.0 / G))
    unequal = torch.tensor([0, 0, 0, 0, 1, 2])
    per_sample = DistillationLoss(temperature=T, alpha=ALPHA, reduction="none")(s, t, y)
    group_balanced = (per_sample[:4].mean() + per_sample[4] + per_sample[5]) / 3
    torch.testing.assert_close(uniform(s, t, y, unequal), group_balanced)
    assert not torch.allclose(group_balanced, plain)


def test_per_iteration_values_through_monai_default_writers(tmp_path):
    """MONAI's default iteration writers log every value of the handler at every iteration when their
    output_transform is iteration_scalars (the pattern of docs/usage.md)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    printed: list[dict] = []
    tb = TensorBoardStatsHandler(log_dir=str(tmp_path), output_transform=iteration_scalars)
    stats = StatsHandler(name="dro_iter", output_transform=lambda out: printed.append(iteration_scalars(out)))
    trainer, _, _, _, dro = build(2, handlers=[tb, stats])
    trainer.run()
    tb.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    for k, name in enumerate(NAMES):
        per_iteration = acc.Scalars(f"dro_weight/{name}")
        assert [e.step for e in per_iteration] == list(range(1, 9))
        assert [e.value for e in per_iteration] == pytest.approx([float(w[k]) for w in dro.weight_history])
        counts = [e.value for e in acc.Scalars(f"group_count/{name}")]
        assert len(counts) == 8 and all(c == int(c) for c in counts)
    assert len(acc.Scalars("loss")) == 8 and len(acc.Scalars("dro_step_size")) == 8
    assert len(printed) == 8
    assert [p["dro_weight/ge"] for p in printed] == [float(w[2]) for w in dro.weight_history]
    assert iteration_scalars({"loss": torch.tensor(0.5), "image": torch.zeros(2)}) == {"loss": 0.5}


def test_handler_argument_errors():
    loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups=2)
    with pytest.raises(ValueError, match="group_names has 3 names but the loss has 2 groups"):
        GroupDROHandler(loss, group_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="GroupDROLoss"):
        GroupDROHandler(torch.nn.CrossEntropyLoss())


def _eval_data() -> list[dict]:
    return make_data(30, seed=7)


def test_group_accuracy_handler_selects_best_worst_group_checkpoint(tmp_path):
    trainer, student, _, _, _ = build(4)
    per_epoch = []
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(_eval_data(), batch_size=8),
        network=student,
        key_val_metric={"val_worst_group_acc": GroupAccuracyHandler(num_groups=G, group_names=NAMES)},
        val_handlers=[
            CheckpointSaver(str(tmp_path), {"network": student}, save_key_metric=True, key_metric_filename="best.pt")
        ],
    )
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(dict(e.state.metrics)))
    ValidationHandler(validator=evaluator, interval=1).attach(trainer)
    trainer.run()
    assert len(per_epoch) == 4
    # the last epoch's values against an independent computation
    data = _eval_data()
    x, y, g = (torch.stack([d[k] for d in data]) for k in ("image", "label", "group"))
    with torch.no_grad():
        expected = compute_group_accuracy(student.eval()(x), y, g, num_groups=G)
    last = per_epoch[-1]
    assert last["val_worst_group_acc"] == pytest.approx(expected["worst_group"])
    assert last["worst_group_accuracy"] == pytest.approx(expected["worst_group"])
    assert last["mean_group_accuracy"] == pytest.approx(expected["mean_group"])
    assert last["accuracy"] == pytest.approx(expected["overall"])
    for k, n in enumerate(NAMES):
        assert last[f"group_accuracy/{n}"] == pytest.approx(float(expected["per_group"][k]))
    # model selection on the worst-group accuracy
    best = max(m["val_worst_group_acc"] for m in per_epoch)
    assert evaluator.state.best_metric == best
    assert per_epoch[evaluator.state.best_metric_epoch - 1]["val_worst_group_acc"] == best
    best_net = make_student()
    best_net.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True))
    with torch.no_grad():
        assert compute_group_accuracy(best_net.eval()(x), y, g, num_groups=G)["worst_group"] == pytest.approx(best)


def test_group_accuracy_handler_groups_from_output_and_missing_key():
    student = make_student()
    handler = GroupAccuracyHandler(num_groups=G, output_transform=from_engine(["pred", "label", "group"]))
    trainer = DistillationTrainer(
        "cpu", 1, DataLoader(make_data(), batch_size=9), student, torch.optim.SGD(student.parameters(), 0.0),
        torch.nn.CrossEntropyLoss(), key_train_metric={"train_worst": handler},
    )  # fmt: skip
    trainer.run()
    data = make_data()
    x, y, g = (torch.stack([d[k] for d in data]) for k in ("image", "label", "group"))
    with torch.no_grad():
        expected = compute_group_accuracy(student(x), y, g, num_groups=G)
    assert trainer.state.metrics["train_worst"] == pytest.approx(expected["worst_group"])
    assert trainer.state.metrics["group_accuracy/group1"] == pytest.approx(float(expected["per_group"][1]))

    no_group = [{k: v for k, v in d.items() if k != "group"} for d in _eval_data()]
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(no_group, batch_size=8), network=student,
        key_val_metric={"worst": GroupAccuracyHandler(num_groups=G)},
    )  # fmt: skip
    with pytest.raises(
        KeyError, match=r"no 'group' key \(needed for group metrics\); keys present: \['image', 'label'\]"
    ):
        evaluator.run()


# --- two processes (gloo): identical weights on every rank, rank 0 writes the report ---------------------------------


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    student = torch.nn.parallel.DistributedDataParallel(make_student())
    loss = GroupDistillationLoss(G, temperature=T, alpha=ALPHA, step_size=ETA)
    dro = GroupDROHandler(loss, group_names=NAMES)
    shard = make_data(36, seed=10 + rank)  # different data on every rank
    trainer = DistillationTrainer(
        "cpu", 2, DataLoader(shard, batch_size=9), student, torch.optim.Adam(student.parameters(), 0.01), loss,
        teacher=make_teacher(), train_handlers=[dro],
    )  # fmt: skip
    trainer.run()
    torch.save(torch.stack(dro.weight_history), os.path.join(out_dir, f"weights{rank}.pt"))
    report = GroupReportHandler(os.path.join(out_dir, f"report_rank{rank}"), G, NAMES, dro_handler=dro, plots=False)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(make_data(10 + 5 * rank, seed=20 + rank), batch_size=4),
        network=student, val_handlers=[report],
    )  # fmt: skip
    evaluator.run()
    with open(os.path.join(out_dir, f"summary{rank}.json"), "w") as f:
        json.dump(report.summary, f)
    exit_worker()


def test_two_processes_identical_weights_and_rank0_report(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    args = (2, str(tmp_path / "init"), str(tmp_path))
    torch.multiprocessing.spawn(_dist_worker, args=args, nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in (0, 1))
    assert w0.shape == (8, G) and torch.equal(w0, w1)
    assert not torch.allclose(w0[-1], torch.full((G,), 1 / G))
    assert (tmp_path / "report_rank0" / "group_report.csv").exists()
    assert not (tmp_path / "report_rank1").exists()
    s0, s1 = (json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 and s0["samples"] == 10 + 15  # both ranks' samples, gathered
    assert not math.isnan(s0["accuracy"])


def test_declared_groups_without_a_training_sample_are_warned_about_once():
    trainer, _, _, loss, _ = build(2, num_groups=5)  # the data holds ids 0-2 only
    with pytest.warns(UserWarning, match=r"groups \['group3', 'group4'\] \(ids \[3, 4\]\) had no training sample"):
        trainer.run()
    assert float(loss.group_weights[3:].sum()) > 0.05  # what the warning is about: they keep weight
    trainer, _, _, _, _ = build(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.run()


def test_a_history_of_other_group_names_is_refused():
    _, _, _, loss, dro = build(1)
    other = GroupDROHandler(loss, group_names=["a", "b", "c"])
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"groups \['siemens', 'philips', 'ge'\] but this run names them \['a', 'b'"):
        other.load_state_dict(dro.state_dict())
    assert other.group_names == ["a", "b", "c"] and other.state_dict()["iterations"].equal(before["iterations"])
