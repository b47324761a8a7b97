"""Exact resume of an interrupted bundle training run, on ignite's ``Checkpoint`` and MONAI's ``CheckpointLoader``.

A bundle's ``resume_checkpoint`` id is ignite's ``Checkpoint`` of ``save_dict`` and ``resume_dict`` (network, loss
with its DRO state, ``GroupDROHandler``, optimizer, trainer, the best metric, the random states and the run's
settings), written as ``<ckpt_dir>/<method>_epoch=<N>.pt`` after every epoch's validation, the two latest kept.
:py:func:`attach_resume` attaches it and, with ``resume`` true, loads the latest file through MONAI's
``CheckpointLoader`` after :py:func:`check_resume_checkpoint` has compared it with the run: a checkpoint written by
another configuration is refused before anything is loaded or written, with a message naming every difference.
:py:class:`RunSettings` is the one state object this adds (``RandomStates`` and ``BestMetricState`` are in
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

from monai_groupdistil.engines.checkpoints import shape_mismatches
from monai_groupdistil.engines.resume_state import BestMetricState, RandomStates

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
]

logger = logging.getLogger("monai_groupdistil.bundle")


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


def check_resume_checkpoint(path: str | os.PathLike, load_dict: Mapping[str, Any]) -> None:
    """Check, without changing anything, that the checkpoint ``path`` can be loaded into the objects of ``load_dict``.

    Networks and losses are compared tensor by tensor (names and shapes), then loaded into copies (so a loss
    refuses another ``absent_groups`` with its own message); objects with a ``check_state_dict`` method
    (:py:class:`RunSettings`, :py:class:`RandomStates`) check their part; other objects with a ``load_state_dict``
    (e.g. ``GroupDROHandler``) are loaded into copies; the trainer's iterations per epoch must match.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file and every difference found.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(
            f"cannot resume from '{path}': it was written by another configuration:\n{lines}\n"
            "Resume with the settings of the interrupted run, or start a new run (resume false) with another "
            "ckpt_dir. Nothing was loaded or written."
        )


def attach_resume(
    trainer: Engine, checkpoint: Checkpoint, resume: bool = False, map_location: Any = None
) -> str | None:
    """Attach the per-epoch ``checkpoint`` to ``trainer`` and, when ``resume`` is true, continue from the latest one.

    ``checkpoint`` is ignite's ``Checkpoint`` of the bundles' ``resume_checkpoint`` id: an atomic ``DiskSaver`` (a
    run killed while saving never leaves a damaged file), ``filename_pattern`` ``{filename_prefix}_epoch={global_step}
    .{ext}``, ``n_saved`` 2 and ``include_self`` (the list of files it keeps is saved under ``checkpointer``, so a
    resumed run goes on removing the oldest). Called in a bundle's ``run`` list before ``trainer.run()``, so the
    checkpoint is written after the epoch's validation; ``trainer.scaler`` is added when the trainer uses AMP. After
    each save, ``<prefix>_epoch=<N>.pt`` files it does not keep (an earlier run's) are removed.

    With ``resume`` true and a checkpoint in the folder, the latest one is checked against this run
    (:py:func:`check_resume_checkpoint`: a checkpoint of another configuration stops the run before anything is
    loaded or written) and MONAI's ``CheckpointLoader`` loads it when the trainer starts; training then goes on with
    the epoch after the checkpoint's, up to this run's ``max_epochs``. Without a checkpoint the run starts from
    epoch 0 (logged), so a job script may always pass ``resume`` true.

    Args:
        trainer: the training engine.
        checkpoint: the ignite ``Checkpoint`` (its ``to_save`` holds everything the run's future depends on).
        resume: whether to continue from the latest checkpoint.
        map_location: where to load tensors (the run's device).

    Returns:
        the checkpoint the run resumes from, or None.

    Raises:
        ValueError: for a checkpoint of another configuration, every difference named.
    """
    from monai.handlers import CheckpointLoader

    folder, prefix = checkpoint.save_handler.dirname, checkpoint.filename_prefix
    if getattr(trainer, "scaler", None) is not None:
        checkpoint.to_save["scaler"] = trainer.scaler
    path = latest_checkpoint(folder, prefix) if resume else None
    if resume and path is None:
        logger.warning("resume is true but %s holds no %s_epoch=<N>.pt: starting from epoch 0", folder, prefix)
    if path is not None:
        load_dict = {**checkpoint.to_save, "checkpointer": checkpoint}
        check_resume_checkpoint(path, load_dict)
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=map_location).attach(trainer)
        logger.info("resuming from %s", path)

    def save(engine: Engine) -> None:
        checkpoint(engine)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        kept = {name for _, name in checkpoint.state_dict()["_saved"]}
        for stale in checkpoint_files(folder, prefix):
            if stale.name not in kept:
                stale.unlink(missing_ok=True)
                logger.info("removed %s (a per-epoch checkpoint of an earlier run)", stale)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, save)
    return None if path is None else str(path)
