"""Loading the teacher (and trained students) from bundle checkpoints, with errors that say what to do."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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
    train_if_missing: bool = False,
    train_fn: Callable[[], object] | None = None,
    how_to_train: str = "",
) -> torch.nn.Module:
    """The frozen teacher: ``network`` with the weights of ``checkpoint``, in eval mode, without gradients.

    Args:
        network: the teacher architecture (the bundle's ``teacher_def``).
        checkpoint: the teacher checkpoint (``@ckpt_dir/teacher.pt``).
        device: where to put the teacher.
        num_classes: the student's class count; a teacher with another output size is refused.
        train_if_missing: when the checkpoint is missing, call ``train_fn`` (which must write it) instead of
            failing.
        train_fn: trains the teacher and writes ``checkpoint``.
        how_to_train: the command that trains the teacher (:py:func:`teacher_command`), quoted on a line of its
            own in the error message.

    Raises:
        FileNotFoundError: when the checkpoint is missing (and ``train_if_missing`` is False), with the command
            that trains the teacher.
        ValueError: when the checkpoint does not fit ``network`` or the teacher's class count differs from the
            student's.
    """
    path = Path(checkpoint)
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(
                f"teacher checkpoint '{path}' not found. Train the teacher first"
                + (
                    f", from the folder this run was started in (the command repeats this run's settings):\n\n"
                    f"    {how_to_train}\n\nthen rerun this command;"
                    if how_to_train
                    else ";"
                )
                + " or rerun with train_teacher_if_missing=true (--train_teacher_if_missing true) to train it now."
            )
        if train_fn is None:
            raise ValueError("train_teacher_if_missing is true but no teacher training function was given.")
        train_fn()
        if not path.is_file():
            raise FileNotFoundError(f"teacher training finished but did not write '{path}'.")
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
