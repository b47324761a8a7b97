"""Reading bundle ids given on the command line, and checking what a config asks of a component."""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import json
import numbers
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_groupdistil.losses import GroupDROLoss

__all__ = ["as_bool", "checked_arguments", "teacher_command"]

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


def _quote(text: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./-]+", text):
        return text
    if not re.search(r"[\"$`\\!]", text):
        return f'"{text}"'
    return shlex.quote(text)


def teacher_command(
    bundle_root: str | os.PathLike,
    overrides: Mapping[str, Any],
    configs: Sequence[str] = ("train.json", "train_teacher.json"),
    python: str = "python",
) -> str:
    """The ``python -m monai.bundle run`` command that trains the teacher with the same settings as this run.

    Every id of ``overrides`` is passed on (``--id value``), except those whose value equals the literal default
    written in ``<bundle_root>/configs/train.json``; ids whose default is an expression (the folders, ``device``)
    are always passed on. The bundles call it with their ``teacher_overrides``, the ids ``train_teacher.json``
    shares with ``train.json``.

    Args:
        bundle_root: the bundle folder.
        overrides: id -> value of this run.
        configs: the config files of the teacher run, in ``<bundle_root>/configs``.
        python: the Python command.

    Returns:
        one shell command line.
    """
    root = os.fspath(bundle_root)
    defaults: dict[str, Any] = {}
    train_json = Path(root) / "configs" / "train.json"
    if train_json.is_file():
        with open(train_json) as f:
            defaults = json.load(f)
    files = "[" + ",".join(f"'{root}/configs/{c}'" for c in configs) + "]"
    parts = [python, "-m", "monai.bundle", "run", "--config_file", _quote(files)]
    parts += ["--meta_file", _quote(f"{root}/configs/metadata.json"), "--bundle_root", _quote(root)]
    for key, value in overrides.items():
        if key == "bundle_root":
            continue
        default = defaults.get(key, ...)
        is_literal = default is not ... and not (isinstance(default, str) and default[:1] in ("$", "@", "%"))
        if isinstance(default, bool):  # written as true/false/yes/no/1/0 in this run
            try:
                value = as_bool(value, key)
            except ValueError:
                pass
        if is_literal and _plain(value) == default:
            continue
        parts += [f"--{key}", _quote(_cli_value(value))]
    return " ".join(parts)


TEACHER_METHODS = ("erm", "group_dro")


def teacher_loss(method: str, num_groups: int, step_size: float, absent_groups: str = "ema") -> torch.nn.Module:
    """The teacher's loss for the bundle id ``teacher_method``.

    ``"erm"``: cross entropy. ``"group_dro"``: ``GroupDROLoss`` around per-sample cross entropy (a robust teacher,
    whose soft targets are not tuned to the majority groups), with ``step_size`` (the id ``teacher_step_size``) and
    ``absent_groups``.

    Raises:
        ValueError: for another ``method``, naming the id and the valid values.
    """
    if method == "erm":
        return torch.nn.CrossEntropyLoss()
    if method == "group_dro":
        per_sample = torch.nn.CrossEntropyLoss(reduction="none")
        return GroupDROLoss(per_sample, num_groups, step_size=step_size, absent_groups=absent_groups)
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
