"""Argument and tensor checks of the losses: ``ValueError`` (``TypeError`` for a type) naming what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "NonFiniteValueError",
    "check_number",
    "check_fraction",
    "check_logits",
    "check_target",
    "check_groups",
    "check_per_group",
    "clamp_labels",
]


class NonFiniteValueError(ValueError):
    """The ``ValueError`` of a loss refusing NaN or infinite logits or losses (nothing is updated then).

    A subclass, so that a caller can tell this refusal from the others and add what it knows: the
    :py:class:`~monai_groupdistil.engines.DistillationTrainer` re-raises it as a ``FloatingPointError`` naming the
    subjects of the batch.
    """


def check_number(value: float, name: str, positive: bool = False) -> float:
    """Return ``value`` as a float after checking that it is finite and ``> 0`` (``positive``) or ``>= 0``."""
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}.")
    return number


def check_fraction(value: float, name: str, open_at_zero: bool = False) -> float:
    """Return ``value`` as a float after checking that it lies in ``[0, 1]`` (``(0, 1]`` with ``open_at_zero``)."""
    number = float(value)
    if not (0.0 < number <= 1.0 if open_at_zero else 0.0 <= number <= 1.0):
        raise ValueError(f"{name} must lie in {'(' if open_at_zero else '['}0, 1], got {value!r}.")
    return number


def check_per_group(value: float | Sequence[float] | torch.Tensor, num_groups: int, name: str) -> torch.Tensor:
    """``value`` (a number or one per group, finite and ``>= 0``) as a float64 tensor ``[num_groups]``.

    Raises:
        ValueError: naming ``name``, for another count of values, a negative or a non-finite one.
    """
    tensor = torch.as_tensor(value, dtype=torch.float64).flatten()
    if tensor.numel() == 1 and not isinstance(value, (Sequence, torch.Tensor)):
        tensor = tensor.expand(num_groups)
    if tensor.numel() != num_groups:
        raise ValueError(f"{name} must have one value per group ({num_groups}), got {tensor.numel()} values.")
    if not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"{name} must be >= 0 for every group and finite, got {tensor.tolist()}.")
    return tensor


def check_logits(input: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
    """Check the student (and teacher) logits: floating tensors ``[B, C, *spatial]``, ``B >= 1``, of one shape."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits [B, C, *spatial], got {_describe(input)}.")
    if input.ndim < 2:
        raise ValueError(
            f"input must have shape [B, C, *spatial] (at least 2 dimensions), got {tuple(input.shape)}; for one "
            "binary logit per sample [B], pass two classes: torch.stack([-x, x], dim=1) / 2 gives the same sigmoid."
        )
    if input.shape[0] == 0:
        raise ValueError("input is an empty batch (B == 0); at least one sample is needed.")
    if teacher_logits is None:
        return
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, got {_describe(teacher_logits)}.")
    if teacher_logits.ndim == input.ndim and teacher_logits.shape[1] != input.shape[1]:
        raise ValueError(
            f"student and teacher have different class counts: input has C={input.shape[1]} "
            f"(shape {tuple(input.shape)}), teacher_logits has C={teacher_logits.shape[1]} "
            f"(shape {tuple(teacher_logits.shape)})."
        )
    if teacher_logits.shape != input.shape:
        raise ValueError(
            f"teacher_logits must have the shape of input {tuple(input.shape)}, got {tuple(teacher_logits.shape)}."
        )


def check_target(target: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Return the class indices of ``target`` as int64 ``[B, *spatial]`` for logits ``[B, C, *spatial]``.

    ``target`` may be class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``, integer or floating with whole
    numbers (as MONAI transforms often produce), or one-hot ``[B, C, *spatial]`` (the shape of ``input``, as MONAI's
    losses accept), which is turned into indices. The range of indices is checked by :py:func:`clamp_labels`.

    Raises:
        TypeError: for a target that is not a real-valued tensor.
        ValueError: for another shape, non-integral values, or a target of the input's shape that is not one-hot.
    """
    if not isinstance(target, torch.Tensor) or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be a tensor of class indices or one-hot labels, got {_describe(target)}.")
    batch, spatial = input.shape[0], tuple(input.shape[2:])
    if target.ndim == input.ndim and target.shape[1] == input.shape[1] > 1 and target.shape == input.shape:
        if not bool(((target == 0) | (target == 1)).all() & (target.sum(dim=1) == 1).all()):
            raise ValueError(
                f"target has the shape of input {tuple(input.shape)} but is not one-hot (one 1 per sample and "
                "position along dimension 1); pass class indices [B, *spatial] or one-hot labels."
            )
        return target.argmax(dim=1)
    if target.ndim == input.ndim and target.shape[1] == 1:
        target = target.squeeze(1)
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target must hold class indices of shape {(batch, *spatial)} or {(batch, 1, *spatial)}, or one-hot "
            f"labels of shape {tuple(input.shape)}, to match input {tuple(input.shape)}; got {tuple(target.shape)}."
        )
    if target.is_floating_point() and not bool(torch.all(target == torch.round(target))):
        raise ValueError("target holds non-integral values; class indices are expected.")
    return target.long()


def clamp_labels(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels clamped into ``[0, num_classes)``, safe for any kernel, and a 0-dim tensor: whether any was outside.

    The flag stays on the device (no host synchronisation), so the caller can check it together with other values;
    ``-100`` (torch's ``ignore_index``) is no class here and counts as outside.
    """
    clamped = labels.clamp(0, num_classes - 1)
    return clamped, (clamped != labels).any()


def raise_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise the ``ValueError`` for labels outside ``[0, num_classes)``, naming their range."""
    lo, hi = (int(v) for v in torch.aminmax(labels))
    raise ValueError(
        f"target holds class indices in [{lo}, {hi}] but input has C={num_classes} classes; "
        f"indices must lie in [0, {num_classes})."
    )


def check_groups(groups: torch.Tensor, batch_size: int, num_groups: int | None = None) -> torch.Tensor:
    """Return the group ids ``groups`` (``[B]`` or ``[B, 1]``) as int64 ``[B]``: the one rule of the losses, the
    metrics and the handlers.

    Ids are integers, given as an integer tensor or a floating one holding whole numbers (as collated metadata may
    be). With ``num_groups`` their range ``[0, num_groups)`` is checked here (one host synchronisation); the losses
    check it with their group statistics instead.

    Raises:
        TypeError: for anything but a real-valued tensor (a boolean one included).
        ValueError: for another shape than ``[B]``, non-integral values, or ids outside ``[0, num_groups)``.
    """
    if not isinstance(groups, torch.Tensor) or groups.dtype == torch.bool or groups.is_complex():
        raise TypeError(f"groups must be a tensor of integer group ids [B], got {_describe(groups)}.")
    if groups.ndim == 2 and groups.shape[1] == 1:
        groups = groups.squeeze(1)
    if tuple(groups.shape) != (batch_size,):
        raise ValueError(f"groups must have shape [B] = ({batch_size},) to match input, got {tuple(groups.shape)}.")
    if groups.is_floating_point() and not bool((groups == groups.round()).all()):
        raise ValueError("groups holds non-integral values; integer group ids in [0, num_groups) are expected.")
    groups = groups.long()
    if num_groups is not None and batch_size and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(
            f"groups holds ids in [{int(groups.min())}, {int(groups.max())}]; ids must lie in [0, num_groups) = "
            f"[0, {num_groups})."
        )
    return groups


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__
