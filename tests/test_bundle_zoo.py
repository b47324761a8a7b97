"""The MONAI model zoo's own checks (Project-MONAI/model-zoo ``ci/``) on copies of the three bundles.

Each bundle is copied as the zoo holds it (``models/<bundle>/`` with ``configs``, ``docs``, ``LICENSE``), with tiny data
in its default ``dataset_dir`` (``<bundle_root>/data``). Then, as the zoo's unit tests do
(``ci/unit_tests/test_spleen_ct_segmentation.py``): every workflow of the bundle is a ``ConfigWorkflow`` of the
bundle's documented command with tiny overrides, on which ``initialize()``, ``check_properties()`` (no required
property missing, no optional property referenced under a wrong id), ``run()`` and ``finalize()`` are called. The
workflows write where the documented commands write (``<bundle_root>/models``, ``<bundle_root>/eval``), so the
``models/model.pt`` that ``ci/verify_bundle.py`` requires is the one the student's run produced, and the steps of
``verify_bundle.py`` that run offline run on it.

A workflow that needs an earlier one (the student needs the teacher; evaluation and inference need the student)
runs it first, once per bundle, so every test can run alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import monai_groupdistil
from tests.bundle_helpers import (  # noqa: F401 (one_thread: an autouse fixture)
    BUNDLES,
    SCHEMA,
    TEACHER_CHECKPOINTS,
    TINY,
    Bundle,
    make_tiny_data,
    one_thread,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:builtin type .* has no __module__ attribute:DeprecationWarning",
    "ignore:`torch.jit.load` is deprecated",
)
# workflow -> (configs merged in order, workflow_type, what it writes under <bundle_root>); as in each bundle's README
WORKFLOWS = {
    "train_teacher": (("train", "train_teacher"), "train", "models/teacher.pt"),
    "train": (("train",), "train", "models/model.pt"),
    "evaluate": (("train", "evaluate"), "train", "eval/groupdistil/group_report.csv"),
    "inference": (("inference",), "infer", None),
}
NEEDS = {"train_teacher": (), "train": ("train_teacher",), "evaluate": ("train",), "inference": ("train",)}
# what inference writes, per bundle (inference.json's own output ids)
INFERENCE_OUTPUT = {
    "cardiac_mri_groupdistil": "eval/predictions.csv",
    "cardiac_mri_seg_groupdistil": "eval/masks",
    "waterbirds_groupdistil": "eval/predictions.csv",
}


@pytest.fixture(scope="module", params=BUNDLES)
def zoo(request, tmp_path_factory):
    """A copy of one bundle in the zoo's layout, with tiny data in its default ``dataset_dir``."""
    name = request.param
    source = Bundle(name).root
    root = tmp_path_factory.mktemp("zoo") / "models" / name
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("models", "eval", "logs", "data"))
    make_tiny_data(name, root / "data")  # nothing for Waterbirds: its bundle generates the data in the empty folder
    overrides = {"bundle_root": str(root), "epochs": 1, "teacher_epochs": 1, "progress_bar": False, **TINY[name]}
    return {"name": name, "bundle": Bundle(name, root), "root": root, "overrides": overrides, "checked": {}}


def zoo_workflow(zoo: dict, workflow: str) -> list[str]:
    """Run ``workflow`` (and, first, those it needs) as the zoo's unit tests do, once per bundle; the properties
    ``check_properties`` found missing or wrongly referenced."""
    for need in NEEDS[workflow]:
        zoo_workflow(zoo, need)
    if workflow not in zoo["checked"]:
        b = zoo["bundle"]
        configs, workflow_type, _ = WORKFLOWS[workflow]
        wf = b.workflow(b.configs(*configs), zoo["overrides"], workflow_type, initialize=False)
        wf.initialize()
        zoo["checked"][workflow] = wf.check_properties()
        wf.run()
        wf.finalize()
    return zoo["checked"][workflow]


@pytest.mark.parametrize("workflow", list(WORKFLOWS))
def test_workflow_passes_the_zoo_unit_test(zoo, workflow):
    """``initialize``, ``check_properties``, ``run``, ``finalize`` of each workflow: nothing missing, and the outputs
    where the documented commands put them (``models/model.pt`` is the file ``verify_bundle.py`` requires)."""
    assert zoo_workflow(zoo, workflow) == []
    written = WORKFLOWS[workflow][2] or INFERENCE_OUTPUT[zoo["name"]]
    if workflow == "train_teacher":  # the default teacher's checkpoint (the segmentation bundle's: GroupDRO's)
        written = "models/" + TEACHER_CHECKPOINTS[zoo["bundle"].raw_config("train")["teacher_method"]]
    assert (zoo["root"] / written).exists(), written
    if workflow == "evaluate":  # validate#evaluator#val_handlers refers to validate#handlers, as the zoo expects
        raw = zoo["bundle"].raw_config("train")["validate"]["evaluator"]
        assert raw["val_handlers"] == "@validate#handlers" and "validate#handlers" in zoo["bundle"].raw_config(workflow)


def test_model_pt_passes_the_verify_bundle_steps(zoo):
    """``ci/verify_bundle.py``'s steps on the copy, after the documented training: the directory (metadata,
    ``models/model.pt``), the version in the changelog, the metadata against the schema (the local copy),
    ``verify_net_in_out`` and the TorchScript export of ``models/model.pt``, loaded back."""
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    zoo_workflow(zoo, "train")
    root = zoo["root"]
    meta_file, config_file = str(root / "configs" / "metadata.json"), str(root / "configs" / "inference.json")
    assert (root / "models" / "model.pt").is_file() and (root / "LICENSE").is_file()
    metadata = json.loads(Path(meta_file).read_text())
    assert metadata["version"] in metadata["changelog"]
    verify_metadata(meta_file=meta_file, filepath=SCHEMA)
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, bundle_root=str(root))
    ts = root / "models" / "verify_model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=meta_file,
        config_file=config_file,
        bundle_root=str(root),  # no key_in_ckpt, as verify_bundle.py calls it: model.pt holds the network alone
    )
    assert isinstance(torch.jit.load(str(ts)), torch.jit.ScriptModule)


@pytest.mark.parametrize("zoo", ["cardiac_mri_groupdistil"], indirect=True)
def test_model_pt_exports_without_key_in_ckpt_as_verify_bundle_calls_it(zoo):
    """``models/model.pt`` is the network's bare state dict (what ``ckpt_export`` loads without ``key_in_ckpt``);
    the DRO state of the same epoch is in ``models/model_dro_state.pt``. The exported model gives the network's
    output."""
    from monai.bundle import ckpt_export

    zoo_workflow(zoo, "train")
    root = zoo["root"]
    ts = root / "models" / "verify_model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        bundle_root=str(root),
    )
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(torch.load(root / "models" / "model_dro_state.pt", weights_only=True)) == {"loss", "dro"}
    wf = zoo["bundle"].workflow(zoo["bundle"].configs("inference"), {"bundle_root": str(root)}, "infer", False)
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    net.eval()
    x = torch.rand(2, 1, *zoo["overrides"]["spatial_size"])
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x), net(x), atol=1e-5)


# ------------------------------------------------------------------ metadata, licence, README (no run)


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_names_the_package_where_the_zoo_reads_dependencies(name):
    """``optional_packages_version`` (what the zoo's ``get_bundle_requirements.py`` reads, with
    ``required_packages_version``, which the schema requires) names ``monai-groupdistil`` at the package's version;
    both hold the same packages, since MONAI (1.6) reads ``optional_packages_version`` as a deprecated name of
    ``required_packages_version`` and replaces it with it."""
    from monai.bundle import verify_metadata

    b = Bundle(name)
    metadata = json.loads(Path(b.meta).read_text())
    assert metadata["optional_packages_version"]["monai-groupdistil"] == monai_groupdistil.__version__
    assert metadata["optional_packages_version"] == metadata["required_packages_version"]
    verify_metadata(meta_file=b.meta, filepath=SCHEMA)
    readme = (b.root / "docs" / "README.md").read_text()
    assert 'pip install -e ".[plot,tensorboard]"' in readme  # the install instruction


@pytest.mark.parametrize("name", BUNDLES)
def test_licence_and_readme_follow_the_zoo(name):
    b = Bundle(name)
    licence = (b.root / "LICENSE").read_text()
    for text in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE", "END OF TERMS"):
        assert text in licence, text
    assert "APPENDIX: How to apply the Apache License to your work." in licence
    readme = (b.root / "docs" / "README.md").read_text()
    sections = [line for line in readme.splitlines() if line.startswith("## ")]
    for section in ("## MONAI Bundle Commands", "## System Configuration", "## Citation", "## License"):
        assert section in sections, section
    assert "models/model.pt" in readme and "large_files.yml" in readme  # why the bundle ships without weights
