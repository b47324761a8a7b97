"""DistillationTrainer: MONAI's SupervisedTrainer with a teacher, for ERM, GroupDRO, KD and GroupDistil students."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import default_prepare_batch
from monai.handlers import from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from monai_groupdistil.engines.teacher_cache import TeacherOutputCache, has_random_transforms, run_teacher
from monai_groupdistil.losses.checks import NonFiniteValueError

if TYPE_CHECKING:
    from ignite.handlers import ProgressBar
else:
    ProgressBar, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "ProgressBar")

__all__ = [
    "DistillationTrainer",
    "TEACHER_PRED",
    "GROUP",
    "SUBJECT_KEYS",
    "check_batch_keys",
    "loss_keywords",
    "sample_names",
]

TEACHER_PRED = "teacher_pred"
"""Key of the teacher's output in ``engine.state.output``."""
GROUP = "group"
"""Key of the group ids in ``engine.state.output``."""
LOSS_KEYWORDS = ("teacher_logits", "groups")
"""The keyword arguments the trainer gives a loss whose ``forward`` declares them."""
SUBJECT_KEYS = ("subject", "id", "img_id")
"""Default batch keys naming a sample in the trainer's errors, first present first: ``subject`` (the M&Ms and
segmentation datalists of :py:mod:`monai_groupdistil.data`, the cardiac bundles), ``id`` (a common datalist key, the
default of :py:class:`TeacherOutputCache`) and ``img_id`` (the Waterbirds datalist)."""
_MAX_NAMED = 20  # samples named in full in an error message; the others are counted


def loss_keywords(loss: Callable) -> set[str]:
    """The names of :py:data:`LOSS_KEYWORDS` that ``loss`` (its ``forward`` for a module) declares as parameters."""
    target = loss.forward if isinstance(loss, torch.nn.Module) else loss
    return set(LOSS_KEYWORDS) & set(inspect.signature(target).parameters)


# what to do when the batch lacks the group ids (DistillationTrainer and HeldOutGroupDROHandler both take group_key)
GROUP_KEY_HINT = "Pass group_key=<the key of the group ids>."


def check_batch_keys(batchdata: Any, keys: Sequence[str], hints: Mapping[str, str] | None = None) -> None:
    """Raise a ``KeyError`` naming the first missing key and the keys present, followed by ``hints[key]`` (what to
    do) when ``hints`` has one for that key.

    Raises:
        KeyError: when ``batchdata`` is a dictionary lacking one of ``keys``.
        TypeError: when ``batchdata`` is not a dictionary.
    """
    if not isinstance(batchdata, Mapping):
        names = [str(k) for k in keys]
        raise TypeError(f"a dictionary batch with keys {names} is expected, got {type(batchdata).__name__}.")
    for key in keys:
        if key not in batchdata:
            present = sorted(map(str, batchdata.keys()))
            hint = (hints or {}).get(key)
            raise KeyError(f"the batch has no '{key}' key; keys present: {present}." + (f" {hint}" if hint else ""))


def _per_sample(value: Any, batch_size: int) -> list | None:
    """``value`` as one item per sample of a batch of ``batch_size`` (a collated list or tensor), else ``None``."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist() if value.numel() == batch_size else None
    if isinstance(value, (list, tuple)):
        return list(value) if len(value) == batch_size else None
    if isinstance(value, (str, int)) and batch_size == 1:
        return [value]
    return None


def sample_names(
    batchdata: Any,
    batch_size: int,
    subject_key: str | Sequence[str] | None = SUBJECT_KEYS,
    inputs: Any = None,
    image_key: str = Keys.IMAGE,
) -> list[str]:
    """One name per sample of a collated batch, for error messages: its subject and its image file where known.

    The subject is read from the first of ``subject_key`` that the (dictionary) batch holds with one value per sample
    (a collated list or tensor), and written ``<key> '<value>'``; the image file is MONAI's meta data
    ``filename_or_obj`` of the prepared ``inputs`` (a ``MetaTensor``), else of ``batchdata[image_key]`` or of
    ``batchdata[image_key + "_meta_dict"]``. A sample that neither names is named by its position in the batch.

    Args:
        batchdata: the collated batch, as the data loader gave it (``engine.state.batch``).
        batch_size: the number of samples.
        subject_key: the key, or keys tried in order, of the subject; ``None`` names the files only.
        inputs: the network input prepared from the batch (``engine.state.output["image"]``), whose meta data is
            looked at first.
        image_key: the key of the image in the batch.

    Returns:
        ``batch_size`` strings, e.g. ``"subject 'A1B2C3' (file /data/A1B2C3_sa.nii.gz)"``, ``"file /data/x.png"`` or
        ``"batch position 3"``.

    Example::

        >>> sample_names({"subject": ["A1", "B2"], "image": torch.zeros(2, 1, 4, 4)}, 2)
        ["subject 'A1'", "subject 'B2'"]
        >>> sample_names({"image": torch.zeros(2, 1, 4, 4)}, 2)
        ['batch position 0', 'batch position 1']
    """
    batch = batchdata if isinstance(batchdata, Mapping) else {}
    key, subjects, files = None, None, None
    for key in [subject_key] if isinstance(subject_key, str) else list(subject_key or ()):
        subjects = _per_sample(batch.get(key), batch_size)
        if subjects is not None:
            break
    metas = [getattr(inputs, "meta", None), getattr(batch.get(image_key), "meta", None)]
    for meta in [*metas, batch.get(f"{image_key}_meta_dict")]:
        if files is None and isinstance(meta, Mapping):
            files = _per_sample(meta.get("filename_or_obj"), batch_size)
    names = []
    for i in range(batch_size):
        subject, file = (None if subjects is None else subjects[i]), (None if files is None else str(files[i]))
        if subject is not None and file is not None and str(subject) != file:
            names.append(f"{key} {str(subject)!r} (file {file})")
        elif subject is not None:
            names.append(f"{key} {str(subject)!r}")
        elif file is not None:
            names.append(f"file {file}")
        else:
            names.append(f"batch position {i}")
    return names


def _float_tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a network output: a tensor, or those of a list, tuple or dictionary of them."""
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else [value]
    return [t.as_subclass(torch.Tensor) for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _non_finite_rows(value: Any, batch_size: int) -> list[int] | None:
    """The batch positions at which a floating-point tensor of ``value`` with the batch dimension (``[B, ...]``) is
    not finite; ``None`` when ``value`` has no such tensor (a reduced loss, for instance)."""
    batched = [t for t in _float_tensors(value) if t.ndim >= 1 and t.shape[0] == batch_size]
    bad: set[int] = set()
    for t in batched:
        bad.update(torch.nonzero(~torch.isfinite(t.reshape(batch_size, -1)).all(dim=1)).flatten().tolist())
    return sorted(bad) if batched else None


# what DistillationTrainer checks: its name in the messages, and what to check when the inputs are finite
_NON_FINITE = {
    "prediction": (
        "the student's prediction",
        "Their input images are finite: the student has diverged. Lower the learning rate (or clip the gradients) "
        "and train again, or resume from a checkpoint written before this point; if it happens from the first "
        "iterations, check these samples' image files for extreme values.",
    ),
    "teacher": (
        "the teacher's output",
        "Their input images and the student's prediction are finite: check the teacher checkpoint (its weights may "
        "not be finite, e.g. a teacher trained to NaN). With a teacher_cache the output may be a stored one: use a "
        "fresh cache folder once the teacher is fixed (stored outputs are never replaced).",
    ),
    "loss": (
        "the loss",
        "The predictions (and teacher outputs) and the labels are finite: the logits are large enough to overflow "
        "the loss. Lower the learning rate (or clip the gradients), and check the loss's settings and these "
        "samples' labels.",
    ),
}


class DistillationTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` whose loss also receives a frozen teacher's output and the group ids.

    The iteration is ``SupervisedTrainer``'s own (batch preparation, ``inferer``, ``amp``, gradient accumulation,
    ``compile``, ``IterationEvents``, decollation, sampler epochs); this class changes only the loss computation,
    through the ``loss_function`` hook ``SupervisedTrainer`` calls as ``loss_function(pred, label)``:
    :py:meth:`compute_loss` runs the teacher (eval mode, ``torch.no_grad()``, inside the same autocast as the
    student; through ``teacher_cache`` when given) and calls the loss with one documented signature::

        loss(pred, target=label, teacher_logits=teacher_output, groups=group_ids)

    where ``teacher_logits`` and ``groups`` are passed only to a loss whose ``forward`` declares them (the losses of
    this package do; ``torch.nn.CrossEntropyLoss`` or MONAI's ``DiceCELoss`` get ``loss(pred, target=label)``).
    So ``GroupDistillationLoss`` (GroupDistil), ``DistillationLoss`` (KD), ``GroupDROLoss`` (GroupDRO) and any
    plain loss (ERM) train with the same engine. ``engine.state.output`` holds what ``SupervisedTrainer`` puts
    there plus ``teacher_pred`` and ``group`` (from ``LOSS_COMPLETED`` on; ``None`` without teacher, or when the
    batch has no group key); the user's loss is ``self.student_loss``.

    Non-finite values stop training (``check_finite``, on by default): the student's prediction is checked right
    after the forward pass, the teacher's output after the teacher, the loss value after the loss; a NaN or infinite
    value raises a ``FloatingPointError`` *before* the backward pass and the optimizer step, so the network's
    parameters (and a DRO loss's weights) stay those from before the batch and no checkpoint written afterwards
    holds NaN weights from it. The message names the iteration, the epoch and the samples at fault: those whose
    input image (for the loss: whose label) is not finite when there are any (a NaN voxel in one study; batch
    normalisation spreads it to the whole batch's prediction), otherwise those whose output (or per-sample loss) is
    not finite, or every sample of the batch for a reduced loss; then what to check (the files; with finite inputs,
    the learning rate or the teacher checkpoint). A sample is named by its subject (the first of ``subject_key`` the
    batch holds, e.g. ``subject 'A1B2C3'``) and its image file (MONAI's ``filename_or_obj`` meta data, e.g.
    ``(file /data/A1B2C3_sa.nii.gz)``), or else by its position in the batch (see :py:func:`sample_names`). The
    forward pass has run when the error is raised, so buffers it updates (batch-norm running statistics) may hold
    NaN: reload the last checkpoint rather than saving the network after the error.

    Args:
        device: an object representing the device on which to run.
        max_epochs: the total epoch number for trainer to run.
        train_data_loader: Ignite engine uses it to run, must be an Iterable or a torch DataLoader of dictionaries.
        network: the student network.
        optimizer: the student's optimizer.
        loss_function: the student's loss, called as above.
        teacher: the frozen teacher network (moved to ``device``; ``requires_grad`` is switched off); ``None``
            for ERM and GroupDRO students. It receives the image only (not the extra inputs of a
            ``PrepareBatchExtraInput``).
        group_key: key of the integer group ids ``[B]`` in the batch dictionary.
        teacher_cache: optional :py:class:`TeacherOutputCache`, for deterministic preprocessing only. When the
            loader's dataset transform holds random transforms (see :py:func:`has_random_transforms`) the cache is
            **ignored** and the teacher runs online, with a warning: a cache would give the student, in every
            epoch, the teacher output of the sample's first augmented view. ``self.teacher_cache`` is then ``None``.
        cache_with_random_transforms: use ``teacher_cache`` even with random transforms (explicit opt-in).
        progress_bar: attach an ignite ``ProgressBar`` (tqdm) showing the loss.
        subject_key: the batch key, or keys tried in order, naming a sample's subject in the errors about
            non-finite values. Defaults to :py:data:`SUBJECT_KEYS` (``"subject"``, ``"id"``, ``"img_id"``: the
            keys of this package's datalists); ``None`` names the image files (and otherwise the positions) only.
        check_finite: stop training at a non-finite prediction, teacher output or loss (see above). Defaults to
            ``True``; ``False`` leaves ``SupervisedTrainer``'s behaviour (NaN weights and training going on).
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (``epoch_length``, ``prepare_batch``,
            ``inferer``, ``train_handlers``, ``amp``, ``key_train_metric``, ``decollate``...).

    Raises:
        ValueError: at construction for a ``teacher`` with a loss that takes no ``teacher_logits``, or a
            ``teacher_cache`` without teacher; during training for a teacher output whose shape differs from the
            student's (both shapes are named; nothing is stored in the cache then).
        KeyError: during training for a batch lacking the image, the label or (for a loss taking ``groups``) the
            group key; the message names the missing key and the keys present.
        FloatingPointError: during training (``check_finite``) for a student prediction, a teacher output or a loss
            value holding NaN or infinite values, or a loss refusing such values (its ``NonFiniteValueError`` is
            the cause); raised before the backward pass, so no optimizer step is taken with it. The message names
            the offending samples (subject and file), the iteration and the epoch, and what to check.

    Example::

        loss = GroupDistillationLoss(num_groups=4)
        trainer = DistillationTrainer(
            device="cuda", max_epochs=10, train_data_loader=loader, network=student, teacher=teacher,
            optimizer=torch.optim.Adam(student.parameters(), 1e-3), loss_function=loss,
            train_handlers=[GroupDROHandler(loss), StatsHandler(output_transform=from_engine("loss", first=True))],
        )
        trainer.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        teacher: torch.nn.Module | None = None,
        group_key: str = GROUP,
        teacher_cache: TeacherOutputCache | None = None,
        cache_with_random_transforms: bool = False,
        progress_bar: bool = False,
        subject_key: str | Sequence[str] | None = SUBJECT_KEYS,
        check_finite: bool = True,
        **kwargs: Any,
    ) -> None:
        keywords = loss_keywords(loss_function)
        if teacher is not None and "teacher_logits" not in keywords:
            raise ValueError(
                f"a `teacher` was given but the loss {type(loss_function).__name__} takes no `teacher_logits`; "
                "use a DistillationLoss or GroupDistillationLoss, or drop the teacher."
            )
        if teacher_cache is not None and teacher is None:
            raise ValueError("a `teacher_cache` was given without a `teacher`.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=self.compute_loss,
            **kwargs,
        )
        self.student_loss = loss_function
        self.loss_keywords = keywords
        if teacher is not None:
            teacher = teacher.to(device).requires_grad_(False).eval()
        self.teacher = teacher
        self.group_key = group_key
        self.subject_key = subject_key
        self.check_finite = bool(check_finite)
        self.cache_with_random_transforms = bool(cache_with_random_transforms)
        dataset_transform = getattr(getattr(train_data_loader, "dataset", None), "transform", None)
        if (
            teacher_cache is not None
            and not self.cache_with_random_transforms
            and has_random_transforms(dataset_transform)
        ):
            warnings.warn(
                "DistillationTrainer: the training transform holds random transforms, so the teacher_cache is "
                "ignored and the teacher runs online: a cache would give the student, in every epoch, the teacher "
                "output of a sample's first augmented view instead of the view it is trained on. Pass "
                "cache_with_random_transforms=True to use the cache anyway.",
                stacklevel=2,
            )
            teacher_cache = None
        self.teacher_cache = teacher_cache
        self.group_key_needed = "groups" in keywords
        self.required_keys = [self.group_key] if self.group_key_needed else []
        if self.prepare_batch is default_prepare_batch:
            self.required_keys = [Keys.IMAGE, Keys.LABEL, *self.required_keys]
        if progress_bar:
            ProgressBar(persist=True).attach(
                self, output_transform=lambda out: {"loss": float(from_engine(Keys.LOSS, first=True)(out))}
            )

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """``SupervisedTrainer._iteration``, after a check that names a missing batch key (tuple batches of a plain
        loss go through unchecked, as in ``SupervisedTrainer``)."""
        if batchdata is not None and self.required_keys and (isinstance(batchdata, Mapping) or self.group_key_needed):
            check_batch_keys(batchdata, self.required_keys, hints={self.group_key: GROUP_KEY_HINT})
        return super()._iteration(engine, batchdata)

    def compute_loss(self, pred: Any, label: torch.Tensor) -> torch.Tensor:
        """The loss of the current iteration: ``student_loss(pred, target=label, [teacher_logits=...], [groups=...])``.

        Called by ``SupervisedTrainer`` inside the iteration (after ``FORWARD_COMPLETED``, under autocast with
        ``amp``); the teacher's output and the group ids are also stored in ``engine.state.output``. With
        ``check_finite``, ``pred`` is checked before the teacher runs (so a teacher cache never stores the outputs
        of a batch whose inputs are not finite), the teacher's output before the loss, and the loss value after it.

        Raises:
            ValueError: when the teacher's output and ``pred`` differ in shape.
            FloatingPointError: (``check_finite``) when ``pred``, the teacher's output or the loss holds NaN or
                infinite values, or the loss refuses such values; the message names the samples.
        """
        output, extras = self.state.output, {}
        output[TEACHER_PRED] = output[GROUP] = None
        self._check_finite("prediction", pred, pred)
        if self.teacher is not None:
            output[TEACHER_PRED] = run_teacher(
                self.teacher,
                output[Keys.IMAGE],
                self.inferer,
                self.teacher_cache,
                self.state.batch,
                expected_shape=pred.shape,  # checked before anything is cached
            )
            self._check_finite("teacher", output[TEACHER_PRED], pred)
        if "teacher_logits" in self.loss_keywords:
            extras["teacher_logits"] = output[TEACHER_PRED]
        batch = self.state.batch
        if isinstance(batch, Mapping) and self.group_key in batch:
            output[GROUP] = self._group_ids(batch[self.group_key])
        if "groups" in self.loss_keywords:
            extras["groups"] = output[GROUP]
        try:
            loss = self.student_loss(pred, target=label, **extras)
        except NonFiniteValueError as err:
            if not self.check_finite:
                raise
            raise FloatingPointError(self._non_finite_message("loss", None, pred, str(err))) from err
        self._check_finite("loss", loss, pred)
        return loss

    def _group_ids(self, groups: Any) -> torch.Tensor:
        """The batch's group ids as a tensor on the training device.

        Raises:
            TypeError: when the ids are not numbers (e.g. group names), with what to do.
        """
        try:
            ids = torch.as_tensor(groups)
        except (TypeError, ValueError) as err:
            shown = list(groups)[:4] if isinstance(groups, Sequence) else groups
            raise TypeError(
                f"batch['{self.group_key}'] must hold integer group ids in [0, num_groups), got {shown!r} ({err}). "
                "Map group names to ids in the preprocessing, e.g. with monai_groupdistil.data.MapGroupNamesd, "
                "or set group_key to the key that holds the ids."
            ) from err
        return ids.to(self.state.device, non_blocking=self.non_blocking)

    def _check_finite(self, quantity: str, value: Any, pred: Any) -> None:
        """With ``check_finite``, raise a ``FloatingPointError`` (message: :py:meth:`_non_finite_message`) when
        ``value``, the ``quantity`` computed for the batch of ``pred``, holds a NaN or infinite value."""
        if not self.check_finite:
            return
        tensors = _float_tensors(value)
        # one isfinite().all() per tensor and one host synchronisation: the per-sample detail only on failure
        if tensors and not bool(torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors]).all()):
            raise FloatingPointError(self._non_finite_message(quantity, value, pred))

    def _non_finite_message(self, quantity: str, value: Any, pred: Any, refusal: str = "") -> str:
        """The message for a non-finite ``quantity`` (a key of :py:data:`_NON_FINITE`) ``value`` of the batch of
        ``pred`` (``value`` is ``None`` for a loss's ``refusal``).

        It names the samples at fault: those whose input image (for the loss: whose label) is not finite when there
        are any, as the cause; otherwise those at which ``value`` is not finite (the whole batch when it has no
        batch dimension), followed by the advice of :py:data:`_NON_FINITE`.
        """
        what, advice = _NON_FINITE[quantity]
        if quantity == "loss" and isinstance(value, torch.Tensor) and value.numel() == 1:
            what += f" ({float(value.detach())})"
        if refusal:
            advice = f"The loss refused the batch: {refusal} {advice}"
        cause_key, cause = (Keys.LABEL, "label") if quantity == "loss" else (Keys.IMAGE, "input image")
        first = (_float_tensors(pred) or [pred])[0]
        batch_size = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim >= 1 else 1
        names = sample_names(self.state.batch, batch_size, self.subject_key, self.state.output.get(Keys.IMAGE))
        rows = _non_finite_rows(value, batch_size)
        causes = _non_finite_rows(self.state.output.get(cause_key), batch_size) or []
        where = f"iteration {self.state.iteration} (epoch {self.state.epoch})"
        if rows is None:
            head = f"{what} is NaN or infinite for the batch of {where}"
        else:
            head = f"{what} holds NaN or infinite values for {len(rows)} of the {batch_size} samples of {where}"
        spread = ""
        if causes:
            head += f", and the {cause} holds NaN or infinite values for {len(causes)} of the batch's samples"
            named = causes
            if rows is not None and len(rows) > len(causes):
                spread = (
                    " (a layer that mixes the samples of a batch, such as batch normalisation in training, spreads a "
                    "sample's NaN to the others)"
                )
            advice = (
                f"Check these samples' {cause}s (and the files they are read from) for NaN or infinite values, e.g. "
                "numpy.isfinite(data).all() after loading, and fix or exclude them."
            )
        elif rows is None:
            head += f", whose {batch_size} samples are"
            named = list(range(batch_size))
        else:
            named = rows
        listing = ", ".join(names[i] for i in named[:_MAX_NAMED])
        if len(named) > _MAX_NAMED:
            listing += f" and {len(named) - _MAX_NAMED} more"
        stopped = "Training was stopped before the backward pass, so no optimizer step was taken with this batch."
        return f"DistillationTrainer: {head}: {listing}{spread}. {stopped} {advice}"
