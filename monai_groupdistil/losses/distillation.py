"""Hinton knowledge-distillation loss (soft teacher targets plus hard labels), per sample and reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import (
    check_fraction,
    check_logits,
    check_non_negative,
    check_positive,
    check_target,
    clamp_labels,
    raise_label_range,
)
from monai_groupdistil.losses.dice import soft_dice_per_sample

__all__ = ["DistillationLoss", "distillation_per_sample"]


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
    term (:py:func:`~monai_groupdistil.losses.dice.soft_dice_per_sample`) is for segmentation. Half-precision logits
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

    Returns:
        a ``[B]`` tensor of per-sample losses.

    Raises:
        TypeError: for non-floating logits or a non-integer target.
        ValueError: for mismatched shapes or class counts, an empty batch, bad hyper-parameters, a missing
            ``teacher_logits`` or ``target``, or class indices outside ``[0, C)`` (checked with one host
            synchronisation).
    """
    temperature, alpha = check_positive(temperature, "temperature"), check_fraction(alpha, "alpha")
    dice_weight = check_non_negative(dice_weight, "dice_weight")
    labels, outside = prepare_labels(input, teacher_logits, target, alpha, dice_weight)
    if outside is not None and bool(outside):
        raise_label_range(check_target(target, input), input.shape[1])  # type: ignore[arg-type]
    return per_sample_loss(input, teacher_logits, labels, temperature, alpha, dice_weight)


def prepare_labels(
    input: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    target: torch.Tensor | None,
    alpha: float,
    dice_weight: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check the inputs of a distillation call; return the labels clamped into ``[0, C)`` and the 0-dim flag of
    :py:func:`~monai_groupdistil.losses.checks.clamp_labels` (both ``None`` when no labels are needed)."""
    if teacher_logits is None and alpha > 0:
        raise ValueError(f"teacher_logits are required when alpha > 0 (alpha={alpha}).")
    check_logits(input, teacher_logits)
    if dice_weight > 0 and input.ndim < 3:
        raise ValueError(f"dice_weight > 0 needs dense logits [B, C, *spatial], got shape {tuple(input.shape)}.")
    if alpha == 1.0 and dice_weight == 0:
        return None, None
    if target is None:
        raise ValueError(f"target is required when alpha < 1 or dice_weight > 0 (alpha={alpha}); pass class indices.")
    return clamp_labels(check_target(target, input), input.shape[1])


def per_sample_loss(
    input: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    dice_weight: float,
) -> torch.Tensor:
    """:py:func:`distillation_per_sample` on checked inputs and labels in ``[0, C)`` (see :py:func:`prepare_labels`)."""
    dtype = input.dtype if teacher_logits is None else torch.promote_types(input.dtype, teacher_logits.dtype)
    compute_dtype = torch.promote_types(dtype, torch.float32)  # half precision would lose the KD term's digits
    if torch.is_autocast_enabled(input.device.type):
        dtype = compute_dtype
    student = input.to(compute_dtype)
    voxel_loss = torch.zeros((), dtype=compute_dtype, device=input.device)
    if alpha > 0:
        log_p_student = F.log_softmax(student / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=1)  # type: ignore[union-attr]
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
        voxel_loss = voxel_loss + alpha * temperature * temperature * kl
    if alpha < 1:
        voxel_loss = voxel_loss + (1 - alpha) * F.cross_entropy(student, labels, reduction="none")  # type: ignore[arg-type]
    per_sample = voxel_loss.flatten(1).mean(dim=1) if voxel_loss.ndim > 1 else voxel_loss
    if dice_weight > 0:
        per_sample = per_sample + dice_weight * soft_dice_per_sample(student, labels)  # type: ignore[arg-type]
    return per_sample.to(dtype)


class DistillationLoss(_Loss):
    """Knowledge-distillation loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The formula of Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), as torchdistill's
    ``KDLoss``, for classification logits ``[B, C]`` and dense logits ``[B, C, *spatial]`` (each sample's value is
    the mean over its voxels), with an optional per-sample soft Dice term for segmentation. Autograd runs through
    ``log_softmax``, ``kl_div`` and ``cross_entropy``, so a teacher trained jointly gets its gradient too.

    Args:
        temperature: softmax temperature ``T > 0``. Defaults to 4.0.
        alpha: weight of the distillation term in ``[0, 1]``; ``1 - alpha`` weights the cross entropy with the
            labels. Defaults to 0.5.
        dice_weight: weight of a soft Dice term per sample (dense logits only), ``>= 0``. Defaults to 0.
        reduction: ``"none"`` (a ``[B]`` tensor of per-sample values), ``"mean"`` or ``"sum"`` over samples.

    Raises:
        ValueError: for ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, a negative ``dice_weight`` or an unknown
            ``reduction``; at call time, see :py:func:`distillation_per_sample`.
        TypeError: at call time for non-floating logits or a non-integer target.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import DistillationLoss
        >>> student, teacher = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
        >>> labels = torch.randint(0, 3, (8,))
        >>> loss = DistillationLoss(temperature=4.0, alpha=0.5)(student, teacher, labels)
        >>> loss.backward()
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
        self.temperature = check_positive(temperature, "temperature")
        self.alpha = check_fraction(alpha, "alpha")
        self.dice_weight = check_non_negative(dice_weight, "dice_weight")

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
        per_sample = distillation_per_sample(
            input, teacher_logits, target, self.temperature, self.alpha, self.dice_weight
        )
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample
