"""GroupDistil: the knowledge-distillation loss under the online group-DRO objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction

from monai_groupdistil.losses.checks import check_alpha, check_groups, check_temperature
from monai_groupdistil.losses.distillation import DistillationLoss, _per_sample
from monai_groupdistil.losses.group_dro import GroupDROLoss

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
        per_sample = _per_sample(input, teacher_logits, target, self.temperature, self.alpha)
        groups = check_groups(groups, input.shape[0])
        try:
            return self.robust_reduce(per_sample, groups)
        except ValueError as err:
            if "not finite" in str(err):
                culprits = [
                    n for n, t in (("input", input), ("teacher_logits", teacher_logits)) if not t.isfinite().all()
                ]
                if culprits:
                    raise ValueError(f"{' and '.join(culprits)} hold NaN or infinite values; {err}") from err
            raise
