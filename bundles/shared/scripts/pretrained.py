"""Optional initialisation of a bundle network from a local file of pretrained weights (nothing is downloaded)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.networks.utils import copy_model_state

from monai_groupdistil.engines.checkpoints import shape_mismatches

__all__ = ["load_pretrained"]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger

_WRAPPER_KEYS = ("model", "state_dict", "network", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def _extract_state_dict(checkpoint: object, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict, or of the entry ``key`` (or a usual wrapper key) of a checkpoint."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"pretrained weights '{path}' hold a {type(checkpoint).__name__}, not a state dict.")
    if key is not None:
        if key not in checkpoint or not isinstance(checkpoint[key], Mapping):
            raise ValueError(
                f"pretrained weights '{path}' have no state dict under '{key}'; keys: {sorted(checkpoint)}."
            )
        checkpoint = checkpoint[key]
    elif not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        for wrapper in _WRAPPER_KEYS:
            if isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint = checkpoint[wrapper]
                break
    state = {str(k): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"pretrained weights '{path}' hold no tensors; top-level keys: {sorted(checkpoint)[:10]}.")
    for prefix in _PREFIXES:  # DistributedDataParallel, wrappers, torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_pretrained(
    network: torch.nn.Module,
    path: str | os.PathLike | None,
    strict: bool = False,
    key: str | None = None,
) -> torch.nn.Module:
    """Initialise ``network`` from a local file of pretrained weights, if one is given, and return it.

    The file is read with ``torch.load(weights_only=True)``; it may be a plain state dict (e.g.
    ``torch.save(torchvision.models.resnet18(weights=...).state_dict(), "resnet18.pt")``; MONAI's ``ResNet``
    uses torchvision's parameter names), a checkpoint of this package (``{"model": state_dict, ...}``), or a
    dict wrapping the state dict under ``key`` or one of ``model``, ``state_dict``, ``network``, ``net``.
    ``module.`` / ``model.`` / ``_orig_mod.`` prefixes shared by every name are removed. The tensors are matched
    and copied by MONAI's ``copy_model_state``; reading the file is ours because MONAI's ``CheckpointLoader`` neither
    finds a wrapped state dict nor strips prefixes, and reports no shape mismatch before loading.

    With ``strict=False`` every tensor whose name and shape match is loaded; tensors with another shape (the
    classifier ``fc`` of a model trained on other classes, typically) and names the network lacks are skipped, and
    the network's own initialisation is kept for what the file lacks. What was loaded and skipped is logged to the
    ``monai_groupdistil.bundle`` logger. Nothing is ever downloaded.

    Args:
        network: the network to initialise (a wrapper such as ``DistributedDataParallel`` is looked through).
        path: the weights file; None, ``""``, ``"null"`` or ``"None"`` leaves ``network`` unchanged.
        strict: require every parameter of the network to be in the file with the same shape, and nothing else.
        key: the checkpoint entry holding the state dict (default: found automatically).

    Returns:
        ``network`` (the same object), initialised in place.

    Raises:
        FileNotFoundError: when ``path`` is given but is not a file (the path is named).
        ValueError: when the file holds no state dict, when nothing in it fits the network, or, with
            ``strict=True``, when names or shapes differ (they are listed).

    Example::

        from monai.networks.nets import ResNet
        from scripts.pretrained import load_pretrained

        net = ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=3, num_classes=2)
        load_pretrained(net, "/models/resnet18_imagenet.pt")  # all but the 1000-class fc layer
    """
    if path is None or str(path).strip().lower() in ("", "null", "none"):  # the CLI (fire) passes null as a string
        return network
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights '{file}' not found; give the path of a local state-dict file (nothing is "
            "downloaded), or null (None) to train from scratch."
        )
    target = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    state = _extract_state_dict(torch.load(file, map_location="cpu", weights_only=True), file, key)
    own = target.state_dict()
    shape_mismatch = shape_mismatches(state, own)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    if strict and (shape_mismatch or unexpected or missing):
        raise ValueError(
            f"pretrained weights '{file}' do not fit {type(target).__name__} exactly (strict=True): "
            f"different shapes {shape_mismatch[:5]}, not in the network {unexpected[:5]}, not in the file "
            f"{missing[:5]}."
        )
    new_state, updated, _ = copy_model_state(target, state, inplace=False)  # the tensors whose name and shape match
    if not {name for name, _ in target.named_parameters()}.intersection(updated):  # counters fit anything
        raise ValueError(
            f"no tensor of pretrained weights '{file}' fits {type(target).__name__} (names or shapes differ "
            f"everywhere, e.g. {(shape_mismatch or unexpected)[:3]}); is it the weights of another architecture?"
        )
    target.load_state_dict(new_state)
    logger.info(
        "pretrained weights %s: loaded %d of the network's %d tensors; skipped (shape differs) %s; not in the "
        "network %s; kept the initialisation of %d tensor(s) not in the file %s",
        file,
        len(updated),
        len(own),
        shape_mismatch or "none",
        unexpected[:10] or "none",
        len(missing),
        missing[:10] or "",
    )
    return network
