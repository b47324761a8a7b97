"""Checkpointable states that MONAI's CheckpointSaver cannot save by itself, for exact resume.

``RandomStates``: the random generators a run's data order and augmentations draw from. ``BestMetricState``: the
evaluator's best key metric (MONAI's evaluator starts it anew), so a resumed run keeps the best model it had. Put
them in the per-epoch checkpoint's ``save_dict`` (``CheckpointSaver``, or ignite's ``Checkpoint``) next to the
network, optimizer, trainer and loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["BestMetricState", "RandomStates"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _numpy_state(rs: np.random.RandomState) -> dict[str, Any]:
    """A ``RandomState``'s state as types ``torch.load(weights_only=True)`` reads back (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = rs.get_state()
    return {
        "name": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(rs: np.random.RandomState, state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    rs.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _walk_randomizable(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, np.random.RandomState]]:
    """``(path, R)`` of every object below ``obj`` (a transform, a list or dict of them) holding a ``RandomState``."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _walk_randomizable(item, f"{path}.{i}", seen)
        return
    if isinstance(obj, Mapping):
        for key, item in obj.items():
            yield from _walk_randomizable(item, f"{path}.{key}", seen)
        return
    if isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, int, float)) or not hasattr(obj, "__dict__"):
        return
    state = getattr(obj, "R", None)
    if isinstance(state, np.random.RandomState):
        yield path, state
    for key, value in vars(obj).items():
        if key.startswith("_") or key == "R":
            continue
        if isinstance(value, (list, tuple, Mapping)) or hasattr(value, "R") or hasattr(value, "transforms"):
            yield from _walk_randomizable(value, f"{path}.{key}", seen)


class RandomStates:
    """The random states a training run's data order and augmentations depend on, as a checkpointable object.

    ``state_dict()`` holds Python's, NumPy's and torch's global generators (CUDA's too when it is initialised) and
    the ``RandomState`` (``.R``) of every MONAI randomizable transform of ``sources``; ``load_state_dict`` puts them
    back. With MONAI's ``DataLoader`` and ``num_workers=0`` the transforms draw from their own ``R`` in the main
    process and the shuffling sampler draws its seed from torch's global generator, so restoring these states at
    the start of a resumed run reproduces the uninterrupted run's batches and augmentations. (With workers, the
    worker seeds derive from torch's global generator, which is restored too.) In a multi-process run the states
    of every rank are gathered (``state_dict`` is then a collective call, as ``Checkpoint`` makes it on every rank)
    and each rank gets its own back.

    Args:
        sources: a dataset (its ``transform`` is searched) or transform, or a list of them.

    Raises:
        ValueError: at load time, when the checkpoint holds states for other transforms or another process count.

    Example::

        states = RandomStates([train_dataset])
        CheckpointSaver(save_dir, {"model": net, "random_states": states}, save_interval=1).attach(trainer)
    """

    def __init__(self, sources: Any) -> None:
        self.sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]

    def _transforms(self) -> list[tuple[str, np.random.RandomState]]:
        seen: set[int] = set()
        found: list[tuple[str, np.random.RandomState]] = []
        for i, source in enumerate(self.sources):
            target = getattr(source, "transform", source) if isinstance(source, torch.utils.data.Dataset) else source
            found += list(_walk_randomizable(target, f"source{i}", seen))
        return found

    def _local_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": _numpy_state(np.random.mtrand._rand),
            "torch": torch.get_rng_state(),
            "transforms": {path: _numpy_state(rs) for path, rs in self._transforms()},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict[str, Any]:
        """``{"world_size": W, "ranks": [state of rank 0, ...]}``."""
        local = self._local_state()
        if not _distributed():
            return {"world_size": 1, "ranks": [local]}
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return {"world_size": len(gathered), "ranks": gathered}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> list[str]:
        """What prevents loading ``state_dict`` into this run (empty when nothing does)."""
        world = torch.distributed.get_world_size() if _distributed() else 1
        if int(state_dict.get("world_size", 1)) != world:
            return [f"written by {state_dict.get('world_size')} process(es), this run has {world}"]
        saved = list(state_dict["ranks"][0]["transforms"])
        here = [path for path, _ in self._transforms()]
        if saved != here:
            return [
                f"random states of {len(saved)} randomizable transform(s) {saved[:4]} in the checkpoint, "
                f"{len(here)} {here[:4]} in this run (another augmentation setting?)"
            ]
        return []

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the states of this process (its rank's, in a multi-process run)."""
        problems = self.check_state_dict(state_dict)
        if problems:
            raise ValueError(f"random states: {problems[0]}.")
        state = state_dict["ranks"][torch.distributed.get_rank() if _distributed() else 0]
        random.setstate(_plain_python_state(state["python"]))
        _set_numpy_state(np.random.mtrand._rand, state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for path, rs in self._transforms():
            _set_numpy_state(rs, state["transforms"][path])


def _plain_python_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a checkpoint may give lists back."""
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


class BestMetricState:
    """The key metric's best value so far, as a checkpointable object (evaluator state and best-model saver).

    ``state_dict()`` holds the evaluator's ``best_metric`` and ``best_metric_epoch``. ``load_state_dict`` restores
    them and, through the saver's ``load_state_dict`` (ignite's ``{"_saved": [(score, filename)]}`` form: MONAI's
    ``CheckpointSaver`` and :py:class:`monai_groupdistil.engines.BestModelSaver` both take it), the best-model
    saver's record of the best saved model, so that a resumed run replaces the best model only with a better one
    (with ``BestModelSaver``, or ``CheckpointSaver`` without ``key_metric_greater_or_equal``: strictly better; an
    equal one with ``key_metric_greater_or_equal``), as the uninterrupted run would.

    Args:
        evaluator: the validation engine (``SupervisedEvaluator``) with a key metric.
        saver: the best-model saver attached to it, if any: a ``BestModelSaver`` or a ``CheckpointSaver`` with
            ``save_key_metric=True``.
        filename: the best model's file name (``BestModelSaver``'s ``filename``, ``CheckpointSaver``'s
            ``key_metric_filename``).
    """

    def __init__(self, evaluator: Engine, saver: Any = None, filename: str = "model.pt") -> None:
        self.evaluator = evaluator
        self.saver = saver
        self.filename = filename

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self.saver is not None and int(state_dict["best_metric_epoch"]) > 0:
            self.saver.load_state_dict({"_saved": [(float(state_dict["best_metric"]), self.filename)]})
