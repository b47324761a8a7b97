"""Hinton knowledge-distillation loss (soft teacher targets plus hard labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.autograd.function import once_differentiable
from torch.nn.modules.loss import _Loss

from monai_groupdistil.losses.checks import (
    check_alpha,
    check_logits,
    check_target,
    check_target_range,
    check_temperature,
)

__all__ = ["DistillationLoss", "distillation_per_sample"]

_LOWER_PRECISION = (torch.float16, torch.bfloat16)


def distillation_per_sample(
    input: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Per-sample knowledge-distillation loss (Hinton et al., 2015).

    For sample ``i`` with student logits ``s_i``, teacher logits ``t_i`` and label ``y_i``::

        kd_i = T^2 * KL(softmax(t_i / T) || softmax(s_i / T))     (summed over classes)
        ce_i = CrossEntropy(s_i, y_i)
        l_i  = alpha * kd_i + (1 - alpha) * ce_i

    For dense outputs (``[B, C, *spatial]``) the per-sample value is the mean over voxels of the voxel-wise terms.

    Args:
        input: student logits, ``[B, C]`` or ``[B, C, *spatial]``.
        teacher_logits: teacher logits, same shape as ``input``.
        target: class indices, ``[B]`` / ``[B, 1]`` (or ``[B, *spatial]`` / ``[B, 1, *spatial]``); may be ``None``
            only when ``alpha == 1``.
        temperature: softmax temperature ``T > 0``.
        alpha: weight of the distillation term, in ``[0, 1]``.

    Returns:
        a ``[B]`` tensor of per-sample losses.

    Raises:
        TypeError: for non-floating logits or a non-integer target.
        ValueError: for mismatched shapes or class counts, an empty batch, ``temperature <= 0``, ``alpha`` outside
            ``[0, 1]``, or a missing ``target`` with ``alpha < 1``.
    """
    temperature, alpha = check_temperature(temperature), check_alpha(alpha)
    return _per_sample(input, teacher_logits, target, temperature, alpha)


def prepare_distillation_inputs(
    input: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Check the logits and target of a distillation loss call and return them ready for the kernels.

    Returns:
        ``(input, teacher_logits, labels, fused)``: ``labels`` are int64 class indices ``[B, *spatial]`` (``None``
        when ``alpha == 1``); ``fused`` is True when the teacher needs no gradient, so the written-out gradient
        (:py:class:`DistillationKernel`) applies; the tensors are then plain ``torch.Tensor`` s (a MONAI
        ``MetaTensor`` is viewed as one), in one dtype: the promoted dtype of the two (float32 rather than a half
        precision under ``torch.autocast``).

    Raises:
        TypeError, ValueError: see :py:func:`distillation_per_sample`.
    """
    check_logits(input, teacher_logits)
    if target is None and alpha < 1.0:
        raise ValueError(f"target is required when alpha < 1 (alpha={alpha}); pass class indices or set alpha=1.")
    # on the CPU the written-out kernel's own index check is caught (DistillationKernel); on GPUs it would assert,
    # and the composite formula's cross entropy skips the index -100 unchecked
    composite = teacher_logits.requires_grad
    check_range = composite or not input.is_cpu
    labels = None if alpha == 1.0 else check_target(target, input, check_range=check_range)  # type: ignore[arg-type]
    if composite:  # a teacher trained jointly: autograd through the composite formula
        return input, teacher_logits, labels, False
    lower = input.dtype in _LOWER_PRECISION or teacher_logits.dtype in _LOWER_PRECISION
    autocast = lower and autocast_active(input.device.type)
    if teacher_logits.dtype != input.dtype or autocast:
        # one dtype for the kernels: the promoted one, and under autocast float32 rather than a half precision (as
        # autocast does for torch's losses); the gradient is cast back to the input's dtype
        dtype = torch.promote_types(input.dtype, teacher_logits.dtype)
        if autocast and dtype in _LOWER_PRECISION:
            dtype = torch.float32
        input, teacher_logits = input.to(dtype), teacher_logits.to(dtype)
    if type(input) is not torch.Tensor:  # e.g. a MONAI MetaTensor: plain tensors through the autograd.Function
        input = input.as_subclass(torch.Tensor)
    if type(teacher_logits) is not torch.Tensor:
        teacher_logits = teacher_logits.as_subclass(torch.Tensor)
    if labels is not None and type(labels) is not torch.Tensor:
        labels = labels.as_subclass(torch.Tensor)
    return input, teacher_logits, labels, True


def _per_sample(
    input: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None, temperature: float, alpha: float
) -> torch.Tensor:
    """:py:func:`distillation_per_sample` for hyper-parameters that are already checked (the losses' hot path)."""
    input, teacher_logits, labels, fused = prepare_distillation_inputs(input, teacher_logits, target, alpha)
    if fused:
        voxel_loss = apply_function(_DistillationPerSample, input, teacher_logits, labels, temperature, alpha)
    else:
        voxel_loss = _composite(input, teacher_logits, labels, temperature, alpha)
    if voxel_loss.ndim > 1:
        voxel_loss = voxel_loss.flatten(1).mean(dim=1)
    return voxel_loss


def _composite(
    input: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, alpha: float
) -> torch.Tensor:
    """Voxel-wise loss ``[B, *spatial]`` from differentiable library functions (gradients for both networks)."""
    voxel_loss: torch.Tensor | None = None
    if alpha > 0.0:
        log_p_student = F.log_softmax(input / temperature, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
        kd = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
        voxel_loss = (alpha * temperature * temperature) * kd
    if labels is not None:
        try:
            ce = F.cross_entropy(input, labels, reduction="none")
        except IndexError:
            check_target_range(labels, input.shape[1])
            raise
        ce = (1.0 - alpha) * ce
        voxel_loss = ce if voxel_loss is None else voxel_loss + ce
    assert voxel_loss is not None
    return voxel_loss


class DistillationKernel:
    """The KD + CE loss of a student whose teacher needs no gradient, with its gradient written out.

    For student logits ``s``, teacher logits ``t`` and labels ``y``, with ``p_T = softmax(s / T)``,
    ``q_T = softmax(t / T)`` and ``p = softmax(s)``, the voxel-wise loss is ``alpha * T^2 * K + (1 - alpha) * E``
    with::

        K = sum_c q_T (log q_T - log p_T)          E = -log p[y]
        d(loss) / ds = alpha * T * (p_T - q_T) + (1 - alpha) * (p - onehot(y))

    The kernel returns it as ``scale * raw``, where ``scale = max(alpha * T^2, 1 - alpha)`` is kept out of the
    voxel-wise values ``raw`` (so the larger of the two terms enters ``raw`` with factor 1: no overflow or loss of
    precision in half precision, whatever ``alpha``); the caller folds ``scale`` into its own arithmetic (the group
    statistics of the group-DRO objective), which saves a kernel. In the same way the gradient's constant factor
    :py:meth:`gradient_factor` ``max(alpha * T, 1 - alpha)`` can be taken from the caller's weights. Built from a
    handful of library kernels without an autograd graph, the forward and backward need about half the operations
    of autograd through the composite formula, which is what small (dispatch-bound) batches pay for. Only first
    derivatives are available.

    Under ``torch.autocast`` the callers pass float32 logits (as autocast does for losses) and the kernel keeps to
    operations that autocast does not lower, so the values are float32.

    Args:
        input: student logits ``[B, C, *spatial]`` (no autograd graph is built here).
        teacher_logits: teacher logits of the same shape.
        labels: int64 class indices ``[B, *spatial]``, or None (``alpha == 1``).
        temperature: ``T > 0``.
        alpha: weight of the distillation term in ``[0, 1]``.

    Raises:
        ValueError: for labels outside ``[0, C)`` (on the CPU, where the kernels check them).
    """

    def __init__(
        self,
        input: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        alpha: float,
    ):
        self.temperature, self.alpha, self.labels = temperature, alpha, labels
        self.log_p_t = self.q_t = self.log_p = None
        kd_weight, ce_weight = alpha * temperature * temperature, 1.0 - alpha
        self.scale = max(kd_weight, ce_weight)
        raw = None
        if alpha > 0.0:
            self.log_p_t = torch.log_softmax(input / temperature, 1)
            log_q_t = torch.log_softmax(teacher_logits / temperature, 1)
            self.q_t = log_q_t.exp()
            if autocast_active(input.device.type):  # vecdot is among the operations autocast lowers
                raw = log_q_t.sub_(self.log_p_t).mul_(self.q_t).sum(1)
            else:
                raw = torch.linalg.vecdot(self.q_t, log_q_t - self.log_p_t, dim=1)
            if kd_weight != self.scale:
                raw.mul_(kd_weight / self.scale)
        if labels is not None:
            self.log_p = torch.log_softmax(input, 1)
            try:  # gather (not nll_loss, which skips the index -100 unchecked) rejects every index outside [0, C)
                log_p_y = self.log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
            except (IndexError, RuntimeError):
                check_target_range(labels, input.shape[1])
                raise
            raw = log_p_y.neg_() if raw is None else raw.sub_(log_p_y, alpha=ce_weight / self.scale)
        assert raw is not None
        self.raw: torch.Tensor = raw

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors the gradient needs (to pass through ``ctx.save_for_backward``)."""
        return self.log_p_t, self.q_t, self.log_p, self.labels

    @staticmethod
    def gradient(
        log_p_t: torch.Tensor | None,
        q_t: torch.Tensor | None,
        log_p: torch.Tensor | None,
        labels: torch.Tensor | None,
        temperature: float,
        alpha: float,
        weights: torch.Tensor,
        weights_scaled: bool = False,
    ) -> torch.Tensor:
        """Gradient of ``sum(weights * loss)`` with respect to the student's logits.

        ``weights`` broadcasts against the logits (``[B, 1, *spatial]`` or ``[B, 1, 1...]``). With
        ``weights_scaled`` they already hold the factor :py:meth:`gradient_factor` (a kernel fewer). The saved
        tensors are not modified (a graph may be retained and differentiated again).
        """
        kd_factor, ce_factor = alpha * temperature, 1.0 - alpha
        if weights_scaled:
            factor = DistillationKernel.gradient_factor(temperature, alpha)
            kd_factor, ce_factor = kd_factor / factor, ce_factor / factor
        grad = None
        if log_p_t is not None and q_t is not None:  # alpha * T * (p_T - q_T)
            grad = log_p_t.exp().sub_(q_t)
            if kd_factor != 1.0:
                grad.mul_(kd_factor)
        if log_p is not None and labels is not None:  # (1 - alpha) * (p - onehot(y))
            p = log_p.exp().scatter_(1, labels.unsqueeze(1), -1.0, reduce="add")
            if grad is None:
                grad = p.mul_(ce_factor) if ce_factor != 1.0 else p
            else:
                grad.add_(p, alpha=ce_factor)
        assert grad is not None
        return grad.mul_(weights)

    @staticmethod
    def gradient_factor(temperature: float, alpha: float) -> float:
        """The factor ``max(alpha * T, 1 - alpha)`` that :py:meth:`gradient` can take from its weights."""
        return max(alpha * temperature, 1.0 - alpha)


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_active(device_type: str) -> bool:
    """Whether ``torch.autocast`` is enabled for ``device_type`` (a cheap first test when this torch has it)."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return False
    return torch.is_autocast_enabled(device_type)


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def apply_function(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` for the losses' own ``autograd.Function`` s, without the Python wrapper's overhead.

    ``torch.autograd.Function.apply`` binds default arguments and inspects every argument for functorch wrappers
    before calling the C++ ``apply``; on the small batches the losses are timed on, that wrapper alone costs about a
    sixth of the loss's fixed cost. The wrapper is skipped only in plain eager execution; under a functorch
    transform (``vmap``, ``grad``...) or ``torch.compile`` tracing, or when this torch lacks the internal names,
    ``function.apply`` is called.
    """
    if _FUNCTORCH_ACTIVE is None or _FUNCTORCH_ACTIVE() or torch.compiler.is_compiling():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)  # type: ignore[misc]


def save_kernel_tensors(
    ctx, tensors: tuple[torch.Tensor | None, ...], labels: torch.Tensor | None, dense: bool
) -> None:
    """Keep the tensors a written-out gradient needs on an autograd ``ctx``.

    Dense tensors go through ``ctx.save_for_backward``, which frees them right after the backward pass. Of the
    classification-sized ones only the labels (or, without labels, the first tensor) go through it, and the others
    are kept as a plain attribute, which is markedly cheaper per call on these dispatch-bound sizes: the one saved
    tensor still gives autograd's checks, i.e. an error for labels modified in place after the forward pass and for
    a second backward pass through a graph that was not retained.
    """
    if dense:
        ctx.save_for_backward(*tensors)
        ctx.stash = None
    else:
        ctx.save_for_backward(labels if labels is not None else tensors[0])
        ctx.stash = tensors


def saved_kernel_tensors(ctx) -> tuple[torch.Tensor | None, ...]:
    """The tensors kept by :py:func:`save_kernel_tensors`.

    Raises:
        RuntimeError: (from autograd) when the labels were modified in place after the forward pass, or when the
            graph was freed by an earlier backward pass.
    """
    saved = ctx.saved_tensors
    return saved if ctx.stash is None else ctx.stash


def first_derivative_only(backward):
    """Decorate an ``autograd.Function.backward``: plain call in the usual case (grad mode off), and
    ``torch.autograd.function.once_differentiable`` semantics under ``create_graph=True`` (the gradient is returned,
    differentiating it again raises)."""
    once = once_differentiable(backward)

    def wrapper(ctx, *grads):
        return once(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    return wrapper


class _DistillationPerSample(torch.autograd.Function):
    """Voxel-wise KD + CE loss ``[B, *spatial]`` of :py:class:`DistillationKernel` (teacher without gradient)."""

    @staticmethod
    def forward(ctx, input, teacher_logits, labels, temperature, alpha):  # type: ignore[override]
        kernel = DistillationKernel(input, teacher_logits, labels, temperature, alpha)
        save_kernel_tensors(ctx, kernel.tensors(), labels, input.ndim > 2)
        ctx.temperature, ctx.alpha = temperature, alpha
        return kernel.raw.mul_(kernel.scale) if kernel.scale != 1.0 else kernel.raw

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_values):  # type: ignore[override]
        weights = grad_values.unsqueeze(1)
        saved = saved_kernel_tensors(ctx)
        grad = DistillationKernel.gradient(*saved, ctx.temperature, ctx.alpha, weights)
        return grad, None, None, None, None


class DistillationLoss(_Loss):
    """Knowledge-distillation loss: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The formula follows Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), as implemented by
    torchdistill's ``KDLoss``. It works for classification logits ``[B, C]`` and for dense (segmentation) logits
    ``[B, C, *spatial]``, where each sample's value is the mean over its voxels.

    Args:
        temperature: softmax temperature ``T``, must be > 0. Defaults to 4.0.
        alpha: weight of the distillation term in ``[0, 1]``; ``1 - alpha`` weights the cross entropy with the
            labels. Defaults to 0.5.
        reduction: ``"none"`` (a ``[B]`` tensor of per-sample values), ``"mean"`` or ``"sum"`` over samples.

    Raises:
        ValueError: when ``temperature <= 0``, ``alpha`` is outside ``[0, 1]`` or ``reduction`` is unknown; at call
            time for mismatched shapes, different class counts, an empty batch or a missing target with
            ``alpha < 1``.
        TypeError: at call time for non-floating logits or a non-integer target.

    Example::

        >>> import torch
        >>> from monai_groupdistil.losses import DistillationLoss
        >>> student, teacher = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
        >>> labels = torch.randint(0, 3, (8,))
        >>> loss = DistillationLoss(temperature=4.0, alpha=0.5)(student, teacher, labels)
        >>> loss.backward()
        >>> DistillationLoss(reduction="none")(student, teacher, labels).shape
        torch.Size([8])
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5, reduction: LossReduction | str = "mean"):
        super().__init__(reduction=LossReduction(reduction).value)
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)

    def forward(
        self, input: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: student logits ``[B, C, *spatial]``.
            teacher_logits: teacher logits, same shape as ``input``.
            target: class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``; optional only when ``alpha == 1``.

        Returns:
            a scalar for ``"mean"``/``"sum"``, a ``[B]`` tensor for ``"none"``.
        """
        per_sample = _per_sample(input, teacher_logits, target, self.temperature, self.alpha)
        if self.reduction == LossReduction.MEAN.value:
            return per_sample.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_sample.sum()
        return per_sample
