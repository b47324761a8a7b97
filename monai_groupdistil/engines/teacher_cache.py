"""Teacher-output cache: compute a frozen teacher's logits once per sample and reuse them in later epochs.

Our own because MONAI has no distillation support (torchdistill caches teacher outputs the same way)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["TeacherOutputCache", "has_random_transforms", "run_teacher"]


def has_random_transforms(transform: Any) -> bool:
    """Whether a (possibly nested) MONAI ``Compose`` holds a transform whose output may change between calls.

    The rule of MONAI's ``CacheDataset``: a transform is random when it is a ``RandomizableTrait`` (``Rand*``
    transforms, ``RandTorchVisiond``, ``RandTorchIOd``, ``RandLambda``...) or not a MONAI ``Transform`` at all
    (a plain callable cannot be inspected). ``OneOf``, ``SomeOf`` and ``RandomOrder`` count as random.

    Args:
        transform: a transform, a ``Compose`` or ``None``.
    """
    from monai.transforms import Compose, RandomizableTrait, Transform

    if transform is None:
        return False
    # CacheDataset's own predicate, over MONAI's flattened Compose (OneOf, SomeOf, RandomOrder stay whole: random)
    is_random = lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)  # noqa: E731
    return Compose([transform]).flatten().get_index_of_first(is_random) is not None


class TeacherOutputCache:
    """Per-sample cache of a frozen teacher's outputs, kept in memory or in a folder, keyed by sample id.

    A frozen teacher in eval mode maps a sample to the same logits every epoch **when the training preprocessing
    is deterministic** (no random augmentation): the cache then computes the logits in the first epoch and
    returns the stored values afterwards, so distillation costs about what training the student alone costs.
    With random augmentation (any ``Rand*`` transform, ``OneOf``...) the teacher sees a different input every
    epoch and must run online: do not use a cache there (:py:class:`DistillationTrainer` ignores a cache, with a
    warning, when its dataset's transform holds random transforms, unless ``cache_with_random_transforms=True``).
    Use a fresh ``cache_dir`` whenever the teacher, its weights or the preprocessing change: stored values are never
    invalidated. A teacher output of the wrong shape (``expected_shape``) is refused before anything is stored, and
    a stored output of the wrong shape (another teacher's) is refused when it is read.

    Only the samples missing from a batch go through the teacher, so the batch sizes of the first epoch decide
    how the stored values were computed, and a convolution's last bits can depend on the batch size (about 1e-6
    on CPU). Students that are compared, or runs that must be bit-identical whatever their sampler, should fill the
    cache up front with :py:meth:`fill` (the whole training set in a fixed order and batch size).

    The sample id is read from ``batch[id_key]`` (a list of strings, e.g. file names or subject codes, or an
    integer tensor of indices). In memory the values live on ``storage_device`` (CPU by default); on disk every
    sample is one ``<sha1(id)>.pt`` file written atomically, so several processes may share the folder.

    Args:
        cache_dir: folder of the on-disk cache; ``None`` keeps the values in memory only.
        id_key: key of the sample id in the batch dictionary.
        keep_in_memory: with ``cache_dir``, also keep the values in memory (no disk read after the first).
        storage_device: device of the in-memory copies.

    Example::

        >>> import torch
        >>> teacher = torch.nn.Linear(4, 3).eval()
        >>> cache = TeacherOutputCache(id_key="id")
        >>> batch = {"image": torch.randn(2, 4), "id": ["case0", "case1"]}
        >>> first = cache.lookup(batch, batch["image"], teacher)
        >>> second = cache.lookup(batch, batch["image"], teacher)  # no teacher call
        >>> bool(torch.equal(first, second)), cache.misses, cache.hits
        (True, 2, 2)
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        id_key: str = "id",
        keep_in_memory: bool = False,
        storage_device: str | torch.device = "cpu",
    ) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.id_key = id_key
        self.keep_in_memory = keep_in_memory or self.cache_dir is None
        self.storage_device = torch.device(storage_device)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(sample_id: Any) -> str:
        if isinstance(sample_id, torch.Tensor):
            sample_id = sample_id.item() if sample_id.numel() == 1 else tuple(sample_id.tolist())
        return str(sample_id)

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{hashlib.sha1(key.encode('utf-8')).hexdigest()}.pt"

    def ids_from_batch(self, batchdata: Mapping) -> list[str]:
        """The cache keys of a collated batch.

        Raises:
            KeyError: when the batch is not a dictionary holding ``id_key`` (the message names the keys present).
        """
        if not isinstance(batchdata, Mapping) or self.id_key not in batchdata:
            present = sorted(map(str, batchdata.keys())) if isinstance(batchdata, Mapping) else type(batchdata)
            raise KeyError(f"teacher cache: the batch has no sample-id key '{self.id_key}'; keys present: {present}.")
        ids = batchdata[self.id_key]
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(ids.shape[0], -1) if ids.ndim > 1 else ids.reshape(-1)
        return [self._key(i) for i in ids]

    def get(self, key: str) -> torch.Tensor | None:
        """The stored output of one sample (``[C, *spatial]``) or ``None``."""
        value = self._memory.get(key)
        if value is None and self.cache_dir is not None:
            path = self._path(key)
            entry = self._read(path) if path.exists() else None
            if entry is not None:
                if entry.get("id") == key:  # guards against hash collisions
                    value = entry["logits"]
                    if self.keep_in_memory:
                        self._memory[key] = value
        return value

    def _read(self, path: Path) -> dict | None:
        """The entry stored in ``path``, or ``None`` (with a warning, the file removed) when it cannot be read: a
        damaged file is recomputed, as MONAI's ``PersistentDataset`` does with its cache."""
        try:
            entry = torch.load(path, map_location=self.storage_device, weights_only=True)
            if not isinstance(entry, dict) or not isinstance(entry.get("logits"), torch.Tensor):
                raise ValueError(f"expected a dict with 'id' and 'logits', got {type(entry).__name__}")
        except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            message = f"teacher cache: '{path}' cannot be read ({err}); removing it, the output is computed anew."
            warnings.warn(message, stacklevel=2)
            path.unlink(missing_ok=True)
            return None
        return entry

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store the output of one sample (``[C, *spatial]``), detached, on ``storage_device``."""
        value = value.detach().to(self.storage_device).clone()
        if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
            value = value.as_subclass(torch.Tensor)  # MetaTensor -> plain tensor
        if self.keep_in_memory:
            self._memory[key] = value
        if self.cache_dir is not None:
            path = self._path(key)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            os.close(fd)
            try:
                torch.save({"id": key, "logits": value.cpu()}, tmp)
                os.replace(tmp, path)
            except BaseException:  # a full disk or an interrupt: no partial file is left behind
                Path(tmp).unlink(missing_ok=True)
                raise

    def __contains__(self, key: Any) -> bool:
        key = self._key(key)
        return key in self._memory or (self.cache_dir is not None and self._path(key).exists())

    def __len__(self) -> int:
        if self.cache_dir is None:
            return len(self._memory)
        return sum(1 for _ in self.cache_dir.glob("*.pt"))

    def clear(self) -> None:
        """Drop every stored value (memory and disk) and reset the hit/miss counters."""
        self._memory.clear()
        if self.cache_dir is not None:
            for path in self.cache_dir.glob("*.pt"):
                path.unlink()
        self.hits = self.misses = 0

    def fill(
        self,
        teacher: torch.nn.Module,
        batches: Iterable[Mapping],
        image_key: str = "image",
        inferer: Callable | None = None,
        device: str | torch.device | None = None,
    ) -> int:
        """Store the teacher's outputs of every sample of ``batches``, one pass, in the order and batch sizes given.

        Filled during training instead, the cache computes the samples missing from each training batch, and a
        convolution's last bits depend on the batch size (an epoch's last batch is smaller): students that share a
        cache would then read targets that differ in the sixth decimal according to which student filled it, enough
        to move a student's selected epoch. Filled up front, every student of a teacher reads the same outputs.
        Samples already stored are not computed again, so a ``fill`` that failed part way (a bad batch raises; the
        batches before it stay stored) resumes where it stopped when called again. The teacher gets
        ``batch[image_key]`` as it is (no ``prepare_batch``) and runs in full precision (no ``amp`` autocast), and
        its outputs are checked against the student's shape when training reads them.

        Args:
            teacher: the frozen teacher (put in eval mode, run under ``torch.no_grad()``).
            batches: collated batches holding ``image_key`` (``[B, ...]``) and the cache's ``id_key``, e.g. a
                ``monai.data.DataLoader`` over the training dataset with ``shuffle=False`` and the training batch
                size. The preprocessing must be the training one without random transforms.
            image_key: key of the teacher's input in a batch.
            inferer: a MONAI ``Inferer`` the teacher runs through (that of the trainer); ``None`` calls it directly.
            device: device of the teacher's inputs; ``None`` uses the device of the teacher's first parameter (CPU
                for a teacher without parameters).

        Returns:
            the number of samples computed by the teacher (those not already stored).

        Raises:
            TypeError: when a batch is not a dictionary.
            KeyError: when a batch lacks ``image_key`` or the sample-id key (the keys present are named).
            ValueError: when a batch's sample ids and inputs differ in number.

        Example::

            >>> import torch
            >>> from monai.data import DataLoader
            >>> teacher = torch.nn.Linear(4, 3)
            >>> data = [{"image": torch.randn(4), "id": f"case{i}"} for i in range(5)]
            >>> cache = TeacherOutputCache(id_key="id")
            >>> cache.fill(teacher, DataLoader(data, batch_size=2, shuffle=False)), len(cache)
            (5, 5)
        """
        if has_random_transforms(getattr(getattr(batches, "dataset", None), "transform", None)):
            warnings.warn(
                "TeacherOutputCache.fill: the loader's dataset transform holds random transforms, so the stored "
                "outputs are those of one random view of each sample; DistillationTrainer ignores a cache with such a "
                "dataset (see its cache_with_random_transforms). Fill it from the deterministic preprocessing.",
                stacklevel=2,
            )
        if device is None:
            device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        before = self.misses
        # the trainer's batch check; imported here because the trainer module imports this one
        from monai_groupdistil.engines.trainer import check_batch_keys

        hints = {
            image_key: "TeacherOutputCache.fill reads the teacher's input there: pass the batch's input key as "
            "image_key.",
            self.id_key: "The cache keys its samples by it: build the cache with id_key set to the batch's sample-id "
            "key.",
        }
        for batch in batches:
            check_batch_keys(batch, [image_key, self.id_key], hints=hints)
            inputs = torch.as_tensor(batch[image_key]).to(device)
            run_teacher(teacher, inputs, inferer, cache=self, batchdata=batch)
        return self.misses - before

    def lookup(
        self,
        batchdata: Mapping,
        inputs: torch.Tensor,
        teacher: Callable[[torch.Tensor], torch.Tensor],
        expected_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Teacher outputs of a batch: stored values where present, ``teacher`` run on the missing samples only.

        The stored outputs and those computed for the missing samples are checked against ``expected_shape``, the
        computed ones *before* any of them is stored, so a failed call leaves the cache (memory and disk) as it was.

        Args:
            batchdata: the collated batch (holds ``id_key``).
            inputs: the teacher's input ``[B, ...]``, on the target device.
            teacher: callable computing outputs ``[b, C, *spatial]`` from ``inputs[missing]`` (already in eval mode
                and under ``torch.no_grad()``, see :py:func:`run_teacher`).
            expected_shape: the shape ``[B, C, *spatial]`` the batch's outputs must have (the student's output
                shape); ``None`` skips the check.

        Returns:
            the outputs ``[B, C, *spatial]`` on ``inputs.device``.

        Raises:
            KeyError: when the sample-id key is missing.
            ValueError: when the ids and the batch size differ, or when the stored or computed outputs do not match
                ``expected_shape`` (both shapes are named; nothing is stored).
        """
        keys = self.ids_from_batch(batchdata)
        if len(keys) != inputs.shape[0]:
            raise ValueError(f"teacher cache: {len(keys)} sample ids for a batch of {inputs.shape[0]} inputs.")
        memory = self._memory
        found = [memory.get(k) for k in keys]
        if self.cache_dir is not None:
            found = [self.get(k) if v is None else v for k, v in zip(keys, found)]
        missing = [i for i, v in enumerate(found) if v is None]
        if expected_shape is not None:  # a cache_dir filled by another teacher, or a cache filled by a wrong one
            per_sample = tuple(int(d) for d in expected_shape)[1:]
            wrong = [keys[i] for i, v in enumerate(found) if v is not None and tuple(v.shape) != per_sample]
            if wrong:
                shape = tuple(found[keys.index(wrong[0])].shape)  # type: ignore[union-attr]
                raise ValueError(
                    f"teacher cache: the stored teacher outputs of {wrong[:3]}{' ...' if len(wrong) > 3 else ''} have "
                    f"shape {shape} per sample, but the student output has shape {per_sample} per sample; the cache "
                    "holds another teacher's or another preprocessing's outputs: use a fresh cache_dir (or clear())."
                )
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            sub = inputs if len(missing) == len(keys) else inputs[torch.as_tensor(missing, device=inputs.device)]
            computed = teacher(sub)
            _check_computed_shape(computed, len(missing), len(keys), expected_shape)
            for j, i in enumerate(missing):
                found[i] = computed[j]
                self.put(keys[i], computed[j])
            if len(missing) == len(keys):
                return computed
        if all(v.device == found[0].device for v in found):  # type: ignore[union-attr]
            return torch.stack(found, dim=0).to(inputs.device)  # type: ignore[arg-type]
        return torch.stack([v.to(inputs.device) for v in found], dim=0)  # type: ignore[union-attr]


def _check_computed_shape(
    computed: torch.Tensor, num_missing: int, batch_size: int, expected_shape: Sequence[int] | None
) -> None:
    """Raise a ``ValueError`` naming both shapes when the outputs computed for ``num_missing`` of the ``batch_size``
    samples of a batch do not have the shape ``expected_shape`` (of the whole batch) implies."""
    if expected_shape is None:
        return
    expected = tuple(int(d) for d in expected_shape)
    wanted = (num_missing, *expected[1:])
    got = tuple(computed.shape)
    if got == wanted:
        return
    if num_missing == batch_size:
        detail = f"the teacher output has shape {got} but the student output has shape {expected}"
    else:
        detail = (
            f"the teacher output for the {num_missing} samples missing from the cache has shape {got}, expected "
            f"{wanted} (the student output has shape {expected})"
        )
    raise ValueError(f"{detail}; they must match (same classes and spatial size). Nothing was stored in a cache.")


def run_teacher(
    teacher: torch.nn.Module,
    inputs: torch.Tensor,
    inferer: Callable | None = None,
    cache: TeacherOutputCache | None = None,
    batchdata: Mapping | None = None,
    args: Sequence = (),
    kwargs: dict | None = None,
    expected_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run a frozen teacher: eval mode, ``torch.no_grad()``, through ``cache`` when given.

    Args:
        teacher: the teacher network.
        inputs: network input ``[B, ...]``.
        inferer: a MONAI ``Inferer`` called as ``inferer(inputs, teacher, *args, **kwargs)``; ``None`` calls the
            teacher directly.
        cache: optional :py:class:`TeacherOutputCache` (needs ``batchdata`` for the sample ids).
        batchdata: the collated batch.
        args: further positional arguments of the network.
        kwargs: further keyword arguments of the network.
        expected_shape: the shape the batch's output must have (the student's output shape); with ``cache``, a
            computed output of another shape raises before it is stored (see :py:meth:`TeacherOutputCache.lookup`).
            ``None`` skips the check.

    Returns:
        the teacher's output, detached.

    Raises:
        ValueError: when the output does not match ``expected_shape`` (both shapes are named), or when ``cache`` is
            given without ``batchdata``.
    """
    kwargs = {} if kwargs is None else kwargs
    teacher.eval()

    def _forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = teacher(x, *args, **kwargs) if inferer is None else inferer(x, teacher, *args, **kwargs)
        return out.detach()

    if cache is None:
        output = _forward(inputs)
        _check_computed_shape(output, inputs.shape[0], inputs.shape[0], expected_shape)
        return output
    if batchdata is None:
        raise ValueError("run_teacher: a teacher cache needs the batch (for the sample ids).")
    return cache.lookup(batchdata, inputs, _forward, expected_shape=expected_shape)
