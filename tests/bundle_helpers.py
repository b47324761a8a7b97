"""Helpers shared by the bundle-level tests: running a bundle's configs through the CLI or ConfigWorkflow."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "tests" / "data" / "meta_schema_20240725.json")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # 2 shared cores: no thread oversubscription


def cli_args(overrides: dict) -> list[str]:
    """``--id value`` pairs for ``python -m monai.bundle run`` (fire reads True/False, not true/false)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return args


def error_chain(err: BaseException) -> str:
    """The messages of an exception and of every exception it was raised from or during."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def root_error(err: BaseException) -> BaseException:
    """The first exception of the chain (the one MONAI's config parser wrapped)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def report_rows(folder: Path) -> list[dict]:
    """The rows of a ``group_report.csv`` written by ``GroupReportHandler``."""
    with open(folder / "group_report.csv", newline="") as f:
        return list(csv.DictReader(f))


BUNDLES = ("cardiac_mri_groupdistil", "cardiac_mri_seg_groupdistil", "waterbirds_groupdistil")
CLASSIFICATION = ("cardiac_mri_groupdistil", "waterbirds_groupdistil")
# per bundle: the overrides of a tiny run (1 epoch, 32 x 32 inputs)
TINY = {
    "cardiac_mri_groupdistil": {"spatial_size": [32, 32], "pixdim": [4.0, 4.0], "batch_size": 4},
    "cardiac_mri_seg_groupdistil": {"spatial_size": [32, 32], "pixdim": [6.0, 6.0], "batch_size": 8},
    "waterbirds_groupdistil": {
        "synthetic_images": 24,
        "synthetic_image_size": 32,
        "spatial_size": [32, 32],
        "resize": [36, 36],
        "batch_size": 4,
    },
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process workflows use one thread (the machine's cores are shared); restored afterwards. A test module
    uses it by importing it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_data(name: str, folder: Path) -> None:
    """The tiny dataset of bundle ``name`` in ``folder``: an M&Ms-layout one for the cardiac bundles; nothing for
    Waterbirds, whose bundle generates its synthetic stand-in (``synthetic_images``) in the empty folder itself."""
    from scripts import make_synthetic_mnms

    if name == "cardiac_mri_groupdistil":
        make_synthetic_mnms(folder, n_subjects=24, seed=1, matrix_scale=0.5, n_frames=4)
    elif name == "cardiac_mri_seg_groupdistil":
        make_synthetic_mnms(folder, n_subjects=16, seed=1, matrix_scale=0.4, n_frames=4, num_workers=0)


# teacher_method -> the teacher checkpoint its run writes and a student of that method reads (under ckpt_dir)
TEACHER_CHECKPOINTS = {"erm": "teacher.pt", "group_dro": "teacher_group_dro.pt"}


def random_teacher(bundle: Bundle, overrides: dict, path: Path | None = None) -> Path:
    """A frozen teacher of the bundle's teacher architecture with seeded random weights (training it is not tested),
    saved to ``path``, by default the run's ``teacher_ckpt`` (the checkpoint of its ``teacher_method``)."""
    import torch

    parser = bundle.workflow(bundle.configs("train"), overrides, initialize=False).parser
    net = parser.get_parsed_content("teacher_def")
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = Path(parser.get_parsed_content("teacher_ckpt")) if path is None else path
    torch.save({"model": net.state_dict()}, path)
    return path


class Bundle:
    """One bundle of ``bundles/``: its config files, CLI runs and ConfigWorkflows."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        """The bundle ``name`` of ``bundles/``, or the copy of it in ``root``."""
        self.name = name
        self.root = ROOT / "bundles" / name if root is None else Path(root)
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
        # run from the bundle folder, as a user does: its scripts/ is imported from there, as in the model zoo
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=self.root)
        if check:
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    def workflow(self, configs: list[str], overrides: dict, workflow_type: str = "train", initialize: bool = True):
        """A ``ConfigWorkflow`` of ``configs`` with ``overrides``, initialised (its ``initialize`` list run) or not."""
        from monai.bundle import ConfigWorkflow

        wf = ConfigWorkflow(config_file=configs, meta_file=self.meta, workflow_type=workflow_type, **overrides)
        if initialize:
            wf.initialize()
        return wf

    def raw_config(self, name: str) -> dict:
        with open(self.config_dir / f"{name}.json") as f:
            return json.load(f)

    def boolean_ids(self) -> list[str]:
        """Top-level ids of train.json whose default is a boolean."""
        return sorted(k for k, v in self.raw_config("train").items() if isinstance(v, bool))


def own_folders(overrides: dict, tmp_path: Path, teacher_from: dict | None = None) -> dict:
    """``overrides`` with checkpoints, reports and logs in ``tmp_path``; the trained teacher linked in if given."""
    ov = {**overrides, **{f"{k}_dir": str(tmp_path / k) for k in ("ckpt", "output", "log")}}
    (tmp_path / "ckpt").mkdir()
    for name in TEACHER_CHECKPOINTS.values() if teacher_from is not None else ():  # what it has of them
        trained = Path(teacher_from["overrides"]["ckpt_dir"]) / name
        if trained.is_file():
            (tmp_path / "ckpt" / name).symlink_to(trained)
    return ov


# boolean id -> the train.json item whose value the id decides, and how to read the decision from it (every bundle)
BOOLEAN_USES = {
    "augment": ("augmentation", lambda augmentation: augmentation is not None),
    "balanced_sampling": ("train#sampler", lambda sampler: type(sampler).__name__ == "GroupBalancedSampler"),
    "progress_bar": ("train#trainer#progress_bar", lambda value: value),
}
# every accepted spelling of a boolean id on the command line and in overrides, with its meaning
SPELLINGS = [("false", False), ("False", False), ("0", False), ("no", False), (0, False), (False, False)]
SPELLINGS += [("true", True), ("True", True), ("1", True), ("yes", True), (1, True), (True, True)]
