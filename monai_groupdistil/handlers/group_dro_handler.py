"""GroupDROHandler: per-iteration management, logging and checkpointing of the group-DRO weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import IgniteInfo, min_version, optional_import

from monai_groupdistil.losses import GroupDROLoss

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["GroupDROHandler", "find_dro_loss", "default_group_names"]


def default_group_names(num_groups: int) -> list[str]:
    """``["group0", "group1", ...]``."""
    return [f"group{g}" for g in range(num_groups)]


def find_dro_loss(loss: Any) -> GroupDROLoss:
    """Return the ``GroupDROLoss`` itself or the one wrapped by an adapter (``.loss``).

    Raises:
        TypeError: when no ``GroupDROLoss`` is found.
    """
    if isinstance(loss, GroupDROLoss):
        return loss
    inner = getattr(loss, "loss", None)
    if isinstance(inner, GroupDROLoss):
        return inner
    raise TypeError(f"a GroupDROLoss (or an adapter holding one as `.loss`) is expected, got {type(loss).__name__}.")


class GroupDROHandler:
    """Manages the group-DRO weights of a ``GroupDROLoss`` / ``GroupDistillationLoss`` at every training iteration.

    - Before every iteration (``ITERATION_STARTED``) it sets the loss's ``step_size``: ``0.0`` during the first
      ``warmup_iterations`` iterations, then ``step_size_schedule(iteration)`` (``iteration`` is ignite's 1-based
      global count) or the loss's initial step size. During the warm-up the weights stay uniform, so the loss is
      ``(1/G) * sum_g L_g``, the mean of the per-group mean losses (an absent group counts 0). That equals the
      plain batch mean (plain KD for a ``GroupDistillationLoss``, ERM for a ``GroupDROLoss``) only when each of
      the ``G`` groups has the same number of samples in the batch (``n_g = B / G``); otherwise it weights each
      sample by ``1 / (G * n_g)`` instead of ``1 / B``, i.e. it is a group-balanced loss. A
      ``GroupBalancedSampler`` makes the groups equally frequent on average only (its batches are random draws),
      so there the two agree only approximately.
    - After the loss (``IterationEvents.MODEL_COMPLETED``, so before ``ITERATION_COMPLETED`` loggers run) it
      records into ``engine.state.metrics`` one float per group:
      ``dro_weight/<name>`` (``q_g`` after this iteration's update), ``group_loss/<name>`` (the group's mean loss
      of the iteration, ``0`` when absent, as the loss module reports it), ``group_count/<name>`` (its number of
      samples), and ``dro_step_size``. ``StatsHandler``, ``TensorBoardStatsHandler`` and ``MLFlowHandler`` read
      ``engine.state.metrics`` only at the end of every epoch, so by default they log the epoch's last iteration's
      values. Their default *iteration* writers log ``output_transform(engine.state.output)`` only, and their
      ``state_attributes`` are epoch-level too; to log the values of every iteration, pass MONAI's supported
      customisation hook, a callable reading ``engine.state.metrics``: ``iteration_event_writer(engine, writer)``
      of ``TensorBoardStatsHandler``, ``iteration_print_logger(engine)`` of ``StatsHandler`` or
      ``iteration_logger(engine)`` of ``MLFlowHandler`` (it replaces the default loss logging, so log the loss
      there too). ``docs/usage.md`` ("Logging the DRO weights of every iteration") has a working example.
    - With ``history=True`` it keeps the weights and group losses of every iteration (``weight_history``,
      ``loss_history``, ``iterations``), used by the report plots.
    - ``state_dict()`` holds the loss's DRO state (weights, EMA) and the history; put the handler (and the loss)
      in ``CheckpointSaver``'s ``save_dict``: ``CheckpointLoader`` restores them exactly, and a run resumed from a
      checkpoint saved at the end of an epoch continues with exactly the weights it would have had
      (``tests/test_handlers.py::test_checkpoint_resume_reproduces_the_weight_trajectory``). A checkpoint saved
      *mid-epoch* (iteration-level ``CheckpointSaver``) restores the DRO state exactly too, but ignite restarts the
      interrupted epoch's data loader from its first batch (and only runs the epoch's remaining number of
      iterations), so the batches after such a resume differ from those of the uninterrupted run and so does the
      weight trajectory: exact resume needs epoch-level checkpoints. A checkpoint with another group count is
      refused (``ValueError``).

    In multi-process runs the loss all-reduces the group statistics, so the weights (and the recorded values) are
    identical on every rank.

    Args:
        loss: the ``GroupDROLoss`` (or an adapter holding it as ``.loss``).
        group_names: one name per group for the metric keys; defaults to ``group0``, ``group1``...
        warmup_iterations: number of first iterations trained with uniform weights (step size 0).
        step_size_schedule: callable ``iteration -> step size`` applied after the warm-up; ``None`` keeps the
            loss's step size (as it was when the handler was built).
        history: keep the per-iteration weight and loss history.
        weight_prefix: prefix of the weight keys.
        loss_prefix: prefix of the group-loss keys.
        count_prefix: prefix of the group-count keys.

    Raises:
        TypeError: when ``loss`` holds no ``GroupDROLoss``.
        ValueError: for ``group_names`` of the wrong length or duplicated, a negative warm-up, or (at load time) a
            checkpoint with a different number of groups.

    Example::

        loss = GroupDistillationLoss(num_groups=4, step_size=0.01)
        dro = GroupDROHandler(loss, group_names=["A", "B", "C", "D"], warmup_iterations=100)
        trainer = DistillationTrainer(..., loss_function=loss, teacher=teacher, train_handlers=[dro, ...])
        CheckpointSaver(save_dir, save_dict={"network": net, "optimizer": opt, "trainer": trainer,
                                             "loss": loss, "dro": dro}).attach(trainer)
    """

    def __init__(
        self,
        loss: Any,
        group_names: Sequence[str] | None = None,
        warmup_iterations: int = 0,
        step_size_schedule: Callable[[int], float] | None = None,
        history: bool = True,
        weight_prefix: str = "dro_weight",
        loss_prefix: str = "group_loss",
        count_prefix: str = "group_count",
    ) -> None:
        self.loss = find_dro_loss(loss)
        self.num_groups = int(self.loss.num_groups)
        names = default_group_names(self.num_groups) if group_names is None else [str(n) for n in group_names]
        if len(names) != self.num_groups:
            raise ValueError(f"group_names has {len(names)} names but the loss has {self.num_groups} groups.")
        if len(set(names)) != len(names):
            raise ValueError(f"group_names must be distinct, got {names}.")
        if int(warmup_iterations) < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}.")
        self.group_names = names
        self.warmup_iterations = int(warmup_iterations)
        self.step_size_schedule = step_size_schedule
        self.base_step_size = float(self.loss.step_size)
        self.keep_history = history
        self.weight_prefix, self.loss_prefix, self.count_prefix = weight_prefix, loss_prefix, count_prefix
        self.iterations: list[int] = []
        self.weight_history: list[torch.Tensor] = []
        self.loss_history: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        """Register the step-size update at ``ITERATION_STARTED`` and the recording after the model update."""
        if not engine.has_event_handler(self.iteration_started, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        # MONAI engines fire MODEL_COMPLETED inside the iteration, before ITERATION_COMPLETED loggers
        record_event = (
            IterationEvents.MODEL_COMPLETED
            if engine.has_registered_events(IterationEvents.MODEL_COMPLETED)
            else Events.ITERATION_COMPLETED
        )
        if not engine.has_event_handler(self.record, record_event):
            engine.add_event_handler(record_event, self.record)

    def step_size_at(self, iteration: int) -> float:
        """The step size used at (1-based) ``iteration``."""
        if iteration <= self.warmup_iterations:
            return 0.0
        if self.step_size_schedule is not None:
            return float(self.step_size_schedule(iteration))
        return self.base_step_size

    def iteration_started(self, engine: Engine) -> None:
        """Set the loss's step size for this iteration."""
        self.loss.step_size = self.step_size_at(engine.state.iteration)

    def record(self, engine: Engine) -> None:
        """Write this iteration's weights, group losses and counts into ``engine.state.metrics``."""
        weights = self.loss.group_weights.detach().float().cpu().clone()
        losses = self.loss.last_group_losses.detach().float().cpu().clone()
        metrics = engine.state.metrics
        for name, w, loss, count in zip(
            self.group_names, weights.tolist(), losses.tolist(), self.loss.last_group_counts.tolist()
        ):
            metrics[f"{self.weight_prefix}/{name}"] = w
            metrics[f"{self.loss_prefix}/{name}"] = loss
            metrics[f"{self.count_prefix}/{name}"] = int(count)
        metrics["dro_step_size"] = float(self.loss.step_size)
        if self.keep_history:
            self.iterations.append(int(engine.state.iteration))
            self.weight_history.append(weights)
            self.loss_history.append(losses)

    def history_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(iterations [T], weights [T, G], group losses [T, G])``."""
        g = self.num_groups
        iters = torch.tensor(self.iterations, dtype=torch.long)
        weights = torch.stack(self.weight_history) if self.weight_history else torch.zeros(0, g)
        losses = torch.stack(self.loss_history) if self.loss_history else torch.zeros(0, g)
        return iters, weights, losses

    def state_dict(self) -> dict[str, Any]:
        """The DRO state of the loss (weights, EMA, ``absent_groups``), the group names and the history."""
        iters, weights, losses = self.history_tensors()
        return {
            "num_groups": self.num_groups,
            "group_names": list(self.group_names),
            "absent_groups": self.loss.absent_groups,
            "group_weights": self.loss.group_weights.detach().cpu().clone(),
            "ema_group_losses": self.loss.ema_group_losses.detach().cpu().clone(),
            "ema_initialized": self.loss.ema_initialized.detach().cpu().clone(),
            "iterations": iters,
            "weight_history": weights,
            "loss_history": losses,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the loss's DRO weights and EMA and the history.

        Raises:
            ValueError: when the checkpoint was written for a different number of groups or another
                ``absent_groups`` rule (nothing is restored then).
        """
        saved = int(state_dict.get("num_groups", len(state_dict["group_weights"])))
        if saved != self.num_groups or tuple(state_dict["group_weights"].shape) != (self.num_groups,):
            raise ValueError(
                f"the checkpoint holds DRO weights for {saved} groups but this run has {self.num_groups} groups "
                f"({self.group_names}); resume with the same grouping or start a new run."
            )
        rule = state_dict.get("absent_groups", self.loss.absent_groups)  # checkpoints before 0.2.0 have none
        if rule != self.loss.absent_groups:
            raise ValueError(
                f"the checkpoint's DRO weights were updated with absent_groups={rule!r} but this run's loss has "
                f"absent_groups={self.loss.absent_groups!r}; resume with the same rule or start a new run."
            )
        dev = self.loss.group_weights.device
        self.loss.group_weights.copy_(state_dict["group_weights"].to(dev))
        self.loss.ema_group_losses.copy_(state_dict["ema_group_losses"].to(dev))
        self.loss.ema_initialized.copy_(state_dict["ema_initialized"].to(dev))
        iters, weights = state_dict.get("iterations"), state_dict.get("weight_history")
        losses = state_dict.get("loss_history")
        self.iterations = [] if iters is None else [int(i) for i in iters.tolist()]
        self.weight_history = [] if weights is None else [w.float().clone() for w in weights]
        self.loss_history = [] if losses is None else [x.float().clone() for x in losses]
