"""Checking the boolean ids given on the command line, and the teacher of the bundles' ``teacher_method`` id."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from monai_groupdistil.losses import GroupDROLoss

__all__ = ["TEACHER_METHODS", "check_booleans", "teacher_checkpoint", "teacher_loss"]


def check_booleans(**flags: Any) -> None:
    """Stop with a clear message when a boolean bundle id holds anything but a boolean (or 0/1).

    ``python -m monai.bundle run`` reads ``--id value`` with ``fire``: ``False``/``True`` arrive as booleans, but
    ``false``/``no`` arrive as *strings*, which Python (``not "false"``) reads as true. The bundles' configs use
    their boolean ids as plain values (``"_disabled_": "$not @augment"``) and check them all first, in
    ``initialize``, so that a string never silently means true.

    Args:
        flags: id -> value, e.g. ``check_booleans(augment=@augment, resume=@resume)`` in a config.

    Raises:
        ValueError: naming the first id whose value is not a boolean, and how to write one.

    Example::

        >>> check_booleans(augment=False, resume=1)
        >>> check_booleans(augment="false")
        Traceback (most recent call last):
        ...
        ValueError: 'augment' must be a boolean, got 'false' (str): write --augment False (or 0), not false.
    """
    for name, value in flags.items():
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            continue
        spelled = "True (or 1)" if str(value).strip().lower() in ("true", "yes") else "False (or 0)"
        raise ValueError(
            f"'{name}' must be a boolean, got {value!r} ({type(value).__name__}): write --{name} {spelled}, not "
            f"{value}."
        )


TEACHER_METHODS = ("erm", "group_dro")


def teacher_loss(
    method: str,
    num_groups: int,
    step_size: float,
    absent_groups: str = "ema",
    loss_fn: Callable[..., torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """The teacher's loss for the bundle id ``teacher_method``.

    ``"erm"``: ``loss_fn()``. ``"group_dro"``: ``GroupDROLoss`` around the per-sample ``loss_fn(reduction="none")``
    (a robust teacher, whose soft targets are not tuned to the majority groups), with ``step_size`` (the id
    ``group_dro_step_size``, also the step of the ``group_dro.json`` baseline) and ``absent_groups``.

    Args:
        method: ``"erm"`` or ``"group_dro"``.
        num_groups: number of groups of the DRO weights.
        step_size: the DRO step size.
        absent_groups: the DRO rule for a group absent from a batch.
        loss_fn: makes the supervised loss, called with no argument (ERM) or with ``reduction="none"`` (group
            DRO); default ``torch.nn.CrossEntropyLoss`` (the segmentation bundle passes
            ``functools.partial(PerSampleDiceCELoss, dice_weight=...)``).

    Raises:
        ValueError: for another ``method``, naming the id and the valid values.

    Example::

        >>> type(teacher_loss("group_dro", 4, step_size=0.1)).__name__
        'GroupDROLoss'
    """
    make = torch.nn.CrossEntropyLoss if loss_fn is None else loss_fn
    if method == "erm":
        return make()
    if method == "group_dro":
        return GroupDROLoss(make(reduction="none"), num_groups, step_size=step_size, absent_groups=absent_groups)
    raise ValueError(f"teacher_method must be one of {TEACHER_METHODS}, got {method!r}.")


def teacher_checkpoint(ckpt_dir: str, method: str) -> str:
    """The teacher checkpoint of ``teacher_method``: ``<ckpt_dir>/teacher.pt`` for ``"erm"``,
    ``<ckpt_dir>/teacher_group_dro.pt`` for ``"group_dro"`` (so the two teachers can live side by side).

    Raises:
        ValueError: for another ``method``, naming the id and the valid values.
    """
    if method not in TEACHER_METHODS:
        raise ValueError(f"teacher_method must be one of {TEACHER_METHODS}, got {method!r}.")
    return os.path.join(ckpt_dir, "teacher.pt" if method == "erm" else f"teacher_{method}.pt")
