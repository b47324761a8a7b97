"""Online group distributionally robust optimisation (group DRO) objective around any per-sample loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import (
    NonFiniteValueError,
    check_fraction,
    check_groups,
    check_number,
    check_per_group,
)

__all__ = ["GroupDROLoss", "ABSENT_GROUP_RULES", "UPDATE_RULES"]

ABSENT_GROUP_RULES = ("ema", "zero")  # values of ``absent_groups``: what an absent group brings to the update
UPDATE_RULES = ("batch", "held_out")  # values of ``update``: which per-group losses take the exponentiated step


class GroupDROLoss(_Loss):
    """Online group-DRO objective (Sagawa et al., ICLR 2020) around a per-sample loss.

    Each call, with per-sample losses ``l_i`` and group ids ``g_i`` (Sagawa et al.'s online algorithm):

    1. ``L_g`` = mean of ``l_i`` over the samples of group ``g``, ``n_g`` their count (``L_g = 0`` when absent).
    2. ``A_g = S_g + C_g / sqrt(N_g)`` (generalisation adjustment; ``C = adjustment``, ``N = group_counts``), where
       ``S_g = L_g`` for a group present in the batch. For an absent group, ``S_g`` is its running loss
       ``ema_group_losses`` (or, before it was ever seen, the mean of the present groups' losses) with
       ``absent_groups="ema"``, and ``0`` with ``"zero"``, the reference rule.
    3. if ``normalize_loss``: ``A <- A / sum(A)`` (a zero sum leaves ``A`` as it is).
    4. in training mode: ``q_g <- q_g * exp(step_size * A_g)``, then ``q <- q / sum(q)`` (on detached values). A
       weight is kept at least the smallest positive normal number of its dtype (``torch.finfo(dtype).tiny``, about
       1e-38 in float32): in floating point a large step can round a weight to 0, after which no loss could raise
       it again (the reference code lets that happen); floored, the group recovers once its loss is the largest.
    5. robust loss ``sum_g q_g * (L_g + C_g / sqrt(N_g))`` with the weights just updated.

    Why ``"ema"``: under natural sampling a rare group misses most batches, and with ``S_g = 0`` each such batch
    lowers its weight; with ``"ema"`` absence alone never moves a weight.

    Held-out update (``update="held_out"``): a group whose training samples the network has memorised has a small
    training loss although it may generalise worst, so its weight stops rising (Sagawa et al. need strong
    regularisation for this reason). With ``"held_out"`` a training call only applies the current weights (step 5);
    steps 1-4 run in :py:meth:`update_weights`, on per-sample losses measured on held-out data, e.g. by
    :py:class:`~monai_groupdistil.handlers.HeldOutGroupDROHandler` every epoch. The running losses then follow the
    held-out losses.

    ``q`` (``group_weights``, uniform at first), the running losses ``ema_group_losses`` (factor ``gamma``; an
    absent group keeps its value), ``ema_initialized`` and the rules (``absent_groups``, ``update``) are in
    ``state_dict()``; a checkpoint of another grouping or rule is refused. In ``eval()`` mode nothing is updated.
    ``last_group_losses``/``last_group_counts`` hold the last call's statistics.

    Multi-process: under ``torch.distributed`` the per-group sums and counts are all-reduced before the update, so
    every rank holds the same weights and running losses, and the loss is scaled by the world size so that
    DistributedDataParallel's gradient averaging gives exactly the gradient of the robust loss of the global batch.

    Args:
        loss_fn: callable ``loss_fn(input, target)`` returning per-sample losses ``[B]`` (or ``[B, *spatial]``,
            averaged over the non-batch dimensions), e.g. ``torch.nn.CrossEntropyLoss(reduction="none")``.
        num_groups: number of groups ``G >= 1``.
        step_size: robust step size ``eta >= 0`` (a settable attribute, checked to be ``>= 0``, so handlers may
            schedule it). Defaults to 0.01.
        adjustment: ``C`` of the generalisation adjustment, a float or one value per group, ``>= 0``. A group with
            ``C_g = 0`` gets no adjustment (group_DRO's code adds the adjustment only when every ``C_g > 0``).
        group_counts: training-set size ``N_g`` of every group; required when ``adjustment`` is non-zero.
        normalize_loss: divide the adjusted group losses by their sum before the update.
        gamma: weight of the *new* value in the running (exponential moving average) group losses,
            ``ema <- ema + gamma * (L_g - ema)``, in ``(0, 1]``.
        absent_groups: ``"ema"`` (default) or ``"zero"``, see step 2.
        update: ``"batch"`` (default: every training call updates the weights from its own batch) or
            ``"held_out"`` (only :py:meth:`update_weights` does, see above).
        reduction: as for MONAI's losses, of per-sample values ``[B]`` whose *mean* is the robust loss
            ``sum_g q_g L_g`` (sample ``i`` of group ``g`` has ``B * q_g * l_i / n_g``): ``"mean"`` (default) returns
            the robust loss, ``"sum"`` ``B`` times it, ``"none"`` the values (so a caller that averages them, as
            ``SupervisedTrainer`` does, trains on the robust loss).

    Raises:
        ValueError: for ``num_groups < 1``, a negative ``step_size``, ``gamma`` outside ``(0, 1]``, an unknown
            ``absent_groups`` or ``update``, ``adjustment``/``group_counts`` of the wrong length or sign, a positive
            adjustment without ``group_counts``; at call time for group ids outside ``[0, num_groups)`` or
            non-integral, shape mismatches, an empty batch and non-finite group losses (a ``NonFiniteValueError``,
            a ``ValueError`` subclass; the state is then left untouched).
        TypeError: for a ``loss_fn`` that is not callable; at call time for group ids that are not a real-valued
            tensor, or missing group ids.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import GroupDROLoss
        >>> loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups=2, step_size=0.1)
        >>> logits = torch.randn(6, 3, requires_grad=True)
        >>> labels, groups = torch.randint(0, 3, (6,)), torch.tensor([0, 0, 0, 1, 1, 1])
        >>> loss(logits, labels, groups).backward()
        >>> loss.group_weights.shape
        torch.Size([2])
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        num_groups: int,
        step_size: float = 0.01,
        adjustment: float | Sequence[float] = 0.0,
        group_counts: Sequence[float] | torch.Tensor | None = None,
        normalize_loss: bool = False,
        gamma: float = 0.1,
        absent_groups: str = "ema",
        reduction: LossReduction | str = "mean",
        update: str = "batch",
    ):
        super().__init__(reduction=LossReduction(reduction).value)
        if isinstance(loss_fn, type):
            raise TypeError(
                f"loss_fn must be a loss object, got the class {loss_fn.__name__}: construct it first, e.g. "
                f"{loss_fn.__name__}(reduction='none')."
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(input, target) -> [B], got {type(loss_fn)}.")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        if absent_groups not in ABSENT_GROUP_RULES:
            raise ValueError(f"absent_groups must be one of {ABSENT_GROUP_RULES}, got {absent_groups!r}.")
        if update not in UPDATE_RULES:
            raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}.")
        self.update = update
        self.loss_fn = loss_fn
        self.num_groups = num_groups
        self.step_size = step_size
        self.normalize_loss = bool(normalize_loss)
        self.gamma = check_fraction(gamma, "gamma", open_at_zero=True)
        self.absent_groups = absent_groups

        adj = check_per_group(adjustment, num_groups, "adjustment")
        counts = None if group_counts is None else check_per_group(group_counts, num_groups, "group_counts")
        self.use_adjustment = bool((adj > 0).any())
        if self.use_adjustment:
            if counts is None:
                raise ValueError("a non-zero adjustment needs group_counts (the training-set size of every group).")
            zero = [g for g in range(num_groups) if adj[g] > 0 and counts[g] == 0]
            if zero:
                raise ValueError(f"group_counts is 0 for groups {zero}, which have a positive adjustment.")
        adj_term = adj / counts.clamp_min(1).sqrt() if self.use_adjustment else torch.zeros(num_groups)  # type: ignore[union-attr]
        self.register_buffer("adjustment_term", adj_term.float(), persistent=False)
        self.register_buffer("group_weights", torch.full((num_groups,), 1.0 / num_groups))
        self.register_buffer("ema_group_losses", torch.zeros(num_groups))
        self.register_buffer("ema_initialized", torch.zeros(num_groups, dtype=torch.bool))
        self.register_buffer("last_group_losses", torch.zeros(num_groups), persistent=False)
        self.register_buffer("last_group_counts", torch.zeros(num_groups, dtype=torch.long), persistent=False)
        self.register_load_state_dict_pre_hook(self._check_checkpoint)

    @property
    def step_size(self) -> float:
        """Robust step size ``eta`` of the exponentiated-gradient update (``>= 0``)."""
        return self._step_size

    @step_size.setter
    def step_size(self, value: float) -> None:
        self._step_size = check_number(value, "step_size")

    def forward(self, input: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """``loss_fn(input, target)`` gives per-sample losses, ``groups`` integer ids ``[B]`` in ``[0, num_groups)``;
        returns the robust loss reduced as ``reduction`` says.

        Raises:
            TypeError: when ``groups`` is missing (MONAI's ``SupervisedTrainer`` calls ``loss(pred, label)`` only;
                the message says to use :py:class:`~monai_groupdistil.engines.DistillationTrainer`).
        """
        if groups is None:
            raise TypeError(_missing_groups_message(type(self).__name__, "loss(input, target, groups)"))
        if not isinstance(input, torch.Tensor) or input.ndim < 1 or input.shape[0] == 0:
            raise ValueError("input must be a tensor with a non-empty batch dimension.")
        groups = check_groups(groups, input.shape[0])
        return self.robust_reduce(self.loss_fn(input, target), groups)

    def weighting_losses(
        self, input: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The per-sample losses ``[B]`` that drive the weights: here ``loss_fn(input, target)`` (averaged over the
        non-batch dimensions). :py:class:`GroupDistillationLoss` chooses them with ``weight_by``. ``teacher_logits``
        is ignored here. Used with :py:meth:`update_weights` on held-out data."""
        return _per_sample_mean(self.loss_fn(input, target), input.shape[0])

    def update_weights(self, losses: torch.Tensor, groups: torch.Tensor) -> None:
        """One exponentiated-gradient step (steps 1-4) from per-sample losses ``[B]`` measured elsewhere, typically
        :py:meth:`weighting_losses` of held-out data under ``torch.no_grad()``; ``groups`` integer ids ``[B]``.

        It runs in any mode (``eval()`` included) and with either ``update`` rule; under ``torch.distributed`` the
        per-group sums and counts are all-reduced, so each rank may pass its own share of the held-out data.

        Raises:
            ValueError: for group ids outside ``[0, num_groups)`` or non-integral, mismatched shapes, an empty batch
                or non-finite losses; the weights and running losses are then left untouched.
            TypeError: for group ids that are not a real-valued tensor.
        """
        if not isinstance(losses, torch.Tensor) or losses.ndim == 0 or losses.shape[0] == 0:
            raise ValueError("losses must be a tensor of per-sample losses [B] with a non-empty batch dimension.")
        groups = check_groups(groups, losses.shape[0])
        losses = _per_sample_mean(losses, groups.shape[0]).detach()
        group_losses, counts, _ = self._group_statistics(losses, groups)
        self._exponentiated_step(group_losses, counts)

    def robust_reduce(
        self,
        per_sample: torch.Tensor,
        groups: torch.Tensor,
        labels_outside: torch.Tensor | None = None,
        weighting: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The robust loss (see ``reduction``) of per-sample losses ``[B]`` (or ``[B, *spatial]``, averaged over the
        non-batch dimensions) and int64 ids ``[B]``; with ``update="batch"`` the weights are updated first in
        training mode.

        ``weighting`` (per-sample ``[B]``, default ``per_sample``) is what the update and the running losses use;
        ``labels_outside``, a caller's 0-dim flag for labels outside the classes, is checked with the ids and the
        group losses."""
        per_sample = _per_sample_mean(per_sample, groups.shape[0])
        if weighting is None:
            weighting = per_sample
        else:  # a non-finite objective must stop the call too: carry it into the checked values
            objective = per_sample.detach()
            weighting = torch.where(objective.isfinite(), _per_sample_mean(weighting, groups.shape[0]), objective)
        # a float16 sum (or a "none" value, B times a sample's share) can overflow although every sample is finite:
        # only then is the result checked, after the update, which is undone (batch statistics too) before the error
        may_overflow = per_sample.dtype == torch.float16 and self.reduction != LossReduction.MEAN.value
        before = None
        if may_overflow and self.training and self.update == "batch":
            before = {name: buffer.clone() for name, buffer in self.named_buffers(recurse=False)}
        group_losses, counts, world_size = self._group_statistics(weighting.detach(), groups, labels_outside)
        weights = self.group_weights.to(group_losses.dtype)
        if self.training and self.update == "batch":
            weights = self._exponentiated_step(group_losses, counts)
        coefficients = weights * world_size / counts.clamp_min(1)  # a_i = q_g / n_g: sum_i a_i l_i = sum_g q_g L_g
        ids = groups.as_subclass(torch.Tensor).to(weights.device).clamp(0, self.num_groups - 1)
        # sum_i a_i l_i (+ sum_g q_g C_g / sqrt(N_g)) is the robust loss; "none" gives B times each sample's share,
        # so that the mean of the values is the robust loss and their sum B times it, as for MONAI's losses
        batch = groups.shape[0]
        robust = per_sample.to(weights.dtype) * coefficients[ids].to(per_sample.device)
        if self.reduction != LossReduction.NONE.value:
            robust = robust.sum()
        if self.use_adjustment:
            robust = robust + (weights * self.adjustment_term.to(weights.dtype)).sum().to(per_sample.device) / (
                batch if self.reduction == LossReduction.NONE.value else 1
            )
        if self.reduction != LossReduction.MEAN.value:
            robust = robust * batch
        result = robust.to(per_sample.dtype)
        if may_overflow and not bool(result.isfinite().all()):
            if before is not None:
                for name, buffer in self.named_buffers(recurse=False):
                    buffer.copy_(before[name])
            raise NonFiniteValueError(
                f"the robust loss with reduction={self.reduction!r} overflows float16 (largest value "
                f"{float(robust.abs().max()):.6g}), though every per-sample loss is finite; the DRO weights are left "
                "as they were. Use reduction='mean', or compute the loss in float32 (under torch.autocast it is)."
            )
        return result

    def _group_statistics(
        self, losses: torch.Tensor, groups: torch.Tensor, labels_outside: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-group mean losses and counts ``[G]`` (all-reduced under ``torch.distributed``) and the world size;
        checks the ids, the labels flag and the finiteness of the group losses."""
        # the one host synchronisation of a call: ids, labels and finiteness are checked together, after the
        # statistics, so a bad id or label never reaches a kernel (it is clamped) and nothing is written before
        device, num_groups = self.group_weights.device, self.num_groups
        dtype = torch.promote_types(torch.promote_types(losses.dtype, self.group_weights.dtype), torch.float32)
        # NCCL reduces CUDA tensors only: reduce on the GPU where the losses or the buffers are
        reduce_device = losses.device if losses.device.type != "cpu" else device
        # plain tensors (a MONAI MetaTensor's batch metadata cannot follow the slicing of the all-reduced statistics)
        losses = losses.as_subclass(torch.Tensor).to(device, dtype)
        groups = groups.as_subclass(torch.Tensor).to(device)
        ids = groups.clamp(0, num_groups - 1)  # safe for index_add_; ids outside are reported below
        sums = torch.zeros(num_groups, dtype=dtype, device=device).index_add_(0, ids, losses)
        counts = torch.zeros(num_groups, dtype=dtype, device=device).index_add_(0, ids, torch.ones_like(losses))
        invalid = (ids != groups).any()
        if labels_outside is not None:
            invalid = invalid | labels_outside.to(device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
            stats = torch.cat([sums, counts, invalid.to(dtype).reshape(1)]).to(reduce_device)
            dist.all_reduce(stats)
            stats = stats.to(device)
            sums, counts, invalid = stats[:num_groups], stats[num_groups:-1], stats[-1] > 0
        group_losses = sums / counts.clamp_min(1)
        if not bool(torch.isfinite(group_losses).all() & ~invalid):
            self._raise_for_bad_batch(groups, labels_outside, bool(invalid), group_losses)
        self.last_group_losses.copy_(group_losses)
        self.last_group_counts.copy_(counts)
        return group_losses, counts, world_size

    def _exponentiated_step(self, group_losses: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Steps 2-4: update the weights and the running losses from per-group losses and counts ``[G]``; returns
        the new weights in the dtype of ``group_losses`` (the buffer may hold them in a lower precision)."""
        dtype = group_losses.dtype
        present = counts > 0
        scores = group_losses
        if self.absent_groups == "ema":
            present_mean = (group_losses * present).sum() / present.sum()
            running = torch.where(self.ema_initialized, self.ema_group_losses.to(dtype), present_mean)
            scores = torch.where(present, group_losses, running)
        if self.use_adjustment:
            scores = scores + self.adjustment_term.to(dtype)
        if self.normalize_loss:
            total = scores.sum()
            scores = torch.where(total != 0, scores / total, scores)
        weights = torch.softmax(self.group_weights.to(dtype).log() + self.step_size * scores, dim=0)  # q exp(eta A)
        # a weight rounded to 0 would stay 0 for good (0 * exp(.) = 0): keep it a positive number of the buffer's dtype.
        # No renormalisation: it would move every weight by rounding; the floor adds at most G * tiny to the sum.
        weights = weights.clamp_min(torch.finfo(self.group_weights.dtype).tiny)
        ema = self.ema_group_losses.to(dtype)
        ema = torch.where(self.ema_initialized, ema + self.gamma * (group_losses - ema), group_losses)
        self.group_weights.copy_(weights)
        self.ema_group_losses.copy_(torch.where(present, ema, self.ema_group_losses))
        self.ema_initialized.logical_or_(present)
        return weights

    def _raise_for_bad_batch(self, groups, labels_outside, invalid: bool, group_losses: torch.Tensor) -> None:
        lo, hi = (int(v) for v in torch.aminmax(groups))
        if lo < 0 or hi >= self.num_groups:
            raise ValueError(
                f"groups holds ids in [{lo}, {hi}]; ids must lie in [0, num_groups) = [0, {self.num_groups}). Set "
                "num_groups to the number of groups, or map the groups to 0 .. num_groups - 1 (group names: "
                "monai_groupdistil.data.MapGroupNamesd)."
            )
        if labels_outside is not None and bool(labels_outside):
            raise ValueError("target holds class indices outside [0, C); the DRO weights were left unchanged.")
        if invalid:
            raise ValueError("another process passed group ids or class indices out of range; nothing was updated.")
        bad = torch.nonzero(~torch.isfinite(group_losses)).flatten().tolist()
        raise NonFiniteValueError(
            f"per-group losses are not finite for groups {bad} (NaN or infinite logits or losses); "
            "the DRO weights were left unchanged."
        )

    def get_extra_state(self) -> dict:
        return {"absent_groups": self.absent_groups, "update": self.update}

    def set_extra_state(self, state: dict) -> None:  # checked by _check_checkpoint, before any buffer is written
        pass

    def _check_checkpoint(self, module, state_dict, prefix, *args) -> None:
        """Load pre-hook: refuse a checkpoint of another grouping or rule (``absent_groups``, ``update``,
        ``weight_by``), or with bad weights."""
        weights = state_dict.get(prefix + "group_weights")
        if weights is not None and tuple(weights.shape) != (self.num_groups,):
            raise ValueError(
                f"the checkpoint holds DRO weights for {weights.numel()} groups (shape {tuple(weights.shape)}) "
                f"but this loss has num_groups={self.num_groups}; train with the same grouping or start anew."
            )
        # every buffer is checked before any is written: torch copies them one by one
        for name, buffer in self.named_buffers(recurse=False):
            saved = state_dict.get(prefix + name)
            if saved is not None and tuple(saved.shape) != tuple(buffer.shape):
                raise ValueError(
                    f"the checkpoint's '{prefix}{name}' has shape {tuple(saved.shape)}, this loss needs "
                    f"{tuple(buffer.shape)} (num_groups={self.num_groups}); the checkpoint is damaged or of another "
                    "loss: start anew or load the right one."
                )
        if weights is not None and not (
            weights.is_floating_point()
            and bool(torch.isfinite(weights).all())
            and bool((weights >= 0).all())
            and -_sum_tolerance(weights) < float(weights.double().sum()) - 1 < _sum_tolerance(weights, self.num_groups)
        ):
            shown = f"{weights.tolist()}" if weights.numel() <= 8 else f"{weights[:8].tolist()} ... ({weights.numel()})"
            raise ValueError(
                f"the checkpoint's DRO weights are not a probability vector (sum {float(weights.double().sum()):.6g}): "
                f"{shown}."
            )
        running = state_dict.get(prefix + "ema_group_losses")
        if running is not None and not bool(torch.isfinite(running).all()):
            raise ValueError(
                f"the checkpoint's running group losses ('{prefix}ema_group_losses') are not finite: "
                f"{running.tolist()}; they would turn the DRO weights into NaN. Load an earlier checkpoint or start "
                "anew."
            )
        # checkpoints of earlier versions carry fewer rules (none before absent_groups): those are taken as they are
        saved = state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        for rule, value in self.get_extra_state().items():
            if rule in saved and saved[rule] != value:
                raise ValueError(
                    f"the checkpoint was trained with {rule}={saved[rule]!r} but this loss has {rule}={value!r}; "
                    "use the same rule or start anew."
                )


def _sum_tolerance(weights: torch.Tensor, num_groups: int = 0) -> float:
    """How far from 1 the sum of saved DRO weights may lie: rounding each weight to the buffer's dtype moves the sum
    by up to half its ``eps`` (0.004 for bfloat16); with ``num_groups``, the tolerance above 1, where the floor of
    ``_exponentiated_step`` adds up to ``num_groups * tiny`` to the sum of weights held in a low precision."""
    info = torch.finfo(weights.dtype)
    return max(1e-3, info.eps) + num_groups * info.tiny


def _missing_groups_message(name: str, call: str) -> str:
    return (
        f"{name} needs the group ids of the batch: call {call}. In a MONAI workflow use "
        "monai_groupdistil.engines.DistillationTrainer, which passes them (and the teacher's output) from the batch's "
        "'group' key; SupervisedTrainer calls a loss as loss(pred, label) only."
    )


def _per_sample_mean(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample values ``[B]`` from ``[B]`` or ``[B, *spatial]`` (mean over the non-batch dimensions).

    Raises:
        ValueError: when ``values`` is not a tensor with ``batch`` samples.
    """
    if not isinstance(values, torch.Tensor) or values.ndim == 0 or values.shape[0] != batch:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"per-sample losses of shape [B] = ({batch},) are expected, got {shape}; "
            "construct the loss function with reduction='none' (MONAI's DiceCELoss has no 'none' reduction: use "
            "monai_groupdistil.losses.PerSampleDiceCELoss)."
        )
    return values.flatten(1).mean(dim=1) if values.ndim > 1 else values
