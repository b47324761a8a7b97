"""Glue that lets an unmodified ``monai.engines.SupervisedTrainer`` train GroupDRO, KD and GroupDistil students."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils.enums import CommonKeys as Keys

from monai_groupdistil.engines.teacher_cache import TeacherOutputCache, run_teacher
from monai_groupdistil.engines.trainer import (
    GROUP,
    TEACHER_PRED,
    check_batch_keys,
    check_teacher_shape,
    compute_distillation_loss,
    needs_groups,
    needs_teacher,
)

__all__ = ["GroupPrepareBatch", "GroupDistillationLossAdapter"]


class GroupPrepareBatch(PrepareBatch):
    """``prepare_batch`` for ``SupervisedTrainer`` that carries the group ids (and teacher logits) with the labels.

    ``SupervisedTrainer`` calls ``loss_function(pred, targets)`` only. This callable returns
    ``(image, targets)`` where ``targets`` is a dictionary ``{"label": label, "group": groups,
    "teacher_pred": teacher_logits_or_None}``; :py:class:`GroupDistillationLossAdapter` unpacks it. The teacher
    logits are computed here (frozen teacher, eval mode, ``torch.no_grad()``, through ``teacher_cache`` when
    given) or read from ``batch[teacher_key]`` (precomputed logits in the data).

    Note that ``engine.state.output["label"]`` then holds that dictionary: a training metric reads the label as
    ``output["label"]["label"]``.

    Args:
        group_key: key of the integer group ids ``[B]`` in the batch.
        teacher: optional frozen teacher network (already on the device).
        teacher_cache: optional :py:class:`TeacherOutputCache` (deterministic preprocessing only).
        teacher_key: optional key of precomputed teacher logits in the batch (used when ``teacher`` is None).
        inferer: optional MONAI inferer for the teacher (``None`` calls it directly).

    Raises:
        KeyError: when the batch lacks the image, label, group (or ``teacher_key``) key; the message names it and
            the keys present.

    Example::

        trainer = SupervisedTrainer(
            device=device, max_epochs=5, train_data_loader=loader, network=student, optimizer=opt,
            prepare_batch=GroupPrepareBatch(group_key="group", teacher=teacher),
            loss_function=GroupDistillationLossAdapter(GroupDistillationLoss(num_groups=4)),
        )
    """

    def __init__(
        self,
        group_key: str = "group",
        teacher: torch.nn.Module | None = None,
        teacher_cache: TeacherOutputCache | None = None,
        teacher_key: str | None = None,
        inferer: Callable | None = None,
    ) -> None:
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        if teacher_cache is not None and teacher is None:
            raise ValueError("a `teacher_cache` was given without a `teacher`.")
        self.group_key = group_key
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.teacher_key = teacher_key
        self.inferer = inferer

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """
        Returns:
            ``(image, {"label": label, "group": groups, "teacher_pred": teacher_logits or None})`` on ``device``.
        """
        keys = [Keys.IMAGE, Keys.LABEL, self.group_key]
        if self.teacher is None and self.teacher_key is not None:
            keys.append(self.teacher_key)
        check_batch_keys(batchdata, keys)

        def _to(x: Any) -> torch.Tensor:
            return torch.as_tensor(x).to(device=device, non_blocking=non_blocking, **kwargs)

        image = _to(batchdata[Keys.IMAGE])
        teacher_pred = None
        if self.teacher is not None:
            teacher_pred = run_teacher(self.teacher, image, self.inferer, self.teacher_cache, batchdata)
        elif self.teacher_key is not None:
            teacher_pred = _to(batchdata[self.teacher_key])
        targets = {Keys.LABEL: _to(batchdata[Keys.LABEL]), GROUP: _to(batchdata[self.group_key])}
        targets[TEACHER_PRED] = teacher_pred
        return image, targets


class GroupDistillationLossAdapter(torch.nn.Module):
    """Loss adapter for ``SupervisedTrainer``: ``adapter(pred, targets)`` calls the wrapped loss with the teacher
    logits and the group ids found in ``targets`` (the dictionary built by :py:class:`GroupPrepareBatch`).

    The wrapped loss is called as :py:class:`DistillationTrainer` calls it (``GroupDistillationLoss``:
    ``loss(pred, teacher_pred, label, groups)``; ``DistillationLoss``: ``loss(pred, teacher_pred, label)``;
    ``GroupDROLoss``: ``loss(pred, label, groups)``; other losses: ``loss(pred, label)``). It is an ``nn.Module``
    holding the loss as ``.loss``, so ``.to(device)`` and ``state_dict()`` carry the DRO weights, and
    :py:class:`monai_groupdistil.handlers.GroupDROHandler` accepts the adapter in place of the loss.

    Args:
        loss: the wrapped loss.

    Raises:
        TypeError: when ``targets`` is not the dictionary of :py:class:`GroupPrepareBatch`.
        ValueError: when the teacher and student outputs differ in shape (both are named), or when the loss needs
            teacher logits that the batch preparation did not provide.
    """

    def __init__(self, loss: Callable) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, pred: torch.Tensor, targets: Mapping[str, Any]) -> torch.Tensor:
        if not isinstance(targets, Mapping) or Keys.LABEL not in targets:
            raise TypeError(
                "GroupDistillationLossAdapter expects the targets dictionary built by GroupPrepareBatch "
                f"(keys 'label', 'group', 'teacher_pred'), got {type(targets).__name__}; "
                "pass prepare_batch=GroupPrepareBatch(...) to the trainer."
            )
        teacher_pred, groups = targets.get(TEACHER_PRED), targets.get(GROUP)
        if teacher_pred is not None:
            check_teacher_shape(pred, teacher_pred)
        if needs_teacher(self.loss) and teacher_pred is None:
            raise ValueError(
                f"{type(self.loss).__name__} needs teacher logits: give GroupPrepareBatch a `teacher` or `teacher_key`."
            )
        if needs_groups(self.loss) and groups is None:
            raise ValueError(f"{type(self.loss).__name__} needs group ids: GroupPrepareBatch found none.")
        return compute_distillation_loss(self.loss, pred, targets[Keys.LABEL], groups, teacher_pred)
