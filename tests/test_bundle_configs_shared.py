"""The bundles' shared configs: ``bundles/shared`` is their one source and ``scripts/sync_bundle_configs.py`` keeps
every bundle's copy in step (a bundle stays self-contained, as ``monai.bundle`` and the model zoo need)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sync_bundle_configs.py"
CARDIAC, SEG, WATERBIRDS = "cardiac_mri_groupdistil", "cardiac_mri_seg_groupdistil", "waterbirds_groupdistil"
# ids the two classification bundles happen to set alike but own: each bundle tunes its training
OWN_PARAMETERS = {
    "augment", "temperature", "alpha", "weight_by", "dro_warmup", "group_dro_step_size", "learning_rate",
    "balanced_sampling", "step_size", "absent_groups", "teacher_method", "teacher_weight_decay",
    "teacher_balanced_sampling",
}  # fmt: skip


def sync(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, timeout=60
    )


def config_ids(config: dict, prefix: str = "") -> dict[str, object]:
    """A config's ids down to components: keys, and keys inside sections (dicts without ``_target_``)."""
    ids = {}
    for key, value in config.items():
        name = f"{prefix}#{key}" if prefix else key
        is_section = isinstance(value, dict) and value and "_target_" not in value
        ids.update(config_ids(value, name) if is_section else {name: value})
    return ids


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "bundles", tmp_path / "bundles")
    return tmp_path


def test_every_bundle_matches_the_shared_configs():
    result = sync(ROOT, "--check")
    assert result.returncode == 0, result.stdout


def test_what_the_classification_bundles_set_alike_is_shared_or_a_parameter():
    """An id both classification bundles hold with the same value comes from bundles/shared (or is a training
    parameter each bundle owns), so a new piece of workflow is not copied into the two bundles by hand."""
    shared = ROOT / "bundles" / "shared"
    for path in sorted((ROOT / "bundles" / CARDIAC / "configs").glob("*.json")):
        if path.name == "metadata.json":  # each bundle's own description
            continue
        cardiac, waterbirds = (
            config_ids(read(ROOT / "bundles" / b / "configs" / path.name)) for b in (CARDIAC, WATERBIRDS)
        )
        alike = {k for k in cardiac.keys() & waterbirds.keys() if cardiac[k] == waterbirds[k]}
        sources = [shared / layer / path.name for layer in ("every_bundle", "classification")]
        from_shared = set().union(*(config_ids(read(p)) for p in sources if p.is_file()))
        assert alike - from_shared <= OWN_PARAMETERS, (path.name, sorted(alike - from_shared - OWN_PARAMETERS))


def drift(bundles: Path) -> Path:
    """Change a shared id and an own id of the cardiac train.json and whole-copied files (a config, a module of the
    bundles' scripts/), and remove copies."""
    train = bundles / CARDIAC / "configs" / "train.json"
    config = read(train)
    config["train"]["trainer"]["max_epochs"] = 3  # a shared id changed in one copy
    config["epochs"] = 3  # the bundle's own id
    train.write_text(json.dumps(config))
    (bundles / WATERBIRDS / "configs" / "logging.conf").write_text("[loggers]\nkeys=root\n")
    (bundles / WATERBIRDS / "configs" / "erm.json").unlink()
    config_py = bundles / WATERBIRDS / "scripts" / "config.py"  # the bundles' code, copied whole
    config_py.write_text(config_py.read_text() + "\nEDITED_IN_A_COPY = True\n")
    (bundles / CARDIAC / "scripts" / "tracking.py").unlink()
    shutil.copy(bundles / "shared" / "scripts" / "natural_transforms.py", bundles / CARDIAC / "scripts")  # unused
    return train


def test_check_names_each_drifted_copy_and_writes_nothing(repo: Path):
    bundles = repo / "bundles"
    drift(bundles)
    before = {p: p.read_bytes() for p in bundles.rglob("*") if p.is_file()}
    result = sync(repo, "--check")
    assert result.returncode == 1
    for name in (
        f"{CARDIAC}/configs/train.json",
        f"{WATERBIRDS}/configs/logging.conf",
        f"{WATERBIRDS}/configs/erm.json",
        f"{WATERBIRDS}/scripts/config.py",
        f"{CARDIAC}/scripts/tracking.py",
    ):
        assert f"differs from bundles/shared: bundles/{name}" in result.stdout
    assert f"not used by its bundle: bundles/{CARDIAC}/scripts/natural_transforms.py" in result.stdout
    assert f"{SEG}/" not in result.stdout
    assert {p: p.read_bytes() for p in bundles.rglob("*") if p.is_file()} == before


def test_sync_restores_the_shared_parts_and_keeps_the_bundles_own(repo: Path):
    bundles = repo / "bundles"
    originals = {p: p.read_text() for p in bundles.rglob("*") if p.is_file()}
    train = drift(bundles)
    assert sync(repo).returncode == 0
    assert sync(repo, "--check").returncode == 0
    assert read(train) == {**json.loads(originals[train]), "epochs": 3}  # the own id kept, the shared one restored
    assert {p: p.read_text() for p in bundles.rglob("*") if p.is_file() and p != train} == {
        p: t for p, t in originals.items() if p != train
    }


def test_a_broken_shared_file_stops_before_writing(repo: Path):
    bundles = repo / "bundles"
    (bundles / "shared" / "classification" / "kd.json").write_text('{"loss": ')
    train = drift(bundles)
    before = train.read_text()
    assert sync(repo).returncode != 0
    assert train.read_text() == before  # nothing written, not even the files before the broken one


def test_a_bundle_importing_a_module_that_is_not_shared_is_refused(repo: Path):
    bundles = repo / "bundles"
    init = bundles / WATERBIRDS / "scripts" / "__init__.py"
    init.write_text(init.read_text() + "from .no_such_module import thing\n")
    train = drift(bundles)
    before = train.read_text()
    result = sync(repo)
    assert result.returncode != 0
    assert f"{init} imports .no_such_module, but neither" in result.stderr and "no_such_module.py" in result.stderr
    assert train.read_text() == before
    init.unlink()
    result = sync(repo)
    assert result.returncode != 0 and f"{init} is missing" in result.stderr


def test_a_bundles_own_module_is_kept_and_an_unknown_one_named_not_removed(repo: Path):
    """A module the bundle's __init__.py imports from its own folder is the bundle's; a module nothing imports
    (e.g. the copy of a module since removed from bundles/shared) is named and left for the developer to remove."""
    scripts = repo / "bundles" / WATERBIRDS / "scripts"
    (scripts / "own_helper.py").write_text("from .datasets import group_counts\n\nANSWER = 42\n")
    (scripts / "__init__.py").write_text((scripts / "__init__.py").read_text() + "from .own_helper import ANSWER\n")
    (scripts / "old_shared_module.py").write_text("X = 1\n")
    for args in (("--check",), ()):
        result = sync(repo, *args)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout.splitlines() == [
            "neither shared nor imported by its scripts/__init__.py (remove or import it): "
            f"bundles/{WATERBIRDS}/scripts/old_shared_module.py"
        ]
        assert (scripts / "own_helper.py").read_text().endswith("ANSWER = 42\n")
        assert (scripts / "old_shared_module.py").is_file()
    (scripts / "old_shared_module.py").unlink()
    assert sync(repo, "--check").returncode == 0


SCRIPTS_REFERENCE = re.compile(r"scripts(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
RESOLVE = """
import pydoc, sys
names = sys.argv[1:]
print([n for n in names if pydoc.locate(n) is None])
"""


@pytest.mark.parametrize("bundle", [CARDIAC, SEG, WATERBIRDS])
def test_each_bundle_holds_the_code_its_configs_call_and_no_other_bundles(bundle: str):
    """Every ``scripts.*`` name in the bundle's configs resolves from the bundle folder alone, and the bundle's
    ``scripts/`` holds no module of another bundle's data (a zoo bundle carries its own code only)."""
    folder = ROOT / "bundles" / bundle
    names = set()
    for path in (folder / "configs").glob("*.json"):
        if path.name != "metadata.json":  # its changelog names code of earlier versions
            names |= set(SCRIPTS_REFERENCE.findall(path.read_text()))
    assert len(names) > 10
    code = [sys.executable, "-c", RESOLVE, *sorted(names)]
    result = subprocess.run(code, capture_output=True, text=True, timeout=120, cwd=folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    modules = {path.stem for path in (folder / "scripts").glob("*.py")}
    others = {
        CARDIAC: {
            "synthetic_waterbirds",
            "natural_transforms",
            "waterbirds_datasets",
            "pretrained",
            "segmentation",
            "segmentation_datasets",
        },
        SEG: {"synthetic_waterbirds", "natural_transforms", "waterbirds_datasets", "pretrained"},
        WATERBIRDS: {"synthetic", "cardiac_transforms", "mnms_datasets", "segmentation", "segmentation_datasets"},
    }[bundle]
    assert modules.isdisjoint(others), sorted(modules & others)


@pytest.mark.parametrize(
    "bundle, own, other", [(CARDIAC, "synthetic", "waterbirds"), (WATERBIRDS, "waterbirds", "synthetic")]
)
def test_the_generator_command_of_a_bundle_names_its_own_data_only(bundle: str, own: str, other: str):
    folder = ROOT / "bundles" / bundle
    usage = subprocess.run([sys.executable, "-m", "scripts"], capture_output=True, text=True, timeout=120, cwd=folder)
    assert usage.returncode == 2 and f"usage: python -m scripts {{{own}}} [options]" in usage.stderr
    result = subprocess.run(
        [sys.executable, "-m", "scripts", other, "--root", "unused"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
    )
    assert result.returncode == 2
    assert f"error: this bundle has no '{other}' generator" in result.stderr and "that bundle's folder" in result.stderr
