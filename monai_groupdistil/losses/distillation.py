"""Hinton knowledge-distillation loss (soft teacher targets plus hard labels), per sample and reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import (
    check_fraction,
    check_logits,
    check_number,
    check_target,
    clamp_labels,
    raise_label_range,
)

__all__ = ["DistillationLoss", "PerSampleDiceCELoss", "distillation_per_sample", "soft_dice_per_sample"]

# MONAI's soft Dice loss per sample and class ([B, C, 1, ...]): softmax of the logits against one-hot labels
_SOFT_DICE = DiceLoss(softmax=True, to_onehot_y=True, reduction="none")


def soft_dice_per_sample(input: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` of every sample ``[B]``, averaged over the classes (background included), for logits
    ``[B, C, *spatial]`` and int64 labels ``[B, *spatial]`` in ``[0, C)``."""
    return _SOFT_DICE(input, labels.unsqueeze(1)).flatten(1).mean(dim=1)


def distillation_per_sample(
    input: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    target: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    dice_weight: float = 0.0,
) -> torch.Tensor:
    """Per-sample knowledge-distillation loss (Hinton et al., 2015).

    For sample ``i`` with student logits ``s_i``, teacher logits ``t_i`` and label ``y_i``::

        kd_i = T^2 * KL(softmax(t_i / T) || softmax(s_i / T))     (summed over classes)
        ce_i = CrossEntropy(s_i, y_i)
        l_i  = alpha * kd_i + (1 - alpha) * ce_i  [+ dice_weight * (1 - softDice_i)]

    For dense outputs (``[B, C, *spatial]``) ``kd`` and ``ce`` are averaged over the voxels; the optional soft Dice
    term (:py:func:`soft_dice_per_sample`) is for segmentation. Half-precision logits
    are computed in float32 and the result is cast back to their dtype (float32 under ``torch.autocast``, as
    autocast does for torch's losses); logits of two dtypes give their promoted dtype.

    Args:
        input: student logits ``[B, C, *spatial]``.
        teacher_logits: teacher logits of the same shape; may be ``None`` when ``alpha == 0``.
        target: class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``; may be ``None`` when ``alpha == 1`` and
            ``dice_weight == 0``.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the distillation term, in ``[0, 1]``.
        dice_weight: weight of the soft Dice term, ``>= 0`` (dense logits only).

    Returns a ``[B]`` tensor of per-sample losses.

    Raises:
        TypeError: for non-floating logits or a target that is not a real-valued tensor.
        ValueError: for mismatched shapes or class counts, an empty batch, bad hyper-parameters, a missing
            ``teacher_logits`` or ``target``, or class indices outside ``[0, C)``.
    """
    return DistillationLoss(temperature, alpha, dice_weight, reduction="none")(input, teacher_logits, target)


class DistillationLoss(_Loss):
    """Knowledge-distillation loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The per-sample value of :py:func:`distillation_per_sample` (Hinton et al., 2015, as torchdistill's ``KDLoss``;
    mean over voxels for dense logits; an optional soft Dice term for segmentation), reduced over the batch.
    Autograd runs through ``log_softmax``, ``kl_div`` and ``cross_entropy``, so a teacher trained jointly gets its
    gradient too, and second derivatives exist.

    Args:
        temperature: softmax temperature ``T > 0``. Defaults to 4.0.
        alpha: weight of the distillation term in ``[0, 1]``; ``1 - alpha`` weights the cross entropy with the
            labels. Defaults to 0.5.
        dice_weight: weight of a soft Dice term per sample (dense logits only), ``>= 0``. Defaults to 0.
        reduction: ``"none"`` (a ``[B]`` tensor of per-sample values), ``"mean"`` or ``"sum"`` over samples.

    Raises:
        ValueError, TypeError: for bad hyper-parameters; at call time, see :py:func:`distillation_per_sample`.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import DistillationLoss
        >>> student, teacher = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
        >>> labels = torch.randint(0, 3, (8,))
        >>> DistillationLoss(temperature=4.0, alpha=0.5)(student, teacher, labels).backward()
        >>> DistillationLoss(reduction="none")(student, teacher, labels).shape
        torch.Size([8])
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.5,
        dice_weight: float = 0.0,
        reduction: LossReduction | str = "mean",
    ):
        super().__init__(reduction=LossReduction(reduction).value)
        self.temperature = temperature
        self.alpha = alpha
        self.dice_weight = dice_weight

    # settable attributes, checked on every assignment (e.g. by a ParamSchedulerHandler), as at construction
    @property
    def temperature(self) -> float:
        """The softmax temperature ``T > 0``."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_number(value, "temperature", positive=True)

    @property
    def alpha(self) -> float:
        """The weight of the distillation term, in ``[0, 1]``."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_fraction(value, "alpha")

    @property
    def dice_weight(self) -> float:
        """The weight of the soft Dice term, ``>= 0``."""
        return self._dice_weight

    @dice_weight.setter
    def dice_weight(self, value: float) -> None:
        self._dice_weight = check_number(value, "dice_weight")

    def forward(
        self, input: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: student logits ``[B, C, *spatial]``.
            teacher_logits: teacher logits, same shape as ``input`` (``None`` allowed when ``alpha == 0``).
            target: class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``; optional only when ``alpha == 1``.

        Returns:
            a scalar for ``"mean"``/``"sum"``, a ``[B]`` tensor for ``"none"``.
        """
        labels, outside = self.prepare_labels(input, teacher_logits, target)
        if outside is not None and bool(outside):  # one host synchronisation
            raise_label_range(check_target(target, input), input.shape[1])  # type: ignore[arg-type]
        per_sample = self.per_sample(input, teacher_logits, labels)
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample

    def prepare_labels(
        self,
        input: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor | None,
        term: str | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Check the inputs of a call; return the labels clamped into ``[0, C)`` and the 0-dim flag of
        :py:func:`~monai_groupdistil.losses.checks.clamp_labels` (both ``None`` when no labels are needed).
        ``term`` (``"kd"`` or ``"ce"``) is a term :py:meth:`per_sample_terms` must also return, whose input is then
        required."""
        alpha, dice_weight = self.alpha, self.dice_weight
        if target is None and isinstance(teacher_logits, torch.Tensor) and not teacher_logits.is_floating_point():
            raise TypeError(
                "teacher_logits are integers and no target was given: was the loss called as loss(pred, label), as "
                "MONAI's SupervisedTrainer does? Call loss(input, teacher_logits, target), or train with "
                "monai_groupdistil.engines.DistillationTrainer, which passes the teacher's output."
            )
        if teacher_logits is None and (alpha > 0 or term == "kd"):
            need = f"alpha > 0 (alpha={alpha})" if alpha > 0 else "the distillation term drives the weights"
            raise ValueError(
                f"teacher_logits are required when {need}; with DistillationTrainer, pass the teacher network as "
                "teacher=."
            )
        check_logits(input, teacher_logits)
        if dice_weight > 0 and input.ndim < 3:
            raise ValueError(f"dice_weight > 0 needs dense logits [B, C, *spatial], got shape {tuple(input.shape)}.")
        if alpha == 1.0 and dice_weight == 0 and term != "ce":
            return None, None
        if target is None:
            need = "alpha < 1 or dice_weight > 0" if term != "ce" else "the cross entropy drives the weights"
            raise ValueError(f"target is required when {need} (alpha={alpha}).")
        return clamp_labels(check_target(target, input), input.shape[1])

    def per_sample(
        self, input: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The per-sample values ``[B]`` for inputs checked by :py:meth:`prepare_labels` (labels in ``[0, C)``)."""
        return self.per_sample_terms(input, teacher_logits, labels)[0]

    def per_sample_terms(
        self,
        input: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        term: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-sample values ``[B]`` and, for ``term="kd"`` or ``"ce"``, that term alone, unweighted:
        ``T^2 * KL(softmax(t/T) || softmax(s/T))`` or ``CE(s, y)`` per sample (mean over voxels); ``None`` for
        ``term=None``. Inputs as checked by :py:meth:`prepare_labels` with the same ``term``."""
        temperature, alpha = self.temperature, self.alpha
        dtype = input.dtype if teacher_logits is None else torch.promote_types(input.dtype, teacher_logits.dtype)
        compute_dtype = torch.promote_types(dtype, torch.float32)  # half precision would lose the KD term's digits
        if torch.is_autocast_enabled(input.device.type):
            dtype = compute_dtype
        student = input.to(compute_dtype)
        terms, kl, ce = [], None, None  # the voxel-wise KD and CE terms
        if alpha > 0 or term == "kd":
            log_p_student = F.log_softmax(student / temperature, dim=1)
            log_p_teacher = F.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=1)  # type: ignore[union-attr]
            kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
            if alpha > 0:
                terms.append(alpha * temperature * temperature * kl)
        if alpha < 1 or term == "ce":
            ce = F.cross_entropy(student, labels, reduction="none")  # type: ignore[arg-type]
            if alpha < 1:
                terms.append((1 - alpha) * ce)
        voxel_loss = sum(terms[1:], terms[0])
        per_sample = _mean_per_sample(voxel_loss)
        if self.dice_weight > 0:
            per_sample = per_sample + self.dice_weight * soft_dice_per_sample(student, labels)  # type: ignore[arg-type]
        extra = None
        if term == "kd":
            extra = _mean_per_sample(temperature * temperature * kl).to(dtype)  # type: ignore[operator]
        elif term == "ce":
            extra = _mean_per_sample(ce).to(dtype)  # type: ignore[arg-type]
        return per_sample.to(dtype), extra


def _mean_per_sample(values: torch.Tensor) -> torch.Tensor:
    """``[B]`` from voxel-wise values ``[B, *spatial]`` (mean over the voxels) or ``[B]``."""
    return values.flatten(1).mean(dim=1) if values.ndim > 1 else values


class PerSampleDiceCELoss(DistillationLoss):
    """Cross entropy (mean over voxels) plus ``dice_weight`` times the soft Dice loss, for every sample.

    ``l_i = mean_v CE(s_iv, y_iv) + dice_weight * (1 - softDice_i)`` (:py:class:`DistillationLoss` with
    ``alpha=0``, no teacher) is a segmentation loss that a group-DRO objective can take:
    ``GroupDROLoss(PerSampleDiceCELoss(reduction="none"), num_groups)``; MONAI's ``DiceCELoss`` reduces over the
    batch. ``forward(input, target)``: logits ``[B, C, *spatial]``, class indices ``[B(, 1), *spatial]``.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import GroupDROLoss, PerSampleDiceCELoss
        >>> loss = GroupDROLoss(PerSampleDiceCELoss(reduction="none"), num_groups=2)
        >>> logits, masks = torch.randn(4, 4, 16, 16, requires_grad=True), torch.randint(0, 4, (4, 16, 16))
        >>> loss(logits, masks, torch.tensor([0, 0, 1, 1])).backward()
    """

    def __init__(self, dice_weight: float = 1.0, reduction: LossReduction | str = "mean"):
        super().__init__(alpha=0.0, dice_weight=dice_weight, reduction=reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if isinstance(input, torch.Tensor) and input.ndim < 3:
            raise ValueError(f"input must be dense logits [B, C, *spatial], got shape {tuple(input.shape)}.")
        return super().forward(input, None, target)
