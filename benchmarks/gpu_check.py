"""GPU checks of the losses: values against the CPU, host synchronisations per training call, a training step.

On a machine with a CUDA device the script

1. runs ``GroupDistillationLoss`` (classification and dense, both ``absent_groups`` rules) and ``GroupDROLoss`` for
   a few training steps on the GPU and on the CPU from the same inputs, and prints the largest differences of the
   values, the student gradients and the DRO weights (float32, and float16/bfloat16 logits under ``torch.autocast``);
2. counts the host synchronisations of one training call (forward and backward) with
   ``torch.cuda.set_sync_debug_mode("warn")``: the losses document exactly one (the check of the group ids, labels
   and group losses);
3. times one training step of the cardiac bundle's student (2-D ResNet, widths 16-128, batch 16 x 1 x 96 x 96,
   cached teacher logits) with ``DistillationLoss`` and with ``GroupDistillationLoss``, interleaved, with CUDA
   events, and prints the ratio (target: at most 1.03x).

Without a CUDA device it prints that it skipped and exits 0. Usage: ``python benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import statistics
import warnings

import torch
from monai.networks.nets import ResNet

from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss


def _batches(shape: tuple[int, ...], num_groups: int, steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        student = torch.randn(*shape, generator=gen) * 2
        teacher = torch.randn(*shape, generator=gen) * 2
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
        groups = torch.randint(0, num_groups - (step % 2), (shape[0],), generator=gen)  # the last group often absent
        yield student, teacher, target, groups


def compare_with_cpu(device: torch.device) -> None:
    cases = {
        "groupdistil classification ema": (lambda: GroupDistillationLoss(4, step_size=0.5), (64, 5)),
        "groupdistil classification zero": (
            lambda: GroupDistillationLoss(4, step_size=0.5, absent_groups="zero"),
            (64, 5),
        ),
        "groupdistil dense + dice": (lambda: GroupDistillationLoss(3, step_size=0.5, dice_weight=1.0), (8, 4, 32, 32)),
        "groupdro cross entropy": (
            lambda: GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), 4, step_size=0.5),
            (64, 5),
        ),
    }
    print("1. GPU against CPU, 4 training steps (largest absolute differences)")
    for autocast_dtype in (None, torch.float16, torch.bfloat16):
        for name, (make, shape) in cases.items():
            losses = {"cpu": make(), "gpu": make().to(device)}
            diffs = {"value": 0.0, "grad": 0.0, "weights": 0.0}
            for student, teacher, target, groups in _batches(shape, losses["cpu"].num_groups, 4):
                results = {}
                if autocast_dtype is not None:  # both sides see the same rounded logits; the CPU computes in float32
                    student, teacher = student.to(autocast_dtype).float(), teacher.to(autocast_dtype).float()
                for where, loss in losses.items():
                    dev = torch.device("cpu") if where == "cpu" else device
                    use_autocast = autocast_dtype is not None and where == "gpu"
                    dtype = autocast_dtype if use_autocast else torch.float32
                    s = student.to(dev, dtype, copy=True).requires_grad_(True)
                    with torch.autocast(dev.type, dtype=autocast_dtype or torch.float16, enabled=use_autocast):
                        if isinstance(loss, GroupDistillationLoss):
                            value = loss(s, teacher.to(dev), target.to(dev), groups.to(dev))
                        else:
                            value = loss(s, target.to(dev), groups.to(dev))
                    value.backward()
                    results[where] = (value.detach().cpu().double(), s.grad.cpu().double(), loss.group_weights.cpu())
                for key, cpu, gpu in zip(diffs, results["cpu"], results["gpu"]):
                    diffs[key] = max(diffs[key], float((cpu.double() - gpu.double()).abs().max()))
            mode = "float32" if autocast_dtype is None else f"autocast {str(autocast_dtype).split('.')[-1]}"
            print(f"   {name:34s} {mode:18s} " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def count_synchronisations(device: torch.device) -> None:
    print("2. host synchronisations of one training call (forward + backward)")
    loss = GroupDistillationLoss(4, step_size=0.1).to(device)
    for name, shape in (("classification", (64, 5)), ("dense", (8, 4, 32, 32))):
        student, teacher, target, groups = (t.to(device) for t in next(_batches(shape, 4, 1)))
        student.requires_grad_(True)
        loss(student, teacher, target, groups).backward()  # warm-up (lazy initialisation may synchronise)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            loss(student, teacher, target, groups).backward()
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"   {name:15s} {len(syncs)} synchronisation(s)" + "".join(f"\n      {w.message}" for w in syncs))


def time_training_step(device: torch.device, repeats: int = 30, iterations: int = 20) -> None:
    print("3. training step of the cardiac bundle's student, batch 16 x 1 x 96 x 96, cached teacher logits")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(16, 1, 96, 96, generator=gen).to(device)
    labels = torch.randint(0, 3, (16,), generator=gen).to(device)
    groups = torch.randint(0, 4, (16,), generator=gen).to(device)
    teacher_logits = torch.randn(16, 3, generator=gen).to(device)
    setups = {}
    for name, loss in (("kd", DistillationLoss()), ("groupdistil", GroupDistillationLoss(4, step_size=0.01))):
        torch.manual_seed(1)
        net = ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=1, num_classes=3)
        net = net.to(device)
        setups[name] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), loss.to(device))

    def step(name: str) -> None:
        net, optimizer, loss = setups[name]
        optimizer.zero_grad()
        logits = net(images)
        value = (
            loss(logits, teacher_logits, labels, groups)
            if name == "groupdistil"
            else loss(logits, teacher_logits, labels)
        )
        value.backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in setups}
    for round_ in range(repeats + 1):
        for name in setups if round_ % 2 == 0 else reversed(list(setups)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                step(name)
            end.record()
            torch.cuda.synchronize()
            if round_ > 0:  # round 0 warms up
                times[name].append(start.elapsed_time(end) / iterations)
    kd, gd = statistics.median(times["kd"]), statistics.median(times["groupdistil"])
    print(f"   kd {kd:.3f} ms/step, groupdistil {gd:.3f} ms/step, ratio {gd / kd:.3f}x (target <= 1.03x)")


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_check: skipped (no CUDA device on this machine)")
        return
    device = torch.device("cuda")
    print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    compare_with_cpu(device)
    count_synchronisations(device)
    time_training_step(device)


if __name__ == "__main__":
    main()
