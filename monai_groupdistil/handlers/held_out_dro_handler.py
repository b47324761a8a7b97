"""HeldOutGroupDROHandler: the group-DRO weight step taken on held-out data (MONAI has no group DRO)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_groupdistil.engines.trainer import GROUP, GROUP_KEY_HINT, check_batch_keys
from monai_groupdistil.losses import GroupDROLoss

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["HeldOutGroupDROHandler"]


class HeldOutGroupDROHandler:
    """Updates the weights of a ``GroupDROLoss(update="held_out")`` from per-group losses on held-out data.

    Why: a group whose few training samples the network has memorised has a small *training* loss, so the usual
    per-batch update stops raising its weight although the group generalises worst (Sagawa et al. need strong
    regularisation for this reason; Narasimhan & Menon update the weights on a held-out set). Every ``interval``
    epochs (or iterations, with ``epoch_level=False``) this handler runs the trainer's network in ``eval()`` mode
    under ``torch.no_grad()`` over ``data_loader``, computes ``loss.weighting_losses`` (for a
    ``GroupDistillationLoss``: the quantity chosen by ``weight_by``, with the trainer's teacher when it has one) and
    takes one exponentiated-gradient step with ``loss.update_weights``. Between two rounds the training iterations
    apply the current weights; before the first round they are uniform (or the checkpoint's).

    The held-out data must not be the split used for model selection: split the validation data in two (as DFR
    does), one half for this handler, the other for the evaluator. In multi-process runs give every rank its share
    (e.g. ``monai.data.DistributedSampler(dataset, shuffle=False, even_divisible=False)``); the loss all-reduces
    the per-group sums and counts, so the step is that of the whole held-out set on every rank. The weights and
    running losses are the loss's state: checkpoint the loss (``CheckpointSaver``'s ``save_dict``) and a resumed run
    continues exactly. Iterating ``data_loader`` draws from the global random generator as any loader does, so
    the run differs from one without the handler, reproducibly.

    Args:
        loss: the ``GroupDROLoss`` or ``GroupDistillationLoss`` of the trainer, built with ``update="held_out"``.
        data_loader: held-out batches (dictionaries with the image, label and group keys).
        interval: take the step every ``interval`` epochs (or iterations). Defaults to 1.
        epoch_level: count ``interval`` in epochs (``True``, default) or iterations.
        group_key: key of the integer group ids ``[B]`` in the batch. Defaults to ``"group"``.
        prepare_batch: ``prepare_batch(batch, device, non_blocking)`` returning ``(image, label, ...)``; defaults to
            the trainer's.

    Raises:
        TypeError: when ``loss`` is not a ``GroupDROLoss``.
        ValueError: when the loss was built with ``update="batch"``, or ``interval < 1``; during training for bad
            group ids, non-finite losses or an empty loader (the weights are then left untouched).
        KeyError: during training for a held-out batch without the group key.

    Example::

        loss = GroupDistillationLoss(num_groups=4, weight_by="ce", update="held_out", step_size=0.5)
        held_out = DataLoader(Dataset(val_half_a, transform=val_transform), batch_size=32)
        trainer = DistillationTrainer(..., loss_function=loss, teacher=teacher, train_handlers=[
            HeldOutGroupDROHandler(loss, held_out, interval=1), GroupDROHandler(loss)])
        # the evaluator selects models on val_half_b
    """

    def __init__(
        self,
        loss: GroupDROLoss,
        data_loader: Iterable,
        interval: int = 1,
        epoch_level: bool = True,
        group_key: str = GROUP,
        prepare_batch: Callable | None = None,
    ) -> None:
        if not isinstance(loss, GroupDROLoss):
            raise TypeError(f"a GroupDROLoss is expected, got {type(loss).__name__}.")
        if loss.update != "held_out":
            raise ValueError(
                f"the loss updates its weights from every training batch (update={loss.update!r}); build it with "
                "update='held_out' so that only this handler moves them."
            )
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}.")
        self.loss = loss
        self.data_loader = data_loader
        self.interval = interval
        self.epoch_level = bool(epoch_level)
        self.group_key = group_key
        self.prepare_batch = prepare_batch

    def attach(self, engine: Engine) -> None:
        """Register the update every ``interval`` epochs or iterations."""
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        """Measure the held-out losses with the current network and take one step."""
        network, teacher = engine.network, getattr(engine, "teacher", None)
        prepare_batch = self.prepare_batch or engine.prepare_batch
        device = engine.state.device
        losses, groups = [], []
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=bool(engine.amp)):
                for batch in self.data_loader:
                    check_batch_keys(batch, [self.group_key], hints={self.group_key: GROUP_KEY_HINT})
                    image, label = prepare_batch(batch, device, engine.non_blocking)[:2]
                    pred = engine.inferer(image, network)
                    teacher_logits = None if teacher is None else engine.inferer(image, teacher)
                    values = self.loss.weighting_losses(pred, label, teacher_logits)
                    losses.append(values.as_subclass(torch.Tensor).float())
                    groups.append(torch.as_tensor(batch[self.group_key]).reshape(-1))
        finally:
            network.train(was_training)
        if not losses:
            raise ValueError("the held-out data_loader gave no batch; the DRO weights were left unchanged.")
        self.loss.update_weights(torch.cat(losses), torch.cat(groups))
