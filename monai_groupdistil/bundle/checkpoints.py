"""The bundles' teacher loading: the library's ``load_teacher``, with the bundle command that trains a missing
teacher in its error."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from monai_groupdistil import engines

__all__ = ["load_teacher", "require_file"]


def load_teacher(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    bundle_root: str | os.PathLike | None = None,
    teacher_method: str = "erm",
) -> torch.nn.Module:
    """The frozen teacher: ``network`` with the weights of ``checkpoint``, in eval mode, without gradients.

    The teacher is trained by its own run, ``train.json`` + ``train_teacher.json`` (as the model zoo trains each
    network of a bundle with its own ``monai.bundle run``); a missing checkpoint stops the student's run with the
    file's name and that command.

    Args:
        network: the teacher architecture (the bundle's ``teacher_def``).
        checkpoint: the teacher checkpoint (the bundle's ``teacher_ckpt``).
        device: where to put the teacher.
        num_classes: the student's class count; a teacher with another output size is refused.
        bundle_root: the bundle folder, for the command in the error message.
        teacher_method: the bundle id ``teacher_method`` of the teacher, for the command in the error message.

    Raises:
        FileNotFoundError: when the checkpoint is missing, naming it and the command that trains the teacher.
        ValueError: when the checkpoint does not fit ``network`` or the teacher's class count differs from the
            student's.

    Example::

        teacher = load_teacher(teacher_def, "models/teacher.pt", "cuda:0", num_classes=3, bundle_root=".")
    """
    path = Path(checkpoint)
    if not path.is_file():
        root = "." if bundle_root is None else os.fspath(bundle_root)
        configs = f"['{root}/configs/train.json','{root}/configs/train_teacher.json']"
        command = f'python -m monai.bundle run --config_file "{configs}" --bundle_root {root} --ckpt_dir {path.parent}'
        command += f" --teacher_method {teacher_method}" if teacher_method != "erm" else ""
        raise FileNotFoundError(
            f"teacher checkpoint '{path}' not found. Train the teacher first, with train_teacher.json after "
            f"train.json and this run's other overrides (data, sizes, epochs...):\n\n    {command}\n\n"
            "then rerun this command."
        )
    return engines.load_teacher(network, path, device, num_classes=num_classes)


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` if it is a file; otherwise raise ``FileNotFoundError`` saying what it should be.

    Args:
        path: the file.
        what: what the file is and how to get it, quoted in the error.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"'{path}' not found: {what}.")
    return str(path)
