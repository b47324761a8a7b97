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

if TYPE_CHECKING:
    from ignite.handlers import ProgressBar
else:
    ProgressBar, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "ProgressBar")

__all__ = ["DistillationTrainer", "TEACHER_PRED", "GROUP", "check_batch_keys", "loss_keywords"]

TEACHER_PRED = "teacher_pred"
"""Key of the teacher's output in ``engine.state.output``."""
GROUP = "group"
"""Key of the group ids in ``engine.state.output``."""
LOSS_KEYWORDS = ("teacher_logits", "groups")
"""The keyword arguments the trainer gives a loss whose ``forward`` declares them."""


def loss_keywords(loss: Callable) -> set[str]:
    """The names of :py:data:`LOSS_KEYWORDS` that ``loss`` (its ``forward`` for a module) declares as parameters."""
    target = loss.forward if isinstance(loss, torch.nn.Module) else loss
    return set(LOSS_KEYWORDS) & set(inspect.signature(target).parameters)


def check_batch_keys(batchdata: Any, keys: Sequence[str]) -> None:
    """Raise a ``KeyError`` naming the first missing key and the keys present.

    Raises:
        KeyError: when ``batchdata`` is a dictionary lacking one of ``keys``.
        TypeError: when ``batchdata`` is not a dictionary.
    """
    if not isinstance(batchdata, Mapping):
        names = [str(k) for k in keys]
        raise TypeError(f"a dictionary batch with keys {names} is expected, got {type(batchdata).__name__}.")
    for key in keys:
        if key not in batchdata:
            raise KeyError(f"the batch has no '{key}' key; keys present: {sorted(map(str, batchdata.keys()))}.")


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
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (``epoch_length``, ``prepare_batch``,
            ``inferer``, ``train_handlers``, ``amp``, ``key_train_metric``, ``decollate``...).

    Raises:
        ValueError: at construction for a ``teacher`` with a loss that takes no ``teacher_logits``, or a
            ``teacher_cache`` without teacher; during training for a teacher output whose shape differs from the
            student's (both shapes are named; nothing is stored in the cache then).
        KeyError: during training for a batch lacking the image, the label or (for a loss taking ``groups``) the
            group key; the message names the missing key and the keys present.

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
            check_batch_keys(batchdata, self.required_keys)
        return super()._iteration(engine, batchdata)

    def compute_loss(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The loss of the current iteration: ``student_loss(pred, target=label, [teacher_logits=...], [groups=...])``.

        Called by ``SupervisedTrainer`` inside the iteration (after ``FORWARD_COMPLETED``, under autocast with
        ``amp``); the teacher's output and the group ids are also stored in ``engine.state.output``.

        Raises:
            ValueError: when the teacher's output and ``pred`` differ in shape.
        """
        output, extras = self.state.output, {}
        output[TEACHER_PRED] = output[GROUP] = None
        if self.teacher is not None:
            output[TEACHER_PRED] = run_teacher(
                self.teacher,
                output[Keys.IMAGE],
                self.inferer,
                self.teacher_cache,
                self.state.batch,
                expected_shape=pred.shape,  # checked before anything is cached
            )
        if "teacher_logits" in self.loss_keywords:
            extras["teacher_logits"] = output[TEACHER_PRED]
        batch = self.state.batch
        if isinstance(batch, Mapping) and self.group_key in batch:
            output[GROUP] = torch.as_tensor(batch[self.group_key]).to(self.state.device, non_blocking=self.non_blocking)
        if "groups" in self.loss_keywords:
            extras["groups"] = output[GROUP]
        return self.student_loss(pred, target=label, **extras)
