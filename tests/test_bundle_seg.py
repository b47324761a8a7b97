"""Bundle-level tests of bundles/cardiac_mri_seg_groupdistil on tiny generated data (1 epoch, 32 x 32 slices).

The expensive runs (the tiny data; teacher, student and evaluation through the CLI) are module-scoped fixtures;
runs that train write into their own folders, so every test can run alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_groupdistil.data import make_synthetic_mnms, segmentation_preprocessing
from tests.bundle_helpers import ENV, SCHEMA, Bundle, own_folders, report_rows

SEG = Bundle("cardiac_mri_seg_groupdistil")
CLASSIFICATION = Bundle("cardiac_mri_groupdistil")
TINY = {"epochs": 1, "teacher_epochs": 1, "spatial_size": [32, 32], "pixdim": [6.0, 6.0], "batch_size": 8}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle"]
VENDORS, STRUCTURES = ["A", "B", "C", "D"], ["LV", "MYO", "RV"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg_bundle")
    make_synthetic_mnms(base / "data", n_subjects=16, seed=1, matrix_scale=0.4, n_frames=4, num_workers=0)
    return {"base": base, "overrides": SEG.run_overrides(base, **TINY)}


@pytest.fixture(scope="module")
def trained(work):
    """Teacher, GroupDistil student (a large DRO step size, so the weights move) and evaluation, through the CLI."""
    ov = work["overrides"]
    SEG.run_cli(SEG.configs("train", "train_teacher"), ov)
    SEG.run_cli(SEG.configs("train"), {**ov, "step_size": 5.0})
    evaluation = SEG.run_cli(SEG.configs("train", "evaluate"), ov)
    return {**work, "evaluate_stdout": evaluation.stdout}


def _dice(pred: np.ndarray, label: np.ndarray, c: int) -> float:
    p, g = pred == c, label == c
    return float("nan") if not g.any() else 2.0 * float((p & g).sum()) / float(p.sum() + g.sum())


def test_teacher_student_evaluate_through_the_cli_and_the_report_by_vendor_and_structure(trained):
    ov = trained["overrides"]
    ckpt = Path(ov["ckpt_dir"])
    assert (ckpt / "teacher.pt").is_file()
    checkpoint = torch.load(ckpt / "model.pt", weights_only=False)
    assert {"model", "loss", "dro"} <= set(checkpoint)
    weights = checkpoint["loss"]["group_weights"]
    assert weights.shape == (4,) and not torch.allclose(weights, torch.full((4,), 0.25))
    report = Path(ov["output_dir"]) / "groupdistil"
    assert f"per-group report: {report}" in trained["evaluate_stdout"]
    rows = report_rows(report)
    assert list(rows[0]) == ["group", "name", "structure", "samples", "dice", "hd95"]
    assert [(r["name"], r["structure"]) for r in rows] == [(v, s) for v in VENDORS for s in [*STRUCTURES, "mean"]]

    # independent check: the saved student segments every test volume slice by slice; Dice per volume with numpy
    wf = SEG.workflow(SEG.configs("train", "evaluate"), ov, workflow_type="infer")
    splits = wf.parser.get_parsed_content("splits")
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(checkpoint["model"])
    net.eval()
    preprocessing = segmentation_preprocessing(TINY["spatial_size"], TINY["pixdim"])
    per_vendor: dict[int, list] = {}
    for entry in splits["test"]:
        item = preprocessing(dict(entry))
        with torch.no_grad():
            pred = net(item["image"].as_tensor().permute(3, 0, 1, 2)).argmax(1).permute(1, 2, 0).numpy()
        label = item["label"][0].numpy()
        per_vendor.setdefault(entry["group"], []).append([_dice(pred, label, c) for c in (1, 2, 3)])
    for row in rows:
        g = VENDORS.index(row["name"])
        if g not in per_vendor:
            assert row["samples"] == "0" and np.isnan(float(row["dice"]))
            continue
        values = np.nanmean(np.array(per_vendor[g]), axis=0)
        expected = (
            float(np.mean(values)) if row["structure"] == "mean" else float(values[STRUCTURES.index(row["structure"])])
        )
        assert int(row["samples"]) == len(per_vendor[g])
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-5), row
    metrics = json.loads((report / "metrics.json").read_text())
    means = {r["name"]: float(r["dice"]) for r in rows if r["structure"] == "mean" and r["samples"] != "0"}
    assert metrics["worst_group"] == min(means, key=means.get)
    assert metrics["worst_group_dice"] == pytest.approx(min(means.values()))
    assert metrics["samples"] == len(splits["test"])
    for name in ("group_dice.png", "dro_weights.png", "worst_group_cases.png"):
        assert (report / name).read_bytes()[:8] == PNG_MAGIC, name


# method -> (override config after train.json, checkpoint name)
METHODS = {
    "teacher": ("train_teacher", "teacher.pt"),
    "groupdistil": (None, "model.pt"),
    "erm": ("erm", "erm.pt"),
    "kd": ("kd", "kd.pt"),
    "group_dro": ("group_dro", "group_dro.pt"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_config_through_config_workflow(trained, method, tmp_path):
    override, ckpt = METHODS[method]
    configs = SEG.configs("train") if override is None else SEG.configs("train", override)
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=None if method == "teacher" else trained)
    wf = SEG.workflow(configs, ov)
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / ckpt, weights_only=False)
    assert ("dro" in checkpoint) == (method in ("groupdistil", "group_dro"))
    ev = SEG.workflow([*configs, *SEG.configs("evaluate")], ov, workflow_type="infer")
    assert ev.check_properties() == []
    ev.run()
    ev.finalize()
    assert len(report_rows(Path(ov["output_dir"]) / method)) == 16


def test_multi_process_training_with_torchrun(trained, tmp_path):
    ov = own_folders(trained["overrides"], tmp_path, teacher_from=trained)
    SEG.run_cli(SEG.configs("train", "multi_gpu_train"), {**ov, "step_size": 5.0}, runner=TORCHRUN)
    checkpoint = torch.load(Path(ov["ckpt_dir"]) / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved without the DDP wrapper
    assert not torch.allclose(checkpoint["loss"]["group_weights"], torch.full((4,), 0.25))


def test_inference_writes_masks_with_the_shape_and_affine_of_the_input(trained, tmp_path):
    ov = trained["overrides"]
    folder = tmp_path / "studies"
    folder.mkdir()
    cines = sorted((Path(ov["dataset_dir"]) / "OpenDataset" / "Testing").glob("*/*_sa.nii.gz"))[:2]
    for s in cines:
        (folder / s.name).symlink_to(s)
    cine = nib.load(cines[0])
    oblique = cine.affine.copy()
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1]])  # rotated in-plane
    nib.save(nib.Nifti1Image(np.asarray(cine.dataobj)[..., 1], oblique), str(folder / "volume3d.nii.gz"))
    overrides = {k: ov[k] for k in ("bundle_root", "ckpt_dir", "spatial_size", "pixdim")}
    wf = SEG.workflow(
        SEG.configs("inference"),
        {**overrides, "dataset_dir": str(folder), "mask_dir": str(tmp_path / "masks")},
        "infer",
    )
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    outputs = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert outputs == sorted([*(s.name.replace(".nii.gz", "_seg.nii.gz") for s in cines), "volume3d_seg.nii.gz"])
    for source in sorted(folder.iterdir()):
        image, mask = nib.load(source), nib.load(tmp_path / "masks" / source.name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == image.shape[:3] and np.allclose(mask.affine, image.affine, atol=1e-5), source.name
        values = set(np.unique(np.asarray(mask.dataobj)).tolist())
        assert values <= {0, 1, 2, 3} and mask.get_data_dtype() == np.uint8


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_conformance_commands(trained, tmp_path):
    base = [sys.executable, "-m", "monai.bundle"]

    def run(args):
        return subprocess.run(base + args, capture_output=True, text=True, timeout=300, env=ENV)

    out = run(["verify_metadata", "--meta_file", SEG.meta, "--filepath", SCHEMA])
    assert out.returncode == 0 and "metadata is verified with no error" in out.stdout + out.stderr, out.stderr
    common = ["--meta_file", SEG.meta, "--config_file", str(SEG.config_dir / "inference.json")]
    out = run(["verify_net_in_out", "network_def", *common])
    assert out.returncode == 0 and "data shape of network is verified with no error" in out.stdout + out.stderr
    ckpt, ts = Path(trained["overrides"]["ckpt_dir"]) / "model.pt", tmp_path / "model.ts"
    export = ["ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--key_in_ckpt", "model"]
    out = run([*export, *common, "--bundle_root", str(SEG.root)])
    assert out.returncode == 0, out.stderr[-3000:]
    scripted = torch.jit.load(str(ts))
    net = SEG.workflow(SEG.configs("inference"), {"bundle_root": str(SEG.root)}, "infer").parser.get_parsed_content(
        "network_def"
    )
    net.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    net.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


# ------------------------------------------------------------------ configuration (no training)


def test_ids_shared_with_the_classification_bundle_and_the_teacher_settings():
    seg, cls = SEG.raw_config("train"), CLASSIFICATION.raw_config("train")
    shared = ["bundle_root", "dataset_dir", "ckpt_dir", "output_dir", "log_dir", "device", "epochs", "teacher_epochs"]
    shared += ["synthetic_subjects", "num_workers", "group_by", "temperature", "alpha", "step_size", "seed"]
    shared += ["batch_size", "learning_rate", "augment", "balanced_sampling", "use_dro", "train_teacher_if_missing"]
    for key in shared:
        assert key in seg and key in cls, key
        assert type(seg[key]) is type(cls[key]), key
    assert set(seg["teacher_overrides"]) == SEG.teacher_shared_ids()
    # the student has at most one eighth of the teacher's parameters
    wf = SEG.workflow(SEG.configs("train"), {"bundle_root": str(SEG.root)}, initialize=False)
    count = lambda name: sum(p.numel() for p in wf.parser.get_parsed_content(name).parameters())  # noqa: E731
    assert count("network_def") * 8 <= count("teacher_def")


def test_metadata_eval_metrics_are_the_measured_ones_in_the_readme():
    meta = json.loads(Path(SEG.meta).read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    metrics = meta["eval_metrics"]
    readme = (SEG.root / "docs" / "README.md").read_text()
    for key in ("worst_group_dice", "dice"):
        assert 0 < metrics[key] <= 1 and f"{metrics[key]:.3f}" in readme, key
