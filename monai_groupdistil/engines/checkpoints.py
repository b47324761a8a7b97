"""Loading a network, and a frozen teacher, from a checkpoint of MONAI's CheckpointSaver or ``torch.save``.

MONAI's ``CheckpointLoader`` loads into an engine's objects at run time; a teacher is needed before the student's
trainer is built, with errors that name the file and what does not fit.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_network", "load_teacher", "output_classes", "read_checkpoint", "shape_mismatches"]


def shape_mismatches(state: Mapping[str, torch.Tensor], network_state: Mapping[str, torch.Tensor]) -> list[str]:
    """``"<name>: checkpoint (shape) vs network (shape)"`` for every tensor of ``state`` whose shape differs from the
    tensor of the same name in ``network_state`` (a network's ``state_dict()``), for error messages and logs."""
    return [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(network_state[k].shape)}"
        for k, v in state.items()
        if k in network_state and tuple(v.shape) != tuple(network_state[k].shape)
    ]


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file, say what is wrong and what to do.

    Args:
        path: the checkpoint file.
        what: what the file is, for the messages (e.g. ``"teacher checkpoint"``).
        map_location: where to load tensors.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file cannot be read: damaged (e.g. truncated by a run killed while writing it, or empty)
            or not a PyTorch checkpoint, or holding objects ``weights_only`` loading refuses (arbitrary Python
            objects are never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' does not exist.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch reports damage as EOFError, RuntimeError, UnpicklingError, IndexError...
        refused = isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower()
        if refused and zipfile.is_zipfile(path):  # a complete checkpoint (torch's zip format) holding objects
            raise ValueError(
                f"{what} '{path}' holds Python objects other than tensors, numbers, strings and containers of them, "
                "so it is not loaded (torch.load with weights_only=True never runs code from a file). Save the "
                "state dicts (network.state_dict()) rather than objects."
            ) from err
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{what} '{path}' cannot be read: the file is damaged ({path.stat().st_size} bytes; e.g. truncated by a "
            f"run killed while writing it) or is not a PyTorch checkpoint ({type(err).__name__}: {detail}). "
            "Replace it: train again, or copy the file again from where it came from."
        ) from err


def _state_dict_of(checkpoint: object, key: str, path: Path) -> Mapping[str, torch.Tensor]:
    # CheckpointSaver writes a bare state dict when its save_dict has one entry, {name: state_dict, ...} otherwise
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a state dict.")
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
        return checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(
        f"checkpoint '{path}' has no '{key}' entry; it holds {sorted(checkpoint)}: pass the entry of the network's "
        "weights as `key`."
    )


def load_network(
    network: torch.nn.Module, checkpoint: str | os.PathLike, key: str = "model", device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load ``network``'s weights (strictly) from a checkpoint file and return the network on ``device``.

    Args:
        network: the network to fill.
        checkpoint: a file written by MONAI's ``CheckpointSaver`` (a bare state dict when its ``save_dict`` had one
            entry, ``{name: state_dict, ...}`` otherwise) or by ``torch.save(network.state_dict(), path)``.
        key: the entry holding the network's weights when the file holds several objects. Defaults to ``"model"``.
        device: where to put the network.

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when the file cannot be read (damaged, e.g. truncated: see :py:func:`read_checkpoint`), holds no
            state dict, no ``key`` entry (the entries are listed), or weights that do not fit ``network`` (the first
            mismatched shapes are named).

    Example::

        net = load_network(DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), "runs/net_final.pt")
    """
    return _load_into(network, Path(checkpoint), key, device, "checkpoint")


def _load_into(
    network: torch.nn.Module, path: Path, key: str, device: str | torch.device, what: str
) -> torch.nn.Module:
    state = _state_dict_of(read_checkpoint(path, what), key, path)
    mismatched = shape_mismatches(state, network.state_dict())
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
    key: str = "model",
    num_classes: int | None = None,
) -> torch.nn.Module:
    """The teacher for distillation: ``network`` with the weights of ``checkpoint``, in eval mode, without gradients.

    Args:
        network: the teacher's architecture.
        checkpoint: the teacher's checkpoint, as for :py:func:`load_network`.
        device: where to put the teacher.
        key: the entry of the teacher's weights when the file holds several objects (``CheckpointSaver`` with a
            ``save_dict`` of several entries). Defaults to ``"model"``.
        num_classes: the student's class count; a classifier teacher with another output size is refused.

    Raises:
        FileNotFoundError: when the checkpoint is missing (train and save the teacher first).
        ValueError: as for :py:func:`load_network` (a damaged file is named: train or copy the teacher again), and
            for a teacher predicting another number of classes.

    Example::

        teacher = load_teacher(DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), "teacher/net_final.pt")
        trainer = DistillationTrainer(..., teacher=teacher, loss_function=GroupDistillationLoss(num_groups=4))
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint '{path}' not found: train the teacher first and save its weights there, e.g. with "
            "MONAI's CheckpointSaver(save_dir, save_dict={'model': teacher}, save_final=True) or "
            "torch.save(teacher.state_dict(), path)."
        )
    teacher = _load_into(network, path, key, device, "teacher checkpoint")
    if num_classes is not None:
        out_features = output_classes(teacher)
        if out_features is not None and out_features != num_classes:
            raise ValueError(
                f"the teacher in '{path}' predicts {out_features} classes but the student predicts {num_classes}; "
                "distillation needs the same classes (retrain the teacher with the student's classes)."
            )
    return teacher.eval().requires_grad_(False)


def output_classes(network: torch.nn.Module) -> int | None:
    """The class count of a classifier: the output size of its last ``torch.nn.Linear`` layer (None if it has none).

    Args:
        network: the network (wrappers such as DistributedDataParallel are looked through).
    """
    last = None
    for module in network.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    return None if last is None else last.out_features
