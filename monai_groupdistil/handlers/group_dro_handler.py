"""GroupDROHandler: per-iteration recording and history of the group-DRO weights (MONAI has no group DRO)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
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

__all__ = ["GroupDROHandler", "iteration_scalars", "default_group_names", "DRO_KEY_PREFIXES"]


def default_group_names(num_groups: int) -> list[str]:
    """``["group0", "group1", ...]``."""
    return [f"group{g}" for g in range(num_groups)]


DRO_KEY_PREFIXES = ("dro_weight/", "group_loss/", "group_count/", "dro_step_size")
"""Prefixes of the per-iteration values :py:class:`GroupDROHandler` writes into ``engine.state.output``."""


def iteration_scalars(output: Any) -> dict[str, float]:
    """The loss and the DRO values of one training iteration, for the ``output_transform`` of MONAI's iteration
    loggers (``StatsHandler``, ``TensorBoardStatsHandler``, ``MLFlowHandler``), which log every entry of a
    dictionary.

    Args:
        output: ``engine.state.output``, a dictionary or (after MONAI's decollation) a list of them.

    Returns:
        ``{"loss": ..., "dro_weight/<name>": ..., "group_loss/<name>": ..., "group_count/<name>": ...,
        "dro_step_size": ...}``; only ``loss`` when no :py:class:`GroupDROHandler` is attached.
    """
    first = output[0] if isinstance(output, (list, tuple)) else output
    values = {"loss": float(first["loss"])}
    values.update({k: float(v) for k, v in first.items() if isinstance(k, str) and k.startswith(DRO_KEY_PREFIXES)})
    return values


class GroupDROHandler:
    """Records the group-DRO weights of a ``GroupDROLoss`` / ``GroupDistillationLoss`` at every training iteration.

    - After the loss (``IterationEvents.LOSS_COMPLETED``; ``ITERATION_COMPLETED`` on a plain ignite engine) it
      writes into ``engine.state.output``, one float per group: ``dro_weight/<name>`` (``q_g`` after this
      iteration's update), ``group_loss/<name>`` (the group's mean loss of the iteration, ``0`` when absent),
      ``group_count/<name>`` (its number of samples), and ``dro_step_size``. MONAI's iteration loggers read
      ``engine.state.output``: pass ``output_transform=iteration_scalars`` to ``StatsHandler``,
      ``TensorBoardStatsHandler`` or ``MLFlowHandler`` to log them with the loss at every iteration.
    - With ``history=True`` it keeps the weights and group losses of every iteration (``weight_history``,
      ``loss_history``, ``iterations``), used by the report plots; ``state_dict()`` holds that history, so put the
      handler in ``CheckpointSaver``'s ``save_dict`` next to the loss. The DRO weights themselves are the loss's
      state (its ``state_dict``), saved once, with the loss.
    - After the first epoch it warns once about every declared group that had no training sample: such a group
      keeps a share of the weight without ever being trained on (with ``absent_groups="ema"`` it enters the update
      with the mean of the other groups' losses), which usually means ``num_groups`` or the group ids are wrong.

    The step size belongs to the loss (``loss.step_size``); a warm-up or any other schedule is MONAI's
    ``ParamSchedulerHandler`` on ``ITERATION_STARTED`` (see the example). In multi-process runs the loss
    all-reduces the group statistics, so the weights (and the recorded values) are identical on every rank.

    Args:
        loss: the ``GroupDROLoss``.
        group_names: one name per group for the keys; defaults to ``group0``, ``group1``...
        history: keep the per-iteration weight and loss history.

    Raises:
        TypeError: when ``loss`` is not a ``GroupDROLoss``.
        ValueError: for ``group_names`` of the wrong length or duplicated, or (at load time) a checkpoint with a
            different number of groups or other group names.

    Example::

        loss = GroupDistillationLoss(num_groups=4, step_size=0.01)
        dro = GroupDROHandler(loss, group_names=["A", "B", "C", "D"])
        warmup = ParamSchedulerHandler(  # step size 0 for 100 iterations, then 0.01
            parameter_setter=functools.partial(setattr, loss, "step_size"), value_calculator="linear",
            vc_kwargs={"initial_value": 0.0, "step_constant": 100, "step_max_value": 101, "max_value": 0.01},
            event=Events.ITERATION_STARTED,
        )
        trainer = DistillationTrainer(..., loss_function=loss, teacher=teacher, train_handlers=[
            dro, warmup, StatsHandler(output_transform=iteration_scalars)])
        CheckpointSaver(save_dir, save_dict={"network": net, "optimizer": opt, "trainer": trainer,
                                             "loss": loss, "dro": dro}).attach(trainer)
    """

    def __init__(self, loss: GroupDROLoss, group_names: Sequence[str] | None = None, history: bool = True) -> None:
        if not isinstance(loss, GroupDROLoss):
            raise TypeError(f"a GroupDROLoss is expected, got {type(loss).__name__}.")
        self.loss = loss
        self.num_groups = int(loss.num_groups)
        names = default_group_names(self.num_groups) if group_names is None else [str(n) for n in group_names]
        if len(names) != self.num_groups:
            raise ValueError(f"group_names has {len(names)} names but the loss has {self.num_groups} groups.")
        if len(set(names)) != len(names):
            raise ValueError(f"group_names must be distinct, got {names}.")
        self.group_names = names
        self.keep_history = history
        self.iterations: list[int] = []
        self.weight_history: list[torch.Tensor] = []
        self.loss_history: list[torch.Tensor] = []
        self.first_epoch_counts = torch.zeros(self.num_groups, dtype=torch.long)

    def attach(self, engine: Engine) -> None:
        """Register the recording after the loss of every iteration."""
        event = (
            IterationEvents.LOSS_COMPLETED
            if engine.has_registered_events(IterationEvents.LOSS_COMPLETED)
            else Events.ITERATION_COMPLETED
        )
        if not engine.has_event_handler(self.record, event):
            engine.add_event_handler(event, self.record)
            engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), self.warn_unseen_groups)

    def warn_unseen_groups(self, engine: Engine) -> None:
        """Warn about the declared groups that had no training sample in the first epoch."""
        unseen = [g for g in range(self.num_groups) if self.first_epoch_counts[g] == 0]
        if unseen:
            names = [self.group_names[g] for g in unseen]
            warnings.warn(
                f"GroupDROHandler: groups {names} (ids {unseen}) had no training sample in the first epoch, yet the "
                f"loss declares num_groups={self.num_groups} and keeps a weight for each "
                f"({[round(float(self.loss.group_weights[g]), 4) for g in unseen]}). Check num_groups and the "
                "group ids of the training data.",
                stacklevel=2,
            )

    def record(self, engine: Engine) -> None:
        """Write this iteration's weights, group losses and counts into ``engine.state.output``."""
        weights = self.loss.group_weights.detach().float().cpu().clone()
        losses = self.loss.last_group_losses.detach().float().cpu().clone()
        counts = self.loss.last_group_counts.tolist()
        output = engine.state.output
        for name, w, loss, count in zip(self.group_names, weights.tolist(), losses.tolist(), counts):
            output[f"dro_weight/{name}"] = w
            output[f"group_loss/{name}"] = loss
            output[f"group_count/{name}"] = int(count)
        output["dro_step_size"] = float(self.loss.step_size)
        if engine.state.epoch == 1:
            self.first_epoch_counts += torch.tensor(counts, dtype=torch.long)
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
        """The group names and the history (the weights are the loss's state)."""
        iters, weights, losses = self.history_tensors()
        return {
            "group_names": list(self.group_names),
            "iterations": iters,
            "weight_history": weights,
            "loss_history": losses,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history.

        Raises:
            ValueError: when the checkpoint's history has another number of groups (nothing is restored then).
        """
        weights, losses = state_dict["weight_history"], state_dict["loss_history"]
        if weights.ndim != 2 or weights.shape[1] != self.num_groups:
            raise ValueError(
                f"the checkpoint holds a DRO history of shape {tuple(weights.shape)} but this run has "
                f"{self.num_groups} groups ({self.group_names}); resume with the same grouping or start a new run."
            )
        saved_names = list(state_dict.get("group_names", self.group_names))
        if saved_names != self.group_names:
            raise ValueError(
                f"the checkpoint's DRO history is of groups {saved_names} but this run names them {self.group_names}; "
                "resume with the same group names (in the same order) or start a new run."
            )
        self.iterations = [int(i) for i in state_dict["iterations"].tolist()]
        self.weight_history = [w.float().clone() for w in weights]
        self.loss_history = [x.float().clone() for x in losses]
