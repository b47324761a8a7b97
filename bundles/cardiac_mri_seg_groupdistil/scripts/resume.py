"""Exact resume of an interrupted bundle training run, on ignite's ``Checkpoint`` and MONAI's ``CheckpointLoader``.

A bundle's ``resume_checkpoint`` id is ignite's ``Checkpoint`` of ``save_dict`` and ``resume_dict`` (network, loss
with its DRO state, ``GroupDROHandler``, optimizer, trainer, the best metric, the random states and the run's
settings), written as ``<ckpt_dir>/<method>_epoch=<N>.pt`` after every epoch's validation through an
:py:class:`~monai_groupdistil.engines.AtomicDiskSaver` (a kill at any instant leaves complete files), the two latest
kept. :py:func:`attach_resume` takes the folder's run lock, attaches the checkpoint and, with ``resume`` true, loads
the newest usable file through MONAI's ``CheckpointLoader`` after :py:func:`check_resume_checkpoint` has compared
it with the run: a damaged file or one written by another configuration is skipped with a WARNING naming it, and
when no file is usable the run is refused before anything is loaded or written, with a message naming every file
and why. :py:class:`RunSettings` is the one state object this adds (``RandomStates`` and ``BestMetricState`` are in
``monai_groupdistil.engines.resume_state``).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_groupdistil.engines.checkpoint_saver import remove_temporary_files
from monai_groupdistil.engines.checkpoints import read_checkpoint, shape_mismatches
from monai_groupdistil.engines.resume_state import BestMetricState, RandomStates

from .run_lock import RunLock

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")

__all__ = [
    "BestMetricState",
    "RandomStates",
    "RunSettings",
    "attach_resume",
    "check_resume_checkpoint",
    "latest_checkpoint",
    "usable_checkpoint",
]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger


class RunSettings:
    """Settings a checkpoint must share with the run that resumes from it, checked by name.

    Args:
        values: name -> value (numbers, strings, lists of them), e.g. ``{"method": "groupdistil", "group_names":
            ["A", "B", "C", "D"]}``.

    Raises:
        ValueError: at load time, naming every setting that differs.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = {str(k): _plain(v) for k, v in values.items()}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> list[str]:
        return [
            f"{key} is {state_dict.get(key, '(not set)')!r} in the checkpoint, {value!r} in this run"
            for key, value in self.values.items()
            if _plain(state_dict.get(key, "(not set)")) != value
        ]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        problems = self.check_state_dict(state_dict)
        if problems:
            raise ValueError(f"settings differ: {'; '.join(problems)}.")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    return str(value)


def checkpoint_files(save_dir: str | os.PathLike, prefix: str) -> list[Path]:
    """The ``<prefix>_epoch=<N>.pt`` files of ``save_dir``, by increasing ``N``."""
    pattern = re.compile(re.escape(prefix) + r"_epoch=(\d+)\.pt")
    found = []
    folder = Path(save_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(save_dir: str | os.PathLike, prefix: str) -> Path | None:
    """The ``<prefix>_epoch=<N>.pt`` file of ``save_dir`` with the largest ``N``, or None."""
    files = checkpoint_files(save_dir, prefix)
    return files[-1] if files else None


def _module_differences(key: str, module: torch.nn.Module, state: Mapping[str, Any]) -> list[str]:
    if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        module = module.module
    own = module.state_dict()
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    problems = [f"{key}: {mismatch}" for mismatch in shape_mismatches(tensors, own)]
    missing, unexpected = [n for n in own if n not in state], [n for n in state if n not in own]
    if missing:
        problems.append(f"{key}: {len(missing)} tensor(s) of this run are not in the checkpoint, e.g. {missing[:3]}")
    if unexpected:
        problems.append(
            f"{key}: {len(unexpected)} tensor(s) of the checkpoint are not in this run, e.g. {unexpected[:3]}"
        )
    if len(problems) > 4:
        problems = problems[:3] + [f"{key}: ... and {len(problems) - 3} more differences"]
    if not problems:  # same tensors: let the module check the rest (e.g. a loss's absent_groups)
        try:
            copy.deepcopy(module).load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            problems.append(f"{key}: {err}")
    return problems


def _checkpoint_problems(path: Path, load_dict: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(what, problems)`` preventing ``path`` from being loaded into ``load_dict``: ``what`` says whether the file
    is damaged or of another configuration; ``problems`` is empty when the file is usable."""
    try:
        checkpoint = read_checkpoint(path, "checkpoint")
    except ValueError as err:
        return "the file is damaged", [str(err)]
    if not isinstance(checkpoint, Mapping):
        return "the file is damaged", [f"it holds a {type(checkpoint).__name__}, not a dict of states"]
    problems: list[str] = []
    absent = [key for key in load_dict if key not in checkpoint]
    if absent:
        problems.append(f"the checkpoint has no {absent} (it holds {sorted(checkpoint)})")
    for key, obj in load_dict.items():
        if key not in checkpoint:
            continue
        state = checkpoint[key]
        if isinstance(obj, torch.nn.Module):
            problems += _module_differences(key, obj, state)
        elif hasattr(obj, "check_state_dict"):
            problems += [f"{key}: {p}" for p in obj.check_state_dict(state)]
        elif isinstance(obj, Engine):
            length = getattr(obj.state, "epoch_length", None)
            if length is not None and int(state.get("epoch_length", length)) != int(length):
                problems.append(
                    f"{key}: {state['epoch_length']} iterations per epoch in the checkpoint, {length} in this run "
                    "(another dataset or batch size?)"
                )
        elif isinstance(obj, (torch.optim.Optimizer, Checkpoint, BestMetricState)):
            continue  # their compatibility follows from the network's and the trainer's
        elif hasattr(obj, "load_state_dict"):
            try:
                copy.deepcopy(obj).load_state_dict(state)
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                problems.append(f"{key}: {err}")
    return "it was written by another configuration", problems


def _refusal(path: Path, what: str, problems: list[str]) -> str:
    if what == "the file is damaged":
        return problems[0]  # read_checkpoint's message, which names the file
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"cannot resume from '{path}': {what}:\n{lines}"


_ADVICE = (
    "Resume with the settings of the interrupted run, or start a new run (resume false) with another ckpt_dir "
    "(a new run in this ckpt_dir replaces these files). Nothing was loaded or written."
)


def check_resume_checkpoint(path: str | os.PathLike, load_dict: Mapping[str, Any]) -> None:
    """Check, without changing anything, that the checkpoint ``path`` can be loaded into the objects of ``load_dict``.

    Networks and losses are compared tensor by tensor (names and shapes), then loaded into copies (so a loss
    refuses another ``absent_groups`` with its own message); objects with a ``check_state_dict`` method
    (:py:class:`RunSettings`, :py:class:`RandomStates`) check their part; other objects with a ``load_state_dict``
    (e.g. ``GroupDROHandler``) are loaded into copies; the trainer's iterations per epoch must match.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file and every difference found, or saying that the file is damaged (e.g. truncated
            by a run killed while writing it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist.")
    what, problems = _checkpoint_problems(path, load_dict)
    if problems:
        raise ValueError(f"{_refusal(path, what, problems)}\n{_ADVICE}")


def usable_checkpoint(save_dir: str | os.PathLike, prefix: str, load_dict: Mapping[str, Any]) -> Path | None:
    """The newest ``<prefix>_epoch=<N>.pt`` of ``save_dir`` that loads and fits ``load_dict``, or None if there are
    none; each newer file that does not is skipped with a WARNING naming it and why.

    Args:
        save_dir: the checkpoint folder.
        prefix: the files' prefix (the bundles' ``method``).
        load_dict: the objects the checkpoint will be loaded into (see :py:func:`check_resume_checkpoint`).

    Returns:
        the file to resume from, or None when ``save_dir`` holds no ``<prefix>_epoch=<N>.pt``.

    Raises:
        ValueError: when there are such files but none is usable, naming every file and why; nothing is changed.
    """
    files = checkpoint_files(save_dir, prefix)
    refused = []
    for path in reversed(files):
        what, problems = _checkpoint_problems(path, load_dict)
        if not problems:
            return path
        refused.append(_refusal(path, what, problems))
        logger.warning("skipping a checkpoint for the resume: %s", refused[-1])
    if not files:
        return None
    raise ValueError(
        f"cannot resume: none of the {len(files)} checkpoint(s) {prefix}_epoch=<N>.pt in '{save_dir}' is usable:\n"
        + "\n".join(refused)
        + f"\n{_ADVICE}"
    )


def _rank() -> int:
    return (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )


def _agree(error: str | None) -> str | None:
    """Rank 0's error (or None), made known to every rank of a multi-process run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    message = [error]
    torch.distributed.broadcast_object_list(message, src=0)
    return message[0]


def attach_resume(
    trainer: Engine, checkpoint: Checkpoint, resume: bool = False, map_location: Any = None, lock: bool = True
) -> str | None:
    """Take the checkpoint folder, attach the per-epoch ``checkpoint`` to ``trainer`` and, when ``resume`` is true,
    continue from the newest usable one.

    ``checkpoint`` is ignite's ``Checkpoint`` of the bundles' ``resume_checkpoint`` id: an
    :py:class:`~monai_groupdistil.engines.AtomicDiskSaver` (every file written to a temporary file and renamed into
    place; a file ``Checkpoint`` drops is removed only after the next one is written), ``filename_pattern``
    ``{filename_prefix}_epoch={global_step}.{ext}``, ``n_saved`` 2 and ``include_self``. Called in a bundle's ``run``
    list before ``trainer.run()``, so the checkpoint is written after the epoch's validation; ``trainer.scaler`` is
    added when the trainer uses AMP. After each save, ``<prefix>_epoch=<N>.pt`` files it does not keep (older ones,
    an earlier run's) are removed.

    With ``lock`` (rank 0 of a multi-process run) the folder's :py:class:`~scripts.run_lock.RunLock`
    is taken first: a folder in use by a live run is refused (every rank raises), a stale lock replaced with a
    WARNING; it is released when the trainer completes, at exit, or when this call fails. Then the temporary files
    of writes killed before their rename are removed.

    With ``resume`` true the ``<prefix>_epoch=<N>.pt`` files are tried newest first (:py:func:`usable_checkpoint`):
    a damaged one (e.g. truncated) or one of another configuration is skipped with a WARNING, and the first usable
    one is loaded by MONAI's ``CheckpointLoader`` when the trainer starts; training then goes on with the epoch
    after the checkpoint's, up to this run's ``max_epochs``. Without a checkpoint the run starts from epoch 0
    (logged), so a job script may always pass ``resume`` true. When none is usable the run is refused before
    anything is loaded or written.

    Args:
        trainer: the training engine.
        checkpoint: the ignite ``Checkpoint`` (its ``to_save`` holds everything the run's future depends on).
        resume: whether to continue from the newest usable checkpoint.
        map_location: where to load tensors (the run's device).
        lock: take the folder's run lock.

    Returns:
        the checkpoint the run resumes from, or None.

    Raises:
        RuntimeError: when another live run holds the folder's lock (the folder and that process are named).
        ValueError: when there are checkpoints but none is usable, every file and its problems named.
    """
    from monai.handlers import CheckpointLoader

    folder, prefix = Path(checkpoint.save_handler.dirname), checkpoint.filename_prefix
    run_lock = RunLock(folder) if lock and _rank() == 0 else None
    error = None
    if run_lock is not None:
        try:
            run_lock.acquire()
        except RuntimeError as err:
            error = str(err)
    error = _agree(error)
    if error is not None:
        raise RuntimeError(error)
    try:
        if getattr(trainer, "scaler", None) is not None:
            checkpoint.to_save["scaler"] = trainer.scaler
        load_dict = {**checkpoint.to_save, "checkpointer": checkpoint}
        path = usable_checkpoint(folder, prefix, load_dict) if resume else None
    except BaseException:
        if run_lock is not None:
            run_lock.release()
        raise
    if _rank() == 0:
        remove_temporary_files(folder)
    if resume and path is None:
        logger.warning("resume is true but %s holds no %s_epoch=<N>.pt: starting from epoch 0", folder, prefix)
    if path is not None:
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=map_location).attach(trainer)
        logger.info("resuming from %s", path)

    def save(engine: Engine) -> None:
        checkpoint(engine)
        if _rank():
            return
        kept = {name for _, name in checkpoint.state_dict()["_saved"]}
        for stale in checkpoint_files(folder, prefix):
            if stale.name not in kept:
                stale.unlink(missing_ok=True)
                logger.info("removed %s (an older per-epoch checkpoint, or one of an earlier run)", stale)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, save)
    if run_lock is not None:
        trainer.add_event_handler(Events.COMPLETED, lambda engine: run_lock.release())
    return None if path is None else str(path)
