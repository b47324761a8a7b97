"""Helpers shared by the bundle-level tests: running a bundle's configs through the CLI or ConfigWorkflow."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "tests" / "data" / "meta_schema_20240725.json")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # 2 shared cores: no thread oversubscription


def cli_args(overrides: dict) -> list[str]:
    """``--id value`` pairs for ``python -m monai.bundle run`` (fire reads True/False, not true/false)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return args


def report_rows(folder: Path) -> list[dict]:
    """The rows of a ``group_report.csv`` written by ``GroupReportHandler``."""
    with open(folder / "group_report.csv", newline="") as f:
        return list(csv.DictReader(f))


class Bundle:
    """One bundle of ``bundles/``: its config files, CLI runs and ConfigWorkflows."""

    def __init__(self, name: str) -> None:
        self.root = ROOT / "bundles" / name
        self.config_dir = self.root / "configs"
        self.meta = str(self.config_dir / "metadata.json")

    def run_overrides(self, base: Path, **extra) -> dict:
        """Overrides that keep a run's data, checkpoints, reports and logs in sub-folders of ``base``."""
        folders = {
            f"{k}_dir": str(base / v)
            for k, v in (("dataset", "data"), ("ckpt", "models"), ("output", "eval"), ("log", "logs"))
        }
        return {"bundle_root": str(self.root), **folders, "progress_bar": False, **extra}

    def configs(self, *names: str) -> list[str]:
        return [str(self.config_dir / f"{n}.json") for n in names]

    def run_cli(self, configs: list[str], overrides: dict, runner: list[str] | None = None, check: bool = True):
        cmd = (runner or [sys.executable, "-m", "monai.bundle"]) + ["run", "--config_file", json.dumps(configs)]
        cmd += ["--meta_file", self.meta, *cli_args(overrides)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        if check:
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    def workflow(self, configs: list[str], overrides: dict, workflow_type: str = "train"):
        from monai.bundle import ConfigWorkflow

        wf = ConfigWorkflow(config_file=configs, meta_file=self.meta, workflow_type=workflow_type, **overrides)
        wf.initialize()
        return wf
