"""Online group distributionally robust optimisation (group DRO) objective around any per-sample loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import add, mul, sub, truediv
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import check_groups, check_step_size, group_sums_and_counts

__all__ = ["GroupDROLoss", "RobustStep"]


class RobustStep(NamedTuple):
    """Linear form of one group-DRO step (:py:meth:`GroupDROLoss.robust_coefficients`)."""

    coefficients: torch.Tensor
    """per-sample coefficients ``a_i`` ``[B]`` of the per-sample losses."""
    constant: float
    """the adjustment term ``c``."""
    value: float | None
    """the robust loss ``sum_i a_i l_i + c`` (single process), or None (multi-process: each rank's share differs)."""


_DISTRIBUTED = dist.is_available()
# state buffers handled as numpy arrays at every call, in the order of ``GroupDROLoss._state_arrays``
_STATE_BUFFERS = ("group_weights", "ema_group_losses", "ema_initialized", "last_group_losses", "last_group_counts")
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class GroupDROLoss(_Loss):
    """Online group-DRO objective (Sagawa et al., ICLR 2020) around a per-sample loss.

    Each call, with per-sample losses ``l_i`` and group ids ``g_i``:

    1. ``L_g`` = mean of ``l_i`` over the samples of group ``g`` (0 when the group is absent), ``n_g`` their count.
    2. ``A_g = L_g + C_g / sqrt(N_g)`` (generalisation adjustment; ``C = adjustment``, ``N = group_counts``).
    3. if ``normalize_loss``: ``A <- A / sum(A)``.
    4. in training mode: ``q_g <- q_g * exp(step_size * A_g)``, then ``q <- q / sum(q)`` (detached values).
    5. robust loss ``sum_g q_g * (L_g + C_g / sqrt(N_g))``, with the weights just updated.

    ``q`` (the buffer ``group_weights``) starts uniform and is part of ``state_dict()``, so MONAI checkpoints carry
    it. In ``eval()`` mode the weights are frozen and the loss uses the current ones. An exponential moving average
    of each group's loss (``ema_group_losses``, factor ``gamma``; an absent group keeps its value) and the
    per-group losses and counts of the last call (``last_group_losses``, ``last_group_counts``) are kept for
    logging. The group reduction is vectorised (one ``bincount`` for the sums and one for the counts), with no
    Python loop over groups or samples.

    Multi-process: when ``torch.distributed`` is initialised, the per-group sums and counts are all-reduced before
    the update, so every rank holds identical weights, and the returned loss is scaled by the world size so that
    DistributedDataParallel's gradient averaging yields exactly the gradient of the robust loss on the concatenated
    global batch. (Each rank then returns its share of the global objective times the world size; their mean over
    ranks is the global robust loss.)

    Args:
        loss_fn: callable ``loss_fn(input, target)`` returning per-sample losses ``[B]`` (or ``[B, *spatial]``,
            averaged over the non-batch dimensions), e.g. ``torch.nn.CrossEntropyLoss(reduction="none")``.
        num_groups: number of groups ``G >= 1``.
        step_size: robust step size ``eta >= 0`` of the exponentiated-gradient update. Defaults to 0.01. It is a
            plain attribute read at every call, so handlers may change it (warm-up, schedules).
        adjustment: ``C`` of the generalisation adjustment, a float or one value per group, ``>= 0``.
        group_counts: training-set size ``N_g`` of every group; required when ``adjustment`` is non-zero.
        normalize_loss: divide the adjusted group losses by their sum before the update (a zero sum leaves them as
            they are).
        gamma: factor of the exponential moving average of the group losses, in ``(0, 1]``.
        reduction: ``"mean"`` or ``"sum"`` return the robust scalar; ``"none"`` returns per-sample contributions
            ``[B]`` whose sum equals it.

    Raises:
        ValueError: for ``num_groups < 1``, negative or non-finite ``step_size``, ``gamma`` outside ``(0, 1]``,
            ``adjustment``/``group_counts`` of the wrong length or negative, a positive adjustment without
            ``group_counts`` or with a zero count; at call time for bad group ids, shape mismatches, an empty batch
            and non-finite per-group losses (the weights are left untouched).
        TypeError: at call time for non-integer group ids.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import GroupDROLoss
        >>> loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups=2, step_size=0.1)
        >>> logits = torch.randn(6, 3, requires_grad=True)
        >>> labels, groups = torch.randint(0, 3, (6,)), torch.tensor([0, 0, 0, 1, 1, 1])
        >>> value = loss(logits, labels, groups)
        >>> value.backward()
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
        reduction: LossReduction | str = "mean",
    ):
        super().__init__(reduction=LossReduction(reduction).value)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(input, target) -> [B], got {type(loss_fn)}.")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        gamma = float(gamma)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}.")
        self.loss_fn = loss_fn
        self.num_groups = num_groups
        self.step_size = step_size
        self.normalize_loss = bool(normalize_loss)
        self.gamma = gamma

        adj = _per_group_tensor(adjustment, num_groups, "adjustment")
        if bool((adj < 0).any()):
            raise ValueError(f"adjustment must be >= 0 for every group, got {adj.tolist()}.")
        counts = None if group_counts is None else _per_group_tensor(group_counts, num_groups, "group_counts")
        if counts is not None and bool((counts < 0).any()):
            raise ValueError(f"group_counts must be >= 0 for every group, got {counts.tolist()}.")
        if bool((adj > 0).any()):
            if counts is None:
                raise ValueError("a non-zero adjustment needs group_counts (the training-set size of every group).")
            zero = [g for g in range(num_groups) if adj[g] > 0 and counts[g] == 0]
            if zero:
                raise ValueError(f"group_counts is 0 for groups {zero}, which have a positive adjustment.")
            adj_term = torch.where(adj > 0, adj / counts.clamp_min(1).sqrt(), torch.zeros_like(adj))
        else:
            adj_term = torch.zeros(num_groups, dtype=torch.float64)
        self.use_adjustment = bool((adj > 0).any())
        self.register_buffer("adjustment", adj, persistent=False)
        self.register_buffer("group_counts", counts, persistent=False)
        self.register_buffer("adjustment_term", adj_term, persistent=False)
        self.register_buffer("group_weights", torch.full((num_groups,), 1.0 / num_groups))
        self.register_buffer("ema_group_losses", torch.zeros(num_groups))
        self.register_buffer("ema_initialized", torch.zeros(num_groups, dtype=torch.bool))
        self.register_buffer("last_group_losses", torch.zeros(num_groups), persistent=False)
        self.register_buffer("last_group_counts", torch.zeros(num_groups, dtype=torch.long), persistent=False)
        self._adjustment_list: list[float] = adj_term.tolist()
        self._numpy_state: tuple[tuple[int, ...], list[np.ndarray]] | None = None

    @property
    def step_size(self) -> float:
        """Robust step size ``eta`` of the exponentiated-gradient update (``>= 0``)."""
        return self._step_size

    @step_size.setter
    def step_size(self, value: float) -> None:
        self._step_size = check_step_size(value)

    def forward(self, input: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: network output passed to ``loss_fn``, first dimension the batch ``B``.
            target: target passed to ``loss_fn``.
            groups: integer group ids ``[B]`` in ``[0, num_groups)``.

        Returns:
            the robust scalar (``"mean"``/``"sum"``) or per-sample contributions ``[B]`` (``"none"``).
        """
        if not isinstance(input, torch.Tensor) or input.ndim < 1 or input.shape[0] == 0:
            raise ValueError("input must be a tensor with a non-empty batch dimension.")
        groups = check_groups(groups, input.shape[0])
        return self.robust_reduce(self.loss_fn(input, target), groups)

    def robust_reduce(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Apply the group-DRO objective to per-sample losses (updating the weights in training mode).

        Args:
            per_sample: per-sample losses ``[B]`` (or ``[B, *spatial]``, averaged over the non-batch dimensions).
            groups: int64 group ids ``[B]`` (see ``check_groups``); their range is checked here.

        Returns:
            the reduced robust loss, see ``reduction``.
        """
        batch = groups.shape[0]
        if not isinstance(per_sample, torch.Tensor) or per_sample.ndim == 0 or per_sample.shape[0] != batch:
            shape = tuple(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise ValueError(
                f"loss_fn must return per-sample losses of shape [B] = ({batch},), got {shape}; "
                "construct it with reduction='none'."
            )
        if per_sample.ndim > 1:
            per_sample = per_sample.flatten(1).mean(dim=1)
        sample_coef, constant, _ = self.robust_coefficients(per_sample.detach(), groups)
        if self.reduction == "none":
            out = (per_sample * sample_coef).to(per_sample.dtype)
            return out + constant / batch if self.use_adjustment else out
        # (half-precision losses have float32 coefficients; .to is a no-op otherwise)
        out = torch.dot(per_sample.to(sample_coef.dtype), sample_coef).to(per_sample.dtype)
        return out + constant if self.use_adjustment else out

    def robust_coefficients(
        self,
        values: torch.Tensor,
        groups: torch.Tensor,
        scale: float = 1.0,
        coefficient_factor: float = 1.0,
        coefficient_dims: int = 1,
    ) -> RobustStep:
        """The group-DRO step on the detached per-sample losses ``l_i = scale * values_i``: returns its linear form.

        Computes the per-group losses and counts, all-reduces them across processes, updates the weights and the
        EMA in training mode (exactly as in the class description), records the last call's statistics, and
        returns the per-sample coefficients ``a_i`` and the constant ``c`` such that the robust loss is
        ``sum_i a_i * l_i + c`` (``a_i = q_g / n_g`` for the sample's group ``g``, times the world size in
        multi-process runs; ``c`` the adjustment term ``sum_g q_g C_g / sqrt(N_g)``, 0 without adjustment).

        Args:
            values: detached per-sample values ``[B]`` (floating point).
            groups: int64 group ids ``[B]``; their range is checked here.
            scale: factor from ``values`` to the losses (e.g. a loss kernel's constant factor kept out of its
                values).
            coefficient_factor: factor applied to the returned coefficients only (folded into the G numbers, so it
                costs no kernel), e.g. a constant of the caller's gradient.
            coefficient_dims: number of dimensions of the returned coefficients, ``[B, 1, ...]``, to broadcast
                against per-sample tensors.

        Returns:
            a :py:class:`RobustStep` ``(coefficients, constant, value)``: ``a`` (times ``coefficient_factor``) as a
            ``[B]`` (``[B, 1, ...]``) tensor on the device of ``values``, float64 for float64 values and float32
            otherwise (half-precision coefficients would lose digits or underflow), ``c`` a float, and in a single
            process the robust loss as a float (``None`` in multi-process runs, where each rank returns its share).

        Raises:
            ValueError: for group ids outside ``[0, num_groups)``, non-finite per-group losses or a failed weight
                update; the state is then left untouched.
        """
        if torch.compiler.is_compiling():  # host-side state: run eagerly at every call, never traced by dynamo
            return _robust_step_eager(self, values, groups, scale, coefficient_factor, coefficient_dims)
        return self._robust_step(values, groups, scale, coefficient_factor, coefficient_dims)

    def _robust_step(
        self, values: torch.Tensor, groups: torch.Tensor, scale: float, coefficient_factor: float, coefficient_dims: int
    ) -> RobustStep:
        """:py:meth:`robust_coefficients` itself."""
        num_groups = self.num_groups
        # The group sums and counts are one bincount each (on the CPU on numpy views of the tensors, so no tensor
        # operation is needed at all). The G numbers they give are then handled as Python floats: on these sizes
        # every numpy or torch call costs microseconds (several, right after the loss kernels have gone through
        # the caches), far more than its arithmetic, and the update below needs about twenty of them.
        on_cpu = values.dtype in _NUMPY_DTYPES and values.is_cpu and groups.is_cpu
        ids = groups.numpy() if on_cpu else None
        group_sums, group_counts = group_sums_and_counts(groups, values, num_groups, ids)
        world_size = 1
        if _DISTRIBUTED and dist.is_initialized():
            world_size = dist.get_world_size()
            stats = torch.from_numpy(np.stack([group_sums, group_counts.astype(np.float64)])).to(values.device)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            group_sums, group_counts = stats.cpu().numpy()
        counts = group_counts.tolist()
        denom = list(map(max, counts, repeat(1)))
        group_losses = list(map(truediv, group_sums.tolist(), denom))
        if scale != 1.0:
            group_losses = list(map(mul, group_losses, repeat(scale)))
        if not math.isfinite(sum(group_losses)):
            bad = np.flatnonzero(~np.isfinite(group_losses)).tolist()
            raise ValueError(
                f"per-group losses are not finite for groups {bad} (NaN or infinite logits or losses); "
                "the DRO weights were left unchanged."
            )
        state = self._state_arrays()
        if self.training:
            weights = self._update_state(state, group_losses, counts)
        else:
            weights = state[0].tolist()
        state[3][...] = group_losses
        state[4][...] = counts
        if state is not self._cpu_state:
            self._commit_state(state)
        coef = map(truediv, weights, denom)  # q_g / n_g (times the factors), per group
        if world_size != 1 or coefficient_factor != 1.0:
            coef = map(mul, coef, repeat(world_size * coefficient_factor))
        double = values.dtype == torch.float64  # coefficients in float64 or float32 (also for half values)
        if on_cpu:  # per-sample coefficients gathered in numpy
            taken = np.fromiter(coef, np.float64 if double else np.float32, num_groups).take(ids)  # type: ignore[union-attr]
            if coefficient_dims != 1:
                taken = taken.reshape(-1, *([1] * (coefficient_dims - 1)))
            sample_coef = torch.from_numpy(taken)
        else:
            coef_t = torch.tensor(list(coef), dtype=torch.float64 if double else torch.float32, device=values.device)
            sample_coef = coef_t.index_select(0, groups)
            if coefficient_dims != 1:
                sample_coef = sample_coef.view(-1, *([1] * (coefficient_dims - 1)))
        constant = sum(map(mul, weights, self._adjustment_list)) if self.use_adjustment else 0.0
        # single process: the robust loss sum_g q_g L_g + c itself (the same number as sum_i a_i l_i + c)
        value = sum(map(mul, weights, group_losses)) + constant if world_size == 1 else None
        return RobustStep(sample_coef, constant, value)

    def _update_state(self, state: list[np.ndarray], group_losses: list[float], counts: list[float]) -> list[float]:
        """Exponentiated-gradient step on the weights and EMA update, written into ``state``; returns the weights.

        ``state`` is left untouched when the update fails. (G numbers as Python floats, combined with ``map``: see
        :py:meth:`robust_coefficients`.)
        """
        adjusted = list(map(add, group_losses, self._adjustment_list)) if self.use_adjustment else group_losses
        if self.normalize_loss:
            total = sum(adjusted)
            if total != 0.0:
                adjusted = list(map(truediv, adjusted, repeat(total)))
        exponent = list(map(mul, adjusted, repeat(self._step_size)))
        top = max(exponent)
        if not -700.0 < top < 700.0:  # exp would overflow or underflow in float64: shift (same weights)
            exponent = list(map(sub, exponent, repeat(top)))
        weights = list(map(mul, map(math.exp, exponent), state[0].tolist()))
        total = sum(weights)
        if not 0.0 < total < math.inf:
            raise ValueError(
                f"the DRO weight update underflowed (step_size={self.step_size} is too large for losses "
                f"{group_losses}); the weights were left unchanged."
            )
        weights = list(map(truediv, weights, repeat(total)))
        ema, initialized = state[1], state[2]
        if 0 in counts or False in initialized.tolist():
            # EMA factor: gamma where the group was seen before and is present now, 1 at its first appearance, 0
            # where it is absent
            present = np.asarray(counts) > 0
            rate = np.where(initialized, self.gamma, 1.0)
            rate *= present
            ema += rate * (np.asarray(group_losses) - ema)
            initialized |= present
        else:  # every group present and seen before (the usual case): factor gamma everywhere
            previous = ema.tolist()
            ema[...] = list(map(add, previous, map(mul, map(sub, group_losses, previous), repeat(self.gamma))))
        state[0][...] = weights
        return weights

    def _state_arrays(self) -> list[np.ndarray]:
        """Numpy arrays of the state buffers (weights, EMA, EMA-initialised, last losses, last counts).

        On the CPU they are views of the buffers (cached while every buffer keeps its storage), so writing into them
        updates the buffers; elsewhere they are copies, written back by :py:meth:`_commit_state`.
        """
        b = self._buffers
        key = (  # the storage of every buffer: a replaced buffer or a moved storage invalidates the views
            b["group_weights"].data_ptr(),  # type: ignore[union-attr]
            b["ema_group_losses"].data_ptr(),  # type: ignore[union-attr]
            b["ema_initialized"].data_ptr(),  # type: ignore[union-attr]
            b["last_group_losses"].data_ptr(),  # type: ignore[union-attr]
            b["last_group_counts"].data_ptr(),  # type: ignore[union-attr]
        )
        if self._numpy_state is not None and self._numpy_state[0] == key:
            return self._numpy_state[1]
        tensors = [b[name] for name in _STATE_BUFFERS]
        if all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in tensors):  # type: ignore[union-attr]
            views = [t.numpy() for t in tensors]  # type: ignore[union-attr]
            self._numpy_state = (key, views)  # the views hold the tensors, so no address can be reused meanwhile
            return views
        # copies (float32 for bfloat16, which numpy lacks), written back by _commit_state
        return [
            t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16 else t.detach().cpu().numpy().copy()  # type: ignore[union-attr]
            for t in tensors
        ]

    @property
    def _cpu_state(self) -> list[np.ndarray] | None:
        """The cached numpy views of the CPU state buffers (None before the first call or off the CPU)."""
        return None if self._numpy_state is None else self._numpy_state[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_numpy_state"] = None  # views of this module's buffers; a copy or an unpickled module makes its own
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_numpy_state", None)
        # modules pickled by earlier versions lack the Python copy of the adjustment terms
        if "_adjustment_list" not in self.__dict__:
            self._adjustment_list = self.adjustment_term.double().cpu().tolist()

    def _commit_state(self, state: list[np.ndarray]) -> None:
        """Copy ``state`` (copies of buffers that are not on the CPU) into the buffers."""
        for name, values in zip(_STATE_BUFFERS, state):
            tensor = self._buffers[name]
            assert tensor is not None
            tensor.copy_(torch.from_numpy(values))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        key = prefix + "group_weights"
        if key in state_dict:
            weights = state_dict[key]
            if tuple(weights.shape) != (self.num_groups,):
                raise ValueError(
                    f"the checkpoint holds DRO weights for {weights.numel()} groups (shape {tuple(weights.shape)}) "
                    f"but this loss has num_groups={self.num_groups}; train with the same grouping or start anew."
                )
            if (
                not bool(torch.isfinite(weights).all())
                or bool((weights < 0).any())
                or abs(float(weights.sum()) - 1) > 1e-3
            ):
                raise ValueError(f"the checkpoint's DRO weights are not a probability vector: {weights.tolist()}.")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)


# dynamo would specialise on the Python floats of the bookkeeping (and fail its own guards when they change)
_robust_step_eager = torch.compiler.disable(GroupDROLoss._robust_step)


def _per_group_tensor(value: float | Sequence[float] | torch.Tensor, num_groups: int, name: str) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value!r}.")
        return torch.full((num_groups,), float(value), dtype=torch.float64)
    tensor = torch.as_tensor(value, dtype=torch.float64).flatten()
    if tensor.numel() != num_groups:
        raise ValueError(f"{name} must have one value per group ({num_groups}), got {tensor.numel()} values.")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got {tensor.tolist()}.")
    return tensor
