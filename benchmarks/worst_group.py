"""Worst-group benchmark: GroupDistil against KD, ERM and GroupDRO students on synthetic multi-vendor cardiac MRI
and a synthetic Waterbirds stand-in.

The default run (``python benchmarks/worst_group.py``; ``--families`` picks some) trains three setting families,
each with the arms and hyper-parameters its own sweep chose on validation data (``FAMILIES``: the arguments of its
settings, the recipe of its GroupDRO teacher and its ``--students``; arguments given on the command line, such as
``--seeds``, ``--out`` or ``--quick``, are applied after a family's own):

- ``minority``: vendor D at 2, 5 and 10 % of 150 training subjects (the issue-13 settings), ERM, GroupDRO, and KD
  and GroupDistil from each teacher;
- ``correlation``: the calibrated vendor x pathology correlation (0.9, 300 training subjects), ERM and GroupDRO
  only (GroupDRO did not beat ERM there, so the distillation methods are not compared);
- ``waterbirds``: the calibrated synthetic Waterbirds (colour cue 0.9, 4,000 images at 32 px, 10 epochs), ERM,
  GroupDRO, KD sampling naturally, and KD and GroupDistil from each teacher.

Every student selects its epoch on the first half of the validation split. The outputs (``worst_group_runs.csv``,
one ``setting`` value per setting; ``worst_group.md``, led by each family's declared comparisons;
``worst_group.png``) are rewritten after every setting of every seed. ``--settings`` instead runs the settings
below with one set of arms (``--arms`` / ``--students``) and ``HYPER`` (``--hyper``), as the per-study commands of
docs/results_studies.md do.

Data (``make_synthetic_mnms``, 4 frames, ``matrix_scale`` 0.5, read with the package's loader and
``cardiac_preprocessing``: ED mid-ventricular slice, ``--size`` pixels over a 128 mm field of view):

- one **evaluation pool** per run, shared by every seed and setting: ``--val-per-cell`` validation and
  ``--test-per-cell`` test subjects in each of the 12 vendor x pathology cells (NOR / HCM / DCM; no
  vendor-pathology correlation), generated once with ``--eval-seed``;
- one **training split** of ``--train-subjects`` subjects per setting and seed (generator seed = the seed).

Preprocessed tensors are cached under ``--cache`` (keyed by every generator and preprocessing argument), so a
rerun or the sweep does not generate the data again; the cache does not change any number.

Settings (``--settings``; their knobs are arguments):

- ``minority``: one setting per ``--fractions`` value f (default 2 %, 5 %, 10 %): ``--minority-vendor`` (default D,
  the noisiest, lowest-contrast vendor) is a fraction f of the training split, the other three vendors share the
  rest equally; groups are the 4 vendors. Validation: ``ceil(--val-per-cell / 3)`` subjects per cell (so at least
  ``--val-per-cell`` per vendor); test: the whole pool (``3 * --test-per-cell`` per vendor).
- ``correlation``: vendors balanced, but a fraction ``--correlation`` of every vendor's training subjects has that
  vendor's "correlated" pathology (A NOR, B HCM, C DCM, D NOR); groups are the 12 vendor x pathology cells
  (validation and test uncorrelated: the whole pool).
- ``waterbirds``: the synthetic Waterbirds stand-in (``make_synthetic_waterbirds``):
  a training split of ``--images`` images per seed (generator seed = the seed; place = label in
  ``--waterbirds-correlation`` of them) and, shared by every seed, a group-balanced evaluation pool of
  ``--wb-val-per-group`` validation and ``--wb-test-per-group`` test images per group (generator seed
  ``--eval-seed``; the generator draws the place independently of the label outside training). Generator knobs:
  ``--colour-cue`` (``--landbird-colour-cue`` for the landbirds alone), ``--bird-scale`` (``--group-bird-scale``
  for some groups), ``--place-noise`` (the pixel noise of one place), ``--waterbirds-image-size``; the setting's
  name holds them all
  (``waterbirds_c0.95_cue0.8_s1_px32_n4000``), and so do the cache keys. Groups are the 4 label x place cells.

With ``--settings``, per setting and seed (``--arms all``, the default): two teachers (a wider, deeper 2-D ResNet,
widths 16-128, two blocks per stage), one trained with cross entropy (``erm``) and one with ``GroupDROLoss``
(``group_dro``, the GroupDRO winner's step size, adjustment and sampling), then six students of one architecture
and budget (ResNet widths 8-64, one block per stage) with ``DistillationTrainer``: ``erm`` and ``group_dro``
without a teacher, ``kd`` (``DistillationLoss``) and ``groupdistil`` (``GroupDistillationLoss``) from each teacher.
Every network is initialised right after ``set_determinism(seed)`` and every data order comes from a generator
seeded with the seed (natural sampling: a shuffling ``DataLoader``; ``balanced``: ``GroupBalancedSampler``), so the
same command gives the same numbers (with the same thread count, ``--threads``, default 1).

After every epoch a network is evaluated on the validation split; the epoch is selected by the worst-group
validation accuracy (ties: average validation accuracy, then the later epoch) and, as a second rule, by the
average validation accuracy; only the selected epochs are evaluated on test. "Average accuracy" weights each
group's accuracy by its share of the training split (Sagawa et al.); the worst-group accuracy is the minimum over
the groups.

Outputs (``--out``, default ``docs/results``; rewritten after every setting of every seed): ``<stem>_runs.csv``
(one row per setting, seed, model, method, teacher and selection rule), ``<stem>.md`` and ``<stem>.png``
(worst-group accuracy of every arm: against the minority fraction, and per other setting). The stem is
``worst_group`` for the default run, ``worst_group_<settings>`` for ``--settings`` (or ``--stem``). The default
run's summary gives each family's protocol, its declared comparisons (paired 95 % bootstrap intervals over seeds of
the differences, the number of positive seeds), every arm's means, every GroupDistil arm against every KD arm and
the per-group accuracies and DRO weights; with ``--settings``, the differences to KD and to ERM.
``--arms baselines`` trains the ERM and GroupDRO students only; ``--arms distil`` both teachers and, from each, KD
and GroupDistil with ``weight_by`` "loss", "ce" and "kd" (``groupdistil``, ``groupdistil_ce``, ``groupdistil_kd``;
the runs CSV has a ``weight_by`` column). Every network is trained with AdamW (``--lr``, default 1e-3) and its
method's ``weight_decay`` (a key of ``HYPER`` and ``SWEEP_GRID``; 0, exactly Adam, unless ``--hyper`` or the sweep
says otherwise). ``--hyper '{"erm": {"weight_decay": 0.1}}'`` updates ``HYPER`` for one run; ``--history`` also
writes every epoch of every network (validation and training accuracy per group, DRO weights) to
``<stem>_history.csv``; ``--stem`` names the outputs; ``--merge-from`` rewrites the tables from the runs CSVs of
several invocations (e.g. blocks of seeds run in parallel).

``--calibrate`` (synthetic Waterbirds, baselines only, validation data only) trains ERM with natural sampling, ERM
with ``GroupBalancedSampler`` and GroupDRO (``--cal-arms``) on every combination of ``--cal-correlation``,
``--cal-colour-cue``, ``--cal-bird-scale``, ``--cal-images`` and ``--cal-weight-decay``, for ``max(--cal-epochs)``
epochs (a shorter budget selects among the first epochs), and applies a fixed rule: ERM's worst-group validation
accuracy at least ``--cal-gap`` below its average and group-balanced ERM's worst group at least
``--cal-min-balanced``; among those, the highest group-balanced ERM worst group. Outputs
``waterbirds_calibration.csv`` / ``_history.csv`` / ``.md``; ``--cal-from`` merges the CSVs of parallel runs.

Held-out DRO update (GroupDistil and GroupDRO; the ``update`` key of a configuration, and a column of the runs
CSV for those arms): the validation split is halved group by group (``monai.data.partition_dataset_classes``,
ratios 1:1, shuffled with ``--val-split-seed``, as the bundles do). With ``"update": "held_out"`` the loss only
applies its weights in training; ``HeldOutGroupDROHandler`` takes the exponentiated-gradient step, of size
``held_out_step_size``, on the per-group losses (the ``weight_by`` quantity) of the network, and of the teacher for
GroupDistil, on the second half, every epoch (``held_out_every`` 0, the default) or every ``held_out_every``
iterations; the epoch is selected on the first half. ``--select-on half`` makes every student select on the first
half (the same selection data for every arm); teachers always select on the whole split. The runs CSV records the
number of images the epoch was selected on (``val_select_n``) and each student's ``base_method``.

``--students '{"label": {"method": "groupdistil", "teacher": "erm", "weight_by": "ce", "update": "held_out",
"held_out_step_size": 1.0, "weight_decay": 1.0}, ...}'`` trains these student arms (``HYPER`` of the method updated
by the keys), and the teachers they name, instead of ``--arms``; the summary then also compares every GroupDistil
arm with every KD arm (paired intervals; the 5-point target) and lists per-group test and training accuracy and DRO
weights at the selected epoch.

``--sweep`` instead trains every configuration of ``SWEEP_GRID`` (with the ERM teacher, or each teacher of
``--sweep-teachers``) on ``--sweep-seeds`` seeds from 1000 and scores it on validation data only; it writes
``worst_group_sweep.csv`` and ``worst_group_sweep.md`` (the winners, which are the values of ``HYPER``; with two
teachers, the winners overall, the teacher a key of the configuration, and per teacher). ``--sweep-grid`` replaces
values of the grid and may add keys (``weight_by``, ``update``, ``held_out_step_size``, ``held_out_every``, and
``width``, the student's first-stage width: 8 by default, a smaller one a student of less capacity); a
batch-update configuration drops the held-out keys and a held-out one ``step_size``. ``--history`` also writes every
epoch of every configuration to ``<stem>_sweep_history.csv``. A sweep of settings other than the minority ones
writes ``worst_group_<settings>...`` files instead.

Usage:
    python benchmarks/worst_group.py                 # the default run: every family, 10 seeds
    python benchmarks/worst_group.py --resume        # complete an interrupted default run (skips finished seeds)
    python benchmarks/worst_group.py --families waterbirds --seeds 3 --out /tmp/wb   # one family, 3 seeds
    python benchmarks/worst_group.py --sweep         # the hyper-parameter sweep (validation data only)
    python benchmarks/worst_group.py --quick --out /tmp/wg   # the whole pipeline on a tiny configuration
    python benchmarks/worst_group.py --calibrate --quick --out /tmp/wg   # the calibration on a tiny configuration
    # the commands of the Waterbirds tables: docs/results_studies.md, "Spurious-correlation setting"
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import inspect
import itertools
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import monai
import numpy
import torch
from ignite.engine import Events
from monai.data import partition_dataset_classes
from monai.networks.nets import ResNet
from monai.utils import set_determinism
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundles" / "shared"))  # the bundles' scripts
from worst_group_stats import paired_bootstrap_ci, paired_difference, sweep_winners  # noqa: E402

from monai_groupdistil.data import (
    MNMS_VENDORS,
    WATERBIRDS_GROUP_NAMES,
    GroupBalancedSampler,
    load_mnms_datalist,
    load_waterbirds_datalist,
    mnms_group_names,
)
from monai_groupdistil.engines import DistillationTrainer, TeacherOutputCache  # noqa: E402
from monai_groupdistil.engines.checkpoint_saver import atomic_write  # noqa: E402
from monai_groupdistil.handlers import HeldOutGroupDROHandler  # noqa: E402
from monai_groupdistil.losses import DistillationLoss, GroupDistillationLoss, GroupDROLoss  # noqa: E402
from monai_groupdistil.metrics import compute_group_accuracy  # noqa: E402
from scripts import cardiac_preprocessing, make_synthetic_mnms, make_synthetic_waterbirds, natural_image_preprocessing

CLASSES = ("NOR", "HCM", "DCM")
METHODS = ("erm", "group_dro", "kd", "groupdistil")
TEACHERS = ("erm", "group_dro")
# (model, method, teacher) of every network trained per setting and seed, in training order
ARMS = (
    ("teacher", "erm", ""),
    ("teacher", "group_dro", ""),
    ("student", "erm", ""),
    ("student", "group_dro", ""),
    ("student", "kd", "erm"),
    ("student", "groupdistil", "erm"),
    ("student", "kd", "group_dro"),
    ("student", "groupdistil", "group_dro"),
)
# ``--arms distil``: both teachers and, from each, KD (with KD's sampler, and ``kd_balanced`` with the
# group-balanced sampler) and GroupDistil with each quantity driving its DRO weights (``weight_by`` of
# GroupDistillationLoss: "loss" for ``groupdistil``, "ce" / "kd" for the two variants)
GROUPDISTIL_WEIGHT_BY = {"groupdistil": "loss", "groupdistil_ce": "ce", "groupdistil_kd": "kd"}
ARMS_DISTIL = (
    ("teacher", "erm", ""),
    ("teacher", "group_dro", ""),
    *(("student", m, t) for t in TEACHERS for m in ("kd", "kd_balanced", *GROUPDISTIL_WEIGHT_BY)),
)
# ``--arms baselines``: the ERM and GroupDRO students, and ERM with natural sampling (``erm_natural``: the standard
# ERM of the literature, whatever sampler the ``erm`` arm uses)
ARMS_BASELINES = (("student", "erm", ""), ("student", "erm_natural", ""), ("student", "group_dro", ""))
ALL_ARMS = ARMS + tuple(a for a in ARMS_DISTIL + ARMS_BASELINES if a not in ARMS)
TEMPERATURE = 4.0
BATCH_SIZE = 16  # every network's training batch (and the batches that fill a teacher's output cache)
# Each method's hyper-parameters: the winners of `--sweep` (validation data only; docs/results_studies.md, "Sweep").
# GroupDistil's tied on worst-group validation accuracy with five others; it was picked by a last-bit float
# difference, where the stated tie-break (the average) picks absent_groups "ema" with adjustment 1.0. Kept: the
# issue-13 tables ran with it.
# ``weight_decay`` is AdamW's (0: exactly Adam, the optimiser of the sweep that chose these values).
HYPER: dict[str, dict] = {
    "erm": {"sampler": "balanced", "weight_decay": 0.0},
    "group_dro": {"step_size": 1.0, "adjustment": 0.0, "sampler": "balanced", "weight_decay": 0.0},
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
SAMPLERS = ("natural", "balanced")
# weight decay: (0.0,) is the grid of the committed sweep; ``--sweep-weight-decay`` replaces it for a run
SWEEP_GRID: dict[str, dict[str, tuple]] = {
    "erm": {"sampler": SAMPLERS, "weight_decay": (0.0,)},
    "kd": {"alpha": (0.5, 0.9), "sampler": SAMPLERS, "weight_decay": (0.0,)},
    "group_dro": {"step_size": (0.01, 0.1, 1.0), "adjustment": (0.0, 1.0), "sampler": SAMPLERS, "weight_decay": (0.0,)},
    "groupdistil": {
        "alpha": (0.5, 0.9),
        "step_size": (0.01, 0.1, 1.0),
        "absent_groups": ("ema", "zero"),
        "adjustment": (0.0, 1.0),
        "sampler": SAMPLERS,
        "weight_decay": (0.0,),
    },
}
SWEEP_OVERRIDE: dict[str, dict] = {}  # ``--sweep-grid``: values replacing those of SWEEP_GRID for one run
SWEEP_KEYS = (
    "alpha",
    "step_size",
    "absent_groups",
    "adjustment",
    "sampler",
    "weight_decay",
    "weight_by",
    "update",
    "held_out_step_size",
    "held_out_every",
    "width",
)
# the DRO weight update (``update`` of GroupDROLoss / GroupDistillationLoss): "batch", every training batch with
# ``step_size``; "held_out", a step of ``held_out_step_size`` on the per-group losses of the held-out half of the
# validation split, every epoch (``held_out_every`` 0) or every ``held_out_every`` iterations
UPDATES = ("batch", "held_out")
HELD_OUT_KEYS = ("held_out_step_size", "held_out_every")
# ``--students``: {label: (base method, teacher, hyper-parameters)} of the student arms of one run
CUSTOM_STUDENTS: dict[str, tuple[str, str, dict]] = {}
STUDENT_WIDTH = 8

# The default run (issue 21): three setting families, each with the hyper-parameters its own sweep chose on
# validation data (docs/results.md names the sweep of every value) and the arms that answer its question. A family
# is the command-line arguments of its settings, the ``--hyper`` of its GroupDRO teacher and its ``--students``
# (labels shared by the families); the arguments given on the command line come after them (``--seeds``, ``--out``,
# ``--quick``, ...). ``comparisons``: the paired differences the summary leads with, (arm, reference arm).
_WATERBIRDS = {"sampler": "balanced", "weight_decay": 1.0}  # the waterbirds sweeps' winners, every student method
FAMILIES: dict[str, dict] = {
    # three rare-vendor settings (issue 13), minority_options_sweep (vendor D 5 %, seeds 1000-1004); HYPER holds
    # this family's GroupDRO winner, the GroupDRO teacher's recipe
    "minority": {
        "argv": ["--settings", "minority", "--fractions", "0.02", "0.05", "0.1", "--select-on", "half"],
        "hyper": {},
        "students": {
            "erm_nat": {"method": "erm", "sampler": "natural", "weight_decay": 0.0},
            "erm_win": {"method": "erm", "sampler": "balanced", "weight_decay": 0.1},
            "group_dro_win": {"method": "group_dro", "step_size": 1.0, "adjustment": 0.0, "sampler": "balanced",
                              "weight_decay": 0.0},
            "kd_erm": {"method": "kd", "teacher": "erm", "alpha": 0.9, "sampler": "natural", "weight_decay": 1.0},
            "gd_erm": {"method": "groupdistil", "teacher": "erm", "alpha": 0.5, "step_size": 0.1,
                       "absent_groups": "zero", "adjustment": 0.0, "sampler": "balanced", "weight_decay": 0.0,
                       "weight_by": "ce", "update": "batch"},
            "kd_dro": {"method": "kd", "teacher": "group_dro", "alpha": 0.5, "sampler": "balanced",
                       "weight_decay": 0.0},
            "gd_dro": {"method": "groupdistil", "teacher": "group_dro", "alpha": 0.1, "absent_groups": "zero",
                       "adjustment": 0.0, "sampler": "balanced", "weight_decay": 0.0, "weight_by": "loss",
                       "update": "held_out", "held_out_step_size": 1.0, "held_out_every": 0},
        },
        "comparisons": [("group_dro_win", "erm_nat"), ("group_dro_win", "erm_win"), ("gd_erm", "kd_erm"),
                        ("gd_dro", "kd_dro"), ("gd_erm", "erm_win")],
    },
    # the calibrated vendor x pathology correlation (correlation 0.9, 300 subjects), correlation_base_sweep: GroupDRO
    # did not beat ERM there (the anchor failed), so no distillation arms (issue 21: find out why first)
    "correlation": {
        "argv": ["--settings", "correlation", "--correlation", "0.9", "--train-subjects", "300", "--select-on",
                 "half"],
        "hyper": {},
        "students": {
            "erm_nat": {"method": "erm", "sampler": "natural", "weight_decay": 1.0},
            "erm_win": {"method": "erm", "sampler": "balanced", "weight_decay": 0.1},
            "group_dro_win": {"method": "group_dro", "step_size": 0.01, "adjustment": 0.0, "sampler": "balanced",
                              "weight_decay": 1.0},
            "group_dro_nat": {"method": "group_dro", "step_size": 0.1, "adjustment": 0.0, "sampler": "natural",
                              "weight_decay": 0.1},
        },
        "comparisons": [("group_dro_win", "erm_nat"), ("group_dro_win", "erm_win"), ("group_dro_nat", "erm_nat")],
    },
    # the calibrated synthetic Waterbirds (waterbirds_calibration), waterbirds_sweep (ERM, GroupDRO) and
    # waterbirds_distil_resweep (KD and GroupDistil from each teacher); kd_erm_nat: plain KD, sampling naturally
    "waterbirds": {
        "argv": ["--settings", "waterbirds", "--size", "32", "--waterbirds-image-size", "32", "--colour-cue", "0.9",
                 "--images", "4000", "--epochs", "10", "--teacher-epochs", "10", "--train-eval-per-group", "250",
                 "--select-on", "half"],
        "hyper": {"group_dro": {"step_size": 0.1, "adjustment": 0.0, **_WATERBIRDS}},
        "students": {
            "erm_nat": {"method": "erm", "sampler": "natural", "weight_decay": 0.1},
            "erm_win": {"method": "erm", **_WATERBIRDS},
            "group_dro_win": {"method": "group_dro", "step_size": 0.1, "adjustment": 0.0, **_WATERBIRDS},
            "kd_erm_nat": {"method": "kd", "teacher": "erm", "alpha": 0.5, "sampler": "natural", "weight_decay": 1.0},
            "kd_erm": {"method": "kd", "teacher": "erm", "alpha": 0.5, **_WATERBIRDS},
            "gd_erm": {"method": "groupdistil", "teacher": "erm", "alpha": 0.5, "step_size": 0.1,
                       "absent_groups": "zero", "adjustment": 0.0, **_WATERBIRDS, "weight_by": "loss",
                       "update": "batch"},
            "kd_dro": {"method": "kd", "teacher": "group_dro", "alpha": 0.9, **_WATERBIRDS},
            "gd_dro": {"method": "groupdistil", "teacher": "group_dro", "alpha": 0.5, "step_size": 0.1,
                       "absent_groups": "zero", "adjustment": 0.0, **_WATERBIRDS, "weight_by": "ce",
                       "update": "batch"},
        },
        "comparisons": [("group_dro_win", "erm_nat"), ("group_dro_win", "erm_win"), ("gd_erm", "kd_erm_nat"),
                        ("gd_erm", "kd_erm"), ("gd_dro", "kd_dro"), ("gd_erm", "kd_dro")],
    },
}  # fmt: skip
BASE_HYPER = copy.deepcopy(HYPER)  # HYPER before a family's or --hyper's update


def environment() -> str:
    """The software and CPU the numbers came from: CPU training is bitwise reproducible on one machine, not across
    machines (the kernels differ with the CPU's instruction set), so the tables name both."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}, numpy "
        f"{numpy.__version__}; CPU {cpu} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} "
        "torch thread(s)"
    )


def resnet(width: int, layers: list[int], channels: int, classes: int) -> ResNet:
    return ResNet(
        "basic",
        layers,
        [width, 2 * width, 4 * width, 8 * width],
        spatial_dims=2,
        n_input_channels=channels,
        num_classes=classes,
        conv1_t_stride=2,
    )


def student(channels: int = 1, classes: int = len(CLASSES), width: int = STUDENT_WIDTH) -> ResNet:
    """The student network: widths ``width`` to ``8 * width`` (default 8-64), one basic block per stage."""
    return resnet(width, [1, 1, 1, 1], channels, classes)


def teacher_net(channels: int = 1, classes: int = len(CLASSES)) -> ResNet:
    return resnet(16, [2, 2, 2, 2], channels, classes)


# ----------------------------------------------------------------------------------------------------- settings


def settings_of(args: argparse.Namespace) -> list[dict]:
    """The settings of a run: name, kind and parameters."""
    out = []
    for kind in args.settings:
        if kind == "minority":
            for f in args.fractions:
                out.append({"name": f"minority_{args.minority_vendor}_{100 * f:g}pct", "kind": kind, "fraction": f})
        elif kind == "correlation":
            out.append({"name": f"correlation_{args.correlation:g}", "kind": kind})
        else:
            out.append(
                waterbirds_setting(
                    args.waterbirds_correlation,
                    args.colour_cue,
                    args.bird_scale,
                    args.waterbirds_image_size,
                    args.images,
                    args.landbird_colour_cue,
                    args.group_bird_scale,
                    args.place_noise,
                )
            )
    return out


def waterbirds_setting(
    correlation: float,
    colour_cue: float,
    bird_scale: float,
    image_size: int,
    images: int,
    landbird_colour_cue: float | None = None,
    group_bird_scale: dict[str, float] | None = None,
    place_noise: dict[str, float] | None = None,
) -> dict:
    """A synthetic Waterbirds setting; its name holds every generator knob (``waterbirds_c0.95_cue0.7_s1_px32_n3000``:
    correlation, colour cue, bird scale, image size, training images; ``..._cue0.9_land0.3_...`` with a landbird
    colour cue of its own; ``..._s1_ll0.5_...`` with landbird/land's birds at half the bird scale;
    ``..._s1_landnoise0.4_...`` with the land images at pixel noise 0.4)."""
    land = "" if landbird_colour_cue is None else f"_land{landbird_colour_cue:g}"
    scales = "".join(f"_{short_group(g)}{f:g}" for g, f in sorted((group_bird_scale or {}).items()))
    scales += "".join(f"_{p}noise{v:g}" for p, v in sorted((place_noise or {}).items()))
    setting = {
        "name": f"waterbirds_c{correlation:g}_cue{colour_cue:g}{land}_s{bird_scale:g}{scales}_px{image_size}_n{images}",
        "kind": "waterbirds",
        "correlation": float(correlation),
        "colour_cue": float(colour_cue),
        "bird_scale": float(bird_scale),
        "image_size": int(image_size),
        "images": int(images),
    }
    if landbird_colour_cue is not None:  # absent otherwise, so the settings (and cache keys) of before stay the same
        setting["landbird_colour_cue"] = float(landbird_colour_cue)
    if group_bird_scale:  # the same
        setting["group_bird_scale"] = {g: float(f) for g, f in sorted(group_bird_scale.items())}
    if place_noise:  # the same
        setting["place_noise"] = {p: float(v) for p, v in sorted(place_noise.items())}
    return setting


def short_group(name: str) -> str:
    """``"landbird/land"`` -> ``"ll"`` (the initials of label and place), for setting names."""
    label, place = name.split("/")
    return label[0] + place[0]


def parse_place_noise(text: str) -> tuple[str, float]:
    """``--place-noise`` item ``PLACE=NOISE`` (``land=0.3``) -> ``("land", 0.3)``."""
    place, sep, noise = text.partition("=")
    if not sep or place not in ("land", "water"):
        raise argparse.ArgumentTypeError(f"expected PLACE=NOISE with PLACE land or water, got {text!r}")
    try:
        value = float(noise)
    except ValueError:
        raise argparse.ArgumentTypeError(f"NOISE must be a number, got {noise!r} in {text!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"NOISE must be a finite number >= 0, got {text!r}")
    return place, value


def parse_group_scale(text: str) -> tuple[str, float]:
    """``--group-bird-scale`` item ``GROUP=FACTOR`` (``landbird/land=0.5``) -> ``("landbird/land", 0.5)``."""
    group, sep, factor = text.partition("=")
    if not sep or group not in WATERBIRDS_GROUP_NAMES:
        raise argparse.ArgumentTypeError(
            f"expected GROUP=FACTOR with GROUP in {list(WATERBIRDS_GROUP_NAMES)}, got {text!r}"
        )
    try:
        return group, float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"FACTOR must be a number, got {factor!r} in {text!r}") from None


def _plain(image) -> torch.Tensor:
    """A float32 ``torch.Tensor`` (not a ``MetaTensor``: no metadata to pickle, no dispatch overhead)."""
    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    return image.float().contiguous()


def _cache_path(cache: Path, spec: dict) -> Path:
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"{spec['what']}_{key}.pt"


def _cardiac_tensors(args: argparse.Namespace, splits: tuple[str, ...], make: dict) -> dict:
    """Generate (or read from the cache) synthetic M&Ms splits, all from one ``make_synthetic_mnms`` call;
    ``{split: {"image", "label", "cell"}}`` with ``cell = vendor * 3 + label``."""
    paths = {
        split: _cache_path(Path(args.cache), {"what": f"mnms_{split}", "size": args.size, "make": make, "version": 1})
        for split in splits
    }
    if all(p.exists() for p in paths.values()):
        return {split: torch.load(p, weights_only=True) for split, p in paths.items()}
    preprocess = cardiac_preprocessing(spatial_size=(args.size, args.size), pixdim=(128.0 / args.size,) * 2)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_mnms(tmp, n_frames=4, matrix_scale=0.5, num_workers=0, **make)
        for split, path in paths.items():
            items = [
                preprocess(d) for d in load_mnms_datalist(root, split, group_by=("vendor", "label"), classes=CLASSES)
            ]
            out[split] = {
                "image": torch.stack([_plain(i["image"]) for i in items]),
                "label": torch.tensor([int(i["label"]) for i in items]),
                "cell": torch.tensor([int(i["group"]) for i in items]),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as temporary:  # per-process name: parallel runs may fill the same cache
                torch.save(out[split], temporary)
    return out


def eval_pool(args: argparse.Namespace) -> dict:
    """Validation and test subjects: ``--val-per-cell`` / ``--test-per-cell`` in each vendor x pathology cell."""
    v, t = args.val_per_cell, args.test_per_cell
    make = {
        "n_subjects": 12 * (v + t),
        "seed": args.eval_seed,
        "split_fractions": [0.0, float(v), float(t)],
        "vendor_fractions": {s: {x: 0.25 for x in MNMS_VENDORS} for s in ("train", "val", "test")},
    }
    return _cardiac_tensors(args, ("val", "test"), make)


def _first_per_cell(split: dict, k: int) -> dict:
    """The first ``k`` samples of every cell (the pool is in a fixed order)."""
    keep, seen = [], {}
    for i, c in enumerate(split["cell"].tolist()):
        if seen.get(c, 0) < k:
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    index = torch.tensor(keep)
    return {key: value[index] for key, value in split.items()}


def build_data(args: argparse.Namespace, setting: dict, seed: int, pool: dict | None) -> dict:
    """Tensors (image, label, group) of the train / val / test splits of one setting and seed, the group names
    and the training size of every group; ``val_select`` and ``val_held_out``, the two halves of the validation
    split (:func:`split_validation`)."""
    data = (
        build_waterbirds(args, setting, seed)
        if setting["kind"] == "waterbirds"
        else build_cardiac(args, setting, seed, pool)
    )
    data["val_select"], data["val_held_out"] = split_validation(data["val"], args.val_split_seed)
    return data


def split_validation(val: dict, seed: int) -> tuple[dict, dict]:
    """The validation split in two halves, group by group (``monai.data.partition_dataset_classes``, the groups as
    classes, ratios 1:1, shuffled with ``seed``; an odd group gives its extra sample to the first half), as the
    bundles do: the first selects the epoch, the second drives the held-out DRO update (DFR's split)."""
    parts = partition_dataset_classes(list(range(len(val["group"]))), val["group"].tolist(), [1, 1], True, seed)
    halves = []
    for part in parts:
        index = torch.tensor(sorted(part), dtype=torch.long)
        halves.append({key: value[index] for key, value in val.items()})
    return halves[0], halves[1]


def build_cardiac(args: argparse.Namespace, setting: dict, seed: int, pool: dict | None) -> dict:
    """The cardiac splits of :func:`build_data`."""
    if setting["kind"] == "minority":
        f, minority = setting["fraction"], args.minority_vendor
        others = [v for v in MNMS_VENDORS if v != minority]
        fractions = {v: (f if v == minority else (1.0 - f) / len(others)) for v in MNMS_VENDORS}
        make = {"n_subjects": args.train_subjects, "seed": seed, "split_fractions": [1.0, 0.0, 0.0]}
        make["vendor_fractions"] = {"train": fractions}
        names = mnms_group_names("vendor", CLASSES)
        to_group = lambda cell: cell // len(CLASSES)  # noqa: E731
        val = _first_per_cell(pool["val"], math.ceil(args.val_per_cell / len(CLASSES)))
    else:
        make = {
            "n_subjects": args.train_subjects,
            "seed": seed,
            "split_fractions": [1.0, 0.0, 0.0],
            "vendor_fractions": {"train": {v: 0.25 for v in MNMS_VENDORS}},
            "pathology_vendor_correlation": args.correlation,
        }
        names = mnms_group_names(("vendor", "label"), CLASSES)
        to_group = lambda cell: cell  # noqa: E731
        val = pool["val"]
    data: dict = {"group_names": names, "channels": 1, "classes": len(CLASSES)}
    for split, tensors in (
        ("train", _cardiac_tensors(args, ("train",), make)["train"]),
        ("val", val),
        ("test", pool["test"]),
    ):
        data[split] = {"image": tensors["image"], "label": tensors["label"], "group": to_group(tensors["cell"])}
    data["group_counts"] = torch.bincount(data["train"]["group"], minlength=len(names)).tolist()
    return data


def _waterbirds_tensors(args: argparse.Namespace, spec: dict, splits: tuple[str, ...]) -> dict:
    """Generate (or read from the cache) synthetic Waterbirds splits from one ``make_synthetic_waterbirds`` call;
    ``{split: {"image", "label", "group"}}``. ``spec["make"]`` holds the generator's arguments."""
    path = _cache_path(Path(args.cache), {**spec, "size": args.size, "version": 2})
    if path.exists():
        return torch.load(path, weights_only=True)
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_waterbirds(Path(tmp) / "wb", **spec["make"])
        preprocess = natural_image_preprocessing(spatial_size=args.size, resize=args.size * 8 // 7)
        for split in splits:
            items = [preprocess(d) for d in load_waterbirds_datalist(root, split)]
            data[split] = {
                "image": torch.stack([_plain(i["image"]) for i in items]),
                "label": torch.tensor([int(i["label"]) for i in items]),
                "group": torch.tensor([int(i["group"]) for i in items]),
            }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:  # per-process name: parallel runs may fill the same cache
        torch.save(data, temporary)
    return data


# passed to the generator
WATERBIRDS_KNOBS = ("colour_cue", "landbird_colour_cue", "bird_scale", "group_bird_scale", "place_noise", "image_size")


def waterbirds_eval_pool(args: argparse.Namespace, setting: dict) -> dict:
    """Group-balanced validation and test splits of a Waterbirds setting: the first ``--wb-val-per-group`` /
    ``--wb-test-per-group`` images of every group of one generator call (seed ``--eval-seed``, shared by every
    training seed and correlation; the generator draws the place independently of the label outside training)."""
    v, t = args.wb_val_per_group, args.wb_test_per_group
    knobs = {k: setting[k] for k in WATERBIRDS_KNOBS if k in setting}
    n = math.ceil(4 * (v + t) * 1.3) + 40  # spare images so that every group of each split gets its quota
    while True:  # deterministic: the same arguments give the same pool
        make = {"n_images": n, "seed": args.eval_seed, "correlation": 0.5, "split_fractions": (0.0, v, t), **knobs}
        pool = _waterbirds_tensors(args, {"what": "waterbirds_eval", "make": make}, ("val", "test"))
        counts = {split: torch.bincount(pool[split]["group"], minlength=4) for split in ("val", "test")}
        if int(counts["val"].min()) >= v and int(counts["test"].min()) >= t:
            break
        n *= 2
    out = {}
    for split, k in (("val", v), ("test", t)):
        tensors = {**pool[split], "cell": pool[split]["group"]}
        out[split] = {key: value for key, value in _first_per_cell(tensors, k).items() if key != "cell"}
    return out


def build_waterbirds(args: argparse.Namespace, setting: dict, seed: int) -> dict:
    """The synthetic Waterbirds stand-in: a training split of ``setting["images"]`` images (generator seed = the
    seed, place = label in a fraction ``setting["correlation"]``) and the group-balanced evaluation pool of
    :func:`waterbirds_eval_pool`; groups ``2 * y + place``."""
    knobs = {k: setting[k] for k in WATERBIRDS_KNOBS if k in setting}
    make = {"n_images": setting["images"], "seed": seed, "correlation": setting["correlation"]}
    make.update(split_fractions=(1.0, 0.0, 0.0), **knobs)
    train_split = _waterbirds_tensors(args, {"what": "waterbirds_train", "make": make}, ("train",))["train"]
    data = {"train": train_split, **waterbirds_eval_pool(args, setting)}
    names = list(WATERBIRDS_GROUP_NAMES)
    data = {**data, "group_names": names, "channels": 3, "classes": 2}
    data["group_counts"] = torch.bincount(data["train"]["group"], minlength=len(names)).tolist()
    if args.train_eval_per_group:  # training accuracy per epoch on the first k images of every group (diagnostics)
        tensors = {**data["train"], "cell": data["train"]["group"]}
        k = args.train_eval_per_group
        data["train_eval"] = {key: v for key, v in _first_per_cell(tensors, k).items() if key != "cell"}
    return data


# ----------------------------------------------------------------------------------------------------- training


def evaluate(network: torch.nn.Module, split: dict, num_groups: int, counts: list[int]) -> dict:
    """Per-group, average (training-share weighted) and worst-group accuracy of ``network`` on ``split``."""
    network.eval()
    with torch.no_grad():
        pred = torch.cat([network(x) for x in split["image"].split(256)])
    network.train()
    acc = compute_group_accuracy(pred, split["label"], split["group"], num_groups)
    per_group = acc["per_group"]
    present = ~torch.isnan(per_group)
    weights = torch.tensor(counts, dtype=torch.float64) * present
    average = float((per_group.double().nan_to_num() * weights).sum() / weights.sum())
    worst = int(torch.where(present, per_group, torch.full_like(per_group, 2.0)).argmin())
    n = torch.bincount(split["group"], minlength=num_groups)
    ce = torch.nn.functional.cross_entropy(pred.double(), split["label"], reduction="none")
    loss = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, split["group"], ce) / n.clamp(min=1)
    return {
        "loss_per_group": [float(v) if c else float("nan") for v, c in zip(loss.tolist(), n.tolist())],
        "average": average,
        "worst": float(per_group[worst]),
        "worst_group": worst,
        "per_group": per_group.tolist(),
        "min_group_n": int(n[n > 0].min()),
    }


def _absent_kwargs(loss_class: type, hyper: dict) -> dict:
    """``absent_groups`` for the loss when the loss has the option (the default "ema" needs nothing)."""
    value = hyper.get("absent_groups", "ema")
    if "absent_groups" in inspect.signature(loss_class.__init__).parameters:
        return {"absent_groups": value}
    if value != "ema":
        raise ValueError(f"absent_groups={value!r}: {loss_class.__name__} of this version has no absent_groups option.")
    return {}


def method_hyper(method: str) -> dict:
    """A student method's hyper-parameters: ``HYPER[method]``; a GroupDistil variant has GroupDistil's with its
    ``weight_by``; an arm of ``--students`` its own."""
    if method in CUSTOM_STUDENTS:
        return CUSTOM_STUDENTS[method][2]
    if method in HYPER:
        return HYPER[method]
    if method == "erm_natural":
        return {**HYPER["erm"], "sampler": "natural"}
    if method == "kd_balanced":
        return {**HYPER["kd"], "sampler": "balanced"}
    return {**HYPER["groupdistil"], "weight_by": GROUPDISTIL_WEIGHT_BY[method]}


def base_method(method: str) -> str:
    """The method whose loss a (student) arm trains with: the method itself, or that of a ``--students`` arm."""
    return CUSTOM_STUDENTS[method][0] if method in CUSTOM_STUDENTS else method


def uses_teacher(method: str) -> bool:
    return base_method(method) in ("kd", "kd_balanced") or base_method(method) in GROUPDISTIL_WEIGHT_BY


def has_dro_weights(method: str) -> bool:
    return base_method(method) == "group_dro" or base_method(method) in GROUPDISTIL_WEIGHT_BY


def update_of(hyper: dict) -> str:
    """The DRO weight update of a configuration (``UPDATES``; default "batch")."""
    update = hyper.get("update", "batch")
    if update not in UPDATES:
        raise ValueError(f"update={update!r}: expected one of {UPDATES}.")
    return update


def make_loss(method: str, hyper: dict, data: dict) -> torch.nn.Module:
    """The training loss of a method with its hyper-parameters (``data`` gives the group count and sizes). With
    ``update`` "held_out" the DRO loss only applies its weights and its step size is ``held_out_step_size``."""
    method = base_method(method)
    num_groups = len(data["group_names"])
    adjustment = float(hyper.get("adjustment", 0.0))
    counts = {"adjustment": adjustment, "group_counts": data["group_counts"]} if adjustment else {}
    step = hyper.get("step_size")
    if update_of(hyper) == "held_out":
        if method != "group_dro" and method not in GROUPDISTIL_WEIGHT_BY:
            raise ValueError(f"update='held_out' needs a group-DRO loss, not method {method!r}.")
        counts["update"] = "held_out"
        step = hyper["held_out_step_size"]
    if method in ("erm", "erm_natural"):
        return torch.nn.CrossEntropyLoss()
    if method == "group_dro":
        return GroupDROLoss(
            torch.nn.CrossEntropyLoss(reduction="none"),
            num_groups,
            step,
            **counts,
            **_absent_kwargs(GroupDROLoss, hyper),
        )
    if method in ("kd", "kd_balanced"):
        return DistillationLoss(TEMPERATURE, hyper["alpha"])
    if method in GROUPDISTIL_WEIGHT_BY:
        weight_by = hyper.get("weight_by", GROUPDISTIL_WEIGHT_BY[method])
        if "weight_by" in inspect.signature(GroupDistillationLoss.__init__).parameters:
            counts["weight_by"] = weight_by
        elif weight_by != "loss":
            raise ValueError(f"weight_by={weight_by!r}: GroupDistillationLoss of this version has no weight_by option.")
        return GroupDistillationLoss(
            num_groups,
            TEMPERATURE,
            hyper["alpha"],
            step,
            **counts,
            **_absent_kwargs(GroupDistillationLoss, hyper),
        )
    raise ValueError(f"unknown method {method!r}, expected one of {METHODS}.")


def train(
    method: str,
    data: dict,
    epochs: int,
    seed: int,
    hyper: dict,
    teacher: torch.nn.Module | None = None,
    cache: TeacherOutputCache | None = None,
    is_teacher: bool = False,
    eval_test: bool = True,
    lr: float = 1e-3,
    select_on: str = "all",
) -> dict:
    """Train one network (student, or teacher when ``is_teacher``) with DistillationTrainer.

    Model selection data: the whole validation split (``data["val"]``), or its first half (``data["val_select"]``)
    for a student with the held-out update or when ``select_on`` is "half" (teachers: always the whole split).
    With ``hyper["update"]`` "held_out", ``HeldOutGroupDROHandler`` takes the DRO step on the second half
    (``data["val_held_out"]``, batches of 64 in a fixed order) every epoch (``held_out_every`` 0) or every
    ``held_out_every`` iterations, after the epoch's record: the recorded weights are those the epoch trained with.

    ``set_determinism(seed)`` runs first, then the network is built, so its initialisation, the dropout-free
    forward passes and the data order (a generator seeded with ``seed``) are the same in every process. The
    optimiser is AdamW with learning rate ``lr`` and ``hyper["weight_decay"]`` (default 0: exactly Adam).

    Returns:
        ``{"network", "history", "selected": {rule: epoch record}}``: every epoch's validation metrics, training
        per-group accuracy and DRO weights; the selected records also hold the test metrics (``eval_test``).
    """
    num_groups = len(data["group_names"])
    if select_on not in ("all", "half"):
        raise ValueError(f"select_on={select_on!r}: expected 'all' or 'half'.")
    held_out = update_of(hyper) == "held_out"
    half = not is_teacher and (held_out or select_on == "half")
    val = data["val_select"] if half else data["val"]
    set_determinism(seed)
    if is_teacher:
        network = teacher_net(data["channels"], data["classes"])
    else:  # a configuration's "width" key narrows or widens the student (a smaller student: less capacity)
        network = student(data["channels"], data["classes"], int(hyper.get("width", STUDENT_WIDTH)))
    loss = make_loss(method, hyper, data)
    split = data["train"]
    items = [
        {"image": split["image"][i], "label": split["label"][i], "group": split["group"][i], "id": i}
        for i in range(len(split["label"]))
    ]
    if hyper.get("sampler", "natural") == "balanced":  # a DistributedSampler: the trainer sets its epoch
        loader = DataLoader(items, batch_size=BATCH_SIZE, sampler=GroupBalancedSampler(split["group"], seed=seed))
    else:
        loader = DataLoader(items, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(seed))
    use_teacher = uses_teacher(method)
    if use_teacher and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher.")
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=make_optimizer(network, lr, hyper),
        loss_function=loss,
        teacher=teacher if use_teacher else None,
        teacher_cache=cache if use_teacher else None,
    )
    history: list[dict] = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def _record(engine):
        weights = getattr(loss, "group_weights", None)
        history.append(
            {
                "epoch": engine.state.epoch,
                "val": evaluate(network, val, num_groups, data["group_counts"]),
                "train": evaluate(network, data.get("train_eval", data["train"]), num_groups, data["group_counts"]),
                "weights": weights.tolist() if weights is not None else None,
                "state": {k: v.clone() for k, v in network.state_dict().items()},
            }
        )

    if held_out:
        every = int(hyper.get("held_out_every", 0))
        split = data["val_held_out"]
        batches = [
            {key: split[key][i : i + 64] for key in ("image", "label", "group")}
            for i in range(0, len(split["label"]), 64)
        ]
        HeldOutGroupDROHandler(loss, batches, interval=every or 1, epoch_level=not every).attach(trainer)
    trainer.run()
    selected = {rule: select(history, rule) for rule in ("worst", "average")}
    if eval_test:
        for chosen in selected.values():
            if "test" not in chosen:
                network.load_state_dict(chosen["state"])
                chosen["test"] = evaluate(network, data["test"], num_groups, data["group_counts"])
    network.load_state_dict(selected["worst"]["state"])
    for h in history:
        h["state"] = None
    network.eval()
    return {"network": network, "history": history, "selected": selected, "select_n": len(val["label"])}


def filled_teacher_cache(teacher: torch.nn.Module, data: dict, batch_size: int = BATCH_SIZE) -> TeacherOutputCache:
    """A teacher-output cache holding the teacher's outputs for every training sample, computed in one pass in index
    order, in batches of the training batch size.

    Filled on demand instead, the cache would compute the missing samples of each training batch, so its values
    would depend on which student filled it: a convolution's last bits change with the batch size, and a change of
    a few 1e-6 in the teacher's logits is enough to send a student's training elsewhere (the sweep's scores moved
    by up to 3 points). Filled up front, every student of a teacher sees the same outputs, whatever trained before
    it."""
    cache = TeacherOutputCache(id_key="id")
    images = data["train"]["image"]
    ids = torch.arange(len(images))
    starts = range(0, len(images), batch_size)
    cache.fill(teacher, [{"image": images[s : s + batch_size], "id": ids[s : s + batch_size]} for s in starts])
    return cache


def make_optimizer(network: torch.nn.Module, lr: float, hyper: dict) -> torch.optim.Optimizer:
    """AdamW with the method's ``weight_decay`` (0 by default, which is exactly Adam)."""
    return torch.optim.AdamW(network.parameters(), lr, weight_decay=float(hyper.get("weight_decay", 0.0)))


def select(history: list[dict], rule: str) -> dict:
    """The epoch chosen by worst-group (``"worst"``) or average (``"average"``) validation accuracy."""
    if rule == "worst":
        return max(history, key=lambda h: (h["val"]["worst"], h["val"]["average"], h["epoch"]))
    return max(history, key=lambda h: (h["val"]["average"], h["val"]["worst"], h["epoch"]))


def teacher_hyper(method: str) -> dict:
    """A teacher's hyper-parameters: cross entropy with natural sampling, or the GroupDRO student winner."""
    return {"sampler": "natural"} if method == "erm" else HYPER["group_dro"]


# ----------------------------------------------------------------------------------------------------- benchmark


def _row(setting: dict, seed: int, arm: tuple, rule: str, chosen: dict, names: list[str], select_n: int = 0) -> dict:
    model, method, teacher = arm
    test, train = chosen["test"], chosen["train"]
    worst_test = test["worst_group"]
    hyper = teacher_hyper(method) if model == "teacher" else method_hyper(method)
    row = {
        "setting": setting["name"],
        "seed": seed,
        "model": model,
        "method": method,
        "teacher": teacher,
        "selection": rule,
        "base_method": base_method(method),
        "epoch": chosen["epoch"],
        "test_average": test["average"],
        "test_worst": test["worst"],
        "test_min_group_n": test["min_group_n"],
        "test_worst_group": names[worst_test],
        "val_average": chosen["val"]["average"],
        "val_worst": chosen["val"]["worst"],
        "val_select_n": select_n,
        "train_acc_test_worst_group": train["per_group"][worst_test],
        "dro_weight_test_worst_group": "" if chosen["weights"] is None else chosen["weights"][worst_test],
        "hyper": json.dumps(hyper, sort_keys=True),
    }
    if model == "student" and base_method(method) in GROUPDISTIL_WEIGHT_BY:
        row["weight_by"] = hyper.get("weight_by", GROUPDISTIL_WEIGHT_BY[base_method(method)])
    if has_dro_weights(method):  # GroupDRO (student or teacher) and GroupDistil: the DRO weight update
        row["update"] = update_of(hyper)
    row.update({f"test_acc/{n}": a for n, a in zip(names, test["per_group"])})
    row.update({f"train_acc/{n}": a for n, a in zip(names, train["per_group"])})
    row.update({f"train_loss/{n}": a for n, a in zip(names, train["loss_per_group"])})
    if chosen["weights"] is not None:
        row.update({f"dro_weight/{n}": a for n, a in zip(names, chosen["weights"])})
    return row


def run_setting(args: argparse.Namespace, setting: dict, seed: int, pool: dict | None) -> tuple[list[dict], str]:
    """Train the two teachers and six students of one setting and seed; the CSV rows and a one-line summary."""
    data = build_data(args, setting, seed, pool)
    names = data["group_names"]
    runs: dict[tuple, dict] = {}
    teachers: dict[str, tuple] = {}
    for arm in arms_of(args):
        model, method, teacher = arm
        if model == "teacher":
            run = train(method, data, args.teacher_epochs, seed, teacher_hyper(method), is_teacher=True, lr=args.lr)
            teachers[method] = (run["network"], filled_teacher_cache(run["network"], data))
        else:
            net, cache = teachers[teacher] if teacher else (None, None)
            hyper = method_hyper(method)
            run = train(method, data, args.epochs, seed, hyper, net, cache, lr=args.lr, select_on=args.select_on)
        runs[arm] = run
    rows = [
        _row(setting, seed, arm, rule, run["selected"][rule], names, run["select_n"])
        for arm, run in runs.items()
        for rule in ("worst", "average")
    ]
    history = [
        {
            "setting": setting["name"],
            "seed": seed,
            "model": a[0],
            "method": a[1],
            "teacher": a[2],
            **_epoch_row(h, names),
        }
        for a, run in runs.items()
        for h in run["history"]
    ]
    summary = {arm_label(*a): f"{100 * r['selected']['worst']['test']['worst']:.1f}" for a, r in runs.items()}
    return rows, f"test worst-group acc: {summary}", history


def register_students(students: dict | None) -> None:
    """``--students``: each label's base method, teacher and hyper-parameters (``HYPER`` of the method updated by
    the label's keys; a held-out configuration drops ``step_size``, a batch one the ``HELD_OUT_KEYS``)."""
    for label, spec in (students or {}).items():
        method = spec["method"]
        hyper = {**HYPER[method], **{k: v for k, v in spec.items() if k not in ("method", "teacher")}}
        unused = HELD_OUT_KEYS if update_of(hyper) == "batch" else ("step_size",)
        hyper = {k: v for k, v in hyper.items() if k not in unused}
        CUSTOM_STUDENTS[label] = (method, spec.get("teacher", ""), hyper)


def arms_of(args: argparse.Namespace) -> tuple:
    """The arms of a run: every arm of ``ARMS``, (``--arms baselines``) ``ARMS_BASELINES``, (``--arms distil``)
    ``ARMS_DISTIL``, or (``--students``) the teachers they need and those students."""
    if args.students:
        students = tuple(("student", label, CUSTOM_STUDENTS[label][1]) for label in args.students)
        teachers = tuple(("teacher", t, "") for t in TEACHERS if any(a[2] == t for a in students))
        return teachers + students
    if args.arms == "baselines":
        return ARMS_BASELINES
    return ARMS_DISTIL if args.arms == "distil" else ARMS


def _epoch_row(h: dict, names: list[str]) -> dict:
    """One epoch of a training history: validation worst / average, per-group validation and training accuracy,
    training cross entropy and DRO weights."""
    row = {"epoch": h["epoch"], "val_worst": h["val"]["worst"], "val_average": h["val"]["average"]}
    row.update({f"val_acc/{n}": a for n, a in zip(names, h["val"]["per_group"])})
    row.update({f"train_acc/{n}": a for n, a in zip(names, h["train"]["per_group"])})
    row.update({f"train_loss/{n}": a for n, a in zip(names, h["train"]["loss_per_group"])})
    if h["weights"] is not None:
        row.update({f"dro_weight/{n}": a for n, a in zip(names, h["weights"])})
    return row


def arm_label(model: str, method: str, teacher: str) -> str:
    if model == "teacher":
        return f"teacher ({method})"
    return f"{method} <- {teacher} teacher" if teacher else method


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"] = int(r["seed"])
    return rows


def run_benchmark(
    args: argparse.Namespace,
    rows: list[dict] | None = None,
    history: list[dict] | None = None,
    write=None,
    timings: list[float] | None = None,
) -> list[dict]:
    """Train every seed of every setting of ``args`` and write the outputs after each; the runs' rows.

    ``rows`` / ``history``: rows already done (a family's run carries the other families' rows; when ``rows`` is
    None, ``resumed_rows``), extended in place; a (setting, seed) with rows is skipped. ``timings``: seconds per
    setting and seed, extended in place. ``write(rows, wall, timings)`` writes the outputs (default:
    ``write_outputs`` of ``args``).
    """
    out, stem = Path(args.out), output_stem(args)
    settings = settings_of(args)
    if write is None:

        def write(rows, wall, timings):
            write_outputs(rows, args, settings, wall, timings)

    if rows is None:
        rows, history = resumed_rows(args, out, stem)
    done = {(r["setting"], r["seed"]) for r in rows}
    history[:] = [r for r in history if (r["setting"], r["seed"]) in done]
    if args.merge_from:  # the runs CSVs of earlier invocations (e.g. one process per block of seeds), no training
        for path in map(Path, args.merge_from):
            rows += _read_rows(path)
            if path.with_name(path.name.replace("_runs.csv", "_history.csv")).exists():
                history += _read_rows(path.with_name(path.name.replace("_runs.csv", "_history.csv")))
        write(rows, 0.0, [])  # wall times: in the logs of the merged runs
        if history:
            _write_csv(out / f"{stem}_history.csv", history)
        return rows
    begin = time.time()
    pool = eval_pool(args) if any(s["kind"] != "waterbirds" for s in settings) else None
    print(f"evaluation pool ready in {time.time() - begin:.0f} s", flush=True)
    timings = [] if timings is None else timings
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for setting in settings:
            if (setting["name"], seed) in done:
                continue
            start = time.time()
            new_rows, summary, new_history = run_setting(args, setting, seed, pool)
            timings.append(time.time() - start)
            rows += new_rows
            history += new_history
            print(f"[{setting['name']} seed {seed}] {timings[-1]:.0f} s, {summary}", flush=True)
            # rewritten after every setting of every seed: an interrupted run leaves complete seeds behind
            write(rows, time.time() - begin, timings)
            if args.history:
                _write_csv(out / f"{stem}_history.csv", history)
    write(rows, time.time() - begin, timings)
    return rows


def resumed_rows(args: argparse.Namespace, out: Path, stem: str) -> tuple[list[dict], list[dict]]:
    """With ``--resume``: the rows of the existing runs CSV and (``--history``) of its history CSV; otherwise, and
    for a merge (which rewrites the outputs from the merged files alone), none."""
    resume = args.resume and not args.merge_from
    runs, history = out / f"{stem}_runs.csv", out / f"{stem}_history.csv"
    return (
        _read_rows(runs) if resume and runs.exists() else [],
        _read_rows(history) if resume and args.history and history.exists() else [],
    )


def family_args(args: argparse.Namespace, argv: list[str], family: str) -> argparse.Namespace:
    """The arguments of one family of the default run: its own (``FAMILIES``), then the command line's ``argv``,
    the outputs named by the default run's stem."""
    spec = FAMILIES[family]
    own = [*spec["argv"], "--students", json.dumps(spec["students"]), "--hyper", json.dumps(spec["hyper"])]
    return parse_args([*own, *argv, "--stem", output_stem(args)], family=True)


def enter_family(family: str) -> None:
    """Set ``HYPER`` (the GroupDRO teacher's recipe) and the student arms to those of ``family``."""
    HYPER.clear()
    HYPER.update(copy.deepcopy(BASE_HYPER))
    for method, update in FAMILIES[family]["hyper"].items():
        HYPER[method] = {**HYPER[method], **update}
    CUSTOM_STUDENTS.clear()
    register_students(FAMILIES[family]["students"])


def run_families(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """The default run: seed by seed, every setting of every family of ``args.families``, into one runs CSV (one
    ``setting`` value per setting) and one summary, rewritten after every setting of every seed (an interrupted
    run leaves complete seeds behind, and ``--resume`` completes it)."""
    out, stem = Path(args.out), output_stem(args)
    runs = {name: family_args(args, argv, name) for name in args.families}
    protocols = {}
    for name, fargs in runs.items():
        enter_family(name)
        protocols[name] = (fargs, settings_of(fargs), copy.deepcopy(HYPER), dict(CUSTOM_STUDENTS))
    rows, history = resumed_rows(args, out, stem)
    begin = time.time()
    timings: list[float] = []  # seconds per setting and seed, every family

    def write(rows, wall, timings):
        write_family_outputs(rows, args, protocols, 0.0 if args.merge_from else time.time() - begin, timings)

    if args.merge_from:  # merged once, with every family's settings in the tables
        enter_family(args.families[0])
        return run_benchmark(runs[args.families[0]], rows, history, write)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, fargs in runs.items():
            enter_family(name)
            one_seed = argparse.Namespace(**{**vars(fargs), "first_seed": seed, "seeds": 1})
            run_benchmark(one_seed, rows, history, write, timings)
    return rows


def _write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Rows (dicts) to ``path``, written whole and atomically (a run killed while writing leaves the previous file,
    which ``--resume`` reads); the columns ``fieldnames``, default in order of first appearance."""
    if fieldnames is None:
        fieldnames = list({k: None for r in rows for k in r})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def _write_lines(path: Path, lines: list[str]) -> None:
    """A Markdown summary to ``path``, one line per item, written whole and atomically like the CSVs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")


def _command_line() -> str:
    return f"Command: `{' '.join(['python benchmarks/worst_group.py', *sys.argv[1:]])}`"


def _seeds_done(rows: list[dict], args: argparse.Namespace) -> str:
    seeds = sorted({r["seed"] for r in rows})
    return f"Seeds done: {len(seeds)} ({', '.join(map(str, seeds))}) of {args.seeds} from {args.first_seed}"


# ----------------------------------------------------------------------------------------------------- outputs


def output_stem(args: argparse.Namespace) -> str:
    """File name stem: ``worst_group`` for the default run (``--sweep``: the minority setting), else with the
    settings appended."""
    if args.stem:
        return args.stem
    if args.families or (args.sweep and list(args.settings) == ["minority"]):
        return "worst_group"
    return "_".join(["worst_group", *args.settings])


def _arms_in(rows: list[dict]) -> list[tuple]:
    """The arms of ``rows``: those of ``ALL_ARMS`` in its order, then the others in order of first appearance."""
    present = list(dict.fromkeys((r["model"], r["method"], r["teacher"]) for r in rows))
    return [a for a in ALL_ARMS if a in present] + [a for a in present if a not in ALL_ARMS]


def _values(rows: list[dict], setting: str, arm: tuple, key: str, rule: str = "worst") -> dict:
    """seed -> value of one arm in one setting."""
    return {
        r["seed"]: float(r[key])
        for r in rows
        if r["setting"] == setting and (r["model"], r["method"], r["teacher"]) == arm and r["selection"] == rule
    }


def _mean_ci(values: dict) -> tuple[float, float, float]:
    vals = list(values.values())
    if not vals:
        return float("nan"), float("nan"), float("nan")
    low, high = paired_bootstrap_ci(vals)
    return statistics.fmean(vals), low, high


def _fmt_diff(d: dict) -> str:
    if d["n"] == 0:
        return "-"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] {d['positive']}/{d['n']}"


KD_ERM = ("student", "kd", "erm")
ERM = ("student", "erm", "")


def summary_lines(
    rows: list[dict], setting_names: list[str], rule: str, refs: tuple[tuple, ...] = (KD_ERM, ERM)
) -> list[str]:
    """Markdown table of one selection rule: means with bootstrap intervals and paired differences to each arm of
    ``refs`` (default: KD from the ERM teacher, and ERM)."""
    titles = {KD_ERM: "KD", ERM: "ERM"}
    head = "".join(
        f" worst - {titles.get(r, arm_label(*r))} | average - {titles.get(r, arm_label(*r))} |" for r in refs
    )
    lines = [
        "| setting | arm | seeds | average | worst group |" + head,
        "|---|---|---|---|---|" + "---|---|" * len(refs),
    ]
    for name in setting_names:
        for arm in _arms_in([r for r in rows if r["setting"] == name]):
            cells = []
            for key in ("test_average", "test_worst"):
                mean, low, high = _mean_ci(_values(rows, name, arm, key, rule))
                cells.append(f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
            for ref in refs:
                for key in ("test_worst", "test_average"):
                    if arm == ref:
                        cells.append("")
                        continue
                    d = paired_difference(_values(rows, name, arm, key, rule), _values(rows, name, ref, key, rule))
                    cells.append(_fmt_diff(d))
            n = len(_values(rows, name, arm, "test_worst", rule))
            lines.append(f"| {name} | {arm_label(*arm)} | {n} | " + " | ".join(cells) + " |")
    return lines


def same_teacher_lines(rows: list[dict], setting_names: list[str]) -> list[str]:
    """GroupDistil - KD with the same teacher, both selection rules, and the issue's target."""
    lines = [
        "| setting | teacher | selection | worst - KD [95 % CI] positive | average - KD [95 % CI] positive | "
        "target met |",
        "|---|---|---|---|---|---|",
    ]
    variants = [m for m in GROUPDISTIL_WEIGHT_BY if any(r["method"] == m for r in rows)]
    refs = [m for m in ("kd", "kd_balanced") if any(r["method"] == m for r in rows)]
    combos = itertools.product(setting_names, refs, TEACHERS, variants, ("worst", "average"))
    for name, ref, teacher, variant, rule in combos:
        gd, kd = ("student", variant, teacher), ("student", ref, teacher)
        dw = paired_difference(_values(rows, name, gd, "test_worst", rule), _values(rows, name, kd, "test_worst", rule))
        da = paired_difference(
            _values(rows, name, gd, "test_average", rule), _values(rows, name, kd, "test_average", rule)
        )
        if dw["n"] == 0:
            continue
        met = dw["mean"] >= 0.03 and dw["low"] > 0 and abs(da["mean"]) <= 0.02
        label = teacher if (variant, ref) == ("groupdistil", "kd") else f"{teacher}: {variant} - {ref}"
        lines.append(f"| {name} | {label} | {rule} | {_fmt_diff(dw)} | {_fmt_diff(da)} | {'yes' if met else 'no'} |")
    return lines


def dro_erm_lines(rows: list[dict], setting_names: list[str]) -> list[str]:
    """The GroupDRO student against each ERM student (the ``erm`` arm, ``erm_natural``), test worst-group and average
    accuracy, both selection rules: paired differences over seeds."""
    lines = [
        "| setting | ERM arm | selection | worst: GroupDRO - ERM [95 % CI] positive | average: GroupDRO - ERM |",
        "|---|---|---|---|---|",
    ]
    dro = ("student", "group_dro", "")
    for name, ref, rule in itertools.product(setting_names, ("erm", "erm_natural"), ("worst", "average")):
        arm = ("student", ref, "")
        dw = paired_difference(
            _values(rows, name, dro, "test_worst", rule), _values(rows, name, arm, "test_worst", rule)
        )
        da = paired_difference(
            _values(rows, name, dro, "test_average", rule), _values(rows, name, arm, "test_average", rule)
        )
        if dw["n"]:
            lines.append(f"| {name} | {ref} | {rule} | {_fmt_diff(dw)} | {_fmt_diff(da)} |")
    return lines


def _mean_of(rows: list[dict], key: str) -> str:
    vals = [float(r[key]) for r in rows if r.get(key, "") not in ("", None) and not math.isnan(float(r[key]))]
    return f"{statistics.fmean(vals):.3f}" if vals else "-"


def diagnostics_lines(rows: list[dict], setting_names: list[str]) -> list[str]:
    """Per setting and arm: test / training accuracy, training loss and DRO weight of the ERM student's usual worst
    group."""
    lines = [
        "| setting | g | arm | test acc g | train acc g | train loss g | DRO weight g | g worst |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in setting_names:
        sel = [r for r in rows if r["setting"] == name and r["selection"] == "worst"]
        erm = [r["test_worst_group"] for r in sel if (r["model"], r["method"], r["teacher"]) == ERM]
        if not erm:
            continue
        g = max(sorted(set(erm)), key=erm.count)
        for arm in _arms_in(sel):
            arm_rows = [r for r in sel if (r["model"], r["method"], r["teacher"]) == arm]
            worst = sum(r["test_worst_group"] == g for r in arm_rows)
            lines.append(
                f"| {name} | {g} | {arm_label(*arm)} | {_mean_of(arm_rows, f'test_acc/{g}')} | "
                f"{_mean_of(arm_rows, f'train_acc/{g}')} | {_mean_of(arm_rows, f'train_loss/{g}')} | "
                f"{_mean_of(arm_rows, f'dro_weight/{g}')} | {worst}/{len(arm_rows)} |"
            )
    return lines


def _family(row: dict) -> str:
    """ "gd" for a GroupDistil student, "kd" for a KD student, "" otherwise (by the row's base method)."""
    base = row.get("base_method") or row["method"]
    if row["model"] != "student":
        return ""
    return "gd" if base in GROUPDISTIL_WEIGHT_BY else "kd" if base in ("kd", "kd_balanced") else ""


def student_pair_lines(rows: list[dict], setting_names: list[str], target: float = 0.05) -> list[str]:
    """Every GroupDistil student arm against every KD student arm (model selected by worst-group validation
    accuracy): paired differences of test worst-group and average accuracy, and whether the worst-group difference
    is at least ``target`` with its 95 % interval above 0."""
    lines = [
        "| setting | GroupDistil arm | KD arm | worst: GD - KD [95 % CI] positive | average: GD - KD | "
        f"worst >= {100 * target:g} points, CI > 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name in setting_names:
        sel = [r for r in rows if r["setting"] == name and r["selection"] == "worst"]
        arms = _arms_in(sel)
        first = {a: next(r for r in sel if (r["model"], r["method"], r["teacher"]) == a) for a in arms}
        for gd, kd in itertools.product(arms, arms):
            if _family(first[gd]) != "gd" or _family(first[kd]) != "kd":
                continue
            dw = paired_difference(_values(rows, name, gd, "test_worst"), _values(rows, name, kd, "test_worst"))
            da = paired_difference(_values(rows, name, gd, "test_average"), _values(rows, name, kd, "test_average"))
            if dw["n"]:
                met = dw["mean"] >= target and dw["low"] > 0
                lines.append(
                    f"| {name} | {arm_label(*gd)} | {arm_label(*kd)} | {_fmt_diff(dw)} | {_fmt_diff(da)} | "
                    f"{'yes' if met else 'no'} |"
                )
    return lines


def arm_group_lines(rows: list[dict], setting_names: list[str]) -> list[str]:
    """Per setting, arm and group (worst-group selection): mean test accuracy, training accuracy and DRO weight at
    the selected epoch, and the number of seeds where the group is the arm's worst on test."""
    lines = [
        "| setting | arm | group | test acc | train acc | DRO weight | worst on test |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in setting_names:
        sel = [r for r in rows if r["setting"] == name and r["selection"] == "worst"]
        # the setting's groups (rows read back from a runs CSV hold every setting's columns, empty for the others)
        groups = [
            k.split("/", 1)[1]
            for k in (sel[0] if sel else {})
            if k.startswith("test_acc/") and any(r.get(k, "") != "" for r in sel)
        ]
        for arm in _arms_in(sel):
            arm_rows = [r for r in sel if (r["model"], r["method"], r["teacher"]) == arm]
            for g in groups:
                worst = sum(r["test_worst_group"] == g for r in arm_rows)
                lines.append(
                    f"| {name} | {arm_label(*arm)} | {g} | {_mean_of(arm_rows, f'test_acc/{g}')} | "
                    f"{_mean_of(arm_rows, f'train_acc/{g}')} | {_mean_of(arm_rows, f'dro_weight/{g}')} | "
                    f"{worst}/{len(arm_rows)} |"
                )
    return lines


def protocol_text(args: argparse.Namespace, settings: list[dict]) -> str:
    """The data, budget, model selection and hyper-parameters of a run's settings, in one sentence."""
    return (
        f"settings: {', '.join(s['name'] for s in settings)}; "
        + (
            f"Waterbirds: training split of the setting's images (generator seed = the seed), validation "
            f"{args.wb_val_per_group} and test {args.wb_test_per_group} images per group (group-balanced, place "
            f"independent of the label, generator seed {args.eval_seed}); "
            if any(s["kind"] == "waterbirds" for s in settings)
            else ""
        )
        + (
            f"cardiac: training split {args.train_subjects} subjects; validation {args.val_per_cell} per cell "
            f"(correlation) / {math.ceil(args.val_per_cell / 3) * 3} per vendor (minority); test {args.test_per_cell} "
            f"per cell / {3 * args.test_per_cell} per vendor; evaluation seed {args.eval_seed}; "
            if any(s["kind"] != "waterbirds" for s in settings)
            else ""
        )
        + f"epochs: teachers {args.teacher_epochs}, students {args.epochs}; input {args.size}x{args.size}; "
        + (
            "students select their epoch on the first half of the validation split (the second half drives the "
            "held-out DRO update); "
            if args.select_on == "half"
            else "students select their epoch on the whole validation split (with the held-out DRO update: on its "
            "first half, the second driving the update); "
        )
        + f"validation halves: seed {args.val_split_seed}; "
        f"AdamW lr {args.lr:g}; temperature {TEMPERATURE}; hyper-parameters {json.dumps(HYPER)}."
    )


def wall_text(args: argparse.Namespace, wall: float, timings: list[float]) -> str:
    return (
        f"Merged from {', '.join(args.merge_from)} (wall times: in the logs of those runs)"
        if args.merge_from
        else f"Wall time of this invocation: {wall / 60:.1f} min with {torch.get_num_threads()} thread(s)"
    ) + (
        f"; per setting and seed {min(timings):.0f}-{max(timings):.0f} s (median {statistics.median(timings):.0f})."
        if timings
        else "."
    )


def comparison_lines(rows: list[dict], comparisons: list[tuple[str, list[str], list[tuple[str, str]]]]) -> list[str]:
    """The declared comparisons of the default run: per family, setting and (arm, reference) student labels, the
    paired differences of test worst-group and average accuracy (worst-group selection), and whether the
    worst-group difference is at least 5 points with its 95 % interval above 0 (issue 21's target)."""
    lines = [
        "| family | setting | arm - reference | worst: difference [95 % CI] positive | average: difference | "
        "worst >= 5 points, CI > 0 |",
        "|---|---|---|---|---|---|",
    ]
    arms = {a[1]: a for a in _arms_in(rows) if a[0] == "student"}
    for family, names, pairs in comparisons:
        for name, (label, ref) in itertools.product(names, pairs):
            if label not in arms or ref not in arms:
                continue
            a, b = arms[label], arms[ref]
            dw = paired_difference(_values(rows, name, a, "test_worst"), _values(rows, name, b, "test_worst"))
            da = paired_difference(_values(rows, name, a, "test_average"), _values(rows, name, b, "test_average"))
            if dw["n"]:
                met = dw["mean"] >= 0.05 and dw["low"] > 0
                lines.append(
                    f"| {family} | {name} | {label} - {ref} | {_fmt_diff(dw)} | {_fmt_diff(da)} | "
                    f"{'yes' if met else 'no'} |"
                )
    return lines


def write_family_outputs(rows: list[dict], args: argparse.Namespace, protocols: dict, wall: float, timings) -> None:
    """The default run's outputs: ``<stem>_runs.csv`` (every family's settings), ``<stem>.md`` (each family's
    protocol, the declared comparisons, every arm's means, every GroupDistil arm against every KD arm, per-group
    accuracies and DRO weights) and ``<stem>.png``."""
    stem, out = output_stem(args), Path(args.out)
    settings = [s for _, family_settings, _, _ in protocols.values() for s in family_settings]
    names = [s["name"] for s in settings]
    write_runs_csv(rows, out / f"{stem}_runs.csv", names)
    per_setting = ", ".join(f"{n} {len({r['seed'] for r in rows if r['setting'] == n})}" for n in names)
    lines = [
        "# Worst-group benchmark: the default run",
        "",
        _command_line(),
        "",
        _seeds_done(rows, args) + f"; per setting: {per_setting}. Each setting family runs with the hyper-parameters "
        "its own sweep chose on validation data "
        "(`FAMILIES` in the script):",
        "",
    ]
    for family, (fargs, family_settings, hyper, students) in protocols.items():
        arms = {label: {"method": m, "teacher": t, **h} for label, (m, t, h) in students.items()}
        text = protocol_text(fargs, family_settings).replace(f"; hyper-parameters {json.dumps(HYPER)}.", ".")
        if any(t == "group_dro" for _, t, _ in students.values()):
            text += f" GroupDRO teacher {json.dumps(hyper['group_dro'])}."
        lines.append(f"- **{family}**: {text} Student arms: `{json.dumps(arms)}`.")
    lines += [
        "",
        wall_text(args, wall, timings),
        "",
        f"Environment: {environment()}.",
        "",
        "Test accuracy (%) with the mean's 95 % bootstrap interval over seeds; differences in points: mean "
        "[paired 95 % bootstrap interval] and the number of seeds where the difference is positive; every student "
        "selected by worst-group validation accuracy.",
        "",
        "## Declared comparisons",
        "",
        *comparison_lines(
            rows, [(f, [s["name"] for s in p[1]], FAMILIES[f]["comparisons"]) for f, p in protocols.items()]
        ),
        "",
        "## Every arm",
        "",
        *summary_lines(rows, names, "worst", refs=()),
        "",
        "## Every GroupDistil arm - every KD arm",
        "",
        *student_pair_lines(rows, names),
        "",
        "## Per group at the selected epoch (means over seeds)",
        "",
        *arm_group_lines(rows, names),
        "",
    ]
    _write_lines(out / f"{stem}.md", lines)
    plot(rows, settings, out / f"{stem}.png")


def write_runs_csv(rows: list[dict], path: Path, setting_names: list[str]) -> None:
    """The runs CSV: the fixed columns, then the others (per-group test accuracies first); rows by seed, then in the
    order of ``setting_names``."""
    base = [
        "setting",
        "seed",
        "model",
        "method",
        "teacher",
        "selection",
        "epoch",
        "test_average",
        "test_worst",
        "test_min_group_n",
        "test_worst_group",
        "val_average",
        "val_worst",
        "train_acc_test_worst_group",
        "dro_weight_test_worst_group",
        "hyper",
    ]
    extra = sorted({k for r in rows for k in r} - set(base), key=lambda k: (not k.startswith("test_acc/"), k))
    order = {name: i for i, name in enumerate(setting_names)}
    _write_csv(path, sorted(rows, key=lambda r: (r["seed"], order.get(r["setting"], len(order)))), base + extra)


def write_outputs(rows: list[dict], args: argparse.Namespace, settings: list[dict], wall: float, timings) -> None:
    stem = output_stem(args)
    out = Path(args.out)
    names = [s["name"] for s in settings]
    write_runs_csv(rows, out / f"{stem}_runs.csv", names)
    order = {name: i for i, name in enumerate(names)}
    rows = sorted(rows, key=lambda r: (r["seed"], order.get(r["setting"], len(order))))
    lines = [
        "# Worst-group benchmark",
        "",
        _command_line(),
        "",
        _seeds_done(rows, args) + "; " + protocol_text(args, settings),
        "",
        wall_text(args, wall, timings),
        "",
        f"Environment: {environment()}.",
        "",
        "Test accuracy (%) with the mean's 95 % bootstrap interval over seeds; differences in points: mean "
        "[paired 95 % bootstrap interval] and the number of seeds where the difference is positive. KD is the KD "
        "student of the ERM teacher; ERM the ERM student.",
        "",
    ]
    for rule, title in (
        ("worst", "worst-group validation accuracy (main rule)"),
        ("average", "average validation accuracy"),
    ):
        lines += [f"## Model selected by {title}", "", *summary_lines(rows, names, rule), ""]
    lines += ["## GroupDistil - KD with the same teacher", "", *same_teacher_lines(rows, names), ""]
    if any(r["method"] in CUSTOM_STUDENTS or r.get("base_method", r["method"]) != r["method"] for r in rows):
        lines += [
            "## Student arms (--students): every GroupDistil arm - every KD arm (worst-group selection)",
            "",
            *student_pair_lines(rows, names),
            "",
            "Per group at the selected epoch (means over seeds):",
            "",
            *arm_group_lines(rows, names),
            "",
        ]
    if any(r["method"] == "erm_natural" for r in rows):
        lines += ["## GroupDRO - ERM (each ERM arm)", "", *dro_erm_lines(rows, names), ""]
    lines += [
        "## Diagnostics (worst-group selection)",
        "",
        "For the group most often worst for the ERM student on test (g): each arm's mean test and training "
        "accuracy and training cross entropy on g at the selected epoch, and the DRO weight of g (uniform: "
        "1 / groups); how often g is the arm's worst test group.",
        "",
        *diagnostics_lines(rows, names),
        "",
    ]
    _write_lines(out / f"{stem}.md", lines)
    plot(rows, settings, out / f"{stem}.png")


def plot(rows: list[dict], settings: list[dict], path: Path) -> None:
    """Worst-group test accuracy of every arm against the minority fraction (left) and in the other settings."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed (pip install matplotlib): %s not written", path)
        return
    minority = [s for s in settings if s["kind"] == "minority"]
    others = [s for s in settings if s["kind"] != "minority"]
    panels = int(bool(minority)) + len(others)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    arms = _arms_in(rows)
    styles = {a: ("--" if a[0] == "teacher" else "-", "s" if a[2] == "group_dro" else "o") for a in arms}
    if minority:
        ax = axes.pop(0)
        for i, arm in enumerate(arms):
            xs, means, errs = [], [], [[], []]
            for s in minority:
                mean, low, high = _mean_ci(_values(rows, s["name"], arm, "test_worst"))
                if math.isnan(mean):
                    continue
                xs.append(100 * s["fraction"] + 0.08 * (i - len(arms) / 2))
                means.append(100 * mean)
                errs[0].append(100 * (mean - low))
                errs[1].append(100 * (high - mean))
            ax.errorbar(xs, means, yerr=errs, label=arm_label(*arm), linestyle=styles[arm][0], marker=styles[arm][1],
                        capsize=3)  # fmt: skip
        ax.set_xticks([100 * s["fraction"] for s in minority], [f"{100 * s['fraction']:g}" for s in minority])
        ax.set_xlabel("minority vendor's share of the training split (%)")
        ax.set_ylabel("worst-group test accuracy (%)")
        ax.set_title("minority vendor (mean, 95 % bootstrap CI over seeds)")
        ax.legend(fontsize=7)
    for ax, s in zip(axes, others):
        for i, arm in enumerate(arms):
            mean, low, high = _mean_ci(_values(rows, s["name"], arm, "test_worst"))
            if not math.isnan(mean):
                ax.errorbar([i], [100 * mean], yerr=[[100 * (mean - low)], [100 * (high - mean)]], marker="o",
                            capsize=3)  # fmt: skip
        ax.set_xticks(range(len(arms)), [arm_label(*a) for a in arms], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("worst-group test accuracy (%)")
        ax.set_title(s["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- sweep


def sweep_configs(method: str, weight_decays: list[float] | None = None) -> list[dict]:
    """Every configuration of ``SWEEP_GRID[method]`` (``weight_decays`` replaces its weight-decay values,
    ``--sweep-grid`` any values and adds keys). A configuration with the batch update (``update`` absent or
    "batch") drops the ``HELD_OUT_KEYS``, one with the held-out update drops ``step_size`` (its step is
    ``held_out_step_size``); duplicates are removed, first occurrence kept."""
    grid = dict(SWEEP_GRID[method])
    if weight_decays is not None:
        grid["weight_decay"] = tuple(weight_decays)
    grid.update({k: tuple(v) for k, v in (SWEEP_OVERRIDE.get(method) or {}).items()})
    out: list[dict] = []
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        unused = HELD_OUT_KEYS if update_of(config) == "batch" else ("step_size",)
        config = {k: v for k, v in config.items() if k not in unused}
        if config not in out:
            out.append(config)
    return out


def sweep_teachers(args: argparse.Namespace, method: str) -> list[str]:
    """The teachers a sweep method runs with: ``--sweep-teachers`` for KD and GroupDistil, none otherwise."""
    return list(args.sweep_teachers) if uses_teacher(method) else [""]


def run_sweep(args: argparse.Namespace) -> dict:
    """Every configuration of ``SWEEP_GRID`` on the seeds of the run, with each teacher of ``--sweep-teachers``
    (KD, GroupDistil), validation only."""
    settings = settings_of(args)
    pool = eval_pool(args) if any(s["kind"] != "waterbirds" for s in settings) else None
    out, stem = Path(args.out), output_stem(args)
    rows: list[dict] = []
    history: list[dict] = []
    begin = time.time()
    winners: dict = {}
    if args.merge_from:  # the sweep CSVs of earlier invocations (e.g. one process per seed), no training
        for path in map(Path, args.merge_from):
            rows += _read_rows(path)
            if path.with_name(path.stem + "_history.csv").exists():
                history += _read_rows(path.with_name(path.stem + "_history.csv"))
        if history:
            _write_csv(out / f"{stem}_sweep_history.csv", history)
        return write_sweep(rows, args, settings, 0.0)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for setting in settings:
            start = time.time()
            data = build_data(args, setting, seed, pool)
            names = data["group_names"]
            teachers = {}
            if any(uses_teacher(m) for m in args.methods):
                for t in args.sweep_teachers:
                    hyper = teacher_hyper(t)
                    run = train(t, data, args.teacher_epochs, seed, hyper, is_teacher=True, eval_test=False, lr=args.lr)
                    teachers[t] = (run["network"], filled_teacher_cache(run["network"], data))
            for method in args.methods:
                for teacher in sweep_teachers(args, method):
                    net, cache = teachers.get(teacher, (None, None))
                    for config in sweep_configs(method, args.sweep_weight_decay):
                        tic = time.time()
                        run = train(method, data, args.epochs, seed, config, net, cache, eval_test=False, lr=args.lr,
                                    select_on=args.select_on)  # fmt: skip
                        chosen = run["selected"]["worst"]
                        keys = {k: config.get(k, "") for k in SWEEP_KEYS}
                        rows.append(
                            {
                                "setting": setting["name"],
                                "seed": seed,
                                "method": method,
                                "teacher": teacher,
                                **keys,
                                "epoch": chosen["epoch"],
                                "val_worst": chosen["val"]["worst"],
                                "val_average": chosen["val"]["average"],
                                "val_select_n": run["select_n"],
                                "wall_s": round(time.time() - tic, 1),
                                **{f"val_acc/{n}": a for n, a in zip(names, chosen["val"]["per_group"])},
                                **{f"train_acc/{n}": a for n, a in zip(names, chosen["train"]["per_group"])},
                                **{f"dro_weight/{n}": a for n, a in zip(names, chosen["weights"] or [])},
                            }
                        )
                        if args.history:
                            for h in run["history"]:
                                history.append({"setting": setting["name"], "seed": seed, "method": method,
                                                "teacher": teacher, **keys, **_epoch_row(h, names)})  # fmt: skip
            print(f"[sweep {setting['name']} seed {seed}] {time.time() - start:.0f} s", flush=True)
            winners = write_sweep(rows, args, settings, time.time() - begin)
            if args.history:
                _write_csv(out / f"{stem}_sweep_history.csv", history)
    return winners


def _winner_lines(winners: dict, label: str = "") -> list[str]:
    return [
        f"| {method}{label} | {json.dumps(w['config'])} | {100 * w['val_worst']:.2f} | {100 * w['val_average']:.2f} | "
        f"{w['runs']} |"
        for method, w in winners.items()
    ]


def write_sweep(rows: list[dict], args: argparse.Namespace, settings: list[dict], wall: float) -> dict:
    """``<stem>_sweep.csv`` and ``<stem>_sweep.md`` (winners overall, the teacher being one of the keys, and per
    teacher; every configuration); returns the overall winners."""
    out, stem = Path(args.out), output_stem(args)
    _write_csv(out / f"{stem}_sweep.csv", rows)
    teachers = [t for t in dict.fromkeys(r.get("teacher", "") for r in rows) if t]
    keys = (*SWEEP_KEYS, "teacher") if len(teachers) > 1 else SWEEP_KEYS
    winners = sweep_winners(rows, keys)
    seeds = sorted({r["seed"] for r in rows})
    select = (
        "the first half of the validation split (every student)"
        if args.select_on == "half"
        else "the whole validation split (held-out update: its first half)"
    )
    lines = [
        "# Worst-group benchmark: hyper-parameter sweep (validation data only)",
        "",
        _command_line(),
        "",
        f"Seeds {', '.join(map(str, seeds))}; settings {', '.join(s['name'] for s in settings)}; "
        f"methods {', '.join(sorted({r['method'] for r in rows}))} (KD, GroupDistil: teachers "
        f"{', '.join(teachers) or 'erm'}); AdamW lr {args.lr:g}; "
        f"epochs: teacher {args.teacher_epochs}, students {args.epochs}; temperature {TEMPERATURE}. "
        + (
            f"Merged from {', '.join(args.merge_from)}; student trainings: "
            f"{sum(float(r.get('wall_s') or 0) for r in rows) / 60:.1f} min in all (teachers not counted). "
            if args.merge_from
            else f"Wall time {wall / 60:.1f} min with {torch.get_num_threads()} thread(s). "
        )
        + f"Environment: {environment()}. "
        + f"Epoch selected on {select}. Score: "
        "worst-group validation accuracy of the epoch it selects, mean over settings and seeds (ties: mean average "
        "validation accuracy).",
        "",
        "## Winners",
        "",
        "| method | configuration | mean val worst | mean val average | runs |",
        "|---|---|---|---|---|",
        *_winner_lines(winners),
    ]
    if len(teachers) > 1:
        for t in teachers:
            lines += _winner_lines(sweep_winners([r for r in rows if r.get("teacher", "") == t], SWEEP_KEYS), f" ({t})")
    lines += ["", "## Every configuration (mean over settings and seeds; per setting: worst / average)", ""]
    names = [s["name"] for s in settings]
    lines += [
        "| method | teacher | " + " | ".join(SWEEP_KEYS) + " | mean worst | mean average | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * (len(SWEEP_KEYS) + 2 + len(names)),
    ]
    configs: dict = {}
    for r in rows:
        configs.setdefault((r["method"], r.get("teacher", ""), *(r.get(k, "") for k in SWEEP_KEYS)), []).append(r)
    for key, group in configs.items():
        per_setting = []
        for name in names:
            sel = [r for r in group if r["setting"] == name]
            per_setting.append(
                f"{100 * statistics.fmean(float(r['val_worst']) for r in sel):.1f} / "
                f"{100 * statistics.fmean(float(r['val_average']) for r in sel):.1f}"
                if sel
                else "-"
            )
        lines.append(
            f"| {key[0]} | "
            + " | ".join(str(v) for v in key[1:])
            + f" | {100 * statistics.fmean(float(r['val_worst']) for r in group):.2f} | "
            f"{100 * statistics.fmean(float(r['val_average']) for r in group):.2f} | " + " | ".join(per_setting) + " |"
        )
    _write_lines(out / f"{stem}_sweep.md", lines)
    return winners


# ----------------------------------------------------------------------------------------------------- calibration

# the baselines of the calibration: (label, method, hyper-parameters other than the weight decay)
CALIBRATION_ARMS = (
    ("erm_natural", "erm", {"sampler": "natural"}),
    ("erm_balanced", "erm", {"sampler": "balanced"}),
    ("group_dro", "group_dro", {"step_size": 0.01, "adjustment": 0.0, "sampler": "balanced"}),
)
CALIBRATION_KNOBS = ("correlation", "colour_cue", "bird_scale", "image_size", "images", "weight_decay", "epochs")


def calibration_grid(args: argparse.Namespace) -> list[dict]:
    """The Waterbirds settings of ``--calibrate``: every combination of the ``--cal-*`` generator knobs."""
    return [
        waterbirds_setting(c, cue, s, args.waterbirds_image_size, n)
        for c, cue, s, n in itertools.product(
            args.cal_correlation, args.cal_colour_cue, args.cal_bird_scale, args.cal_images
        )
    ]


def run_calibration(args: argparse.Namespace) -> dict | None:
    """Baselines only (``CALIBRATION_ARMS``), validation data only, on every setting of :func:`calibration_grid`,
    every ``--cal-weight-decay`` and every ``--cal-epochs`` (one training of ``max(--cal-epochs)`` epochs; a shorter
    budget selects among its first epochs, which is what a shorter training would have given: no schedule).

    Writes ``<stem>.csv`` (one row per setting, seed, arm, weight decay and epoch budget), ``<stem>_history.csv``
    (every epoch) and ``<stem>.md`` after every setting of every seed; returns the chosen candidate."""
    out, stem = Path(args.out), args.stem or "waterbirds_calibration"
    rows: list[dict] = []
    history: list[dict] = []
    begin = time.time()
    if args.cal_from:  # merge the CSVs of earlier calibration runs (e.g. one process per seed), train nothing
        for path in map(Path, args.cal_from):
            rows += [_calibration_types(r) for r in _read_rows(path)]
            if path.with_name(path.stem + "_history.csv").exists():
                history += _read_rows(path.with_name(path.stem + "_history.csv"))
        _write_csv(out / f"{stem}.csv", rows)
        _write_csv(out / f"{stem}_history.csv", history)
        return write_calibration(rows, args, out / f"{stem}.md", time.time() - begin)
    chosen = None
    max_epochs = max(args.cal_epochs)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for setting in calibration_grid(args):
            start = time.time()
            data = build_data(args, setting, seed, None)
            names = data["group_names"]
            first = len(rows)
            for wd in args.cal_weight_decay:
                for label, method, hyper in (a for a in CALIBRATION_ARMS if a[0] in args.cal_arms):
                    run = train(
                        method, data, max_epochs, seed, {**hyper, "weight_decay": wd}, eval_test=False, lr=args.lr
                    )
                    knobs = {k: setting[k] for k in CALIBRATION_KNOBS[:5]}
                    for h in run["history"]:
                        history.append({"setting": setting["name"], "seed": seed, "arm": label, "weight_decay": wd,
                                        **_epoch_row(h, names)})  # fmt: skip
                    for epochs in sorted(args.cal_epochs):
                        pick = select(run["history"][:epochs], "worst")
                        rows.append(
                            {
                                "setting": setting["name"],
                                **knobs,
                                "weight_decay": wd,
                                "epochs": epochs,
                                "seed": seed,
                                "arm": label,
                                "selected_epoch": pick["epoch"],
                                "val_worst": pick["val"]["worst"],
                                "val_average": pick["val"]["average"],
                                "val_worst_group": names[pick["val"]["worst_group"]],
                                "train_min_group_n": min(data["group_counts"]),
                                **{f"val_acc/{n}": a for n, a in zip(names, pick["val"]["per_group"])},
                                **{f"train_acc/{n}": a for n, a in zip(names, pick["train"]["per_group"])},
                            }
                        )
            for r in rows[first:]:
                r["wall_s"] = round(time.time() - start, 1)  # of the whole setting and seed (every arm)
            print(f"[calibration {setting['name']} seed {seed}] {time.time() - start:.0f} s", flush=True)
            _write_csv(out / f"{stem}.csv", rows)
            _write_csv(out / f"{stem}_history.csv", history)
            chosen = write_calibration(rows, args, out / f"{stem}.md", time.time() - begin)
    return chosen


def _calibration_types(row: dict) -> dict:
    """A calibration CSV row with its numbers as numbers again."""
    for k in ("correlation", "colour_cue", "bird_scale", "weight_decay", "val_worst", "val_average", "wall_s"):
        row[k] = float(row[k])
    for k in ("image_size", "images", "epochs", "selected_epoch"):
        row[k] = int(row[k])
    return row


def calibration_candidates(rows: list[dict], gap: float, min_balanced: float) -> list[dict]:
    """Per candidate (the ``CALIBRATION_KNOBS`` of a row): the mean over seeds of every arm's validation worst-group
    and average accuracy, and whether it meets the rule: ERM (natural sampling) worst-group at least ``gap`` below
    its average, and group-balanced ERM's worst group at least ``min_balanced``. GroupDRO's numbers are reported,
    never used. Candidates in order of first appearance."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in CALIBRATION_KNOBS), {}).setdefault(r["arm"], []).append(r)
    out = []
    for key, arms in groups.items():
        c: dict = dict(zip(CALIBRATION_KNOBS, key))
        seeds = None
        for label, arm_rows in arms.items():
            c[f"{label}/worst"] = statistics.fmean(float(r["val_worst"]) for r in arm_rows)
            c[f"{label}/average"] = statistics.fmean(float(r["val_average"]) for r in arm_rows)
            c[f"{label}/epoch"] = statistics.fmean(float(r["selected_epoch"]) for r in arm_rows)
            n = {r["seed"] for r in arm_rows}
            seeds = n if seeds is None else seeds & n
        c["seeds"] = len(seeds or ())
        if "erm_natural/worst" in c and "erm_balanced/worst" in c:
            c["erm_gap"] = c["erm_natural/average"] - c["erm_natural/worst"]
            c["eligible"] = c["erm_gap"] >= gap and c["erm_balanced/worst"] >= min_balanced
        else:
            c["erm_gap"], c["eligible"] = float("nan"), False
        out.append(c)
    return out


def choose_calibration(candidates: list[dict], min_seeds: int) -> dict | None:
    """The eligible candidate (run on at least ``min_seeds`` seeds) with the highest group-balanced ERM worst-group
    validation accuracy (the bird learnt best), ties: the larger ERM gap, then the first; None when none is."""
    best = None
    for c in candidates:
        if c["eligible"] and c["seeds"] >= min_seeds:
            if best is None or (c["erm_balanced/worst"], c["erm_gap"]) > (best["erm_balanced/worst"], best["erm_gap"]):
                best = c
    return best


def write_calibration(rows: list[dict], args: argparse.Namespace, path: Path, wall: float) -> dict | None:
    candidates = calibration_candidates(rows, args.cal_gap, args.cal_min_balanced)
    seeds = sorted({r["seed"] for r in rows})
    chosen = choose_calibration(candidates, min(args.seeds, 2))
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Synthetic Waterbirds calibration (baselines only, validation data only)",
        "",
        _command_line(),
        "",
        f"Seeds done: {', '.join(map(str, seeds))} ({args.seeds} asked from {args.first_seed}); validation "
        f"{args.wb_val_per_group} images per group (test pool {args.wb_test_per_group} per group, not used here), "
        f"group-balanced, generator seed {args.eval_seed}, place independent of the label; input {args.size} px; "
        f"AdamW lr {args.lr:g}, batch 16; student network. Training time: "
        f"{sum({(r['setting'], r['seed']): r['wall_s'] for r in rows}.values()) / 60:.1f} min in all, one thread "
        f"per process (this invocation: {wall / 60:.1f} min).",
        "",
        f"Rule (fixed before the runs): a candidate is eligible when ERM with natural sampling has a worst-group "
        f"validation accuracy at least {pct(args.cal_gap)} points below its average validation accuracy and ERM with "
        f"the group-balanced sampler a worst-group validation accuracy of at least {pct(args.cal_min_balanced)} % "
        "(means over seeds, epoch selected by worst-group validation accuracy within the epoch budget); among the "
        "eligible, the one with the highest group-balanced ERM worst-group accuracy, ties the larger ERM gap. "
        "GroupDRO (step 0.01, balanced sampler) is reported, never used by the rule.",
        "",
        "**Chosen**: "
        + (
            ", ".join(f"{k} {chosen[k]}" for k in CALIBRATION_KNOBS)
            + f" (ERM natural {pct(chosen['erm_natural/average'])} average / {pct(chosen['erm_natural/worst'])} "
            f"worst, group-balanced ERM worst {pct(chosen['erm_balanced/worst'])})."
            if chosen
            else "none yet (no candidate meets the rule)."
        ),
        "",
        "Validation accuracy (%), means over seeds; `epoch`: mean selected epoch.",
        "",
        "| correlation | colour cue | bird scale | px | train images | weight decay | epochs | seeds | "
        "ERM nat. average | ERM nat. worst | ERM gap | ERM nat. epoch | ERM bal. average | ERM bal. worst | "
        "GroupDRO worst | eligible |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in candidates:
        get = lambda k, c=c: pct(c[k]) if k in c else "-"  # noqa: E731
        mark = "**chosen**" if c is chosen else ("yes" if c["eligible"] else "no")
        lines.append(
            "| "
            + " | ".join(f"{c[k]:g}" for k in CALIBRATION_KNOBS)
            + f" | {c['seeds']} | {get('erm_natural/average')} | "
            f"{get('erm_natural/worst')} | {pct(c['erm_gap'])} | {c.get('erm_natural/epoch', float('nan')):.1f} | "
            f"{get('erm_balanced/average')} | {get('erm_balanced/worst')} | {get('group_dro/worst')} | {mark} |"
        )
    _write_lines(path, lines)
    return chosen


# ----------------------------------------------------------------------------------------------------- CLI


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) is expected, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None, family: bool = False) -> argparse.Namespace:
    """The command line; ``family``: the arguments of one family of the default run (``family_args``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10; sweep 3)")
    parser.add_argument("--first-seed", type=int, default=None, help="first seed (default 0; sweep 1000)")
    parser.add_argument("--epochs", type=int, default=15, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--train-subjects", type=int, default=150, help="training subjects per setting and seed")
    parser.add_argument("--val-per-cell", type=int, default=100, help="validation subjects per vendor x pathology")
    parser.add_argument("--test-per-cell", type=int, default=100, help="test subjects per vendor x pathology")
    parser.add_argument("--eval-seed", type=int, default=999999, help="generator seed of the evaluation pool")
    parser.add_argument("--size", type=int, default=48, help="input size (pixels) of the 128 mm field of view")
    parser.add_argument("--minority-vendor", default="D", choices=list(MNMS_VENDORS))
    parser.add_argument(
        "--fractions",
        type=_fraction,
        nargs="+",
        default=None,
        help="minority vendor's training share (default 0.02 0.05 0.10; sweep 0.05)",
    )
    parser.add_argument("--correlation", type=float, default=0.8, help="vendor-pathology correlation in training")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of every network")
    wb = parser.add_argument_group("synthetic Waterbirds (make_synthetic_waterbirds)")
    wb.add_argument("--images", type=int, default=1000, help="Waterbirds training images per seed")
    wb.add_argument("--waterbirds-correlation", type=float, default=0.95, help="P(place = label) in training")
    wb.add_argument("--colour-cue", type=float, default=1.0, help="P(the bird's colour comes from its class palette)")
    wb.add_argument(
        "--landbird-colour-cue",
        type=float,
        default=None,
        help="the landbirds' own colour cue (default: --colour-cue for both); lower makes landbirds the harder class",
    )
    wb.add_argument("--bird-scale", type=float, default=1.0, help="bird size, in (0, 1.5]")
    wb.add_argument(
        "--group-bird-scale",
        type=parse_group_scale,
        nargs="+",
        default=None,
        metavar="GROUP=FACTOR",
        help="a factor on --bird-scale for some groups (landbird/land=0.5: that group's birds at half the size), "
        "so that one group is harder than the others",
    )
    wb.add_argument(
        "--place-noise",
        type=parse_place_noise,
        nargs="+",
        default=None,
        metavar="PLACE=NOISE",
        help="the pixel noise of every image of a place (land=0.3; default 0.05 everywhere): a site with poorer "
        "images, harder for both of its groups",
    )
    wb.add_argument("--waterbirds-image-size", type=int, default=64, help="generated image side (pixels, >= 16)")
    wb.add_argument("--wb-val-per-group", type=int, default=100, help="validation images per group (balanced)")
    wb.add_argument(
        "--train-eval-per-group",
        type=int,
        default=0,
        help="Waterbirds: per-epoch training accuracy on the first N images of every group (default 0: all)",
    )
    wb.add_argument("--wb-test-per-group", type=int, default=250, help="test images per group (balanced)")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=None,
        choices=["minority", "correlation", "waterbirds"],
        help="run these settings with the arms of --arms / --students and HYPER (updated by --hyper) instead of the "
        "default run (sweep: default minority)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        choices=list(FAMILIES),
        help="the default run's setting families, each with its own arms and hyper-parameters (default: all)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    parser.add_argument(
        "--cache", default=str(Path.home() / ".cache" / "monai_groupdistil" / "worst_group"), help="tensor cache"
    )
    parser.add_argument("--resume", action="store_true", help="keep the rows of the existing runs CSV, skip them")
    parser.add_argument("--quick", action="store_true", help="the whole pipeline on a tiny configuration (< 1 min)")
    parser.add_argument("--sweep", action="store_true", help="run the hyper-parameter sweep instead")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="sweep methods")
    parser.add_argument(
        "--sweep-weight-decay", type=float, nargs="+", default=None, help="weight decays of the sweep (default 0)"
    )
    parser.add_argument(
        "--arms",
        default="all",
        choices=["all", "baselines", "distil"],
        help="baselines: ERM and GroupDRO students only; distil: both teachers, KD and GroupDistil (weight_by loss, "
        "ce, kd) students from each",
    )
    parser.add_argument(
        "--hyper", type=json.loads, default=None, help="JSON {method: {key: value}} updating HYPER for this run"
    )
    parser.add_argument("--merge-from", nargs="+", default=None, help="merge these runs CSVs (no training)")
    parser.add_argument(
        "--sweep-grid", type=json.loads, default=None, help="JSON {method: {key: [values]}} replacing SWEEP_GRID values"
    )
    parser.add_argument("--stem", default=None, help="output file name stem (default from the settings)")
    parser.add_argument(
        "--history", action="store_true", help="also write <stem>_history.csv (--sweep: <stem>_sweep_history.csv)"
    )
    parser.add_argument(
        "--students",
        type=json.loads,
        default=None,
        help='JSON {label: {"method": m, "teacher": t, key: value}}: train these student arms (and the teachers '
        "they name) instead of --arms; m is erm, group_dro, kd or groupdistil, t erm or group_dro (KD, "
        "GroupDistil), the other keys update HYPER[m] (e.g. sampler, weight_decay, weight_by, update, "
        "held_out_step_size, held_out_every)",
    )
    parser.add_argument(
        "--sweep-teachers",
        nargs="+",
        default=["erm"],
        choices=list(TEACHERS),
        help="--sweep: the teachers of the KD and GroupDistil configurations (default erm)",
    )
    held = parser.add_argument_group(
        "held-out DRO update and model selection (the validation split in two halves, group by group)"
    )
    held.add_argument(
        "--select-on",
        default="all",
        choices=["all", "half"],
        help="all: students select their epoch on the whole validation split, except those with the held-out update "
        "(the first half); half: every student selects on the first half (the same data for every arm). Teachers: "
        "always the whole split",
    )
    held.add_argument(
        "--val-split-seed",
        type=int,
        default=0,
        help="shuffling seed of the group-stratified halving (monai.data.partition_dataset_classes, ratios 1:1)",
    )
    cal = parser.add_argument_group("--calibrate: Waterbirds baselines on validation data over a grid of knobs")
    cal.add_argument("--calibrate", action="store_true", help="run the Waterbirds calibration instead")
    cal.add_argument("--cal-correlation", type=float, nargs="+", default=[0.95])
    cal.add_argument("--cal-colour-cue", type=float, nargs="+", default=[0.7, 0.85, 1.0])
    cal.add_argument("--cal-bird-scale", type=float, nargs="+", default=[1.0])
    cal.add_argument("--cal-images", type=int, nargs="+", default=[1500, 3000])
    cal.add_argument("--cal-weight-decay", type=float, nargs="+", default=[0.0, 0.1])
    cal.add_argument("--cal-epochs", type=int, nargs="+", default=[10, 20])
    cal.add_argument(
        "--cal-arms",
        nargs="+",
        default=[a[0] for a in CALIBRATION_ARMS],
        choices=[a[0] for a in CALIBRATION_ARMS],
        help="baselines to train (the rule needs erm_natural and erm_balanced)",
    )
    cal.add_argument("--cal-from", nargs="+", default=None, help="merge these calibration CSVs (no training)")
    cal.add_argument("--cal-gap", type=float, default=0.20, help="rule: ERM average - worst >= this")
    cal.add_argument("--cal-min-balanced", type=float, default=0.70, help="rule: balanced ERM worst >= this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numbers depend on it; default 1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds or 1
        args.train_subjects, args.val_per_cell, args.test_per_cell = 40, 6, 6
        args.epochs, args.teacher_epochs, args.size, args.fractions, args.images = 2, 2, 32, [0.05], 120
        args.wb_val_per_group, args.wb_test_per_group, args.waterbirds_image_size = 6, 6, 32
        args.cal_colour_cue, args.cal_images, args.cal_weight_decay, args.cal_epochs = [1.0], [120], [0.0, 0.1], [1, 2]
    if args.families and (args.settings or args.sweep or args.calibrate) and not family:
        parser.error("--families selects families of the default run; it does not go with --settings, --sweep or "
                     "--calibrate")  # fmt: skip
    default_run = args.settings is None and not (args.sweep or args.calibrate)
    if args.settings is None:
        args.settings = ["minority"]
    if family:
        args.families = None
    if args.fractions is None:
        args.fractions = [0.05] if args.sweep else [0.02, 0.05, 0.10]
    if args.seeds is None:
        args.seeds = 2 if args.calibrate else 3 if args.sweep else 10
    if args.first_seed is None:
        args.first_seed = 1000 if args.sweep or args.calibrate else 0
    for name in ("colour_cue", "bird_scale"):
        values = [getattr(args, name), *getattr(args, f"cal_{name}")]
        low = 0.0 if name == "colour_cue" else 1e-9
        high = 1.0 if name == "colour_cue" else 1.5
        if not all(low <= v <= high for v in values):
            parser.error(f"--{name.replace('_', '-')} values must be in [{low:g}, {high:g}], got {values}")
    if args.landbird_colour_cue is not None and not 0.0 <= args.landbird_colour_cue <= 1.0:
        parser.error(f"--landbird-colour-cue must be in [0, 1], got {args.landbird_colour_cue}")
    for name in ("group_bird_scale", "place_noise"):
        items = getattr(args, name) or []
        keys = [k for k, _ in items]
        if len(set(keys)) < len(keys):
            parser.error(f"--{name.replace('_', '-')}: each key at most once, got {keys}")
        setattr(args, name, dict(items) or None)
    knobs = [k for k in ("landbird_colour_cue", "group_bird_scale", "place_noise") if getattr(args, k) is not None]
    if args.calibrate and knobs:
        parser.error(f"--calibrate does not take {', '.join('--' + k.replace('_', '-') for k in knobs)}")
    for group, factor in (args.group_bird_scale or {}).items():
        if not 0.0 < factor * args.bird_scale <= 1.5:
            parser.error(f"--group-bird-scale {group}={factor:g}: times --bird-scale must be in (0, 1.5]")
    if args.waterbirds_image_size < 16:
        parser.error(f"--waterbirds-image-size must be >= 16, got {args.waterbirds_image_size}")
    unknown = set(args.hyper or {}) - {*METHODS, "erm_natural"}
    if unknown:
        parser.error(f"--hyper: unknown method(s) {sorted(unknown)}, expected some of {list(METHODS)}")
    for method, update in (args.hyper or {}).items():
        if set(update) - set(SWEEP_KEYS):  # the keys a method's configuration may hold (a typo would be ignored)
            parser.error(
                f"--hyper: {method} has no key(s) {sorted(set(update) - set(SWEEP_KEYS))}; expected some of "
                f"{list(SWEEP_KEYS)}"
            )
    for label, spec in (args.students or {}).items():
        method, teacher = spec.get("method"), spec.get("teacher", "")
        if label in METHODS or label in ("erm_natural", "kd_balanced", *GROUPDISTIL_WEIGHT_BY):
            parser.error(f"--students: label {label!r} is a built-in arm; choose another")
        if method not in METHODS:
            parser.error(f"--students: {label!r} needs a method among {list(METHODS)}, got {method!r}")
        if (method in ("kd", "groupdistil")) != (teacher in TEACHERS):
            parser.error(f"--students: {label!r} ({method}) has teacher {teacher!r}; KD and GroupDistil need one of "
                         f"{list(TEACHERS)}, the others none")  # fmt: skip
        if spec.get("update", "batch") not in UPDATES or (
            spec.get("update", "batch") == "held_out" and method not in ("group_dro", "groupdistil")
        ):
            parser.error(f"--students: {label!r}: update must be one of {UPDATES}, held_out for a group-DRO loss")
    if not 0.0 <= args.correlation <= 1.0:
        parser.error(f"--correlation must be in [0, 1], got {args.correlation}")
    if args.seeds < 1 or args.train_subjects < 1 or args.val_per_cell < 1 or args.test_per_cell < 1:
        parser.error("--seeds, --train-subjects, --val-per-cell and --test-per-cell must be positive")
    if default_run:  # the default run: its families, each with its own arms and hyper-parameters
        chosen = [f"--{k}" for k in ("students", "hyper") if getattr(args, k)] + (["--arms"] * (args.arms != "all"))
        if chosen:
            verb = "needs" if len(chosen) == 1 else "need"
            parser.error(f"{' and '.join(chosen)} {verb} --settings: the default run's families have their own arms "
                         "and hyper-parameters (FAMILIES in the script)")  # fmt: skip
        args.families = args.families or list(FAMILIES)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    for method, update in (args.hyper or {}).items():
        HYPER[method] = {**method_hyper(method), **update}
    register_students(args.students)
    SWEEP_OVERRIDE.update(args.sweep_grid or {})
    if args.calibrate:
        chosen = run_calibration(args)
        print("chosen:", json.dumps({k: chosen[k] for k in CALIBRATION_KNOBS} if chosen else None))
    elif args.sweep:
        winners = run_sweep(args)
        print("winners:", json.dumps({m: w["config"] for m, w in winners.items()}))
    elif args.families:
        run_families(args, sys.argv[1:] if argv is None else argv)
    else:
        run_benchmark(args)
    print(f"done in {(time.time() - start) / 60:.1f} min; outputs in {args.out}")


if __name__ == "__main__":
    main()
