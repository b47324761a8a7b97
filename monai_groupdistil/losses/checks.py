"""Argument and tensor checks shared by the losses.

Every check raises ``ValueError`` (``TypeError`` for a wrong dtype) with a message that names the argument and the
expected form, and never modifies its inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "check_logits",
    "check_target",
    "check_target_range",
    "check_groups",
    "group_sums_and_counts",
    "check_temperature",
    "check_alpha",
    "check_step_size",
]


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float after checking that it is finite and > 0."""
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    return value


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float after checking that it lies in [0, 1]."""
    value = float(alpha)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}.")
    return value


def check_step_size(step_size: float) -> float:
    """Return ``step_size`` as a float after checking that it is finite and >= 0."""
    value = float(step_size)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}.")
    return value


def check_logits(input: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
    """Check the student (and teacher) logits: floating tensors of shape ``[B, C, *spatial]`` with ``B >= 1``.

    Raises:
        TypeError: when a tensor is not a floating-point ``torch.Tensor``.
        ValueError: when ``input`` has fewer than 2 dimensions, an empty batch, or ``teacher_logits`` does not have
            the shape of ``input`` (a different class count is reported as such).
    """
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits [B, C, *spatial], got {_describe(input)}.")
    if input.ndim < 2:
        raise ValueError(f"input must have shape [B, C, *spatial] (at least 2 dimensions), got {tuple(input.shape)}.")
    if input.shape[0] == 0:
        raise ValueError("input is an empty batch (B == 0); at least one sample is needed.")
    if teacher_logits is None:
        return
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, got {_describe(teacher_logits)}.")
    if teacher_logits.ndim == input.ndim and teacher_logits.shape[0] == input.shape[0]:
        if teacher_logits.shape[1] != input.shape[1]:
            raise ValueError(
                f"student and teacher have different class counts: input has C={input.shape[1]} "
                f"(shape {tuple(input.shape)}), teacher_logits has C={teacher_logits.shape[1]} "
                f"(shape {tuple(teacher_logits.shape)})."
            )
    if teacher_logits.shape != input.shape:
        raise ValueError(
            f"teacher_logits must have the shape of input {tuple(input.shape)}, got {tuple(teacher_logits.shape)}."
        )


def check_target(target: torch.Tensor, input: torch.Tensor, check_range: bool = True) -> torch.Tensor:
    """Return class-index targets of shape ``[B, *spatial]`` (int64) for logits ``input`` of shape ``[B, C, *spatial]``.

    ``target`` may be ``[B, *spatial]`` or ``[B, 1, *spatial]``; an integer tensor, or a floating tensor holding whole
    numbers (as MONAI transforms often produce).

    Args:
        target: the class indices.
        input: the logits they belong to.
        check_range: also check that the indices lie in ``[0, C)`` (one reduction over ``target``); callers on the
            CPU may skip it and call :py:func:`check_target_range` when the loss kernel rejects an index.

    Raises:
        TypeError: when ``target`` is not a tensor, is boolean, or is complex.
        ValueError: for a shape that does not match ``input``, non-integral values or indices outside ``[0, C)``.
    """
    if not isinstance(target, torch.Tensor) or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be an integer tensor of class indices, got {_describe(target)}.")
    batch, spatial = input.shape[0], tuple(input.shape[2:])
    if target.ndim == input.ndim and target.shape[1] == 1:
        target = target.squeeze(1)
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(
            f"target must have shape {(batch, *spatial)} or {(batch, 1, *spatial)} to match input "
            f"{tuple(input.shape)}, got {tuple(target.shape)}."
        )
    if target.is_floating_point():
        if not bool(torch.all(target == torch.round(target))):
            raise ValueError("target holds non-integral values; class indices are expected.")
        target = target.long()
    if check_range:
        check_target_range(target, input.shape[1])
    return target if target.dtype == torch.int64 else target.long()


def check_target_range(target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` naming the offending range when ``target`` holds indices outside ``[0, num_classes)``."""
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"target holds class indices in [{lo}, {hi}] but input has C={num_classes} classes; "
            f"indices must lie in [0, {num_classes})."
        )


def check_groups(groups: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return ``groups`` as an int64 tensor ``[B]`` after checking its dtype and shape.

    The range of the ids is checked by :py:func:`group_sums_and_counts`.

    Raises:
        TypeError: when ``groups`` is not an integer tensor.
        ValueError: for a shape other than ``[B]`` / ``[B, 1]``.
    """
    if not isinstance(groups, torch.Tensor) or groups.is_floating_point() or groups.is_complex():
        raise TypeError(f"groups must be an integer tensor of group ids [B], got {_describe(groups)}.")
    if groups.dtype == torch.bool:
        raise TypeError("groups must be an integer tensor of group ids [B], got a boolean tensor.")
    if groups.ndim == 2 and groups.shape[1] == 1:
        groups = groups.squeeze(1)
    if tuple(groups.shape) != (batch_size,):
        raise ValueError(f"groups must have shape [B] = ({batch_size},) to match input, got {tuple(groups.shape)}.")
    return groups if groups.dtype == torch.int64 else groups.long()


def group_sums_and_counts(
    groups: torch.Tensor, values: torch.Tensor, num_groups: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of ``values`` (float64) and sample counts (int64), both ``[num_groups]`` numpy arrays.

    This also checks the range of the ids. With ``ids`` (the caller's numpy view of CPU ids, for CPU values of a
    numpy dtype) both reductions run in numpy (no torch dispatch); otherwise they run on the tensors' device with
    ``torch.bincount`` and only the ``G`` results are copied.

    Args:
        groups: int64 group ids ``[B]``.
        values: detached per-sample values ``[B]``.
        num_groups: ``G``.
        ids: ``groups`` as a numpy array (a view of the CPU tensor) to take the numpy path, or None.

    Raises:
        ValueError: for ids outside ``[0, num_groups)``.
    """
    weights = values.numpy() if ids is not None else values.double()  # outside the try: its errors are not ids'
    try:
        if ids is not None:
            counts = np.bincount(ids, minlength=num_groups)
            sums = np.bincount(ids, weights=weights, minlength=num_groups)
        else:
            counts = torch.bincount(groups, minlength=num_groups).cpu().numpy()
            sums = torch.bincount(groups, weights=weights, minlength=num_groups).cpu().numpy()
    except (ValueError, RuntimeError):  # negative ids
        counts = None
    if counts is None or counts.shape[0] > num_groups:
        lo, hi = (int(v) for v in torch.aminmax(groups))
        raise ValueError(f"groups holds ids in [{lo}, {hi}]; ids must lie in [0, num_groups) = [0, {num_groups}).")
    return sums, counts


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return f"{type(obj).__name__}"
