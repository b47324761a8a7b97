"""GroupDistil: the knowledge-distillation loss under the online group-DRO objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction

from monai_groupdistil.losses.checks import (
    NonFiniteValueError,
    check_groups,
    raise_label_range,
)
from monai_groupdistil.losses.distillation import DistillationLoss
from monai_groupdistil.losses.group_dro import GroupDROLoss, _missing_groups_message

__all__ = ["GroupDistillationLoss", "WEIGHT_BY"]

WEIGHT_BY = ("loss", "ce", "kd")  # values of ``weight_by``: the per-sample quantity that drives the group weights


class GroupDistillationLoss(GroupDROLoss):
    """GroupDistil loss (Vilouras et al., 2023): per-sample distillation losses under the online group-DRO objective.

    The per-sample value is that of :py:class:`DistillationLoss`,
    ``l_i = alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)) + (1 - alpha) * CE(s_i, y_i)`` (mean over voxels for
    dense outputs, plus ``dice_weight`` times a soft Dice term if asked); the group reduction, the update of
    ``group_weights``, the adjustment, the running losses, ``absent_groups`` and the multi-process behaviour are
    those of :py:class:`GroupDROLoss`.

    What drives the weights (``weight_by``): the objective is always ``sum_g q_g * mean_{i in g} l_i``; only the
    per-group quantity of the exponentiated-gradient step (and of the running losses, ``absent_groups``, the
    adjustment and ``last_group_losses``) changes:

    - ``"loss"`` (default): the whole per-sample loss ``l_i``.
    - ``"ce"``: the student's cross entropy with the labels, ``CE(s_i, y_i)`` (mean over voxels). A group the
      student gets wrong gains weight whatever the teacher says.
    - ``"kd"``: the distillation term alone, ``T^2 * KL(softmax(t_i/T) || softmax(s_i/T))``.

    Why it matters: ``T^2 * KL`` is small where the teacher is unsure, so with ``"loss"`` (or ``"kd"``) a group on
    which the teacher is uncertain (often the rare group) looks easy and loses weight, and a group on which a
    shortcut teacher is confidently wrong gains weight on a term that pulls the student toward the wrong label.
    ``"ce"`` measures what the student gets wrong against the labels.

    Shapes: ``input`` and ``teacher_logits`` ``[B, C]`` (classification) or ``[B, C, *spatial]`` (dense); ``target``
    ``[B]``/``[B, 1]`` or ``[B, *spatial]``/``[B, 1, *spatial]`` class indices, or one-hot ``[B, C, *spatial]``;
    ``groups`` an integer tensor ``[B]``.

    Args:
        num_groups: number of groups ``G >= 1``; the ids of ``groups`` lie in ``[0, G)``.
        temperature: softmax temperature ``T > 0`` of the distillation term. Defaults to 4.0.
        alpha: weight of the distillation term in ``[0, 1]``; ``1 - alpha`` weights the cross entropy with the
            labels. Defaults to 0.5.
        step_size: robust step size ``eta >= 0`` of the exponentiated-gradient update (a settable attribute,
            checked to be ``>= 0``, so handlers may schedule it). Defaults to 0.01; docs/method.md says how to
            choose it.
        adjustment: ``C`` of the generalisation adjustment ``C_g / sqrt(N_g)``, a float or one value per group,
            ``>= 0``. Defaults to 0.
        group_counts: training-set size ``N_g`` of every group; required when ``adjustment`` is non-zero.
        normalize_loss: divide the adjusted group losses by their sum before the update. Defaults to False.
        gamma: weight of the *new* value in the running group losses, ``ema <- ema + gamma * (L_g - ema)``, in
            ``(0, 1]``. Defaults to 0.1.
        absent_groups: ``"ema"`` (default: a group absent from a batch enters the update with its running loss) or
            ``"zero"`` (group DRO's reference rule: with loss 0).
        dice_weight: weight of a per-sample soft Dice term (dense logits only), ``>= 0``. Defaults to 0.
        reduction: as for :py:class:`GroupDROLoss`: ``"mean"`` (default) returns the robust loss
            ``sum_g q_g L_g``, ``"none"`` per-sample values ``[B]`` whose mean is the robust loss, ``"sum"`` their
            sum (``B`` times it).
        weight_by: ``"loss"``, ``"ce"`` or ``"kd"``, see above. ``"ce"`` needs ``target`` and ``"kd"`` needs
            ``teacher_logits`` even when ``alpha`` would not.
        update: ``"batch"`` (default: every training call updates the weights from its batch) or ``"held_out"``
            (only :py:meth:`update_weights` does, e.g. through
            :py:class:`~monai_groupdistil.handlers.HeldOutGroupDROHandler`).

    Raises:
        ValueError: for invalid hyper-parameters; at call time for group ids outside ``[0, num_groups)``, class
            indices outside ``[0, C)``, non-integral ids or class indices (whole numbers in a floating tensor are
            accepted, as for MONAI's transforms), a non-one-hot target of the input's shape, mismatched shapes or
            class counts, an empty batch and NaN/infinite logits (a ``NonFiniteValueError``, a ``ValueError``
            subclass whose message names them). A failed call leaves the state untouched.
        TypeError: at call time for non-floating logits, a target or group ids that are not real-valued tensors
            (booleans included), or missing group ids.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import GroupDistillationLoss
        >>> loss = GroupDistillationLoss(num_groups=2, temperature=4.0, alpha=0.5, step_size=0.1)
        >>> student = torch.randn(6, 3, requires_grad=True)
        >>> teacher, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
        >>> groups = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> loss(student, teacher, labels, groups).backward()
        >>> bool(loss.group_weights.sum().isclose(torch.tensor(1.0)))
        True
    """

    def __init__(
        self,
        num_groups: int,
        temperature: float = 4.0,
        alpha: float = 0.5,
        step_size: float = 0.01,
        adjustment: float | Sequence[float] = 0.0,
        group_counts: Sequence[float] | torch.Tensor | None = None,
        normalize_loss: bool = False,
        gamma: float = 0.1,
        absent_groups: str = "ema",
        dice_weight: float = 0.0,
        reduction: LossReduction | str = "mean",
        weight_by: str = "loss",
        update: str = "batch",
    ):
        if weight_by not in WEIGHT_BY:
            raise ValueError(f"weight_by must be one of {WEIGHT_BY}, got {weight_by!r}.")
        distillation = DistillationLoss(temperature, alpha, dice_weight, reduction="none")
        super().__init__(
            distillation,
            num_groups,
            step_size,
            adjustment,
            group_counts,
            normalize_loss,
            gamma,
            absent_groups,
            reduction,
            update,
        )
        self.weight_by = weight_by

    # the distillation hyper-parameters live in ``loss_fn``, which computes the loss: read and set them there, so that
    # an assignment (e.g. by a ParamSchedulerHandler) takes effect and is checked
    @property
    def temperature(self) -> float:
        """The softmax temperature ``T > 0`` (settable)."""
        return self.loss_fn.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.loss_fn.temperature = value

    @property
    def alpha(self) -> float:
        """The weight of the distillation term, in ``[0, 1]`` (settable)."""
        return self.loss_fn.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.loss_fn.alpha = value

    @property
    def dice_weight(self) -> float:
        """The weight of the soft Dice term, ``>= 0`` (settable)."""
        return self.loss_fn.dice_weight

    @dice_weight.setter
    def dice_weight(self, value: float) -> None:
        self.loss_fn.dice_weight = value

    def forward(  # type: ignore[override]
        self,
        input: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Student and teacher logits ``[B, C, *spatial]``, class indices (or one-hot labels) ``target`` (``None``
        only when no term needs it) and group ids ``[B]``; returns the robust loss reduced as ``reduction`` says.

        The order ``(input, teacher_logits, target)`` is that of :py:class:`DistillationLoss` (and torchdistill's
        KD losses), with the groups appended; MONAI's ``SupervisedTrainer`` calls a loss as ``loss(pred, label)``
        only, so use :py:class:`~monai_groupdistil.engines.DistillationTrainer`, which passes every argument by
        name.

        Raises:
            TypeError: when ``groups`` is missing (the message says how to pass it).
        """
        if groups is None:
            integer_teacher = isinstance(teacher_logits, torch.Tensor) and not teacher_logits.is_floating_point()
            if integer_teacher and target is not None:  # loss(pred, label) alone is SupervisedTrainer's call
                raise TypeError(
                    "teacher_logits holds integers and groups is missing: the call looks like loss(input, target, "
                    "groups), without the teacher's logits. Call loss(input, teacher_logits, target, groups) "
                    "(teacher_logits=None only where alpha is 0)."
                )
            raise TypeError(_missing_groups_message(type(self).__name__, "loss(input, teacher_logits, target, groups)"))
        term = None if self.weight_by == "loss" else self.weight_by
        labels, outside = self.loss_fn.prepare_labels(input, teacher_logits, target, term)
        groups = check_groups(groups, input.shape[0])
        per_sample, weighting = self.loss_fn.per_sample_terms(input, teacher_logits, labels, term)
        try:
            return self.robust_reduce(per_sample, groups, outside, weighting)
        except ValueError as err:  # name the culprit where the group statistics cannot
            if outside is not None and bool(outside):
                raise_label_range(target.long().reshape(labels.shape), input.shape[1])  # type: ignore[union-attr]
            named = (("input", input), ("teacher_logits", teacher_logits))  # no teacher_logits where alpha is 0
            culprits = [n for n, t in named if t is not None and not t.isfinite().all()]
            if culprits and "not finite" in str(err):
                verb = "holds" if len(culprits) == 1 else "hold"
                raise NonFiniteValueError(f"{' and '.join(culprits)} {verb} NaN or infinite values; {err}") from err
            raise

    def weighting_losses(  # type: ignore[override]
        self, input: torch.Tensor, target: torch.Tensor | None, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-sample quantity ``[B]`` chosen by ``weight_by`` (the whole loss, ``CE`` or ``T^2 * KL``), for
        :py:meth:`update_weights` on held-out data.

        The arguments are in the order of :py:meth:`GroupDROLoss.weighting_losses` (``input, target``), with the
        teacher's logits last: ``loss.update_weights(loss.weighting_losses(student, labels, teacher), groups)``.

        Raises:
            TypeError: when ``target`` and ``teacher_logits`` are given in the order of :py:meth:`forward`.
            ValueError: for the input errors of :py:meth:`forward` (a missing ``teacher_logits`` or ``target`` that
                the chosen quantity needs, class indices outside ``[0, C)``...).
        """
        swapped = (
            isinstance(teacher_logits, torch.Tensor)
            and not teacher_logits.is_floating_point()
            and isinstance(target, torch.Tensor)
            and target.is_floating_point()
            and target.shape == input.shape
        )
        if swapped:
            raise TypeError(
                "weighting_losses takes (input, target, teacher_logits), the order of GroupDROLoss.weighting_losses "
                "with the teacher last; target holds logits and teacher_logits integers: swap them."
            )
        term = None if self.weight_by == "loss" else self.weight_by
        labels, outside = self.loss_fn.prepare_labels(input, teacher_logits, target, term)
        if outside is not None and bool(outside):
            raise_label_range(target.long().reshape(labels.shape), input.shape[1])  # type: ignore[union-attr]
        per_sample, weighting = self.loss_fn.per_sample_terms(input, teacher_logits, labels, term)
        return per_sample if weighting is None else weighting

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "weight_by": self.weight_by}
