"""Worst-group benchmark: GroupDistil against KD, ERM and GroupDRO students on synthetic multi-vendor cardiac MRI.

For every seed and setting the script generates one dataset with ``make_synthetic_mnms`` (M&Ms layout; train /
val / test = 50 / 20 / 30 % of ``--subjects``, 4 frames, ``matrix_scale`` 0.5), reads it with the package's loader
and preprocessing (ED mid-ventricular slice, ``--size`` pixels over a 128 mm field of view), trains one teacher (a
wider and deeper 2-D ResNet: widths 16-128, two blocks per stage, cross entropy) and then four students of the same
architecture and budget (ResNet widths 8-64, one block per stage; same epochs, optimiser, batch size and data
order) with ``DistillationTrainer``:

- ``erm``: cross entropy, no teacher;
- ``group_dro``: ``GroupDROLoss`` around cross entropy, no teacher;
- ``kd``: ``DistillationLoss`` (Hinton KD) with the teacher;
- ``groupdistil``: ``GroupDistillationLoss`` with the teacher.

Settings:

- ``minority``: vendor D (Canon, the noisiest, lowest-contrast vendor) is 2 % of the training split (A 37, B 36,
  C 25 %); validation and test are vendor-balanced; groups are the 4 vendors.
- ``correlation``: vendors balanced in every split, but in training a fraction ``--correlation`` of every vendor's
  subjects has that vendor's "correlated" pathology (A NOR, B HCM, C DCM, D NOR: a spurious vendor-pathology
  correlation; validation and test are uncorrelated); groups are the 12 vendor x pathology cells (the group-DRO
  choice for a spurious correlation: grouping by vendor alone would not separate the cells the shortcut fails on).
- ``waterbirds`` (not in the default run; ``--settings waterbirds``): the synthetic Waterbirds stand-in
  (``make_synthetic_waterbirds``, ``--images`` 64-pixel images, the place agrees with the label in
  ``--waterbirds-correlation`` of training, independent in validation and test), read with
  ``load_waterbirds_datalist`` and ``natural_image_preprocessing`` (ImageNet normalisation, centre crop of
  ``--size``); groups are the 4 label x place cells; the networks take 3 channels and predict 2 classes.

After every epoch the student is evaluated on the validation and test splits. Model selection uses the
worst-group validation accuracy (the group-DRO rule; ties go to the higher average validation accuracy, then to
the later epoch); selection by average validation accuracy is reported as well. "Average accuracy" weights each
group's accuracy by its share of the training set, as in Sagawa et al.; the worst-group accuracy is the minimum
over the groups present in the split.

Outputs (``--out``, default ``docs/results``): ``worst_group_runs.csv`` (every run and selection),
``worst_group.md`` (mean +- std tables, the per-seed paired difference GroupDistil - KD, the settings and the
command), ``worst_group.png``; they are rewritten after every seed. Other ``--settings`` than the default write
``worst_group_<settings>...`` files instead (e.g. ``worst_group_waterbirds.md``). ``--sweep`` instead runs the
hyper-parameter sweep (grid ``SWEEP``: KD alpha; GroupDistil alpha x step size; GroupDRO step size; temperature
fixed at 4) on the seed-0 dataset of each setting, scores every configuration by the worst-group *validation*
accuracy of its selected epoch (mean over the settings, ties to the higher mean average validation accuracy) and
writes ``worst_group_sweep.csv`` (``worst_group_<settings>_sweep.csv`` for other settings); its winners are the
values in ``HYPER`` (see ``docs/results.md`` for the run).

Usage:
    python benchmarks/worst_group.py                   # the default benchmark (5 seeds, both settings)
    python benchmarks/worst_group.py --quick --out /tmp/wg   # a few minutes
    python benchmarks/worst_group.py --settings waterbirds   # the synthetic Waterbirds stand-in (5 seeds)
    python benchmarks/worst_group.py --sweep           # the hyper-parameter sweep (validation data only)
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.networks.nets import ResNet
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from monai_groupdistil.data import (
    MNMS_VENDORS,
    WATERBIRDS_GROUP_NAMES,
    cardiac_preprocessing,
    load_mnms_datalist,
    load_waterbirds_datalist,
    make_synthetic_mnms,
    make_synthetic_waterbirds,
    mnms_group_names,
    natural_image_preprocessing,
)
from monai_groupdistil.engines import DistillationTrainer, TeacherOutputCache
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss
from monai_groupdistil.metrics import compute_group_accuracy

CLASSES = ("NOR", "HCM", "DCM")
METHODS = ("erm", "group_dro", "kd", "groupdistil")
BALANCED = {v: 0.25 for v in MNMS_VENDORS}
SETTINGS = {
    "minority": {
        "group_by": "vendor",
        "make": {
            "vendor_fractions": {
                "train": {"A": 0.37, "B": 0.36, "C": 0.25, "D": 0.02},
                "val": BALANCED,
                "test": BALANCED,
            }
        },
    },
    "correlation": {"group_by": ("vendor", "label"), "make": {"vendor_fractions": BALANCED}},
    # not in the default run: python benchmarks/worst_group.py --settings waterbirds
    "waterbirds": {"classes": ("landbird", "waterbird"), "channels": 3},
}
DEFAULT_SETTINGS = ["minority", "correlation"]
WATERBIRDS_IMAGE_SIZE = 64  # generated images; the network sees the centre --size crop of a resize to 8/7 of it
SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
# Chosen by `--sweep` on the validation split (see docs/results.md): each method's winner; T fixed at 4.
HYPER = {"temperature": 4.0, "kd_alpha": 0.9, "alpha": 0.5, "step_size": 0.01, "group_dro_step_size": 0.01}
SWEEP = {"step_size": (0.01, 0.1, 1.0), "alpha": (0.5, 0.9)}


def resnet(width: int, layers: list[int], channels: int = 1, classes: int = len(CLASSES)) -> ResNet:
    return ResNet(
        "basic",
        layers,
        [width, 2 * width, 4 * width, 8 * width],
        spatial_dims=2,
        n_input_channels=channels,
        num_classes=classes,
        conv1_t_stride=2,
    )


STUDENT_WIDTH = 8


def student(setting: str = "minority") -> ResNet:
    spec = SETTINGS[setting]
    return resnet(STUDENT_WIDTH, [1, 1, 1, 1], spec.get("channels", 1), len(spec.get("classes", CLASSES)))


def teacher_net(setting: str = "minority") -> ResNet:
    spec = SETTINGS[setting]
    return resnet(16, [2, 2, 2, 2], spec.get("channels", 1), len(spec.get("classes", CLASSES)))


def build_data(
    setting: str, seed: int, subjects: int, correlation: float, size: int, workdir: Path, matrix_scale: float = 0.5
) -> dict:
    """Generate, load and preprocess one dataset; returns tensors per split and the group names."""
    if setting == "waterbirds":
        return build_waterbirds(seed, subjects, correlation, size, workdir)
    spec = SETTINGS[setting]
    make = dict(spec["make"])
    if setting == "correlation":
        make["pathology_vendor_correlation"] = correlation
    root = make_synthetic_mnms(
        workdir / f"{setting}_{seed}",
        n_subjects=subjects,
        seed=seed,
        split_fractions=SPLIT_FRACTIONS,
        matrix_scale=matrix_scale,
        n_frames=4,
        **make,
    )
    return _preprocessed_splits(
        lambda split: load_mnms_datalist(root, split, group_by=spec["group_by"], classes=CLASSES),
        cardiac_preprocessing(spatial_size=(size, size), pixdim=(128.0 / size, 128.0 / size)),
        mnms_group_names(spec["group_by"], CLASSES),
    )


def build_waterbirds(seed: int, images: int, correlation: float, size: int, workdir: Path) -> dict:
    """The synthetic Waterbirds stand-in: ``images`` images (50/20/30 %), place = label in a fraction
    ``correlation`` of training, groups ``2 * y + place``, ImageNet-style evaluation preprocessing."""
    root = make_synthetic_waterbirds(
        workdir / f"waterbirds_{seed}",
        n_images=images,
        seed=seed,
        correlation=correlation,
        split_fractions=SPLIT_FRACTIONS,
        image_size=WATERBIRDS_IMAGE_SIZE,
    )
    return _preprocessed_splits(
        lambda split: load_waterbirds_datalist(root, split),
        natural_image_preprocessing(spatial_size=size, resize=size * 8 // 7),
        list(WATERBIRDS_GROUP_NAMES),
    )


def _preprocessed_splits(datalist, preprocess, names: list[str]) -> dict:
    """Tensors (image, label, group) of every split from ``datalist(split)`` through ``preprocess``; the group
    names; the training-set size of every group."""
    data: dict = {"group_names": names}
    for split in ("train", "val", "test"):
        items = [preprocess(d) for d in datalist(split)]
        data[split] = {
            "image": torch.stack([torch.as_tensor(i["image"]).float() for i in items]),
            "label": torch.tensor([i["label"] for i in items]),
            "group": torch.tensor([i["group"] for i in items]),
        }
    data["group_counts"] = torch.bincount(data["train"]["group"], minlength=len(names)).tolist()
    return data


def evaluate(network: torch.nn.Module, split: dict, num_groups: int, counts: list[int]) -> dict:
    network.eval()
    with torch.no_grad():
        pred = torch.cat([network(x) for x in split["image"].split(64)])
    network.train()
    acc = compute_group_accuracy(pred, split["label"], split["group"], num_groups)
    per_group = acc["per_group"]
    present = ~torch.isnan(per_group)
    weights = torch.tensor(counts, dtype=torch.float64) * present
    average = float((per_group.double().nan_to_num() * weights).sum() / weights.sum())
    worst = int(torch.where(present, per_group, torch.full_like(per_group, 2.0)).argmin())
    return {"average": average, "worst": float(per_group[worst]), "worst_group": worst, "per_group": per_group.tolist()}


def train(
    method: str, data: dict, epochs: int, seed: int, hyper: dict, teacher=None, cache=None, network=None
) -> list[dict]:
    """Train one network with DistillationTrainer; returns the validation and test metrics of every epoch."""
    num_groups = len(data["group_names"])
    set_determinism(seed)
    network = network if network is not None else student(data["setting"])
    if method in ("erm", "teacher"):
        loss = torch.nn.CrossEntropyLoss()
    elif method == "group_dro":
        loss = GroupDROLoss(torch.nn.CrossEntropyLoss(reduction="none"), num_groups, hyper["group_dro_step_size"])
    elif method == "kd":
        loss = DistillationLoss(hyper["temperature"], hyper["kd_alpha"])
    else:
        loss = GroupDistillationLoss(num_groups, hyper["temperature"], hyper["alpha"], hyper["step_size"])
    train_split = data["train"]
    items = [
        {"image": train_split["image"][i], "label": train_split["label"][i], "group": train_split["group"][i], "id": i}
        for i in range(len(train_split["label"]))
    ]
    loader = DataLoader(items, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    use_teacher = method in ("kd", "groupdistil")
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=loss,
        teacher=teacher if use_teacher else None,
        teacher_cache=cache if use_teacher else None,
    )
    history: list[dict] = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        history.append(
            {
                "epoch": engine.state.epoch,
                "val": evaluate(network, data["val"], num_groups, data["group_counts"]),
                "state": {k: v.clone() for k, v in network.state_dict().items()},
            }
        )

    trainer.run()
    # the test split is evaluated only at the epochs the two selection rules pick (same numbers, less CPU)
    for rule in ("worst", "average"):
        chosen = select(history, rule)
        if "test" not in chosen:
            network.load_state_dict(chosen["state"])
            chosen["test"] = evaluate(network, data["test"], num_groups, data["group_counts"])
    network.load_state_dict(history[-1]["state"])
    if method != "teacher":
        for h in history:
            h["state"] = None
    return history


def select(history: list[dict], rule: str) -> dict:
    if rule == "worst":
        key = lambda h: (h["val"]["worst"], h["val"]["average"], h["epoch"])  # noqa: E731
    else:
        key = lambda h: (h["val"]["average"], h["val"]["worst"], h["epoch"])  # noqa: E731
    return max(history, key=key)


def _sizes(args: argparse.Namespace, setting: str) -> tuple[int, float]:
    """Dataset size and correlation of a setting: images and place-label correlation for Waterbirds."""
    if setting == "waterbirds":
        return args.images, args.waterbirds_correlation
    return args.subjects, args.correlation


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} +- {100 * std:.1f}"


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    rows, begin = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for setting in args.settings:
                start = time.time()
                data = build_data(setting, seed, *_sizes(args, setting), args.size, Path(tmp))
                data["setting"] = setting
                names = data["group_names"]
                teacher = teacher_net(setting)
                t_hist = train("teacher", data, args.teacher_epochs, seed, HYPER, network=teacher)
                best = select(t_hist, "worst")
                teacher.load_state_dict(best["state"])
                teacher.eval()
                cache = TeacherOutputCache(id_key="id")
                runs = {"teacher": t_hist}
                for method in METHODS:
                    runs[method] = train(method, data, args.epochs, seed, HYPER, teacher=teacher, cache=cache)
                for method, hist in runs.items():
                    for rule in ("worst", "average"):
                        chosen = select(hist, rule)
                        rows.append(
                            {
                                "setting": setting,
                                "seed": seed,
                                "method": method,
                                "selection": rule,
                                "epoch": chosen["epoch"],
                                "test_average": chosen["test"]["average"],
                                "test_worst": chosen["test"]["worst"],
                                "test_worst_group": names[chosen["test"]["worst_group"]],
                                "val_average": chosen["val"]["average"],
                                "val_worst": chosen["val"]["worst"],
                                **{f"test_acc/{n}": a for n, a in zip(names, chosen["test"]["per_group"])},
                            }
                        )
                summary = {m: f"{100 * select(runs[m], 'worst')['test']['worst']:.0f}" for m in runs}
                print(
                    f"[{setting} seed {seed}] {time.time() - start:.0f} s, test worst-group acc: {summary}", flush=True
                )
            # the outputs are rewritten after every seed, so an interrupted run leaves complete seeds behind
            write_outputs(rows, args, time.time() - begin, seed + 1)
    return rows


def _describe_setting(args: argparse.Namespace, setting: str) -> str:
    if setting == "minority":
        return (
            f"minority: {args.subjects} subjects, vendor fractions "
            f"{SETTINGS['minority']['make']['vendor_fractions']}, groups = vendor"
        )
    if setting == "correlation":
        return (
            f"correlation: {args.subjects} subjects, pathology-vendor correlation {args.correlation} in training, "
            "groups = vendor x pathology"
        )
    return (
        f"waterbirds: {args.images} synthetic images of {WATERBIRDS_IMAGE_SIZE} px, place = label in "
        f"{args.waterbirds_correlation:.0%} of training, groups = label x place"
    )


def output_stem(settings: list[str]) -> str:
    """File name stem of the outputs: ``worst_group`` for the default settings, else with the settings appended."""
    return "worst_group" if list(settings) == DEFAULT_SETTINGS else "_".join(["worst_group", *settings])


def write_outputs(rows: list[dict], args: argparse.Namespace, wall: float, seeds: int) -> None:
    stem = output_stem(args.settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("test_acc/"), k))
    base = [
        "setting",
        "seed",
        "method",
        "selection",
        "epoch",
        "test_average",
        "test_worst",
        "test_worst_group",
        "val_average",
        "val_worst",
    ]
    columns = base + [c for c in columns if c not in base]
    with open(out / f"{stem}_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Worst-group benchmark",
        "",
        f"Command: `{' '.join(['python benchmarks/worst_group.py', *sys.argv[1:]])}`",
        "",
        f"Seeds: {seeds} of {args.seeds}; train / val / test fractions {SPLIT_FRACTIONS}; "
        + "; ".join(_describe_setting(args, setting) for setting in args.settings)
        + f"; student width {STUDENT_WIDTH}; epochs: teacher {args.teacher_epochs}, students {args.epochs}; input "
        f"{args.size}x{args.size}; hyper-parameters: {HYPER}. Wall time: {wall / 60:.1f} min "
        f"({torch.get_num_threads()} threads).",
        "",
    ]
    for rule, title in (("worst", "worst-group validation accuracy"), ("average", "average validation accuracy")):
        lines += [
            f"## Test accuracy (%), model selected by {title}",
            "",
            "| setting | method | average accuracy | worst-group accuracy |",
            "|---|---|---|---|",
        ]
        for setting in args.settings:
            for method in ("teacher", *METHODS):
                sel = [r for r in rows if r["setting"] == setting and r["method"] == method and r["selection"] == rule]
                lines.append(
                    f"| {setting} | {method} | {_mean_std([r['test_average'] for r in sel])} | "
                    f"{_mean_std([r['test_worst'] for r in sel])} |"
                )
        lines.append("")
    lines += [
        "## GroupDistil - KD, paired by seed (worst-group selection, points)",
        "",
        "| setting | per-seed worst-group difference | mean | positive | average-accuracy difference (mean) |",
        "|---|---|---|---|---|",
    ]
    for setting in args.settings:

        def get(method, key, setting=setting):
            return {
                r["seed"]: r[key]
                for r in rows
                if r["setting"] == setting and r["method"] == method and r["selection"] == "worst"
            }

        gd, kd = get("groupdistil", "test_worst"), get("kd", "test_worst")
        diffs = [100 * (gd[s] - kd[s]) for s in sorted(gd)]
        avg_diff = [100 * (get("groupdistil", "test_average")[s] - get("kd", "test_average")[s]) for s in sorted(gd)]
        lines.append(
            f"| {setting} | {', '.join(f'{d:+.1f}' for d in diffs)} | {statistics.mean(diffs):+.1f} | "
            f"{sum(d > 0 for d in diffs)}/{len(diffs)} | {statistics.mean(avg_diff):+.1f} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed (pip install matplotlib): %s.png not written", stem)
        return
    fig, axes = plt.subplots(1, len(args.settings), figsize=(5 * len(args.settings), 3.5), squeeze=False)
    for ax, setting in zip(axes[0], args.settings):
        methods = ("teacher", *METHODS)
        for offset, (key, label) in enumerate((("test_average", "average"), ("test_worst", "worst group"))):
            vals = [
                [
                    100 * r[key]
                    for r in rows
                    if r["setting"] == setting and r["method"] == m and r["selection"] == "worst"
                ]
                for m in methods
            ]
            means = [statistics.mean(v) for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.bar([i + 0.38 * offset for i in range(len(methods))], means, 0.38, yerr=errs, label=label, capsize=3)
        ax.set_xticks([i + 0.19 for i in range(len(methods))], methods, rotation=20)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)


def run_sweep(args: argparse.Namespace) -> None:
    """Hyper-parameter sweep on seed 0, scored on the validation split only."""
    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            data = build_data(setting, 0, *_sizes(args, setting), args.size, Path(tmp))
            data["setting"] = setting
            teacher = teacher_net(setting)
            best = select(train("teacher", data, args.teacher_epochs, 0, HYPER, network=teacher), "worst")
            teacher.load_state_dict(best["state"])
            teacher.eval()
            cache = TeacherOutputCache(id_key="id")
            for alpha in SWEEP["alpha"]:
                kd_hyper = {**HYPER, "kd_alpha": alpha}
                chosen = select(train("kd", data, args.epochs, 0, kd_hyper, teacher, cache), "worst")
                rows.append(
                    {
                        "setting": setting,
                        "method": "kd",
                        "alpha": alpha,
                        "step_size": "",
                        "val_worst": chosen["val"]["worst"],
                        "val_average": chosen["val"]["average"],
                    }
                )
                for step in SWEEP["step_size"]:
                    hyper = {**HYPER, "alpha": alpha, "step_size": step}
                    chosen = select(train("groupdistil", data, args.epochs, 0, hyper, teacher, cache), "worst")
                    rows.append(
                        {
                            "setting": setting,
                            "method": "groupdistil",
                            "alpha": alpha,
                            "step_size": step,
                            "val_worst": chosen["val"]["worst"],
                            "val_average": chosen["val"]["average"],
                        }
                    )
            for step in SWEEP["step_size"]:
                chosen = select(
                    train("group_dro", data, args.epochs, 0, {**HYPER, "group_dro_step_size": step}), "worst"
                )
                rows.append(
                    {
                        "setting": setting,
                        "method": "group_dro",
                        "alpha": "",
                        "step_size": step,
                        "val_worst": chosen["val"]["worst"],
                        "val_average": chosen["val"]["average"],
                    }
                )
            print(f"[sweep {setting}] done at {(time.time() - start) / 60:.1f} min", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{output_stem(args.settings)}_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for method in ("kd", "groupdistil", "group_dro"):
        scores: dict = {}
        for r in rows:
            if r["method"] == method:
                scores.setdefault((r["alpha"], r["step_size"]), []).append((r["val_worst"], r["val_average"]))
        best = max(scores, key=lambda k: tuple(statistics.mean(v) for v in zip(*scores[k])))
        print(f"{method}: best (alpha, step_size) by mean validation worst-group accuracy over the settings: {best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--subjects", type=int, default=300, help="labelled subjects per dataset (50/20/30)")
    parser.add_argument("--size", type=int, default=48, help="input size (pixels) of the 128 mm field of view")
    parser.add_argument("--correlation", type=float, default=0.8, help="vendor-pathology correlation (setting 2)")
    parser.add_argument("--images", type=int, default=1000, help="images per Waterbirds dataset (50/20/30)")
    parser.add_argument(
        "--waterbirds-correlation", type=float, default=0.95, help="place-label agreement in Waterbirds training"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=DEFAULT_SETTINGS,
        choices=list(SETTINGS),
        help="default: minority correlation; waterbirds runs the synthetic Waterbirds stand-in",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    parser.add_argument("--quick", action="store_true", help="1 seed, 100 subjects, 8 epochs: a few minutes")
    parser.add_argument("--sweep", action="store_true", help="run the hyper-parameter sweep instead")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.subjects, args.images, args.epochs, args.teacher_epochs = 1, 100, 300, 8, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    if args.sweep:
        run_sweep(args)
        return
    run_benchmark(args)
    stem = output_stem(args.settings)
    print(f"wrote {args.out}/{stem}.md, {stem}_runs.csv, {stem}.png in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
