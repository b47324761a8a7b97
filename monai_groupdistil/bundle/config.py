"""Reading bundle ids given on the command line, and checking what a config asks of a component."""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from monai_groupdistil.losses import GroupDROLoss

__all__ = ["TEACHER_METHODS", "as_bool", "checked_arguments", "handler_ref", "teacher_checkpoint", "teacher_loss"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def as_bool(value: Any, name: str = "value") -> bool:
    """The boolean a bundle id means, whichever way it was written.

    ``python -m monai.bundle run`` reads its ``--id value`` pairs with ``fire``, which turns ``True``/``False`` into
    booleans and ``1``/``0`` into integers but leaves ``true``, ``false``, ``yes``, ``no`` as strings, and the
    string ``"false"`` is truthy. The bundles read every boolean id through this function.

    Args:
        value: a bool, 0 or 1, or one of the strings ``true/1/yes`` and ``false/0/no`` (any case, surrounding
            spaces ignored).
        name: the id, quoted in the error.

    Returns:
        the boolean.

    Raises:
        ValueError: for anything else, naming ``name`` and the accepted values.

    Example::

        >>> as_bool("False", "augment"), as_bool("yes", "augment"), as_bool(1, "augment")
        (False, True, True)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(
        f"'{name}' must be a boolean, got {value!r} ({type(value).__name__}). Use true/false (also True/False, "
        f"1/0, yes/no), e.g. --{name} false."
    )


def checked_arguments(component: Callable, config_id: str = "loss") -> Callable:
    """Wrap ``component`` (a class or function) so that unknown keyword arguments stop with a helpful message.

    Used as ``"_target_": "$monai_groupdistil.bundle.checked_arguments(<class>, 'loss')"`` in a bundle config:
    an override such as ``--loss#temprature 2.0`` then stops with a ``TypeError`` that names the unknown
    argument, suggests the closest valid one and lists every argument ``component`` accepts, instead of Python's
    bare "unexpected keyword argument". Components that take ``**kwargs`` are not checked.

    Args:
        component: the class or function the config instantiates.
        config_id: the config id of the component (``loss``), quoted in the message.

    Returns:
        a function with ``component``'s name, docstring and signature that checks the keyword arguments, then
        returns ``component(**kwargs)``.
    """
    try:
        parameters = inspect.signature(component).parameters
    except (TypeError, ValueError):  # no signature to check against
        return component
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return component
    valid = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    name = f"{getattr(component, '__module__', '')}.{getattr(component, '__qualname__', component)}".lstrip(".")

    @functools.wraps(component, updated=())
    def make(**kwargs: Any) -> Any:
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            names, fixes = [], []
            for key in unknown:
                close = difflib.get_close_matches(key, valid, n=1)
                names.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
                if close:
                    fixes.append(f"--{config_id}#{close[0]} {_cli_value(kwargs[key])}")
            example = f" (e.g. {', '.join(fixes)})" if fixes else ""
            raise TypeError(
                f"'{config_id}' ({name}) got unknown argument(s) {', '.join(names)}. The valid arguments of {name} "
                f"are: {', '.join(valid)}. Correct the argument's name in the override{example} or in the config "
                f"file, or remove it."
            )
        return component(**kwargs)

    return make


def _cli_value(value: Any) -> str:
    """``value`` written so that ``fire`` (the ``monai.bundle`` command line) reads it back unchanged."""
    if isinstance(value, (os.PathLike, Path)):
        value = os.fspath(value)
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return value
        return value if isinstance(parsed, str) else repr(value)  # "123" would come back as a number
    if isinstance(value, (bool, numbers.Number)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(_plain(v)) for v in value) + "]"
    return str(value)  # torch.device and the like


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, numbers.Number)) or value is None:
        return value
    return str(value)


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
    ``teacher_step_size``) and ``absent_groups``.

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


def handler_ref(handler: Any) -> Any:
    """``handler`` itself: a bundle's handler list refers to a handler defined under its own id through it.

    MONAI's ``ConfigWorkflow.check_properties`` reads every entry of ``train#handlers`` as a component (a dict with
    ``_target_``) and ``--tracking`` appends to the list, so the list holds components rather than ``@id``
    strings; a ``_disabled_`` entry is left out of the list by MONAI (a plain ``@id`` of a disabled component
    would leave a ``None`` there). In a config::

        "train": {
            "dro_handler": {"_target_": "monai_groupdistil.handlers.GroupDROHandler", "loss": "@loss",
                            "_disabled_": "$not @use_dro"},
            "handlers": [{"_target_": "monai_groupdistil.bundle.handler_ref", "handler": "@train#dro_handler",
                          "_disabled_": "$@train#dro_handler is None"}]
        }

    Args:
        handler: the handler (an ``@id`` reference).

    Returns:
        ``handler``.
    """
    return handler
