"""Per-sample soft Dice, and cross entropy plus soft Dice per sample, for dense (segmentation) logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import (
    check_logits,
    check_non_negative,
    check_target,
    clamp_labels,
    raise_label_range,
)

__all__ = ["soft_dice_per_sample", "PerSampleDiceCELoss"]

# MONAI's soft Dice loss per sample and class ([B, C, 1, ...]): softmax of the logits against one-hot labels
_SOFT_DICE = DiceLoss(softmax=True, to_onehot_y=True, reduction="none")


def soft_dice_per_sample(input: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` of every sample, averaged over the classes (background included), as a ``[B]`` tensor.

    Args:
        input: logits ``[B, C, *spatial]`` with at least one spatial dimension.
        labels: int64 class indices ``[B, *spatial]`` in ``[0, C)``.
    """
    return _SOFT_DICE(input, labels.unsqueeze(1)).flatten(1).mean(dim=1)


class PerSampleDiceCELoss(_Loss):
    """Cross entropy (mean over voxels) plus ``dice_weight`` times the soft Dice loss, for every sample.

    The per-sample value ``l_i = mean_v CE(s_iv, y_iv) + dice_weight * (1 - softDice_i)`` (soft Dice averaged over
    the classes, MONAI's ``DiceLoss(softmax=True, to_onehot_y=True)``) is what a group-DRO objective needs of a
    segmentation loss: ``GroupDROLoss(PerSampleDiceCELoss(reduction="none"), num_groups)``. MONAI's ``DiceCELoss``
    reduces over the batch and cannot be used there.

    Args:
        dice_weight: weight of the soft Dice term, ``>= 0``. Defaults to 1.
        reduction: ``"none"`` (``[B]``), ``"mean"`` or ``"sum"`` over samples.

    Raises:
        ValueError: for a negative ``dice_weight``; at call time for logits without a spatial dimension, a target
            of the wrong shape, and class indices outside ``[0, C)`` (one host synchronisation).
        TypeError: at call time for non-floating logits or a non-integer target.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import GroupDROLoss, PerSampleDiceCELoss
        >>> loss = GroupDROLoss(PerSampleDiceCELoss(reduction="none"), num_groups=2)
        >>> logits, masks = torch.randn(4, 4, 16, 16, requires_grad=True), torch.randint(0, 4, (4, 16, 16))
        >>> loss(logits, masks, torch.tensor([0, 0, 1, 1])).backward()
    """

    def __init__(self, dice_weight: float = 1.0, reduction: LossReduction | str = "mean"):
        super().__init__(reduction=LossReduction(reduction).value)
        self.dice_weight = check_non_negative(dice_weight, "dice_weight")

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits ``[B, C, *spatial]``.
            target: class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``.
        """
        check_logits(input)
        if input.ndim < 3:
            raise ValueError(f"input must be dense logits [B, C, *spatial], got shape {tuple(input.shape)}.")
        labels = check_target(target, input)
        clamped, outside = clamp_labels(labels, input.shape[1])
        if bool(outside):
            raise_label_range(labels, input.shape[1])
        per_sample = F.cross_entropy(input, clamped, reduction="none").flatten(1).mean(dim=1)
        if self.dice_weight > 0:
            per_sample = per_sample + self.dice_weight * soft_dice_per_sample(input, clamped)
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample
