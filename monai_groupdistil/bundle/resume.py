"""Exact resume of an interrupted bundle training run: per-epoch checkpoints of everything the run depends on.

A bundle run attaches :py:func:`attach_resume` to its trainer. At the end of every epoch (after validation) it
writes ``<save_dir>/<prefix>_epoch=<N>.pt`` holding the network, optimizer, trainer state, loss (with its DRO
state), ``GroupDROHandler``, the key metric's best value, the random states the data order and the augmentations
depend on (:py:class:`RandomStates`) and the run's structural settings (:py:class:`RunSettings`); the two latest
files are kept. With ``resume`` true, a run loads the latest of them (MONAI's ``CheckpointLoader``, at the
trainer's ``STARTED``) and continues with the next epoch, so that the resumed run ends with exactly the weights of
an uninterrupted one. A checkpoint written by another configuration is refused before anything is loaded or
written, with a message naming every difference.
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

from monai_groupdistil.engines.resume_state import BestMetricState, RandomStates

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, DiskSaver
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
    DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = [
    "BestMetricState",
    "RandomStates",
    "ResumeCheckpointSaver",
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


class ResumeCheckpointSaver:
    """Writes ``<save_dir>/<prefix>_epoch=<N>.pt`` at the end of every ``save_interval``-th epoch, keeping ``n_saved``.

    Built on ignite's ``Checkpoint`` with an atomic ``DiskSaver`` (a file is written to a temporary name and then
    renamed, so a run killed while saving never leaves a damaged checkpoint) and ``include_self`` (the list of
    files it keeps is in every checkpoint, under ``checkpointer``, so that a resumed run goes on removing the
    oldest). After each save, ``<prefix>_epoch=*.pt`` files it does not keep (left by an earlier run of the same
    method in the folder) are removed. Only rank 0 writes.

    Args:
        save_dir: the folder.
        save_dict: name -> object with ``state_dict()`` (DistributedDataParallel is saved without its wrapper).
        prefix: the file name prefix (the bundles use the method: ``groupdistil_epoch=3.pt``).
        n_saved: number of latest checkpoints kept (2: a run killed while writing keeps the previous one).
        save_interval: save every N epochs.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        prefix: str,
        n_saved: int = 2,
        save_interval: int = 1,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must be a non-empty string.")
        self.save_dir = Path(save_dir)
        self.prefix = prefix
        self.save_interval = int(save_interval)
        self.checkpoint = Checkpoint(
            to_save=dict(save_dict),
            save_handler=DiskSaver(str(save_dir), create_dir=True, require_empty=False, atomic=True),
            filename_prefix=prefix,
            n_saved=n_saved,
            global_step_transform=lambda engine, _: engine.state.epoch,
            filename_pattern="{filename_prefix}_epoch={global_step}.{ext}",
            include_self=True,
        )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)

    def __call__(self, engine: Engine) -> None:
        self.checkpoint(engine)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        kept = {name for _, name in self.checkpoint.state_dict()["_saved"]}
        for path in checkpoint_files(self.save_dir, self.prefix):
            if path.name not in kept:
                path.unlink(missing_ok=True)
                logger.info("removed %s (a per-epoch checkpoint of an earlier run)", path)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.checkpoint.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.checkpoint.load_state_dict(state_dict)


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
    problems = [
        f"{key}: {name} has shape {tuple(state[name].shape)} in the checkpoint, {tuple(own[name].shape)} in this run"
        for name in own
        if name in state
        and isinstance(state[name], torch.Tensor)
        and tuple(state[name].shape) != tuple(own[name].shape)
    ]
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
        elif isinstance(obj, (torch.optim.Optimizer, ResumeCheckpointSaver, BestMetricState)):
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
    trainer: Engine,
    save_dir: str | os.PathLike,
    save_dict: Mapping[str, Any],
    prefix: str,
    resume: Any = False,
    n_saved: int = 2,
    map_location: Any = None,
) -> str | None:
    """Attach the per-epoch checkpoints to ``trainer`` and, when ``resume`` is true, continue from the latest one.

    Called in a bundle's ``run`` list before ``trainer.run()``; its handlers go after the trainer's own, so each
    checkpoint is written after the epoch's validation. ``save_dict`` should hold everything the run's future
    depends on (the bundles pass network, loss, DRO handler, optimizer, trainer, :py:class:`RandomStates`,
    :py:class:`BestMetricState` and :py:class:`RunSettings`); the saver adds itself as ``checkpointer`` and
    ``trainer.scaler`` is added when the trainer uses AMP.

    With ``resume`` true and a checkpoint in ``save_dir``, the latest one is checked against this run
    (:py:func:`check_resume_checkpoint`: a checkpoint of another configuration stops the run before anything is
    loaded or written) and MONAI's ``CheckpointLoader`` loads it when the trainer starts; training then goes on with
    the epoch after the checkpoint's, up to this run's ``max_epochs``. Without a checkpoint the run starts from
    epoch 0 (logged), so a job script may always pass ``resume`` true.

    Args:
        trainer: the training engine.
        save_dir: the checkpoint folder (the bundles' ``ckpt_dir``).
        save_dict: name -> object to save and restore.
        prefix: the file name prefix (the method).
        resume: whether to continue from the latest checkpoint.
        n_saved: how many per-epoch checkpoints to keep.
        map_location: where to load tensors (the run's device).

    Returns:
        the checkpoint the run resumes from, or None.

    Raises:
        ValueError: for a checkpoint of another configuration (every difference named) or a bad ``resume`` value.
    """
    from monai.handlers import CheckpointLoader

    resume = bool(resume)
    objects = dict(save_dict)
    if getattr(trainer, "scaler", None) is not None:
        objects["scaler"] = trainer.scaler
    saver = ResumeCheckpointSaver(save_dir, objects, prefix, n_saved=n_saved)
    path = latest_checkpoint(save_dir, prefix) if resume else None
    if resume and path is None:
        logger.warning("resume is true but %s holds no %s_epoch=<N>.pt: starting from epoch 0", save_dir, prefix)
    if path is not None:
        load_dict = {**objects, "checkpointer": saver}
        check_resume_checkpoint(path, load_dict)
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=map_location).attach(trainer)
        logger.info("resuming from %s", path)
    saver.attach(trainer)
    return None if path is None else str(path)
