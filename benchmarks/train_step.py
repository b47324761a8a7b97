"""Median time per training iteration of the distillation engines, against the student trained alone (ERM).

The student is the cardiac bundle's (MONAI 2-D ResNet, widths 16-128, one basic block per stage, 3 classes) on
batches of 16 x 1 x 96 x 96, as in ``bundles/cardiac_mri_groupdistil``; the teacher is a wider CNN. In one process,
with the same student, data and optimiser settings, the script times ``DistillationTrainer``:

- ``erm``: the student alone, cross entropy (the baseline);
- ``kd_online``: plain KD (``DistillationLoss``), the teacher run every iteration;
- ``groupdistil_online``: ``GroupDistillationLoss`` + ``GroupDROHandler``, the teacher run every iteration;
- ``kd_cached``: plain KD, teacher logits from a ``TeacherOutputCache`` (filled before timing);
- ``groupdistil_cached``: GroupDistil + ``GroupDROHandler``, cached teacher logits.

An iteration is timed from ignite's ``GET_BATCH_STARTED`` to ``ITERATION_COMPLETED`` (collation, forward passes,
loss, backward, optimiser step, MONAI's decollation and the handlers). The configurations run one epoch each in
turn, ``--repeats`` times (interleaved, so drifts in machine load hit all of them alike); the first round is a
warm-up and is discarded. The script prints the median time per iteration, the ratio to ``erm`` and the ratio
that a user of GroupDistil pays over plain KD. Target: ``groupdistil_cached`` at most 1.03x ``kd_cached`` (the
group statistics and the weight update cost next to nothing beside a network's forward and backward).

Usage: python benchmarks/train_step.py [--repeats 5] [--iterations 20] [--batch-size 16] [--size 96] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ignite.engine import Events
from monai.networks.nets import ResNet
from torch.utils.data import DataLoader

from monai_groupdistil.engines import DistillationTrainer, TeacherOutputCache
from monai_groupdistil.handlers import GroupDROHandler
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss

NUM_CLASSES, NUM_GROUPS = 3, 4
TARGET = 1.03


def bundle_student() -> torch.nn.Module:
    """The cardiac bundle's student: a 2-D ResNet, widths 16-128, one basic block per stage."""
    return ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=1, num_classes=NUM_CLASSES)


def conv_net(width: int, depth: int) -> torch.nn.Module:
    """A plain 2-D CNN classifier: ``depth`` conv blocks of ``width`` channels, global pooling, linear head."""
    layers: list[torch.nn.Module] = []
    channels = 1
    for i in range(depth):
        layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
        if i < depth - 1:
            layers.append(torch.nn.MaxPool2d(2))
        channels = width
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, NUM_CLASSES)]
    return torch.nn.Sequential(*layers)


def saved_for_backward_mb(loss_kind: str, batch_size: int, size: int) -> float:
    """Megabytes of the tensors autograd keeps for the backward pass of one student step (network and loss),
    counted with ``torch.autograd.graph.saved_tensors_hooks``: the activation memory a step holds at its peak."""
    torch.manual_seed(1)
    student = bundle_student()
    images, teacher_logits = torch.randn(batch_size, 1, size, size), torch.randn(batch_size, NUM_CLASSES)
    labels, groups = torch.randint(0, NUM_CLASSES, (batch_size,)), torch.randint(0, NUM_GROUPS, (batch_size,))
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = student(images)
        if loss_kind == "groupdistil":
            value = GroupDistillationLoss(NUM_GROUPS)(logits, teacher_logits, labels, groups)
        else:
            value = DistillationLoss()(logits, teacher_logits, labels)
    value.backward()
    return total[0] / 2**20


def make_data(n: int, size: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, size, size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    groups = torch.randint(0, NUM_GROUPS, (n,), generator=gen)
    return [{"image": images[i], "label": labels[i], "group": groups[i], "id": f"s{i}"} for i in range(n)]


def build(kind: str, loader: DataLoader, teacher: torch.nn.Module) -> tuple[DistillationTrainer, list[float]]:
    torch.manual_seed(1)
    student = bundle_student()
    handlers: list = []
    if kind == "erm":
        loss, teacher_arg = torch.nn.CrossEntropyLoss(), None
    elif kind.startswith("kd"):
        loss, teacher_arg = DistillationLoss(), teacher
    else:
        loss, teacher_arg = GroupDistillationLoss(NUM_GROUPS, step_size=0.01), teacher
        handlers.append(GroupDROHandler(loss))
    cache = TeacherOutputCache(id_key="id") if kind.endswith("cached") else None
    trainer = DistillationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9),
        loss_function=loss,
        teacher=teacher_arg,
        teacher_cache=cache,
        train_handlers=handlers,
    )
    times: list[float] = []
    start = [0.0]
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda e: start.__setitem__(0, time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: times.append(time.perf_counter() - start[0]))
    return trainer, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the first is a warm-up)")
    parser.add_argument("--iterations", type=int, default=20, help="iterations per round (one epoch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=96, help="image side (1 x size x size inputs)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loader = DataLoader(make_data(args.iterations * args.batch_size, args.size), batch_size=args.batch_size)
    torch.manual_seed(2)
    teacher = conv_net(width=48, depth=4)  # about 9x the student's compute
    kinds = ["erm", "kd_online", "groupdistil_online", "kd_cached", "groupdistil_cached"]
    runs = {k: build(k, loader, teacher) for k in kinds}
    medians: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(args.repeats):
        for kind in kinds:
            trainer, times = runs[kind]
            times.clear()
            trainer.run()
            if round_ > 0:  # round 0 warms up (and fills the caches)
                medians[kind].append(statistics.median(times))

    print(
        f"DistillationTrainer, CPU, {torch.get_num_threads()} threads, batch {args.batch_size} x 1 x {args.size} x "
        f"{args.size}, {args.iterations} iterations x {args.repeats - 1} rounds (after 1 warm-up round)"
    )
    base = statistics.median(medians["erm"])
    print(f"{'configuration':<22}{'ms/iteration':>14}{'ratio to erm':>14}")
    for kind in kinds:
        value = statistics.median(medians[kind])
        print(f"{kind:<22}{value * 1e3:>14.2f}{value / base:>13.2f}x")
    for mode in ("cached", "online"):
        pairs = [g / k for g, k in zip(medians[f"groupdistil_{mode}"], medians[f"kd_{mode}"])]  # same round
        spread = f"rounds: {min(pairs):.3f}-{max(pairs):.3f}"
        print(f"groupdistil_{mode} / kd_{mode}: {statistics.median(pairs):.3f}x ({spread})")
    memory = {kind: saved_for_backward_mb(kind, args.batch_size, args.size) for kind in ("kd", "groupdistil")}
    print(
        f"saved for backward in one step: kd {memory['kd']:.2f} MB, groupdistil {memory['groupdistil']:.2f} MB "
        f"({memory['groupdistil'] / memory['kd']:.3f}x)"
    )
    ratio = statistics.median(g / k for g, k in zip(medians["groupdistil_cached"], medians["kd_cached"]))
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"target groupdistil_cached <= {TARGET:.2f}x kd_cached: {verdict} ({ratio:.3f}x)")


if __name__ == "__main__":
    main()
