"""Forward+backward time of GroupDistillationLoss relative to a plain KD loss on the same tensors.

The baseline (KL + CE, written inline below) and GroupDistillationLoss are timed interleaved in one process, in
alternating blocks of ``--block`` forward+backward calls (a block averages out the timer and scheduling noise of
single sub-millisecond calls on a shared machine); the script prints the median time per call of each and their
ratio for three cases:

- classification: B=1024, C=10, G=16 (target: at most 1.5x)
- dense: B=8, C=4, 128x128, G=4 (target: at most 1.10x)
- small, dispatch-bound: B=256, C=4, G=16 (target: at most 2x; the absolute overhead is printed in microseconds)

These targets are reported, not contorted for: what a user pays is the training step (``train_step.py``).

Usage: python benchmarks/loss_overhead.py [--repeats 100] [--block 10] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from monai_groupdistil.losses import GroupDistillationLoss

TEMPERATURE, ALPHA = 4.0, 0.5
CASES = [
    ("classification B=1024 C=10 G=16", (1024, 10), 16, 1.5),
    ("dense B=8 C=4 128x128 G=4", (8, 4, 128, 128), 4, 1.10),
    ("small B=256 C=4 G=16", (256, 4), 16, 2.0),
]


def plain_kd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hinton KD with the same formula, no groups: the baseline."""
    log_s = F.log_softmax(student / TEMPERATURE, dim=1)
    log_t = F.log_softmax(teacher / TEMPERATURE, dim=1)
    kd = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=1)
    per_voxel = ALPHA * TEMPERATURE**2 * kd + (1 - ALPHA) * F.cross_entropy(student, target, reduction="none")
    if per_voxel.ndim > 1:
        per_voxel = per_voxel.flatten(1).mean(dim=1)
    return per_voxel.mean()


def _time(fn, student, block: int) -> float:
    """Mean time of one forward+backward call over ``block`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(block):
        student.grad = None
        fn().backward()
    return (time.perf_counter() - start) / block


def saved_for_backward_kb(fn) -> float:
    """Kilobytes of the tensors autograd keeps for the backward pass of ``fn()`` (``saved_tensors_hooks``)."""
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = fn()
    value.backward()
    return total[0] / 1024


def run_case(shape, num_groups, repeats, block):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(*shape, generator=gen).requires_grad_(True)
    teacher = torch.randn(*shape, generator=gen)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    groups = torch.randint(0, num_groups, (shape[0],), generator=gen)
    loss = GroupDistillationLoss(num_groups, temperature=TEMPERATURE, alpha=ALPHA, step_size=0.01)

    def base():
        return plain_kd(student, teacher, target)

    def group():
        return loss(student, teacher, target, groups)

    # same formula: with uniform, frozen weights and every group of equal size the two losses agree
    check = GroupDistillationLoss(1, TEMPERATURE, ALPHA).eval()
    assert torch.allclose(check(student, teacher, target, torch.zeros_like(groups)), base(), rtol=1e-5)
    for _ in range(5):  # warm-up
        _time(base, student, block)
        _time(group, student, block)
    t_base, t_group = [], []
    for i in range(repeats):
        order = (base, group) if i % 2 == 0 else (group, base)
        for fn in order:
            (t_base if fn is base else t_group).append(_time(fn, student, block))
    memory = (saved_for_backward_kb(base), saved_for_backward_kb(group))
    return statistics.median(t_base), statistics.median(t_group), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=100, help="timed blocks of each loss per case")
    parser.add_argument("--block", type=int, default=10, help="forward+backward calls per timed block")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved blocks of {args.block} calls"
    )
    print(f"{'case':34s} {'plain KD (us)':>14s} {'GroupDistil (us)':>17s} {'ratio':>7s} {'overhead (us)':>14s} target")
    for name, shape, groups, target in CASES:
        base, group, memory = run_case(shape, groups, args.repeats, args.block)
        ratio = group / base
        verdict = "ok" if ratio <= target else "MISSED"
        print(
            f"{name:34s} {base * 1e6:14.1f} {group * 1e6:17.1f} {ratio:7.3f} {(group - base) * 1e6:14.1f} "
            f"<= {target:.2f}x {verdict}; saved for backward: {memory[0]:.0f} KB / {memory[1]:.0f} KB"
        )


if __name__ == "__main__":
    main()
