"""The bundles' shared configs: ``bundles/shared`` is their one source and ``scripts/sync_bundle_configs.py`` keeps
every bundle's copy in step (a bundle stays self-contained, as ``monai.bundle`` and the model zoo need)."""

from __future__ import annotations

import json
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
    "augment", "temperature", "alpha", "weight_by", "dro_warmup", "teacher_step_size", "learning_rate",
    "balanced_sampling", "step_size", "absent_groups",
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
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checked 27 bundle config files"  # 9 shared configs x 3 bundles


def test_shared_ids_are_in_every_bundle_of_their_layer():
    shared = ROOT / "bundles" / "shared"
    layers = {"every_bundle": (CARDIAC, SEG, WATERBIRDS), "classification": (CARDIAC, WATERBIRDS)}
    assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == sorted(layers)
    for layer, bundles in layers.items():
        for source in (shared / layer).glob("*.json"):
            for bundle in bundles:
                copy = config_ids(read(ROOT / "bundles" / bundle / "configs" / source.name))
                for name, value in config_ids(read(source)).items():
                    assert copy.get(name, KeyError) == value, (bundle, source.name, name)
    # the workflow is shared: most of train.json, all of kd.json, erm.json, group_dro.json, evaluate.json
    cardiac = config_ids(read(ROOT / "bundles" / CARDIAC / "configs" / "train.json"))
    in_shared = config_ids(read(shared / "every_bundle" / "train.json")) | config_ids(
        read(shared / "classification" / "train.json")
    )
    assert len(in_shared) >= 50 and len(in_shared) >= 0.6 * len(cardiac)
    for overlay in ("erm", "kd", "group_dro", "evaluate"):
        whole = config_ids(read(shared / "every_bundle" / f"{overlay}.json"))
        whole |= config_ids(read(shared / "classification" / f"{overlay}.json"))
        assert whole == config_ids(read(ROOT / "bundles" / WATERBIRDS / "configs" / f"{overlay}.json")), overlay


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


def test_check_names_each_drifted_copy_and_writes_nothing(repo: Path):
    bundles = repo / "bundles"
    train = bundles / CARDIAC / "configs" / "train.json"
    config = read(train)
    config["train"]["trainer"]["max_epochs"] = 3  # a shared id changed in one copy
    config["epochs"] = 3  # the bundle's own id
    train.write_text(json.dumps(config, indent=4))
    (bundles / WATERBIRDS / "configs" / "logging.conf").write_text("[loggers]\nkeys=root\n")
    (bundles / WATERBIRDS / "configs" / "erm.json").unlink()
    before = {p: p.read_bytes() for p in bundles.rglob("*") if p.is_file()}

    result = sync(repo, "--check")
    assert result.returncode == 1
    assert f"bundles/{CARDIAC}/configs/train.json: train#trainer\n" in result.stderr
    assert f"bundles/{WATERBIRDS}/configs/logging.conf: the whole file\n" in result.stderr
    assert f"bundles/{WATERBIRDS}/configs/erm.json: missing\n" in result.stderr
    assert "edit bundles/shared/, not the copies, then run: python scripts/sync_bundle_configs.py" in result.stderr
    assert len(result.stderr.splitlines()) == 5  # the header, three files, the hint
    assert {p: p.read_bytes() for p in bundles.rglob("*") if p.is_file()} == before


def test_sync_restores_the_shared_ids_and_keeps_the_bundles_own(repo: Path):
    bundles = repo / "bundles"
    train = bundles / CARDIAC / "configs" / "train.json"
    original = train.read_text()
    config = read(train)
    config["train"]["trainer"]["max_epochs"] = 3
    config["epochs"] = 3
    del config["validate"]["checkpoint_saver"]
    train.write_text(json.dumps(config))  # also out of the bundles' layout
    erm = bundles / WATERBIRDS / "configs" / "erm.json"
    erm_text = erm.read_text()
    erm.unlink()

    result = sync(repo)
    assert result.returncode == 0, result.stderr
    assert f"updated bundles/{CARDIAC}/configs/train.json: train#trainer, validate#checkpoint_saver" in result.stdout
    assert f"updated bundles/{WATERBIRDS}/configs/erm.json: missing" in result.stdout
    restored = read(train)
    assert restored == {**json.loads(original), "epochs": 3}  # the own id kept, the shared ones restored
    assert list(restored["validate"])[-1] == "checkpoint_saver"  # a missing id is appended to its section
    assert train.read_text().splitlines()[:20] == original.replace('"epochs": 25', '"epochs": 3').splitlines()[:20]
    assert erm.read_text() == erm_text
    assert sync(repo, "--check").returncode == 0


def test_a_broken_shared_file_stops_before_writing(repo: Path):
    bundles = repo / "bundles"
    (bundles / "shared" / "classification" / "kd.json").write_text('{"loss": ')
    train = bundles / CARDIAC / "configs" / "train.json"
    train.write_text(train.read_text().replace('"max_epochs": "@epochs"', '"max_epochs": 3'))
    before = train.read_text()
    result = sync(repo)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bundles / 'shared' / 'classification' / 'kd.json'}: not valid JSON")
    assert train.read_text() == before  # nothing written, not even the files before the broken one


def test_a_shared_id_inside_a_component_of_a_bundle_is_refused(repo: Path):
    train = repo / "bundles" / WATERBIRDS / "configs" / "train.json"
    config = read(train)
    config["validate"]["key_metric"] = {"_target_": "monai_groupdistil.handlers.GroupAccuracyHandler"}
    train.write_text(json.dumps(config))
    before = train.read_text()
    result = sync(repo)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {train}: the shared id 'validate#key_metric#val_worst_group_accuracy' needs 'key_metric' to be a "
        "section, not a component."
    )
    assert train.read_text() == before
