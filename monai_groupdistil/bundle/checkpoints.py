"""Loading the teacher (and trained students) from bundle checkpoints, with errors that say what to do."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["load_network", "load_teacher", "output_classes", "require_file"]


def _state_dict_of(checkpoint: object, key: str, path: Path) -> Mapping[str, torch.Tensor]:
    """The network's state dict in a checkpoint written by ``CheckpointSaver`` (single object or a dict of them)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a state dict.")
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
        return checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"checkpoint '{path}' has no '{key}' entry; it holds {sorted(checkpoint)}.")


def load_network(
    network: torch.nn.Module, checkpoint: str | os.PathLike, key: str = "model", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load ``network``'s weights from a checkpoint file and return the network on ``device``.

    Args:
        network: the network to fill.
        checkpoint: a file written by ``CheckpointSaver`` (``{key: state_dict, ...}``) or a plain state dict.
        key: the entry holding the network's weights.
        device: where to put the network.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when the checkpoint does not fit ``network`` (e.g. another class count); both shapes are named.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist.")
    state = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), key, path)
    own = network.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"checkpoint '{path}' does not fit the network {type(network).__name__} (a different class count or "
            f"architecture?): {'; '.join(mismatched[:3])}."
        )
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint '{path}' does not fit the network {type(network).__name__}: {err}") from err
    return network.to(device)


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
    teacher = load_network(network, path, device=device)
    if num_classes is not None:
        out_features = _output_classes(teacher)
        if out_features is not None and out_features != num_classes:
            raise ValueError(
                f"the teacher in '{path}' predicts {out_features} classes but the student predicts {num_classes}; "
                "distillation needs the same classes (retrain the teacher with the student's classes)."
            )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _output_classes(network: torch.nn.Module) -> int | None:
    """Size of the last linear layer's output (the class count of a classifier), if there is one."""
    last = None
    for module in network.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    return None if last is None else last.out_features


def output_classes(network: torch.nn.Module) -> int | None:
    """The class count of a classifier: the output size of its last ``torch.nn.Linear`` layer (None if it has none).

    Args:
        network: the network (wrappers such as DistributedDataParallel are looked through).
    """
    return _output_classes(network)


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` if it is a file; otherwise raise ``FileNotFoundError`` saying what it should be.

    Args:
        path: the file.
        what: what the file is and how to get it, quoted in the error.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"'{path}' not found: {what}.")
    return str(path)
