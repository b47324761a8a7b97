"""The bundles' checkpoint files: teacher loading (the library's ``load_teacher``, with the bundle command that
trains a missing teacher in its error), checks of the files a config needs, and the best model's DRO state."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from monai_groupdistil import engines
from monai_groupdistil.engines.checkpoint_saver import dro_state_filename

from .config import teacher_checkpoint

__all__ = ["dro_state_file", "file_digest", "load_teacher", "require_checkpoint", "require_file"]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger


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
        ValueError: when the checkpoint is damaged (e.g. truncated by a teacher run killed while writing it; the
            file and the command that trains the teacher again are named), does not fit ``network``, or the
            teacher's class count differs from the student's.

    Example::

        teacher = load_teacher(teacher_def, "models/teacher.pt", "cuda:0", num_classes=3, bundle_root=".")
    """
    path = Path(checkpoint)
    root = "." if bundle_root is None else os.fspath(bundle_root)
    configs = "['configs/train.json','configs/train_teacher.json']"  # run from the bundle folder, as in the zoo
    command = "" if root == "." else f"cd {root} && "
    command += f'python -m monai.bundle run --config_file "{configs}" --meta_file configs/metadata.json'
    command += f" --ckpt_dir {path.parent}"
    command += f" --teacher_method {teacher_method}"  # always: the bundles' defaults differ
    if not path.is_file():
        written = Path(teacher_checkpoint(os.fspath(path.parent), teacher_method))
        then = "then rerun this command."
        if written.name != path.name:  # a --teacher_ckpt of another name: the teacher run writes its own name
            then = f"It writes '{written}': then rerun this command with --teacher_ckpt {written}."
        raise FileNotFoundError(
            f"teacher checkpoint '{path}' not found. Train the teacher first, with train_teacher.json after "
            f"train.json and this run's data and size overrides (the teacher's epochs are --teacher_epochs; --epochs, "
            f"--weight_decay and --balanced_sampling are the student's):\n\n    {command}\n\n{then}"
        )
    try:
        engines.read_checkpoint(path, "teacher checkpoint")
    except ValueError as err:
        raise ValueError(
            f"{err}\nTo train the teacher again, with this run's other overrides:\n\n    {command}\n"
        ) from err
    teacher = engines.load_teacher(network, path, device, num_classes=num_classes)
    logger.info("teacher: '%s' (teacher_method %s)", path, teacher_method)  # which teacher a student learns from
    return teacher


def require_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> str:
    """Return ``path`` if it is a readable checkpoint file; otherwise raise an error naming it and saying what it
    should be.

    Args:
        path: the file.
        what: what the file is and how to get it, quoted in the errors.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it cannot be read (damaged, e.g. truncated, or not a PyTorch checkpoint).
    """
    require_file(path, what)
    try:
        engines.read_checkpoint(path, "checkpoint")
    except ValueError as err:
        raise ValueError(f"{err} ({what}.)") from err
    return str(path)


def dro_state_file(model_path: str | os.PathLike) -> str:
    """The file holding the DRO state (loss buffers, ``GroupDROHandler`` history) of the best model ``model_path``.

    :py:class:`~monai_groupdistil.engines.BestModelSaver` writes it next to the model, as ``<stem>_dro_state.pt``
    (``model.pt`` -> ``model_dro_state.pt``). A best-model file of an earlier version of the bundles holds the DRO
    state itself (``{"model", "loss", "dro"}``); it is returned when the separate file is absent.

    Args:
        model_path: the best model's file (``<ckpt_dir>/<ckpt_name>``).

    Raises:
        FileNotFoundError: when neither the DRO-state file nor a model file holding the DRO state exists.
        ValueError: when the DRO-state file is damaged (named, with what to do).
    """
    path = Path(model_path)
    companion = path.with_name(dro_state_filename(path.name))
    if companion.is_file():
        engines.read_checkpoint(companion, "DRO-state file")  # a damaged file is named here, not by torch.load
        return str(companion)
    if path.is_file():
        try:
            if "loss" in torch.load(path, map_location="cpu", weights_only=True, mmap=True):
                return str(path)  # the earlier layout, {"model", "loss", "dro"}
        except Exception:  # a damaged model file: refused with its own message when the model is loaded
            pass
    raise FileNotFoundError(
        f"'{companion}' not found: the DRO state (DRO weights and history) of the best model '{path}', which the "
        "training run writes next to it. Copy it along with the model, or run the training config again. A model "
        "trained without a DRO loss (KD, ERM) has none: evaluate it with its own config merged after train.json "
        "(e.g. configs/kd.json), which sets its method and loss, not with --method."
    )


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` if it is a file; otherwise raise ``FileNotFoundError`` saying what it should be.

    Args:
        path: the file.
        what: what the file is and how to get it, quoted in the error.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"'{path}' not found: {what}.")
    return str(path)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the bytes of ``path``, in hex: the identity of a teacher checkpoint that the resume check
    compares (MONAI's ``monai.apps.utils.check_hash`` verifies a digest but does not return one).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
