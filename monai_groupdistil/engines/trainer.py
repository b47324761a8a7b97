"""DistillationTrainer: a MONAI SupervisedTrainer that trains ERM, GroupDRO, KD and GroupDistil students."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.handlers import from_engine
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader, DistributedSampler

from monai_groupdistil.engines.teacher_cache import TeacherOutputCache, has_random_transforms, run_teacher
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss, PerSampleDiceCELoss

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import ProgressBar
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    ProgressBar, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "ProgressBar")

__all__ = [
    "DistillationTrainer",
    "TEACHER_PRED",
    "GROUP",
    "check_batch_keys",
    "check_teacher_shape",
    "compute_distillation_loss",
    "needs_groups",
    "needs_teacher",
]

TEACHER_PRED = "teacher_pred"
"""Key of the teacher's output in ``engine.state.output``."""
GROUP = "group"
"""Key of the group ids in ``engine.state.output``."""


def _unwrap_loss(loss: Any) -> Any:
    """The loss behind an adapter (``.loss``), for type dispatch."""
    inner = getattr(loss, "loss", None)
    return inner if isinstance(inner, (GroupDROLoss, DistillationLoss)) else loss


def needs_teacher(loss: Any) -> bool:
    """Whether ``loss`` consumes teacher logits (``DistillationLoss``, ``GroupDistillationLoss``; not
    ``PerSampleDiceCELoss``, a ``DistillationLoss`` without teacher called as ``loss(pred, label)``)."""
    inner = _unwrap_loss(loss)
    return isinstance(inner, (DistillationLoss, GroupDistillationLoss)) and not isinstance(inner, PerSampleDiceCELoss)


def needs_groups(loss: Any) -> bool:
    """Whether ``loss`` consumes group ids (any ``GroupDROLoss``, including ``GroupDistillationLoss``)."""
    return isinstance(_unwrap_loss(loss), GroupDROLoss)


def compute_distillation_loss(
    loss_function: Callable,
    pred: torch.Tensor,
    label: torch.Tensor | None,
    groups: torch.Tensor | None,
    teacher_pred: torch.Tensor | None,
) -> torch.Tensor:
    """Call ``loss_function`` with the arguments its kind expects.

    - ``GroupDistillationLoss`` (and any other callable when a teacher is given):
      ``loss(pred, teacher_pred, label, groups)``;
    - ``DistillationLoss``: ``loss(pred, teacher_pred, label)``;
    - ``GroupDROLoss``: ``loss(pred, label, groups)``;
    - any other loss without a teacher: ``loss(pred, label)``.

    Raises:
        ValueError: when the loss needs a teacher output or group ids that are ``None``.
    """
    inner = _unwrap_loss(loss_function)
    if needs_teacher(inner) and teacher_pred is None:
        raise ValueError(f"{type(inner).__name__} needs teacher logits: give the trainer a `teacher`.")
    if needs_groups(inner) and groups is None:
        raise ValueError(f"{type(inner).__name__} needs group ids, got None.")
    if isinstance(inner, DistillationLoss) and needs_teacher(inner):
        return loss_function(pred, teacher_pred, label)
    if isinstance(inner, GroupDROLoss) and not isinstance(inner, GroupDistillationLoss):
        return loss_function(pred, label, groups)
    if teacher_pred is not None:
        return loss_function(pred, teacher_pred, label, groups)
    return loss_function(pred, label)


def check_batch_keys(batchdata: Any, keys: Sequence[str]) -> None:
    """Raise a ``KeyError`` naming the first missing key and the keys present.

    Raises:
        KeyError: when ``batchdata`` is a dictionary lacking one of ``keys``.
        TypeError: when ``batchdata`` is not a dictionary.
    """
    if not isinstance(batchdata, Mapping):
        raise TypeError(f"a dictionary batch with keys {list(keys)} is expected, got {type(batchdata).__name__}.")
    for key in keys:
        if key not in batchdata:
            raise KeyError(f"the batch has no '{key}' key; keys present: {sorted(map(str, batchdata.keys()))}.")


def check_teacher_shape(pred: torch.Tensor, teacher_pred: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming both shapes when the teacher's and the student's outputs differ in shape."""
    if tuple(teacher_pred.shape) != tuple(pred.shape):
        raise ValueError(
            f"the teacher output has shape {tuple(teacher_pred.shape)} but the student output has shape "
            f"{tuple(pred.shape)}; they must match (same classes and spatial size)."
        )


class DistillationTrainer(SupervisedTrainer):
    """Supervised trainer for knowledge distillation and group-robust training, on MONAI's engine.

    Every iteration runs the student and, when ``teacher`` is given, the frozen teacher (eval mode,
    ``torch.no_grad()``, parameters never updated; its output may come from ``teacher_cache``), then calls the loss:

    - with a teacher: ``loss(pred, teacher_pred, label, groups)`` (e.g. ``GroupDistillationLoss``), or
      ``loss(pred, teacher_pred, label)`` for a ``DistillationLoss`` (plain KD);
    - without: ``loss(pred, label, groups)`` for a ``GroupDROLoss``, ``loss(pred, label)`` for any other loss (ERM).

    So ERM, GroupDRO, KD and GroupDistil students train with the same engine. ``engine.state.output`` holds
    ``image``, ``label``, ``pred``, ``teacher_pred`` (``None`` without teacher), ``group`` (``None`` when the batch
    has no groups and the loss does not need them) and ``loss``. ``IterationEvents`` fire as in
    ``SupervisedTrainer`` (``FORWARD_COMPLETED`` after the student and teacher forward passes); ``amp``, gradient
    accumulation and ``compile`` behave as there.

    Args:
        device: an object representing the device on which to run.
        max_epochs: the total epoch number for trainer to run.
        train_data_loader: Ignite engine uses it to run, must be an Iterable or a torch DataLoader of dictionaries.
        network: the student network.
        optimizer: the student's optimizer.
        loss_function: see above.
        teacher: the frozen teacher network (moved to ``device``; ``requires_grad`` is switched off); ``None``
            for ERM and GroupDRO students.
        group_key: key of the integer group ids ``[B]`` in the batch dictionary.
        teacher_cache: optional :py:class:`TeacherOutputCache`, for deterministic preprocessing only. When the
            loader's dataset transform holds random transforms (``Rand*``, ``OneOf``..., see
            :py:func:`has_random_transforms`) the cache is **ignored** and the teacher runs online, with a warning:
            a cache would give the student, in every epoch, the teacher output of the sample's first augmented
            view instead of the view it is trained on. ``self.teacher_cache`` is then ``None``.
        cache_with_random_transforms: use ``teacher_cache`` even when the dataset transform holds random
            transforms (an explicit opt-in, e.g. for augmentations the teacher is known to be invariant to, or
            to trade exactness for speed); default ``False``.
        progress_bar: attach an ignite ``ProgressBar`` (tqdm) showing the loss.
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (``epoch_length``, ``prepare_batch``,
            ``inferer``, ``train_handlers``, ``amp``, ``key_train_metric``, ``decollate``...).

    Raises:
        ValueError: at construction for a ``DistillationLoss``/``GroupDistillationLoss`` without a teacher; during
            training for a teacher output whose shape differs from the student's (both shapes are named; the
            shape is checked before the output is stored in ``teacher_cache``, so the cache is left unchanged).
        KeyError: during training for a batch lacking the image, the label or (for group losses) the group key; the
            message names the missing key and the keys present.

    Example::

        trainer = DistillationTrainer(
            device="cuda", max_epochs=10, train_data_loader=loader, network=student, teacher=teacher,
            optimizer=torch.optim.Adam(student.parameters(), 1e-3),
            loss_function=GroupDistillationLoss(num_groups=4),
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
        group_key: str = "group",
        teacher_cache: TeacherOutputCache | None = None,
        progress_bar: bool = False,
        cache_with_random_transforms: bool = False,
        **kwargs: Any,
    ) -> None:
        if needs_teacher(loss_function) and teacher is None:
            raise ValueError(f"{type(_unwrap_loss(loss_function)).__name__} needs a `teacher` network, got None.")
        if teacher_cache is not None and teacher is None:
            raise ValueError("a `teacher_cache` was given without a `teacher`.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        if teacher is not None:
            teacher = teacher.to(device)
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher = teacher
        self.group_key = group_key
        self.cache_with_random_transforms = bool(cache_with_random_transforms)
        if teacher_cache is not None and not self.cache_with_random_transforms:
            dataset_transform = getattr(getattr(train_data_loader, "dataset", None), "transform", None)
            if has_random_transforms(dataset_transform):
                warnings.warn(
                    "DistillationTrainer: the training transform holds random transforms, so the teacher_cache is "
                    "ignored and the teacher runs online: a cache would give the student, in every epoch, the "
                    "teacher output of a sample's first augmented view instead of the view it is trained on. "
                    "Pass cache_with_random_transforms=True to use the cache anyway.",
                    stacklevel=2,
                )
                teacher_cache = None
        self.teacher_cache = teacher_cache
        self._check_keys = self.prepare_batch is default_prepare_batch
        sampler = getattr(train_data_loader, "sampler", None)
        if hasattr(sampler, "set_epoch") and not isinstance(sampler, DistributedSampler):
            # MONAI sets the epoch of a DistributedSampler only; samplers such as GroupBalancedSampler draw anew
            # every epoch when they are told the epoch too.
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch))
        if progress_bar:
            ProgressBar(persist=True).attach(
                self, output_transform=lambda out: {"loss": float(from_engine(Keys.LOSS, first=True)(out))}
            )

    def _iteration(self, engine: DistillationTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore
        """
        One distillation iteration. Returns (and stores in ``engine.state.output``):
            - ``image``, ``label``: network input and target on the device.
            - ``pred``: the student's output.
            - ``teacher_pred``: the teacher's output (``None`` without teacher).
            - ``group``: group ids ``[B]`` on the device (``None`` when absent and not needed).
            - ``loss``: the loss value.

        Raises:
            ValueError: when ``batchdata`` is None, or the teacher and student output shapes differ.
            KeyError: when a required key is missing from the batch.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        group_needed = needs_groups(engine.loss_function)
        if isinstance(batchdata, Mapping):
            required = [Keys.IMAGE, Keys.LABEL] if self._check_keys else []
            check_batch_keys(batchdata, required + ([engine.group_key] if group_needed else []))
        elif group_needed:
            check_batch_keys(batchdata, [engine.group_key])
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args: tuple = ()
            kwargs: dict = {}
        else:
            inputs, targets, args, kwargs = batch
        if targets is None:
            check_batch_keys(batchdata, [Keys.LABEL])
        groups = None
        if isinstance(batchdata, Mapping) and engine.group_key in batchdata:
            groups = torch.as_tensor(batchdata[engine.group_key]).to(engine.state.device, non_blocking=True)

        inputs_meta = targets_meta = None
        if engine.compile:  # same workaround as SupervisedTrainer (pytorch/pytorch#117026)
            if isinstance(inputs, MetaTensor):
                inputs, inputs_meta = inputs.as_tensor(), (inputs.meta, inputs.applied_operations)
            if isinstance(targets, MetaTensor):
                targets, targets_meta = targets.as_tensor(), (targets.meta, targets.applied_operations)

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, TEACHER_PRED: None, GROUP: groups}

        def _compute_pred_loss():
            output = engine.state.output
            output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            if engine.teacher is not None:
                teacher_pred = run_teacher(
                    engine.teacher,
                    inputs,
                    engine.inferer,
                    engine.teacher_cache,
                    batchdata,
                    args,
                    kwargs,
                    expected_shape=output[Keys.PRED].shape,  # checked before anything is cached
                )
                check_teacher_shape(output[Keys.PRED], teacher_pred)
                output[TEACHER_PRED] = teacher_pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = compute_distillation_loss(
                engine.loss_function, output[Keys.PRED], targets, groups, output[TEACHER_PRED]
            )
            output[Keys.LOSS] = loss.mean()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        acc = engine.accumulation_steps
        should_zero_grad = should_step = True
        if acc > 1:
            epoch_length = engine.state.epoch_length
            local_iter = engine.state.iteration - 1
            if epoch_length is not None:
                local_iter = local_iter % epoch_length
            should_zero_grad = local_iter % acc == 0
            should_step = (local_iter + 1) % acc == 0 or (epoch_length is not None and local_iter + 1 == epoch_length)

        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        if engine.amp and engine.scaler is not None:
            with torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs):
                _compute_pred_loss()
            loss = engine.state.output[Keys.LOSS]
            engine.scaler.scale(loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        else:
            _compute_pred_loss()
            loss = engine.state.output[Keys.LOSS]
            (loss / acc if acc > 1 else loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.optimizer.step()

        if inputs_meta is not None:
            meta, ops = inputs_meta
            engine.state.output[Keys.IMAGE] = MetaTensor(inputs, meta=meta, applied_operations=ops)
            engine.state.output[Keys.PRED] = MetaTensor(
                engine.state.output[Keys.PRED], meta=meta, applied_operations=ops
            )
        if targets_meta is not None:
            meta, ops = targets_meta
            engine.state.output[Keys.LABEL] = MetaTensor(targets, meta=meta, applied_operations=ops)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
