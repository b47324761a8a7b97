"""Hinton knowledge-distillation loss (soft teacher targets plus hard labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.autograd.function import once_differentiable
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import (
    check_alpha,
    check_logits,
    check_target,
    check_target_range,
    check_temperature,
)

__all__ = ["DistillationLoss", "distillation_per_sample"]


def distillation_per_sample(
    input: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Per-sample knowledge-distillation loss (Hinton et al., 2015).

    For sample ``i`` with student logits ``s_i``, teacher logits ``t_i`` and label ``y_i``::

        kd_i = T^2 * KL(softmax(t_i / T) || softmax(s_i / T))     (summed over classes)
        ce_i = CrossEntropy(s_i, y_i)
        l_i  = alpha * kd_i + (1 - alpha) * ce_i

    For dense outputs (``[B, C, *spatial]``) the per-sample value is the mean over voxels of the voxel-wise terms.

    Args:
        input: student logits, ``[B, C]`` or ``[B, C, *spatial]``.
        teacher_logits: teacher logits, same shape as ``input``.
        target: class indices, ``[B]`` / ``[B, 1]`` (or ``[B, *spatial]`` / ``[B, 1, *spatial]``); may be ``None``
            only when ``alpha == 1``.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the distillation term, in ``[0, 1]``.

    Returns:
        a ``[B]`` tensor of per-sample losses.

    Raises:
        TypeError: for non-floating logits or a non-integer target.
        ValueError: for mismatched shapes or class counts, an empty batch, ``temperature <= 0``, ``alpha`` outside
            ``[0, 1]``, or a missing ``target`` with ``alpha < 1``.
    """
    temperature, alpha = check_temperature(temperature), check_alpha(alpha)
    return _per_sample(input, teacher_logits, target, temperature, alpha)


def _per_sample(
    input: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, temperature: float, alpha: float
) -> torch.Tensor:
    """:py:func:`distillation_per_sample` for hyper-parameters that are already checked (the losses' hot path)."""
    check_logits(input, teacher_logits)
    if target is None and alpha < 1.0:
        raise ValueError(f"target is required when alpha < 1 (alpha={alpha}); pass class indices or set alpha=1.")
    on_cpu = input.device.type == "cpu"  # on CPU the kernels' own index checks are caught below; on GPUs they assert
    labels = None if alpha == 1.0 else check_target(target, input, check_range=not on_cpu)  # type: ignore[arg-type]
    if teacher_logits.requires_grad:  # a teacher trained jointly: autograd through the composite formula
        voxel_loss = _composite(input, teacher_logits, labels, temperature, alpha)
    else:
        if type(input) is not torch.Tensor:  # e.g. a MONAI MetaTensor: plain tensors through the autograd.Function
            input = input.as_subclass(torch.Tensor)
        if type(teacher_logits) is not torch.Tensor:
            teacher_logits = teacher_logits.as_subclass(torch.Tensor)
        if labels is not None and type(labels) is not torch.Tensor:
            labels = labels.as_subclass(torch.Tensor)
        try:
            voxel_loss = _FusedDistillation.apply(input, teacher_logits, labels, temperature, alpha)
        except (IndexError, RuntimeError):
            if labels is not None:
                check_target_range(labels, input.shape[1])
            raise
    if voxel_loss.ndim > 1:
        voxel_loss = voxel_loss.flatten(1).mean(dim=1)
    return voxel_loss


def _composite(
    input: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, alpha: float
) -> torch.Tensor:
    """Voxel-wise loss ``[B, *spatial]`` from differentiable library functions (gradients for both networks)."""
    voxel_loss: torch.Tensor | None = None
    if alpha > 0.0:
        log_p_student = F.log_softmax(input / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        kd = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
        voxel_loss = (alpha * temperature * temperature) * kd
    if labels is not None:
        try:
            ce = F.cross_entropy(input, labels, reduction="none")
        except IndexError:
            check_target_range(labels, input.shape[1])
            raise
        ce = (1.0 - alpha) * ce
        voxel_loss = ce if voxel_loss is None else voxel_loss + ce
    assert voxel_loss is not None
    return voxel_loss


class _FusedDistillation(torch.autograd.Function):
    """Voxel-wise KD + CE loss ``[B, *spatial]`` with its gradient with respect to the student's logits written out.

    For student logits ``s``, teacher logits ``t`` (no gradient) and labels ``y``, with ``p_T = softmax(s / T)``,
    ``q_T = softmax(t / T)`` and ``p = softmax(s)``::

        value  = alpha * T^2 * sum_c q_T (log q_T - log p_T) - (1 - alpha) * log p[y]
        d / ds = alpha * T * (p_T - q_T) + (1 - alpha) * (p - onehot(y))

    Computed without building an autograd graph, it needs about half the kernels of the composite formula (the
    per-sample loss is dispatch-bound for classification batches). Only first derivatives are available.
    """

    @staticmethod
    def forward(ctx, input, teacher_logits, labels, temperature, alpha):  # type: ignore[override]
        values = log_p_t = q_t = log_p = None
        if alpha > 0.0:
            log_p_t = F.log_softmax(input / temperature, dim=1)
            log_q_t = F.log_softmax(teacher_logits / temperature, dim=1)
            q_t = log_q_t.exp()
            values = (q_t * (log_q_t - log_p_t)).sum(dim=1).mul_(alpha * temperature * temperature)
        if labels is not None:
            log_p = F.log_softmax(input, dim=1)
            ce = log_p.gather(1, labels.unsqueeze(1)).squeeze(1).mul_(alpha - 1.0)
            values = ce if values is None else values.add_(ce)
        ctx.save_for_backward(log_p_t, q_t, log_p, labels)
        ctx.temperature, ctx.alpha = temperature, alpha
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):  # type: ignore[override]
        log_p_t, q_t, log_p, labels = ctx.saved_tensors
        temperature, alpha = ctx.temperature, ctx.alpha
        grad = None
        if log_p_t is not None:
            grad = log_p_t.exp().sub_(q_t).mul_(alpha * temperature)  # saved tensors stay intact (retain_graph)
        if log_p is not None:
            index = labels.unsqueeze(1)
            minus_one = torch.full(index.shape, -1.0, dtype=log_p.dtype, device=index.device)
            p = log_p.exp().scatter_add_(1, index, minus_one)
            grad = p.mul_(1.0 - alpha) if grad is None else grad.add_(p, alpha=1.0 - alpha)
        return grad.mul_(grad_values.unsqueeze(1)), None, None, None, None


class DistillationLoss(_Loss):
    """Knowledge-distillation loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The formula follows Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), as implemented by
    torchdistill's ``KDLoss``. It works for classification logits ``[B, C]`` and for dense (segmentation) logits
    ``[B, C, *spatial]``, where each sample's value is the mean over its voxels.

    Args:
        temperature: softmax temperature ``T``, must be > 0. Defaults to 4.0.
        alpha: weight of the distillation term in ``[0, 1]``; ``1 - alpha`` weights the cross entropy with the
            labels. Defaults to 0.5.
        reduction: ``"none"`` (a ``[B]`` tensor of per-sample values), ``"mean"`` or ``"sum"`` over samples.

    Raises:
        ValueError: when ``temperature <= 0``, ``alpha`` is outside ``[0, 1]`` or ``reduction`` is unknown; at call
            time for mismatched shapes, different class counts, an empty batch or a missing target with
            ``alpha < 1``.
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

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, reduction: LossReduction | str = "mean"):
        super().__init__(reduction=LossReduction(reduction).value)
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)

    def forward(
        self, input: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: student logits ``[B, C, *spatial]``.
            teacher_logits: teacher logits, same shape as ``input``.
            target: class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``; optional only when ``alpha == 1``.

        Returns:
            a scalar for ``"mean"``/``"sum"``, a ``[B]`` tensor for ``"none"``.
        """
        per_sample = _per_sample(input, teacher_logits, target, self.temperature, self.alpha)
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample
