"""Worst-vendor segmentation benchmark: GroupDistil against KD, ERM and GroupDRO students of a 2-D cardiac U-Net.

For every seed the script generates a training set with ``make_synthetic_mnms`` (M&Ms layout, ``--train-subjects``
subjects, vendor D, the noisiest and lowest-contrast vendor, ``--minority`` of them, A/B/C sharing the rest), reads
it with the package's segmentation pipeline (``segmentation_frames``: ED and ES frames; ``segmentation_preprocessing``:
whole-frame intensity percentiles, ``--size`` pixels over a 192 mm in-plane field of view; the annotated slices),
trains one teacher (MONAI ``UNet``, channels 16-128, two residual units, the bundle's teacher) and then four students
(``UNet`` channels 8-64 without residual units, 0.10x the teacher's parameters, the bundle's student; same epochs,
optimiser, batch size and data order) with ``DistillationTrainer``:

- ``erm``: ``PerSampleDiceCELoss`` (cross entropy + soft Dice), no teacher;
- ``group_dro``: ``GroupDROLoss`` around ``PerSampleDiceCELoss(reduction="none")``, no teacher;
- ``kd``: ``DistillationLoss`` (Hinton KD + CE + soft Dice) with the teacher;
- ``groupdistil``: ``GroupDistillationLoss`` (the same per-sample loss under the group-DRO objective) with it.

The validation and test splits are vendor-balanced and the same for every seed (``--val-per-vendor`` and
``--test-per-vendor`` subjects of each vendor, generated once with seed 1000); every subject gives two volumes (ED,
ES). After every epoch the network segments every validation volume slice by slice; the Dice of LV, MYO and RV of
every volume (MONAI ``DiceMetric``) is averaged per vendor (``GroupMetric``), and the epoch with the best worst-vendor
mean Dice on validation is selected (ties to the later epoch) and evaluated on the test split. No augmentation; the
teacher's outputs on the training slices are computed once (``TeacherOutputCache``).

Reported (test split, selected epoch): worst-vendor mean Dice, vendor-mean Dice, the minority vendor's Dice, for
every method; per-seed paired differences (GroupDistil - KD, GroupDistil - ERM, GroupDRO - ERM, KD - ERM) with a
paired bootstrap 95 % interval over seeds (10 000 resamples of the seeds) and the number of seeds with a positive
difference. Outputs (``--out``, default ``docs/``): ``results_segmentation.md`` and
``results/worst_group_seg_runs.csv``, rewritten after every seed.

Usage:
    python benchmarks/worst_group_seg.py                       # the default run (5 seeds; about 20 CPU minutes)
    python benchmarks/worst_group_seg.py --quick --out /tmp/s  # 1 seed, small: a few minutes
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from monai_groupdistil.data import (
    MNMS_VENDORS,
    load_mnms_datalist,
    make_synthetic_mnms,
    segmentation_frames,
    segmentation_preprocessing,
    volume_slices,
)
from monai_groupdistil.engines import DistillationTrainer, TeacherOutputCache
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss, PerSampleDiceCELoss
from monai_groupdistil.metrics import summarise_group_values

METHODS = ("erm", "group_dro", "kd", "groupdistil")
PATHOLOGIES = ("NOR", "HCM", "DCM")
FOV_MM = 192.0
HYPER = {"temperature": 4.0, "alpha": 0.5, "step_size": 0.01, "dice_weight": 1.0, "lr": 2e-3, "batch_size": 16}
COMPARISONS = (("groupdistil", "kd"), ("groupdistil", "erm"), ("group_dro", "erm"), ("kd", "erm"))


def teacher_net() -> UNet:
    return UNet(2, 1, 4, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)


def student_net() -> UNet:
    return UNet(2, 1, 4, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=0)


# ----------------------------------------------------------------------------------------------------- data


def _volumes(root: str, split: str, size: int) -> list[dict]:
    subjects = load_mnms_datalist(root, split, classes=PATHOLOGIES)
    preprocess = segmentation_preprocessing((size, size), (FOV_MM / size, FOV_MM / size))
    out = []
    for entry in segmentation_frames(subjects):
        item = preprocess(entry)
        out.append({
            "image": item["image"].as_tensor().float(), "label": item["label"].as_tensor().float(),
            "group": int(entry["group"]), "case": entry["case"],
        })  # fmt: skip
    return out


def make_split(split: str, n: int, fractions: dict, seed: int, size: int, matrix_scale: float) -> list[dict]:
    """Preprocessed volumes of one generated split (``n`` subjects, ``fractions`` of the vendors)."""
    index = ("train", "val", "test").index(split)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_mnms(
            tmp,
            n_subjects=n,
            seed=seed,
            split_fractions=[1.0 if i == index else 0.0 for i in range(3)],
            vendor_fractions={split: fractions},
            n_frames=4,
            matrix_scale=matrix_scale,
            num_workers=0,
        )
        return _volumes(root, split, size)


def train_slices(volumes: list[dict]) -> list[dict]:
    items = []
    for v in volumes:
        for s in volume_slices(v):
            items.append(
                {"image": s["image"], "label": s["label"], "group": s["group"], "id": f"{v['case']}_{s['slice_index']}"}
            )
    return items


# ----------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(network: torch.nn.Module, volumes: list[dict], num_groups: int) -> dict:
    """Per-volume Dice (LV, MYO, RV) of ``network`` segmenting every slice; per-vendor summary."""
    network.eval()
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    values = []
    for v in volumes:
        slices = v["image"].permute(3, 0, 1, 2)  # [Z, 1, H, W]
        pred = network(slices).argmax(1)  # [Z, H, W]
        pred = torch.nn.functional.one_hot(pred, 4).permute(3, 1, 2, 0)[None]  # [1, 4, H, W, Z]
        label = torch.nn.functional.one_hot(v["label"][0].long(), 4).permute(3, 0, 1, 2)[None]
        values.append(dice(pred, label))
    network.train()
    dice.reset()
    groups = torch.tensor([v["group"] for v in volumes])
    res = summarise_group_values(torch.cat(values), groups, num_groups)
    return {
        "worst": res["worst_group"],
        "worst_group": res["worst_group_id"],
        "mean_group": res["mean_group"],
        "per_group": res["per_group"].tolist(),
        "per_structure": res["overall_channel"].tolist(),
    }


# ----------------------------------------------------------------------------------------------------- training


def make_loss(method: str, num_groups: int) -> torch.nn.Module:
    h = HYPER
    if method in ("erm", "teacher"):
        return PerSampleDiceCELoss(dice_weight=h["dice_weight"])
    if method == "group_dro":
        return GroupDROLoss(PerSampleDiceCELoss(h["dice_weight"], reduction="none"), num_groups, h["step_size"])
    if method == "kd":
        return DistillationLoss(h["temperature"], h["alpha"], dice_weight=h["dice_weight"])
    if method == "groupdistil":
        return GroupDistillationLoss(
            num_groups, h["temperature"], h["alpha"], h["step_size"], dice_weight=h["dice_weight"]
        )
    raise ValueError(f"unknown method {method!r}")


def train(method: str, data: dict, epochs: int, seed: int, teacher=None, cache=None) -> dict:
    """Train one network; returns the selected epoch's validation and test results and the history."""
    num_groups = len(MNMS_VENDORS)
    set_determinism(seed)
    network = teacher_net() if method == "teacher" else student_net()
    loss = make_loss(method, num_groups)
    loader = DataLoader(
        data["train"], batch_size=HYPER["batch_size"], shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    use_teacher = method in ("kd", "groupdistil")
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), HYPER["lr"]),
        loss_function=loss,
        teacher=teacher if use_teacher else None,
        teacher_cache=cache if use_teacher else None,
    )
    history: list[dict] = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        weights = getattr(loss, "group_weights", None)
        history.append({
            "epoch": engine.state.epoch,
            "val": evaluate(network, data["val"], num_groups),
            "weights": weights.tolist() if weights is not None else None,
            "state": {k: v.clone() for k, v in network.state_dict().items()},
        })  # fmt: skip

    trainer.run()
    chosen = max(history, key=lambda h: (h["val"]["worst"], h["epoch"]))
    network.load_state_dict(chosen["state"])
    test = evaluate(network, data["test"], num_groups)
    network.eval()
    return {
        "network": network,
        "epoch": chosen["epoch"],
        "val": chosen["val"],
        "test": test,
        "weights": chosen["weights"],
    }


# ----------------------------------------------------------------------------------------------------- statistics


def paired_bootstrap(diffs: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``diffs`` over resamples (with replacement) of its entries."""
    if len(diffs) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_outputs(rows: list[dict], args: argparse.Namespace, wall: float, done: int) -> None:
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    runs = out / "results" / "worst_group_seg_runs.csv"
    fields = ["seed", "method", "epoch", "val_worst", "test_worst", "test_mean_group", "test_worst_vendor"]
    fields += [f"test_{v}" for v in MNMS_VENDORS] + ["test_LV", "test_MYO", "test_RV", "dro_weights", "seconds"]
    with open(runs, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in fields})
    methods = ["teacher", *METHODS]
    by = {(r["seed"], r["method"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    minority = args.minority_vendor

    def values(method: str, key: str) -> list[float]:
        return [by[(s, method)][key] for s in seeds if (s, method) in by]

    lines = [
        "# Worst-vendor segmentation benchmark (cardiac MRI, synthetic M&Ms layout)",
        "",
        "GroupDistil against plain KD, ERM and GroupDRO students of a 2-D cardiac U-Net (LV, MYO, RV), with vendor "
        f"{minority} a {100 * args.minority:g} % minority of training; produced by `benchmarks/worst_group_seg.py` "
        "(its docstring describes the protocol). Command:",
        "",
        "```bash",
        f"OMP_NUM_THREADS=1 python benchmarks/worst_group_seg.py {' '.join(sys.argv[1:])}".rstrip(),
        "```",
        "",
        f"Run on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (last write) on {platform.node()} "
        f"({os.cpu_count()} CPUs, shared with other jobs; one torch thread), torch {torch.__version__}: {done} of "
        f"{args.seeds} seeds, {wall / 60:.1f} min wall so far. Load average at the end: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        "",
        f"Data per seed: {args.train_subjects} training subjects (vendor {minority}: "
        f"{round(args.minority * args.train_subjects)}; the others share the rest), two frames (ED, ES) each, the "
        f"annotated slices as 2-D training samples; validation {args.val_per_vendor} and test {args.test_per_vendor} "
        f"subjects per vendor (the same for every seed; {2 * args.val_per_vendor} / {2 * args.test_per_vendor} "
        f"volumes per vendor). {args.size} x {args.size} pixels over {FOV_MM:g} mm; teacher {args.teacher_epochs} "
        f"epochs, students {args.epochs} epochs; Adam lr {HYPER['lr']}, batch {HYPER['batch_size']}; T "
        f"{HYPER['temperature']}, alpha {HYPER['alpha']}, DRO step size {HYPER['step_size']}, soft-Dice weight "
        f"{HYPER['dice_weight']}, absent groups 'ema' (the losses' default). Model selection: best worst-vendor "
        "validation Dice.",
        "",
        "## Test Dice (%), mean over seeds [95 % bootstrap interval of the mean]",
        "",
        f"| method | worst vendor | vendor mean | vendor {minority} | LV | MYO | RV |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        if not values(m, "test_worst"):
            continue
        cells = []
        for key in ("test_worst", "test_mean_group", f"test_{minority}", "test_LV", "test_MYO", "test_RV"):
            vals = values(m, key)
            lo, hi = paired_bootstrap(vals)
            cells.append(f"{_pct(statistics.fmean(vals))}" + (f" [{_pct(lo)}, {_pct(hi)}]" if len(vals) > 1 else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired differences (Dice points), per seed, [paired bootstrap 95 % interval over seeds], seeds > 0",
        "",
        f"| comparison | worst vendor | vendor mean | vendor {minority} |",
        "|---|---|---|---|",
    ]
    for a, b in COMPARISONS:
        cells = []
        for key in ("test_worst", "test_mean_group", f"test_{minority}"):
            pairs = [(by[(s, a)][key], by[(s, b)][key]) for s in seeds if (s, a) in by and (s, b) in by]
            if not pairs:
                continue
            diffs = [100 * (x - y) for x, y in pairs]
            lo, hi = paired_bootstrap(diffs)
            cells.append(
                f"{statistics.fmean(diffs):+.2f} [{lo:+.2f}, {hi:+.2f}], {sum(d > 0 for d in diffs)}/{len(diffs)}"
            )
        if cells:
            lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (test worst-vendor Dice, %):", "", "| seed | " + " | ".join(methods) + " |"]
    lines.append("|---" * (len(methods) + 1) + "|")
    for s in seeds:
        lines.append(
            f"| {s} | " + " | ".join(_pct(by[(s, m)]["test_worst"]) if (s, m) in by else "" for m in methods) + " |"
        )
    lines += ["", "Every run: [`results/worst_group_seg_runs.csv`](results/worst_group_seg_runs.csv)."]
    (out / "results_segmentation.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--train-subjects", type=int, default=40)
    parser.add_argument("--minority", type=float, default=0.05, help="fraction of the minority vendor in training")
    parser.add_argument("--minority-vendor", default="D", choices=MNMS_VENDORS)
    parser.add_argument("--val-per-vendor", type=int, default=8)
    parser.add_argument("--test-per-vendor", type=int, default=12)
    parser.add_argument("--size", type=int, default=48, help="pixels of the 192 mm field of view")
    parser.add_argument("--matrix-scale", type=float, default=0.6, help="matrix_scale of the generated images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 subjects, 2 epochs")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.train_subjects = 1, 2, 2, 16
        args.val_per_vendor, args.test_per_vendor = 2, 2
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    minority = args.minority_vendor
    others = [v for v in MNMS_VENDORS if v != minority]
    train_fr = {v: args.minority if v == minority else (1 - args.minority) / len(others) for v in MNMS_VENDORS}
    balanced = {v: 0.25 for v in MNMS_VENDORS}
    val = make_split("val", 4 * args.val_per_vendor, balanced, 1000, args.size, args.matrix_scale)
    test = make_split("test", 4 * args.test_per_vendor, balanced, 1001, args.size, args.matrix_scale)
    print(
        f"evaluation data: {len(val)} val / {len(test)} test volumes ({time.perf_counter() - start:.0f} s)", flush=True
    )
    rows: list[dict] = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        volumes = make_split("train", args.train_subjects, train_fr, seed, args.size, args.matrix_scale)
        data = {"train": train_slices(volumes), "val": val, "test": test}
        print(f"seed {seed}: {len(data['train'])} training slices ({time.perf_counter() - t0:.0f} s)", flush=True)
        results = {}
        t1 = time.perf_counter()
        results["teacher"] = train("teacher", data, args.teacher_epochs, seed)
        results["teacher"]["seconds"] = time.perf_counter() - t1
        teacher = results["teacher"]["network"]
        cache = TeacherOutputCache(id_key="id")  # in memory; one teacher for KD and GroupDistil
        for method in METHODS:
            t1 = time.perf_counter()
            results[method] = train(method, data, args.epochs, seed, teacher=teacher, cache=cache)
            results[method]["seconds"] = time.perf_counter() - t1
        for method, r in results.items():
            test_r = r["test"]
            row = {
                "seed": seed, "method": method, "epoch": r["epoch"], "val_worst": r["val"]["worst"],
                "test_worst": test_r["worst"], "test_mean_group": test_r["mean_group"],
                "test_worst_vendor": MNMS_VENDORS[test_r["worst_group"]],
                **{f"test_{v}": test_r["per_group"][i] for i, v in enumerate(MNMS_VENDORS)},
                **{f"test_{s}": test_r["per_structure"][i] for i, s in enumerate(("LV", "MYO", "RV"))},
                "dro_weights": " ".join(f"{w:.3f}" for w in r["weights"]) if r["weights"] else "",
                "seconds": round(r["seconds"], 1),
            }  # fmt: skip
            rows.append(row)
            print(
                f"seed {seed} {method:12s} epoch {r['epoch']:2d} test worst {100 * test_r['worst']:.1f} "
                f"mean {100 * test_r['mean_group']:.1f} {minority} {100 * row[f'test_{minority}']:.1f} "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
        write_outputs(rows, args, time.perf_counter() - start, seed + 1)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; {Path(args.out) / 'results_segmentation.md'}")


if __name__ == "__main__":
    main()
