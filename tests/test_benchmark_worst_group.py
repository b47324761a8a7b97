"""The worst-group benchmark: ``--quick`` end to end (twice: the same numbers), its statistics and sweep scoring."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import worst_group  # noqa: E402
from worst_group_stats import paired_bootstrap_ci, paired_difference, sweep_winners  # noqa: E402

REQUIRED = ["setting", "seed", "method", "teacher", "selection", "test_average", "test_worst", "test_min_group_n"]


def _run_quick(out: Path, cache: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(BENCH / "worst_group.py"), "--quick", "--out", str(out), "--cache", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "worst_group_runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_twice_gives_the_same_rows(tmp_path):
    """Two processes (torch's initial seed differs between them) give identical CSV rows; the second reads the
    evaluation pool and training splits from the cache the first wrote."""
    cache = tmp_path / "cache"
    first = _run_quick(tmp_path / "a", cache)
    assert sorted(p.name for p in cache.iterdir())  # the first run filled the cache
    second = _run_quick(tmp_path / "b", cache)
    assert first == second
    assert (tmp_path / "a" / "worst_group_runs.csv").read_text() == (
        tmp_path / "b" / "worst_group_runs.csv"
    ).read_text()

    rows = first
    assert set(REQUIRED) <= set(rows[0])
    # --quick: one seed, the 5 % minority setting and the correlation setting; 8 networks x 2 selection rules
    assert {r["setting"] for r in rows} == {"minority_D_5pct", "correlation_0.8"}
    assert {r["seed"] for r in rows} == {"0"}
    for setting in ("minority_D_5pct", "correlation_0.8"):
        arms = sorted((r["model"], r["method"], r["teacher"], r["selection"]) for r in rows if r["setting"] == setting)
        expected = sorted(
            (model, method, teacher, rule)
            for model, method, teacher in worst_group.ARMS
            for rule in ("worst", "average")
        )
        assert arms == expected
    for r in rows:
        assert r["method"] in {"erm", "group_dro", "kd", "groupdistil"}
        assert r["teacher"] in ({"erm", "group_dro"} if r["method"] in ("kd", "groupdistil") else {""})
        assert r["selection"] in {"worst", "average"}
        # --quick: 6 test subjects per vendor x pathology cell -> 18 per vendor, 6 per cell
        n = 18 if r["setting"].startswith("minority") else 6
        assert int(r["test_min_group_n"]) == n
        group_cols = [k for k in r if k.startswith("test_acc/") and r[k] != ""]
        assert len(group_cols) == (4 if n == 18 else 12)
        per_group = [float(r[k]) for k in group_cols]
        assert float(r["test_worst"]) == min(per_group)
        assert r[f"test_acc/{r['test_worst_group']}"] == r["test_worst"]
        for acc in per_group:  # accuracies are counts over n subjects
            assert math.isclose(acc * n, round(acc * n), abs_tol=1e-9)
        assert min(per_group) <= float(r["test_average"]) <= max(per_group)

    # the summary reports the CSV's values (one seed: mean = the value, interval = the value)
    summary = (tmp_path / "a" / "worst_group.md").read_text()
    for r in rows:
        if r["selection"] == "worst" and r["model"] == "student" and r["method"] == "groupdistil":
            label = f"groupdistil <- {r['teacher']} teacher"
            line = next(x for x in summary.splitlines() if x.startswith(f"| {r['setting']} | {label} |"))
            worst = 100 * float(r["test_worst"])
            assert f"| {worst:.1f} [{worst:.1f}, {worst:.1f}] |" in line
    assert (tmp_path / "a" / "worst_group.png").stat().st_size > 0


def test_paired_bootstrap_ci_two_values():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1]
    assert paired_bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert paired_bootstrap_ci([0.3]) == (0.3, 0.3)
    assert paired_bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_paired_bootstrap_ci_matches_normal_theory_for_many_seeds():
    d = np.random.default_rng(3).normal(1.0, 2.0, size=200)
    low, high = paired_bootstrap_ci(d, n_boot=20000)
    half = 1.959964 * d.std(ddof=0) / math.sqrt(d.size)  # plug-in standard error, as the bootstrap uses
    assert low == pytest.approx(d.mean() - half, abs=0.08 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.08 * half)
    # the same arguments give the same interval (fixed generator)
    assert paired_bootstrap_ci(d, n_boot=20000) == (low, high)


@pytest.mark.parametrize(
    "args, message",
    [(([],), "non-empty"), (([1.0, float("nan")],), "finite"), (([1.0], 1.5), "level must be in")],
)
def test_paired_bootstrap_ci_errors(args, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_ci(*args)


def test_paired_difference_uses_common_seeds():
    d = paired_difference({0: 0.9, 1: 0.8, 2: 0.7, 5: 0.1}, {0: 0.8, 1: 0.85, 2: 0.6, 3: 0.0})
    assert d["n"] == 3 and d["positive"] == 2
    assert d["mean"] == pytest.approx((0.1 - 0.05 + 0.1) / 3)
    assert d["differences"] == pytest.approx([0.1, -0.05, 0.1])
    assert d["low"] <= d["mean"] <= d["high"]
    empty = paired_difference({0: 1.0}, {1: 1.0})
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_sweep_winners_scores_on_validation_only():
    keys = ("alpha", "step_size", "sampler")

    def row(method, alpha, step, sampler, worst, average, setting="s1"):
        return {"setting": setting, "method": method, "alpha": alpha, "step_size": step, "sampler": sampler,
                "val_worst": worst, "val_average": average, "test_worst": 1.0}  # fmt: skip

    rows = [
        # groupdistil: (0.5, 0.1) has the best mean worst over two settings (0.7, 0.9 -> 0.8)
        row("groupdistil", 0.5, 0.01, "natural", 0.9, 0.9),
        row("groupdistil", 0.5, 0.01, "natural", 0.6, 0.9, "s2"),
        row("groupdistil", 0.5, 0.1, "natural", 0.7, 0.8),
        row("groupdistil", 0.5, 0.1, "natural", 0.9, 0.8, "s2"),
        # kd: a tie on worst, broken by the average
        row("kd", 0.5, "", "natural", 0.8, 0.90),
        row("kd", 0.9, "", "natural", 0.8, 0.95),
        # erm: a full tie goes to the first configuration
        row("erm", "", "", "balanced", 0.5, 0.5),
        row("erm", "", "", "natural", 0.5, 0.5),
    ]
    w = sweep_winners(rows, keys)
    assert w["groupdistil"]["config"] == {"alpha": 0.5, "step_size": 0.1, "sampler": "natural"}
    assert w["groupdistil"]["val_worst"] == pytest.approx(0.8) and w["groupdistil"]["runs"] == 2
    assert w["kd"]["config"] == {"alpha": 0.9, "sampler": "natural"}
    assert w["erm"]["config"] == {"sampler": "balanced"}


def test_sweep_grid_covers_the_issue_options():
    gd = worst_group.sweep_configs("groupdistil")
    assert len(gd) == 2 * 3 * 2 * 2 * 2
    assert {c["absent_groups"] for c in gd} == {"ema", "zero"} and {c["sampler"] for c in gd} == {"natural", "balanced"}
    assert {c["adjustment"] for c in gd} == {0.0, 1.0}
    for method in worst_group.METHODS:
        assert {c["sampler"] for c in worst_group.sweep_configs(method)} == {"natural", "balanced"}
        # the winners in HYPER are configurations of the grid
        assert {k: v for k, v in worst_group.HYPER[method].items()} in worst_group.sweep_configs(method)


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        worst_group.parse_args(["--fractions", "1.5"])
    assert "a fraction in (0, 1) is expected, got '1.5'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        worst_group.parse_args(["--correlation", "1.2"])
    assert "--correlation must be in [0, 1], got 1.2" in capsys.readouterr().err
