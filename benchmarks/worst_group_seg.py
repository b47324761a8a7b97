"""Worst-vendor segmentation benchmark: GroupDistil against KD, ERM and GroupDRO students of a 2-D cardiac U-Net.

Protocol (the powered protocol of the classification benchmark, ``benchmarks/worst_group.py``):

- **Evaluation data, generated once per run and the same for every seed**: ``--val-per-vendor`` validation and
  ``--test-per-vendor`` test subjects of each of the four vendors (``make_synthetic_mnms``, generator seeds 1000 and
  1001, vendors balanced); every subject gives two volumes (ED, ES).
- **Training data, one split per seed** (generator seed = the seed): ``--train-subjects`` subjects, vendor
  ``--minority-vendor`` (default D, the noisiest and lowest-contrast vendor) a fraction ``--minority`` of them, the
  other vendors sharing the rest; the annotated slices of both frames are the 2-D training samples.
- Read with the package's segmentation pipeline (``segmentation_frames``: ED and ES; ``segmentation_preprocessing``:
  whole-frame intensity percentiles, ``--size`` pixels over a 192 mm in-plane field of view).
- **Networks, per seed**: one teacher (MONAI ``UNet``, channels 16-128, two residual units; cross entropy + soft
  Dice, natural sampling; ``--teacher group_dro``: ``GroupDROLoss`` with GroupDRO's hyper-parameters and the batch
  update, the classification benchmark's GroupDRO teacher), then four students (``UNet`` channels 8-64 without
  residual units, 0.10x the teacher's parameters) with ``DistillationTrainer``, every network built right after
  ``set_determinism(seed)``:

  - ``erm``: ``PerSampleDiceCELoss`` (cross entropy + soft Dice), no teacher;
  - ``group_dro``: ``GroupDROLoss`` around ``PerSampleDiceCELoss(reduction="none")``, no teacher;
  - ``kd``: ``DistillationLoss`` (Hinton KD + CE + soft Dice) from the teacher;
  - ``groupdistil``: ``GroupDistillationLoss`` (the same per-sample loss under the group-DRO objective) from it.

  The teacher's outputs on the training slices are computed once per seed, up front in slice order
  (``filled_teacher_cache``), and shared by KD and GroupDistil, so a student's numbers do not depend on the students
  trained before it.
- **Hyper-parameters** (``HYPER``): chosen on this benchmark's validation data (seeds 100-102, and seeds 0-9 for
  GroupDistil's weight decay and KD's recipe): every method's weight decay and sampler, GroupDRO's step size, and
  GroupDistil's and KD's alpha, step size and ``absent_groups``; GroupDistil's batch DRO update against the held-out
  one; GroupDRO's and GroupDistil's generalisation adjustment (0; GroupDistil's checked on seeds 0-9).
  ``--hyper '{"groupdistil":
  {"weight_by": "ce"}}'`` updates them for one run, ``--methods`` trains some students only. Common to every network:
  AdamW (weight decay 0 is Adam), lr ``--lr`` annealed to 0 along a cosine over every iteration of ``--epochs`` epochs
  (teacher: ``--teacher-epochs``), batch 16, temperature 4, soft-Dice weight 1, no augmentation. Every student has the
  same number of epochs and iterations per epoch (``GroupBalancedSampler`` draws as many slices as the training split
  holds).
- **Model selection on validation only**: after every epoch the network segments every validation volume slice by
  slice; the Dice of LV, MYO and RV of every volume (MONAI ``DiceMetric``) is averaged per vendor; the epoch with the
  best worst-vendor validation Dice is selected (ties: the vendor-mean Dice, then the later epoch), and only it is
  evaluated on the test split.
- **The held-out update** (``--hyper '{"groupdistil": {"update": "held_out", "held_out_step_size": 1.0}}'``, also for
  ``group_dro``): the validation subjects are halved vendor by vendor (``split_validation``, as the segmentation
  bundle does); the student selects its epoch on the first half, and ``HeldOutGroupDROHandler`` steps its DRO
  weights after every epoch on the second half, while the training batches only apply them. ``--select-on half``
  makes every student select on the first half, so that arms with and without it are compared on the same
  selection data.
- **Statistics** (test split, selected epoch): worst-vendor Dice, vendor-mean Dice, the minority vendor's Dice, per
  structure, for every network: the mean over seeds with a 95 % bootstrap interval of the mean; per-seed paired
  differences (``COMPARISONS``) with a paired 95 % percentile bootstrap interval over seeds (10,000 resamples,
  ``worst_group_stats.paired_bootstrap_ci``, the classification benchmark's) and the number of positive seeds.

Outputs (``--out``, default ``docs/results/``; file names from ``--stem``, default ``worst_group_seg``), rewritten
after every seed, so a stopped run leaves complete seeds: ``<stem>.md`` (the tables; ``docs/results_segmentation.md``
is the hand-written page that reads them), ``<stem>_runs.csv`` (one row per seed and network) and
``<stem>_history.csv`` (the validation Dice of every epoch). Everything is seeded: the same command with the same
``--threads`` gives the same numbers.

Usage:
    python benchmarks/worst_group_seg.py                       # the default run (10 seeds; about 90 min, one thread)
    python benchmarks/worst_group_seg.py --seeds 5             # seeds 0-4, then, to add seeds 5-9 to its CSVs:
    python benchmarks/worst_group_seg.py --seeds 10 --resume
    python benchmarks/worst_group_seg.py --quick --out /tmp/s  # 1 seed, tiny: about 20 s
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import partition_dataset_classes
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.utils import set_determinism
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles" / "shared"))  # the bundles' scripts
from worst_group_stats import paired_bootstrap_ci, paired_difference  # noqa: E402

from monai_groupdistil.data import MNMS_VENDORS, GroupBalancedSampler, load_mnms_datalist
from monai_groupdistil.engines import DistillationTrainer, TeacherOutputCache  # noqa: E402
from monai_groupdistil.engines.checkpoint_saver import atomic_write  # noqa: E402
from monai_groupdistil.handlers import HeldOutGroupDROHandler  # noqa: E402
from monai_groupdistil.losses import (  # noqa: E402
    DistillationLoss,
    GroupDistillationLoss,
    GroupDROLoss,
    PerSampleDiceCELoss,
)
from monai_groupdistil.metrics import summarise_group_values  # noqa: E402
from scripts import make_synthetic_mnms, segmentation_frames, segmentation_preprocessing, volume_slices

METHODS = ("erm", "group_dro", "kd", "groupdistil")
ARMS = ("teacher", *METHODS)
PATHOLOGIES = ("NOR", "HCM", "DCM")
STRUCTURES = ("LV", "MYO", "RV")
FOV_MM = 192.0
TEMPERATURE = 4.0
DICE_WEIGHT = 1.0
BATCH_SIZE = 16
VAL_SEED, TEST_SEED = 1000, 1001
# Every method's hyper-parameters, chosen on this benchmark's validation data (docs/results_segmentation_studies.md):
# GroupDistil's and KD's sampler, step size, alpha and absent_groups from the defaults sweep
# (results/worst_group_seg_sweep.csv, seeds 100-102); every method's weight decay and GroupDRO's step size from the
# weight-decay sweep (results/worst_group_seg_wd_sweep.csv, seeds 100-102), except GroupDistil's weight decay: 0 won a
# 10-seed check on validation (seeds 0-9: results/worst_group_seg_tuned_runs.csv against _tuned_gd_wd0_runs.csv) after
# the three-seed sweep had chosen 1.0; ERM's and GroupDRO's sampler, and GroupDRO's step size at weight decay 1.0, from
# the baselines' sweep (results/worst_group_seg_baseline_sweep.csv, seeds 100-102; ERM's natural sampler by the tie
# rule: 0.04 points below the balanced one, higher vendor-mean Dice); KD's recipe confirmed on seeds 0-9 against weight
# decay 0.1 and the balanced sampler (_tuned_kd_*_runs.csv); GroupDRO's and GroupDistil's adjustment C = 0 against 0.1
# and 1 (results/worst_group_seg_adjustment_sweep.csv, seeds 100-102; GroupDistil's 0.1, first there by 0.21 points, was
# 0.17 points below 0 on seeds 0-9: _adjustment_check_runs.csv). Until 2026-12-07 every value but the teacher's came
# from the classification benchmark (weight decay 0 everywhere then). The teacher is trained like the classification
# benchmark's ERM teacher (natural sampling, no group weighting, weight decay 0); with --teacher group_dro, like its
# GroupDRO teacher (main replaces HYPER["teacher"] by group_dro's recipe and "loss": "group_dro").
HYPER: dict[str, dict] = {
    "teacher": {"sampler": "natural"},
    "erm": {"sampler": "natural", "weight_decay": 1.0},
    "group_dro": {"step_size": 1.0, "adjustment": 0.0, "sampler": "balanced", "weight_decay": 1.0},
    "kd": {"alpha": 0.5, "sampler": "natural", "weight_decay": 0.0},
    "groupdistil": {
        "alpha": 0.5,
        "step_size": 0.1,
        "absent_groups": "zero",
        "adjustment": 0.0,
        "sampler": "balanced",
        "weight_decay": 0.0,
    },
}
COMPARISONS = (("groupdistil", "kd"), ("groupdistil", "erm"), ("group_dro", "erm"), ("kd", "erm"), ("teacher", "erm"))
RUN_FIELDS = [
    "seed", "method", "teacher", "epoch", "epochs", "val_worst", "val_mean_group", "test_worst", "test_mean_group",
    "test_worst_vendor", *(f"test_{v}" for v in MNMS_VENDORS), *(f"test_{s}" for s in STRUCTURES), "dro_weights",
    "seconds",
]  # fmt: skip
HISTORY_FIELDS = ["seed", "method", "epoch", "lr", "val_worst", "val_mean_group", *(f"val_{v}" for v in MNMS_VENDORS)]


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


def subject_of(volume: dict) -> str:
    """The subject of a volume (its ``case`` is ``<subject>_<frame>``)."""
    return volume["case"].rsplit("_", 1)[0]


def split_validation(volumes: list[dict], seed: int = VAL_SEED) -> tuple[list[dict], list[dict]]:
    """The validation volumes in two halves of subjects, vendor by vendor (``monai.data.partition_dataset_classes``,
    the vendors as classes, ratios 1:1, shuffled with ``seed``), as the segmentation bundle splits its validation
    subjects for ``dro_update`` held_out; both frames of a subject fall in the same half. The first half selects
    the epoch, the second gives the per-vendor losses of the held-out DRO update (DFR's split)."""
    vendor = {subject_of(v): v["group"] for v in volumes}
    subjects = list(vendor)
    parts = partition_dataset_classes(subjects, [vendor[s] for s in subjects], ratios=[1, 1], shuffle=True, seed=seed)
    first = set(parts[0])
    return [v for v in volumes if subject_of(v) in first], [v for v in volumes if subject_of(v) not in first]


def stack_volumes(volumes: list[dict]) -> dict:
    """Every slice of ``volumes`` in one batch (``image`` ``[S, 1, H, W]``, ``label`` ``[S, H, W]``), for evaluation."""
    return {
        "image": torch.cat([v["image"].permute(3, 0, 1, 2) for v in volumes]),
        "label": torch.cat([v["label"][0].permute(2, 0, 1) for v in volumes]).long(),
        "slices": [int(v["image"].shape[-1]) for v in volumes],
        "group": torch.tensor([v["group"] for v in volumes]),
    }


# ----------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(network: torch.nn.Module, split: dict, num_groups: int, chunk: int = 512) -> dict:
    """Per-volume Dice (LV, MYO, RV) of ``network`` segmenting every slice of ``split`` (``stack_volumes``)."""
    network.eval()
    pred = torch.cat([network(x).argmax(1) for x in split["image"].split(chunk)])  # [S, H, W]
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    values = []
    for p, y in zip(pred.split(split["slices"]), split["label"].split(split["slices"])):
        p1 = torch.nn.functional.one_hot(p, 4).permute(3, 1, 2, 0)[None]  # [1, 4, H, W, Z]
        y1 = torch.nn.functional.one_hot(y, 4).permute(3, 1, 2, 0)[None]
        values.append(dice(p1, y1))
    dice.reset()
    network.train()
    res = summarise_group_values(torch.cat(values), split["group"], num_groups)
    return {
        "worst": res["worst_group"],
        "worst_group": res["worst_group_id"],
        "mean_group": res["mean_group"],
        "per_group": res["per_group"].tolist(),
        "per_structure": res["overall_channel"].tolist(),
    }


# ----------------------------------------------------------------------------------------------------- training


def uses_held_out_update(method: str) -> bool:
    """Whether ``method``'s ``HYPER`` asks for the held-out DRO update (``"update": "held_out"``)."""
    return HYPER[method].get("update", "batch") == "held_out"


def make_loss(method: str, num_groups: int, group_counts: Sequence[int] | None = None) -> torch.nn.Module:
    """The training loss of ``method`` (``ARMS``) with its ``HYPER``; the teacher's is ``GroupDROLoss`` when its
    ``HYPER`` has ``"loss": "group_dro"`` (``--teacher group_dro``), else the ERM loss. ``group_counts`` (training
    slices per vendor) is the ``N_g`` of a group-DRO loss's adjustment ``C / sqrt(N_g)``, needed when its
    ``HYPER`` has a non-zero ``"adjustment"``."""
    if method not in HYPER:
        raise ValueError(f"unknown method {method!r}; expected one of {ARMS}.")
    h = HYPER[method]
    teacher_loss = h.get("loss", "erm") if method == "teacher" else None
    if teacher_loss not in (None, "erm", "group_dro"):
        raise ValueError(f"teacher: loss={teacher_loss!r}, expected 'erm' or 'group_dro'.")
    update = h.get("update", "batch")
    if update not in ("batch", "held_out"):
        raise ValueError(f"{method}: update={update!r}, expected 'batch' or 'held_out'.")
    if uses_held_out_update(method) and method not in ("group_dro", "groupdistil"):
        raise ValueError(f"update='held_out' needs a group-DRO loss, not method {method!r}.")
    # the held-out update: the training calls only apply the weights; HeldOutGroupDROHandler steps them
    held_out = {"update": "held_out"} if uses_held_out_update(method) else {}
    step = h["held_out_step_size"] if held_out else h.get("step_size")
    if method == "erm" or teacher_loss == "erm":
        return PerSampleDiceCELoss(dice_weight=DICE_WEIGHT)
    if method == "group_dro" or teacher_loss == "group_dro":
        return GroupDROLoss(
            PerSampleDiceCELoss(DICE_WEIGHT, reduction="none"),
            num_groups,
            step,
            adjustment=h["adjustment"],
            group_counts=group_counts,
            **held_out,
        )
    if method == "kd":
        return DistillationLoss(TEMPERATURE, h["alpha"], dice_weight=DICE_WEIGHT)
    if method == "groupdistil":
        return GroupDistillationLoss(
            num_groups,
            TEMPERATURE,
            h["alpha"],
            step,
            adjustment=h["adjustment"],
            group_counts=group_counts,
            absent_groups=h["absent_groups"],
            dice_weight=DICE_WEIGHT,
            weight_by=h.get("weight_by", "loss"),
            **held_out,
        )
    raise AssertionError(f"HYPER has {method!r} but make_loss does not build it.")


def train(
    method: str, data: dict, epochs: int, lr: float, seed: int, teacher=None, cache=None, select_on: str = "all"
) -> dict:
    """Train one network; returns the selected epoch's validation and test results and the validation history.

    The epoch is selected on the whole validation split (``data["val"]``), or, for a student with the held-out update
    or with ``select_on`` "half", on its first half (``data["val_select"]``); with the held-out update,
    ``HeldOutGroupDROHandler`` steps the DRO weights after every epoch on the second half (``data["val_held_out"]``,
    slices in batches of 64), after the epoch's record, so the recorded weights are those the epoch trained with."""
    if select_on not in ("all", "half"):
        raise ValueError(f"select_on={select_on!r}: expected 'all' or 'half'.")
    num_groups = len(MNMS_VENDORS)
    held_out = uses_held_out_update(method)
    val = data["val_select"] if method != "teacher" and (held_out or select_on == "half") else data["val"]
    set_determinism(seed)
    network = teacher_net() if method == "teacher" else student_net()
    items = data["train"]
    groups = [it["group"] for it in items]
    loss = make_loss(method, num_groups, torch.bincount(torch.tensor(groups), minlength=num_groups).tolist())
    if HYPER[method]["sampler"] == "balanced":
        sampler = GroupBalancedSampler(groups, seed=seed)
        loader = DataLoader(items, batch_size=BATCH_SIZE, sampler=sampler)
    else:
        sampler = None
        loader = DataLoader(items, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(seed))
    use_teacher = method in ("kd", "groupdistil")
    if use_teacher and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher.")
    # AdamW with weight decay 0 is Adam (the published runs)
    optimizer = torch.optim.AdamW(network.parameters(), lr, weight_decay=HYPER[method].get("weight_decay", 0.0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        teacher=teacher if use_teacher else None,
        teacher_cache=cache if use_teacher else None,
    )
    if sampler is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch))
    history: list[dict] = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        weights = getattr(loss, "group_weights", None)
        history.append({
            "epoch": engine.state.epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "val": evaluate(network, val, num_groups),
            "weights": weights.tolist() if weights is not None else None,
            "state": {k: v.clone() for k, v in network.state_dict().items()},
        })  # fmt: skip

    if held_out:
        HeldOutGroupDROHandler(loss, DataLoader(data["val_held_out"], batch_size=64)).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: schedule.step())
    trainer.run()
    chosen = select_epoch(history)
    network.load_state_dict(chosen["state"])
    test = evaluate(network, data["test"], num_groups)
    network.eval()
    for h in history:
        h["state"] = None
    return {
        "network": network,
        "epoch": chosen["epoch"],
        "val": chosen["val"],
        "test": test,
        "weights": chosen["weights"],
        "history": history,
    }


def filled_teacher_cache(
    teacher: torch.nn.Module, items: Sequence[dict], batch_size: int = BATCH_SIZE
) -> TeacherOutputCache:
    """A teacher-output cache holding the teacher's logits for every training slice, computed in one pass in the
    order of ``items``, in batches of the training batch size.

    Filled on demand instead, the cache would compute the missing slices of each training batch, so its values would
    depend on which student filled it: a convolution's last bits change with the batch size (an epoch's last batch
    is smaller), and a change in the sixth decimal of the teacher's logits sends a student's training elsewhere (a
    GroupDistil student trained after KD selected other epochs than the same student trained alone). Filled up
    front, every student of a teacher reads the same targets, whatever trained before it (the classification
    benchmark's ``filled_teacher_cache`` does the same)."""
    cache = TeacherOutputCache(id_key="id")
    cache.fill(teacher, DataLoader([{"image": it["image"], "id": it["id"]} for it in items], batch_size=batch_size))
    return cache


def select_epoch(history: Sequence[dict]) -> dict:
    """The epoch with the best worst-vendor validation Dice (ties: vendor-mean validation Dice, then the later one)."""
    if not history:
        raise ValueError("select_epoch: empty history (no epoch was evaluated).")
    return max(history, key=lambda h: (h["val"]["worst"], h["val"]["mean_group"], h["epoch"]))


def result_row(seed: int, method: str, epochs: int, r: dict, teacher: str = "erm") -> dict:
    """One row of ``<stem>_runs.csv`` (``RUN_FIELDS``) from a result of ``train``; ``teacher`` is how the run's
    teacher was trained (``--teacher``), on every row of the run."""
    t = r["test"]
    return {
        "seed": seed, "method": method, "teacher": teacher, "epoch": r["epoch"], "epochs": epochs,
        "val_worst": r["val"]["worst"], "val_mean_group": r["val"]["mean_group"], "test_worst": t["worst"],
        "test_mean_group": t["mean_group"],
        "test_worst_vendor": MNMS_VENDORS[t["worst_group"]],
        **{f"test_{v}": t["per_group"][i] for i, v in enumerate(MNMS_VENDORS)},
        **{f"test_{s}": t["per_structure"][i] for i, s in enumerate(STRUCTURES)},
        "dro_weights": " ".join(f"{w:.3f}" for w in r["weights"]) if r["weights"] else "",
        "seconds": round(r["seconds"], 1),
    }  # fmt: skip


def history_rows(seed: int, method: str, history: Sequence[dict]) -> list[dict]:
    """Rows of ``<stem>_history.csv`` (``HISTORY_FIELDS``): the validation Dice of every epoch."""
    return [
        {
            "seed": seed,
            "method": method,
            "epoch": h["epoch"],
            "lr": h["lr"],
            "val_worst": h["val"]["worst"],
            "val_mean_group": h["val"]["mean_group"],
            **{f"val_{v}": h["val"]["per_group"][i] for i, v in enumerate(MNMS_VENDORS)},
        }  # fmt: skip
        for h in history
    ]


# ----------------------------------------------------------------------------------------------------- statistics


def by_seed(rows: Sequence[dict], method: str, key: str, scale: float = 1.0) -> dict[int, float]:
    """``{seed: scale * row[key]}`` of ``method``'s rows."""
    return {int(r["seed"]): scale * float(r[key]) for r in rows if r["method"] == method}


def arm_summary(rows: Sequence[dict], method: str, key: str) -> dict:
    """Mean over seeds of ``method``'s ``key`` (in %) with the 95 % bootstrap interval of the mean.

    Returns ``{"n", "mean", "low", "high"}``; ``n == 0`` gives NaN.
    """
    vals = list(by_seed(rows, method, key, 100.0).values())
    if not vals:
        return {"n": 0, "mean": float("nan"), "low": float("nan"), "high": float("nan")}
    low, high = paired_bootstrap_ci(vals)
    return {"n": len(vals), "mean": statistics.fmean(vals), "low": low, "high": high}


def compare(rows: Sequence[dict], a: str, b: str, key: str) -> dict:
    """Paired difference ``a - b`` of ``key`` in Dice points over the seeds both have (``paired_difference``)."""
    return paired_difference(by_seed(rows, a, key, 100.0), by_seed(rows, b, key, 100.0))


def curve_means(history: Sequence[dict], method: str, epochs: Sequence[int]) -> list[float]:
    """Mean over seeds of ``method``'s worst-vendor validation Dice (%) at each of ``epochs`` (NaN when absent)."""
    out = []
    for e in epochs:
        vals = [100 * float(h["val_worst"]) for h in history if h["method"] == method and int(h["epoch"]) == e]
        out.append(statistics.fmean(vals) if vals else float("nan"))
    return out


def _interval(s: dict) -> str:
    return f"{s['mean']:.1f} [{s['low']:.1f}, {s['high']:.1f}]"


def _difference(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], {d['positive']}/{d['n']}"


def format_markdown(rows: Sequence[dict], history: Sequence[dict], args: argparse.Namespace, meta: dict) -> str:
    """The markdown tables of a run (``<stem>.md``).

    Args:
        rows: ``RUN_FIELDS`` rows (numbers as numbers or strings).
        history: ``HISTORY_FIELDS`` rows.
        args: the parsed command line (``parse_args``).
        meta: ``command``, ``done`` (seeds completed), ``wall`` (seconds), ``when`` (text), ``machine`` (text),
            ``eval_volumes`` (``{"val": [per vendor], "test": [per vendor]}``).
    """
    minority = args.minority_vendor
    seeds = sorted({int(r["seed"]) for r in rows})
    students = f"students {args.epochs} epochs, teacher {args.teacher_epochs} epochs"
    hyper = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in HYPER[m].items()) for m in ARMS)
    held_out = [m for m in METHODS if uses_held_out_update(m)]
    every = args.select_on == "half"
    selection = ""
    if held_out or every:
        selection = (
            f" ({'every student' if every else ', '.join(held_out)} on the first half of the validation subjects of "
            "each vendor"
            + (f"; the second half drives the held-out DRO update of {', '.join(held_out)}" if held_out else "")
            + "; teachers on the whole split)"
        )
    runs, hist = (output_paths(args)[k].name for k in ("runs", "history"))
    lines = [
        "# Worst-vendor segmentation benchmark (cardiac MRI, synthetic M&Ms layout)",
        "",
        "GroupDistil against plain KD, ERM and GroupDRO students of a 2-D cardiac U-Net (LV, MYO, RV), one teacher "
        f"per seed, vendor {minority} a {100 * args.minority:g} % minority of training; produced by "
        "`benchmarks/worst_group_seg.py` (its docstring describes the protocol; these tables are generated, the "
        "repository's `docs/results_segmentation.md` reads them). Command:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Run {meta['when']} on {meta['machine']}: {meta['done']} of {args.seeds} seeds "
        f"({', '.join(map(str, seeds))}), {meta['wall'] / 60:.1f} min wall so far{meta.get('note', '')}.",
        "",
        f"Data per seed: {args.train_subjects} training subjects (vendor {minority}: "
        f"{round(args.minority * args.train_subjects)}; the others share the rest), two frames (ED, ES) each, the "
        f"annotated slices as 2-D training samples. Validation {args.val_per_vendor} and test {args.test_per_vendor} "
        "subjects per vendor, the same for every seed (volumes per vendor A/B/C/D: validation "
        f"{'/'.join(map(str, meta['eval_volumes']['val']))}, test {'/'.join(map(str, meta['eval_volumes']['test']))}). "
        f"{args.size} x {args.size} pixels over {FOV_MM:g} mm; {students}; AdamW lr {args.lr} annealed to 0 along a "
        f"cosine, batch {BATCH_SIZE}, temperature {TEMPERATURE}, soft-Dice weight {DICE_WEIGHT}. Method "
        f"hyper-parameters (chosen on this benchmark's validation data, unless "
        f"`--hyper` changed them): {hyper}. "
        f"Model selection: best worst-vendor validation Dice{selection}.",
        "",
        "## Test Dice (%), mean over seeds [95 % bootstrap interval of the mean]",
        "",
        f"| network | worst vendor | vendor mean | vendor {minority} | LV | MYO | RV | selected epoch (min-max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("test_worst", "test_mean_group", f"test_{minority}", "test_LV", "test_MYO", "test_RV")
    for m in ARMS:
        if not by_seed(rows, m, "test_worst"):
            continue
        ep = list(by_seed(rows, m, "epoch").values())
        cells = [_interval(arm_summary(rows, m, k)) for k in keys] + [f"{min(ep):g}-{max(ep):g}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired differences (test Dice points): mean [paired 95 % bootstrap interval over seeds], seeds > 0",
        "",
        f"| comparison | worst vendor | vendor mean | vendor {minority} |",
        "|---|---|---|---|",
    ]
    for a, b in COMPARISONS:
        diffs = [compare(rows, a, b, k) for k in ("test_worst", "test_mean_group", f"test_{minority}")]
        if diffs[0]["n"]:
            lines.append(f"| {a} - {b} | " + " | ".join(_difference(d) for d in diffs) + " |")
    lines += ["", "Per seed (test worst-vendor Dice, %):", "", "| seed | " + " | ".join(ARMS) + " |"]
    lines.append("|---" * (len(ARMS) + 1) + "|")
    for s in seeds:
        cells = [by_seed(rows, m, "test_worst", 100.0).get(s) for m in ARMS]
        lines.append(f"| {s} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |")
    if history:
        n_epochs = max(int(h["epoch"]) for h in history)
        marks = sorted({max(1, round(n_epochs * q)) for q in (0.25, 0.5, 0.75, 0.9)} | {n_epochs})
        lines += [
            "",
            "Validation worst-vendor Dice (%) against the epoch, mean over seeds (is training still improving?):",
            "",
            "| network | " + " | ".join(f"epoch {e}" for e in marks) + " |",
            "|---" * (len(marks) + 1) + "|",
        ]
        for m in ARMS:
            vals = curve_means(history, m, marks)
            if any(v == v for v in vals):
                lines.append(f"| {m} | " + " | ".join("" if v != v else f"{v:.1f}" for v in vals) + " |")
    lines += [
        "",
        f"Every run: [`{runs}`]({runs}); every epoch's validation Dice: [`{hist}`]({hist}).",
    ]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """Write ``rows`` (exactly the keys ``fields``) to ``path`` with a header, whole and atomically (a run killed while
    writing leaves the previous file, which ``--resume`` reads)."""
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The files of a run: ``{"md", "runs", "history"}`` -> ``<out>/<stem>.md``, ``<stem>_runs.csv``,
    ``<stem>_history.csv``."""
    out, stem = Path(args.out), args.stem
    return {"md": out / f"{stem}.md", "runs": out / f"{stem}_runs.csv", "history": out / f"{stem}_history.csv"}


def write_outputs(rows: Sequence[dict], history: Sequence[dict], args: argparse.Namespace, meta: dict) -> None:
    """Rewrite the runs and history CSVs and the markdown tables of ``output_paths(args)`` (generated files only:
    the reading of a run belongs in ``docs/results_segmentation.md``, which no run writes)."""
    paths = output_paths(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_csv(paths["runs"], RUN_FIELDS, rows)
    write_csv(paths["history"], HISTORY_FIELDS, history)
    with atomic_write(paths["md"]) as temporary:
        temporary.write_text(format_markdown(rows, history, args, meta))


def load_complete_seeds(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The rows of the seeds that an earlier run under ``args.out`` completed (the teacher and every student of
    ``args.methods``), for
    ``--resume``; incomplete seeds and seeds outside the planned range are dropped.

    Returns:
        ``(runs, history)``: rows as read from ``<stem>_runs.csv`` and ``<stem>_history.csv`` (strings); empty lists
        when the runs CSV does not exist.

    Raises:
        ValueError: when a kept row was trained with other epochs or another teacher (``--teacher``) than ``args``
            asks for.
    """
    paths = output_paths(args)
    runs_path, history_path = paths["runs"], paths["history"]
    if not runs_path.exists():
        return [], []
    with open(runs_path, newline="") as f:
        runs = list(csv.DictReader(f))
    history: list[dict] = []
    if history_path.exists():
        with open(history_path, newline="") as f:
            history = list(csv.DictReader(f))
    planned = set(range(args.first_seed, args.first_seed + args.seeds))
    needed = {"teacher", *args.methods}
    complete = {s for s in planned if {r["method"] for r in runs if int(r["seed"]) == s} >= needed}
    runs = [r for r in runs if int(r["seed"]) in complete]
    for r in runs:
        r["teacher"] = r.get("teacher") or "erm"  # CSVs written before the column: every run had the ERM teacher
        want = args.teacher_epochs if r["method"] == "teacher" else args.epochs
        if int(r["epochs"]) != want:
            raise ValueError(
                f"--resume: {runs_path} has seed {r['seed']} {r['method']} trained for {r['epochs']} epochs, the "
                f"command asks for {want}; use another --out."
            )
        if r["teacher"] != args.teacher:
            raise ValueError(
                f"--resume: {runs_path} has seed {r['seed']} from the {r['teacher']} teacher, the command asks for "
                f"--teacher {args.teacher}; use another --out or --stem."
            )
    return runs, [h for h in history if int(h["seed"]) in complete]


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3, help="initial Adam learning rate (cosine to 0)")
    parser.add_argument("--train-subjects", type=int, default=40)
    parser.add_argument("--minority", type=float, default=0.05, help="fraction of the minority vendor in training")
    parser.add_argument("--minority-vendor", default="D", choices=MNMS_VENDORS)
    parser.add_argument("--val-per-vendor", type=int, default=40)
    parser.add_argument("--test-per-vendor", type=int, default=100)
    parser.add_argument("--size", type=int, default=48, help="pixels of the 192 mm field of view")
    parser.add_argument("--matrix-scale", type=float, default=0.6, help="matrix_scale of the generated images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="students to train (default: all four)"
    )
    parser.add_argument(
        "--hyper",
        type=json.loads,
        default=None,
        help='JSON {method: {key: value}} updating HYPER for this run, e.g. \'{"groupdistil": {"weight_by": "ce"}}\'',
    )
    parser.add_argument(
        "--select-on",
        choices=("all", "half"),
        default="all",
        help="students select their epoch on the whole validation split or on its first half (the half that a "
        "student with the held-out update selects on: the same selection data for every arm)",
    )
    parser.add_argument(
        "--teacher",
        choices=("erm", "group_dro"),
        default="erm",
        help="how the teacher is trained: cross entropy + soft Dice with natural sampling, or GroupDROLoss with "
        "group_dro's hyper-parameters (after --hyper)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    parser.add_argument(
        "--stem",
        default=None,
        help="file name stem of the outputs under --out (default worst_group_seg, with --teacher group_dro "
        "worst_group_seg_group_dro_teacher)",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 16 subjects, 2 epochs, 2 + 2 per vendor")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the complete seeds of the --stem CSVs under --out (same epochs and teacher) and train the others",
    )
    args = parser.parse_args(argv)
    if args.stem is None:
        args.stem = "worst_group_seg" if args.teacher == "erm" else f"worst_group_seg_{args.teacher}_teacher"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.stem):
        parser.error(
            f"--stem {args.stem!r}: expected a file name stem (a letter or digit, then letters, digits, '_', '.', '-')"
        )
    if args.teacher == "group_dro" and "teacher" in (args.hyper or {}):
        parser.error(
            "--hyper: the GroupDRO teacher (--teacher group_dro) takes group_dro's hyper-parameters; set them "
            "with --hyper '{\"group_dro\": {...}}' instead of 'teacher'"
        )
    unknown = set(args.hyper or {}) - set(ARMS)
    if unknown:
        parser.error(f"--hyper: unknown method(s) {sorted(unknown)}, expected some of {list(ARMS)}")
    for method, update in (args.hyper or {}).items():
        known = {*HYPER[method], *(["weight_by"] if method == "groupdistil" else [])}  # make_loss reads these
        if method in ("group_dro", "groupdistil"):
            known |= {"update", "held_out_step_size"}
        if set(update) - known:
            parser.error(
                f"--hyper: {method} has no key(s) {sorted(set(update) - known)}; expected some of {sorted(known)}"
            )
        if update.get("update", "batch") not in ("batch", "held_out"):
            parser.error(f"--hyper: {method} update={update['update']!r}; expected 'batch' or 'held_out'")
        if update.get("update") == "held_out" and "held_out_step_size" not in {*update, *HYPER[method]}:
            parser.error(f"--hyper: {method} update 'held_out' needs a held_out_step_size")
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.train_subjects = 1, 2, 2, 16
        args.val_per_vendor, args.test_per_vendor = 2, 2
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for method, update in (args.hyper or {}).items():
        HYPER[method] = {**HYPER[method], **update}
    if args.teacher == "group_dro":  # the classification benchmark's GroupDRO teacher: the GroupDRO student's recipe
        recipe = {k: v for k, v in HYPER["group_dro"].items() if k not in ("update", "held_out_step_size")}
        HYPER["teacher"] = {"loss": "group_dro", **recipe}  # the batch update: no held-out half for teachers
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    minority = args.minority_vendor
    others = [v for v in MNMS_VENDORS if v != minority]
    train_fr = {v: args.minority if v == minority else (1 - args.minority) / len(others) for v in MNMS_VENDORS}
    balanced = {v: 0.25 for v in MNMS_VENDORS}
    val = make_split("val", 4 * args.val_per_vendor, balanced, VAL_SEED, args.size, args.matrix_scale)
    test = make_split("test", 4 * args.test_per_vendor, balanced, TEST_SEED, args.size, args.matrix_scale)
    eval_volumes = {
        name: [sum(v["group"] == g for v in vols) for g in range(len(MNMS_VENDORS))]
        for name, vols in (("val", val), ("test", test))
    }
    val_select, val_held_out = split_validation(val)
    halves = {"val_select": stack_volumes(val_select), "val_held_out": train_slices(val_held_out)}
    val, test = stack_volumes(val), stack_volumes(test)
    print(f"evaluation data: {eval_volumes} volumes per vendor ({time.perf_counter() - start:.0f} s)", flush=True)
    md = output_paths(args)["md"]
    rows: list[dict] = []
    history: list[dict] = []
    if args.resume:
        rows, history = load_complete_seeds(args)
    kept = sorted({int(r["seed"]) for r in rows})
    note = f"; seeds {', '.join(map(str, kept))} from an earlier invocation (not in this wall time)" if kept else ""
    command = shlex.join(sys.argv[1:] if argv is None else argv)

    def write(done: int) -> None:
        meta = {
            "command": f"OMP_NUM_THREADS=1 python benchmarks/worst_group_seg.py {command}".rstrip(),
            "done": done,
            "wall": time.perf_counter() - start,
            "when": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC (last write)",
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, shared with other jobs; {args.threads} torch "
            f"thread(s)), torch {torch.__version__}",
            "eval_volumes": eval_volumes,
            "note": note,
        }
        write_outputs(rows, history, args, meta)

    todo = [s for s in range(args.first_seed, args.first_seed + args.seeds) if s not in kept]
    print(f"seeds kept from {args.out}: {kept}; to train: {todo}", flush=True)
    for done, seed in enumerate(todo, start=len(kept) + 1):
        t0 = time.perf_counter()
        volumes = make_split("train", args.train_subjects, train_fr, seed, args.size, args.matrix_scale)
        data = {"train": train_slices(volumes), "val": val, "test": test, **halves}
        print(f"seed {seed}: {len(data['train'])} training slices ({time.perf_counter() - t0:.0f} s)", flush=True)
        teacher = cache = None
        for method in ("teacher", *args.methods):
            t1 = time.perf_counter()
            epochs = args.teacher_epochs if method == "teacher" else args.epochs
            r = train(method, data, epochs, args.lr, seed, teacher=teacher, cache=cache, select_on=args.select_on)
            r["seconds"] = time.perf_counter() - t1
            if method == "teacher":
                teacher = r["network"]
                cache = filled_teacher_cache(teacher, data["train"])  # in memory; shared by KD and GroupDistil
            rows.append(result_row(seed, method, epochs, r, teacher=args.teacher))
            history.extend(history_rows(seed, method, r["history"]))
            last = r["history"][-1]["val"]["worst"]
            print(
                f"seed {seed} {method:12s} epoch {r['epoch']:2d}/{epochs} val worst {100 * r['val']['worst']:.1f} "
                f"(last {100 * last:.1f}) test worst {100 * r['test']['worst']:.1f} mean "
                f"{100 * r['test']['mean_group']:.1f} ({r['seconds']:.0f} s)",
                flush=True,
            )
        write(done)
    if not todo and rows:  # every planned seed was already complete: the outputs are rewritten from the CSVs
        write(len(kept))
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; {md}")


if __name__ == "__main__":
    main()
