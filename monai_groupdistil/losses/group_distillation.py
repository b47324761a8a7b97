"""GroupDistil: the knowledge-distillation loss under the online group-DRO objective."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.utils import LossReduction

from monai_groupdistil.losses.checks import check_alpha, check_groups, check_temperature
from monai_groupdistil.losses.distillation import (
    DistillationKernel,
    DistillationLoss,
    _composite,
    _DistillationPerSample,
    apply_function,
    first_derivative_only,
    prepare_distillation_inputs,
    save_kernel_tensors,
    saved_kernel_tensors,
)
from monai_groupdistil.losses.group_dro import _NUMPY_DTYPES, GroupDROLoss

__all__ = ["GroupDistillationLoss"]


class GroupDistillationLoss(GroupDROLoss):
    """GroupDistil loss (Vilouras et al., 2023): per-sample distillation losses under the online group-DRO objective.

    The per-sample value is that of :py:class:`DistillationLoss`,
    ``l_i = alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)) + (1 - alpha) * CE(s_i, y_i)`` (mean over voxels for
    dense outputs); the group reduction, the exponentiated-gradient update of ``group_weights``, the adjustment, the
    EMA and the multi-process behaviour are those of :py:class:`GroupDROLoss`.

    Shapes: ``input`` and ``teacher_logits`` ``[B, C]`` (classification) or ``[B, C, *spatial]`` (dense); ``target``
    ``[B]``/``[B, 1]`` or ``[B, *spatial]``/``[B, 1, *spatial]`` class indices; ``groups`` an integer tensor ``[B]``.

    Args:
        num_groups: number of groups ``G >= 1``.
        temperature: softmax temperature ``T > 0``. Defaults to 4.0.
        alpha: weight of the distillation term in ``[0, 1]``. Defaults to 0.5.
        step_size: robust step size ``eta >= 0``. Defaults to 0.01.
        adjustment: generalisation adjustment ``C`` (float or one per group, ``>= 0``).
        group_counts: training-set size of every group; required when ``adjustment`` is non-zero.
        normalize_loss: normalise the adjusted group losses to sum 1 before the update.
        gamma: factor of the exponential moving average of the group losses, in ``(0, 1]``.
        reduction: ``"mean"``/``"sum"``: the robust scalar; ``"none"``: per-sample contributions ``[B]`` summing to it.

    Raises:
        ValueError: for invalid hyper-parameters (see :py:class:`DistillationLoss` and :py:class:`GroupDROLoss`); at
            call time for group ids outside ``[0, num_groups)``, mismatched shapes, different student and teacher
            class counts, an empty batch and NaN/infinite logits or per-group losses. A failed call leaves
            ``group_weights`` untouched.
        TypeError: at call time for non-floating logits, non-integer targets or group ids.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import GroupDistillationLoss
        >>> loss = GroupDistillationLoss(num_groups=2, temperature=4.0, alpha=0.5, step_size=0.1)
        >>> student = torch.randn(6, 3, requires_grad=True)
        >>> teacher, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
        >>> groups = torch.tensor([0, 0, 0, 0, 1, 1])
        >>> value = loss(student, teacher, labels, groups)
        >>> value.backward()
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
        reduction: LossReduction | str = "mean",
    ):
        temperature, alpha = check_temperature(temperature), check_alpha(alpha)
        super().__init__(
            loss_fn=DistillationLoss(temperature=temperature, alpha=alpha, reduction="none"),
            num_groups=num_groups,
            step_size=step_size,
            adjustment=adjustment,
            group_counts=group_counts,
            normalize_loss=normalize_loss,
            gamma=gamma,
            reduction=reduction,
        )
        self.temperature = temperature
        self.alpha = alpha

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, groups: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            input: student logits ``[B, C, *spatial]``.
            teacher_logits: teacher logits, same shape as ``input``.
            target: class indices (``None`` allowed only when ``alpha == 1``).
            groups: integer group ids ``[B]`` in ``[0, num_groups)``.

        Returns:
            the robust scalar (``"mean"``/``"sum"``) or per-sample contributions ``[B]`` (``"none"``).
        """
        input, teacher_logits, labels, fused = prepare_distillation_inputs(input, teacher_logits, target, self.alpha)
        groups = check_groups(groups, input.shape[0])
        temperature, alpha = self.temperature, self.alpha
        try:
            if fused and self.reduction != "none":  # the whole objective in one autograd node
                objective = _GroupDistillationObjective
                return apply_function(objective, input, teacher_logits, labels, groups, self, temperature, alpha)
            if fused:
                per_sample = apply_function(_DistillationPerSample, input, teacher_logits, labels, temperature, alpha)
            else:
                per_sample = _composite(input, teacher_logits, labels, temperature, alpha)
            return self.robust_reduce(per_sample, groups)
        except ValueError as err:
            if "not finite" in str(err):
                culprits = [
                    n for n, t in (("input", input), ("teacher_logits", teacher_logits)) if not t.isfinite().all()
                ]
                if culprits:
                    raise ValueError(f"{' and '.join(culprits)} hold NaN or infinite values; {err}") from err
            raise


class _GroupDistillationObjective(torch.autograd.Function):
    """The robust scalar of :py:class:`GroupDistillationLoss` for a teacher without gradient, in one autograd node.

    Forward: the voxel-wise values ``scale * raw`` of :py:class:`DistillationKernel`, their per-sample means, and
    :py:meth:`GroupDROLoss.robust_coefficients` (statistics, weight update, per-sample coefficients ``a_i``). In a
    single process the value is the robust loss computed from the group statistics (``sum_g q_g L_g + c``, which
    equals ``sum_i a_i l_i + c``); in multi-process runs it is this rank's share ``sum_i a_i l_i + c``. Backward:
    the kernel's written-out gradient weighted by ``a_i`` times the incoming gradient. The graph holds this one
    node instead of the kernel, the reduction and a dot product: on small batches every node and kernel launch
    counts. Only first derivatives are available (see :py:func:`first_derivative_only`).
    """

    @staticmethod
    def forward(ctx, input, teacher_logits, labels, groups, loss, temperature, alpha):  # type: ignore[override]
        kernel = DistillationKernel(input, teacher_logits, labels, temperature, alpha)
        raw = kernel.raw if kernel.raw.ndim == 1 else kernel.raw.flatten(1).mean(dim=1)  # dense: mean over voxels
        # the backward weights a_i * alpha * T / voxels, shaped to broadcast against the logits
        factor = DistillationKernel.gradient_factor(temperature, alpha) / math.prod(input.shape[2:])
        sample_coef, constant, robust = loss.robust_coefficients(raw, groups, kernel.scale, factor, input.ndim)
        if robust is None:  # multi-process: this rank's share
            coef = sample_coef.flatten()
            value = torch.dot(raw.to(coef.dtype), coef).mul_(kernel.scale / factor).to(raw.dtype)
            if loss.use_adjustment:
                value.add_(constant)
        elif raw.is_cpu and raw.dtype in _NUMPY_DTYPES:  # the value from the group statistics
            value = torch.from_numpy(np.array(robust, dtype=_NUMPY_DTYPES[raw.dtype]))
        else:
            value = torch.scalar_tensor(robust, dtype=raw.dtype, device=raw.device)
        save_kernel_tensors(ctx, (sample_coef, *kernel.tensors()), labels, input.ndim > 2)
        ctx.temperature, ctx.alpha = temperature, alpha
        return value

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_value):  # type: ignore[override]
        weights, *saved = saved_kernel_tensors(ctx)
        if not grad_value.is_cpu:
            weights = weights * grad_value
        elif (incoming := float(grad_value)) != 1.0:  # 1 for loss.backward()
            weights = weights * incoming
        grad = DistillationKernel.gradient(*saved, ctx.temperature, ctx.alpha, weights, weights_scaled=True)
        return grad, None, None, None, None, None, None
