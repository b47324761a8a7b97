"""Inference that keeps what it can (issue 24): a study that cannot be read, or whose input or prediction is not
finite, is listed in ``failures.csv`` with its file and the reason, the other studies (its batch-mates too) are
predicted as in a run without it, and the run then fails naming it; outputs are replaced only by complete new ones."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import NibabelWriter
from monai.engines import SupervisedEvaluator
from monai.handlers import ClassificationSaver
from monai.transforms import Activationsd

from monai_groupdistil.data.skip_failed import (
    FAILURE_KEY,
    SkipFailedDataset,
    SkipFailedLoader,
    SkipNonFinited,
    skip_failed_collate,
)
from monai_groupdistil.engines import remove_temporary_files
from monai_groupdistil.handlers import (
    AtomicNibabelWriter,
    ClassProbabilitySaver,
    InferenceFailedError,
    InferenceFailureHandler,
)
from scripts import make_synthetic_mnms
from tests.bundle_helpers import Bundle, error_chain, one_thread, root_error  # noqa: F401 (one_thread: autouse)
from tests.test_inference_configs import network_state

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")
CLASSIFIER, SEGMENTER = "cardiac_mri_groupdistil", "cardiac_mri_seg_groupdistil"
SMALL = {CLASSIFIER: {"spatial_size": [32, 32], "pixdim": [4.0, 4.0]}, SEGMENTER: {"spatial_size": [32, 32]}}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """Five good 4-D cines of a synthetic M&Ms release and three bad studies: a truncated copy of a good file, an
    all-NaN study (a good one's header) and a file that does not exist."""
    base = tmp_path_factory.mktemp("studies")
    root = make_synthetic_mnms(base / "mnms", n_subjects=5, seed=1, matrix_scale=0.5, n_frames=4, num_workers=0)
    good = sorted(f for f in glob.glob(f"{root}/**/*_sa.nii.gz", recursive=True))
    assert len(good) == 5
    data = Path(good[0]).read_bytes()
    (base / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    header = nib.load(good[1])
    nib.save(nib.Nifti1Image(np.full(header.shape, np.nan, np.float32), header.affine), base / "all_nan.nii.gz")
    bad = {"broken": str(base / "broken.nii.gz"), "all_nan": str(base / "all_nan.nii.gz")}
    bad["missing"] = str(base / "missing.nii.gz")
    good = {f"good{i}": f for i, f in enumerate(good)}
    # batches of 3: [good0, broken, good1], [all_nan, good2, missing], [good3, good4]
    mixed = ["good0", "broken", "good1", "all_nan", "good2", "missing", "good3", "good4"]
    files = {**good, **bad}
    for name, subjects in (("mixed", mixed), ("good", list(good))):
        for key in ("ed", "frame"):  # the classification and the segmentation bundle's JSON datalists
            entries = [{"image": files[s], key: 0, "subject": s} for s in subjects]
            (base / f"{name}_{key}.json").write_text(json.dumps(entries))
    return {"base": base, "files": files, "good": list(good), "bad": bad}


def check_failures_csv(path: Path, bad: dict[str, str], id_name: str = "subject") -> None:
    """``failures.csv``: the bad studies in datalist order, each with its file and the reason of its failure."""
    rows = read_rows(path)
    assert list(rows[0]) == [id_name, "file", "reason"]
    assert [(r[id_name], r["file"]) for r in rows] == [(s, bad[s]) for s in ("broken", "all_nan", "missing")]
    reasons = {r[id_name]: r["reason"] for r in rows}
    assert reasons["broken"].startswith("EOFError: Compressed file ended"), reasons
    assert reasons["all_nan"].startswith("non-finite input 'image': "), reasons
    assert reasons["missing"] == f"FileNotFoundError: '{bad['missing']}' does not exist", reasons


def check_message(message: str, bad: dict[str, str], total: int, failures_csv: Path) -> None:
    assert f"inference failed for 3 of {total} studies (the other {total - 3} were predicted" in message
    assert f"each is listed in '{failures_csv}'" in message
    for subject, file in bad.items():
        assert f"'{subject}' ({file}): " in message, subject
    assert "Fix or remove these files and run again." in message


def test_classification_keeps_the_good_studies_and_exits_non_zero(studies, tmp_path):
    """``python -m monai.bundle run`` of inference.json, batches of 3 mixing good and bad studies: the good ones'
    predictions replace the earlier predictions.csv, equal to a run without the bad ones; the bad ones are logged and
    listed; the exit status is 1 with an error naming them."""
    bundle, base = Bundle(CLASSIFIER), studies["base"]
    torch.save({"model": network_state(CLASSIFIER)}, tmp_path / "model.pt")
    common = {"bundle_root": str(bundle.root), "ckpt_dir": str(tmp_path), "device": "cpu", **SMALL[CLASSIFIER]}
    reference = bundle.workflow(
        bundle.configs("inference"),
        {**common, "dataset_dir": str(base / "good_ed.json"), "output_file": str(tmp_path / "ref" / "p.csv")},
        "infer",
    )
    reference.run()
    assert read_rows(tmp_path / "ref" / "failures.csv") == [] and (tmp_path / "ref" / "failures.csv").is_file()
    expected = read_rows(tmp_path / "ref" / "p.csv")
    assert [r["subject"] for r in expected] == studies["good"]

    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("subject,predicted_class\nearlier,NOR\n")
    overrides = {
        **common,
        "dataset_dir": str(base / "mixed_ed.json"),
        "output_file": str(out / "predictions.csv"),
        "batch_size": 3,
    }
    run = bundle.run_cli(bundle.configs("inference"), overrides, check=False)
    log = run.stdout + run.stderr
    assert run.returncode == 1, log[-3000:]
    assert "InferenceFailedError: inference failed for 3 of 8 studies" in run.stderr, run.stderr[-3000:]
    check_message(run.stderr, studies["bad"], 8, out / "failures.csv")
    for subject, file in studies["bad"].items():
        assert f"WARNING - study '{subject}' ({file}) not predicted: " in log, subject

    rows = read_rows(out / "predictions.csv")
    assert [r["subject"] for r in rows] == studies["good"]
    assert [r["predicted_class"] for r in rows] == [r["predicted_class"] for r in expected]
    columns = [c for c in expected[0] if c.startswith("prob_")]
    got = torch.tensor([[float(r[c]) for c in columns] for r in rows])
    want = torch.tensor([[float(r[c]) for c in columns] for r in expected])
    assert torch.allclose(got, want, atol=2e-6, rtol=0), (got, want)
    assert len({r[columns[0]] for r in rows}) > 1  # the inputs make a difference
    check_failures_csv(out / "failures.csv", studies["bad"])
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv", "predictions.csv"]  # no temporary file left


@pytest.mark.parametrize("checkpoint", ["missing", "damaged", "another_network"])
def test_a_run_that_fails_before_writing_leaves_the_earlier_outputs(studies, tmp_path, checkpoint):
    """No checkpoint or a damaged one (the run stops while the handlers are built, naming the file), or one that
    does not fit the network (it stops when the evaluator starts, after the prediction saver was built): the earlier
    predictions.csv and failures.csv are untouched (MONAI's CSVSaver deleted predictions.csv when it was built)."""
    bundle = Bundle(CLASSIFIER)
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"predictions.csv": "subject,predicted_class\nearlier,NOR\n", "failures.csv": "subject,file,reason\n"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    models = tmp_path / "models"
    models.mkdir()
    if checkpoint == "another_network":
        torch.save({"model": {"fc.weight": torch.zeros(3, 8)}}, models / "model.pt")
    if checkpoint == "damaged":  # a write killed half-way, by an older version that wrote in place
        torch.save({"fc.weight": torch.zeros(300, 80)}, models / "model.pt")
        (models / "model.pt").write_bytes((models / "model.pt").read_bytes()[:5000])
    overrides = {
        "bundle_root": str(bundle.root),
        "ckpt_dir": str(models),
        "device": "cpu",
        "dataset_dir": str(studies["base"] / "good_ed.json"),
        "output_file": str(out / "predictions.csv"),
        **SMALL[CLASSIFIER],
    }
    wf = bundle.workflow(bundle.configs("inference"), overrides, "infer")
    with pytest.raises(RuntimeError) as err:
        wf.run()
    if checkpoint == "missing":
        assert isinstance(root_error(err.value), FileNotFoundError)
        assert f"'{models / 'model.pt'}' not found: the trained student" in error_chain(err.value)
    elif checkpoint == "damaged":
        named = [e for e in error_chain(err.value).split("\n") if str(models / "model.pt") in e]
        assert named and "damaged" in named[0], error_chain(err.value)
    else:
        assert "Missing key(s) in state_dict" in error_chain(err.value)
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier


def test_segmentation_writes_the_good_masks_and_fails_naming_the_bad_studies(studies, tmp_path):
    """The segmentation bundle's inference: the masks of the good studies, equal to a run without the bad ones; the
    bad ones listed in failures.csv and named by the error; no mask and no temporary file for them."""
    bundle, base = Bundle(SEGMENTER), studies["base"]
    torch.save({"model": network_state(SEGMENTER)}, tmp_path / "model.pt")
    common = {"bundle_root": str(bundle.root), "ckpt_dir": str(tmp_path), "device": "cpu", **SMALL[SEGMENTER]}
    reference = bundle.workflow(
        bundle.configs("inference"),
        {**common, "dataset_dir": str(base / "good_frame.json"), "output_dir": str(tmp_path / "ref")},
        "infer",
    )
    reference.run()
    wf = bundle.workflow(
        bundle.configs("inference"),
        {**common, "dataset_dir": str(base / "mixed_frame.json"), "output_dir": str(tmp_path / "out")},
        "infer",
    )
    with pytest.raises(RuntimeError) as err:
        wf.run()
    failed = root_error(err.value)
    assert isinstance(failed, InferenceFailedError), error_chain(err.value)
    check_message(str(failed), studies["bad"], 8, tmp_path / "out" / "failures.csv")
    assert [f["id"] for f in failed.failures] == ["broken", "all_nan", "missing"]
    check_failures_csv(tmp_path / "out" / "failures.csv", studies["bad"])

    masks = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "ref" / "masks").iterdir())
    named = sorted(Path(studies["files"][s]).name.replace(".nii.gz", "_seg.nii.gz") for s in studies["good"])
    assert masks == named  # SaveImaged names a mask after its input file
    distinct = set()
    for name in masks:
        mask = np.asarray(nib.load(tmp_path / "out" / "masks" / name).dataobj)
        assert np.array_equal(mask, np.asarray(nib.load(tmp_path / "ref" / "masks" / name).dataobj)), name
        distinct |= set(np.unique(mask).tolist())
    assert len(distinct) > 1  # the masks are not empty


# ------------------------------------------------------------------ the pieces, on an evaluator of known outputs


def _evaluator(tmp_path: Path, logits: torch.Tensor, ids: list[str], batch_size: int = 2) -> SupervisedEvaluator:
    """Identity "network" on ``logits`` (the inputs), the bundles' failure handling and predictions.csv writing."""
    data = [{"image": logits[i], "label": 0, "subject": s, "path": f"/data/{s}.nii.gz"} for i, s in enumerate(ids)]
    dataset = SkipFailedDataset(data, transform=None, file_key="path", id_key="subject", finite_keys=())
    saver = ClassificationSaver(
        batch_transform=lambda batch: [{"filename_or_obj": item["subject"]} for item in batch],
        output_transform=lambda output: [item["pred"] for item in output],
        saver=ClassProbabilitySaver(["a", "b", "c"], tmp_path, "predictions.csv"),
    )
    return SupervisedEvaluator(
        device="cpu",
        val_data_loader=SkipFailedLoader(dataset, batch_size=batch_size),
        network=torch.nn.Identity(),
        postprocessing=SkipNonFinited("pred", Activationsd("pred", softmax=True)),
        val_handlers=[InferenceFailureHandler(tmp_path / "failures.csv", file_key="path"), saver],
    )


def test_a_non_finite_prediction_sets_aside_its_study_only(tmp_path):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, float("nan"), 1.0], [-1.0, -1.0, 0.5], [1.0, float("inf"), 0.0]])
    (tmp_path / "predictions.csv").write_text("earlier\n")
    evaluator = _evaluator(tmp_path, logits, ["s0", "s1", "s2", "s3"])
    with pytest.raises(InferenceFailedError, match=r"inference failed for 2 of 4 studies \(the other 2 were") as err:
        evaluator.run()
    probs = torch.softmax(logits[[0, 2]], dim=1)
    expected = ["subject,predicted_class,prob_a,prob_b,prob_c"] + [
        ",".join([s, c, *[f"{p:.6f}" for p in probs[k].tolist()]])
        for k, (s, c) in enumerate([("s0", "a"), ("s2", "c")])
    ]
    assert (tmp_path / "predictions.csv").read_text().splitlines() == expected
    reason = "non-finite network output 'pred': 1 of 3 values are NaN or infinite"
    assert err.value.failures == [
        {"id": "s1", "file": "/data/s1.nii.gz", "reason": reason},
        {"id": "s3", "file": "/data/s3.nii.gz", "reason": reason},
    ]
    assert read_rows(tmp_path / "failures.csv") == [
        {"subject": f["id"], "file": f["file"], "reason": f["reason"]} for f in err.value.failures
    ]
    assert f"'s1' (/data/s1.nii.gz): {reason}; 's3' (/data/s3.nii.gz): {reason}." in str(err.value)


def test_a_batch_whose_every_study_failed_reaches_the_saver_empty(tmp_path):
    """The savers' transforms of the bundles (and of the handler's example) accept the empty batch."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0], [float("nan")] * 3, [0.0, float("inf"), 0.0]])
    logits = torch.cat([logits, torch.tensor([[-1.0, -1.0, 0.5]])])
    with pytest.raises(InferenceFailedError, match=r"failed for 2 of 5 studies \(the other 3 were predicted"):
        _evaluator(tmp_path, logits, ["s0", "s1", "s2", "s3", "s4"], batch_size=2).run()  # s2 and s3: one batch
    assert [r["subject"] for r in read_rows(tmp_path / "predictions.csv")] == ["s0", "s1", "s4"]
    assert [r["subject"] for r in read_rows(tmp_path / "failures.csv")] == ["s2", "s3"]


def test_no_study_predicted_leaves_the_earlier_predictions(tmp_path):
    logits = torch.full((3, 3), float("nan"))
    (tmp_path / "predictions.csv").write_text("earlier\n")
    with pytest.raises(InferenceFailedError, match=r"failed for 3 of 3 studies \(no study was predicted"):
        _evaluator(tmp_path, logits, ["s0", "s1", "s2"]).run()
    assert (tmp_path / "predictions.csv").read_text() == "earlier\n"
    assert [r["subject"] for r in read_rows(tmp_path / "failures.csv")] == ["s0", "s1", "s2"]


def test_a_run_without_failures_replaces_an_earlier_failure_list(tmp_path):
    (tmp_path / "failures.csv").write_text("subject,file,reason\nold,/data/old.nii.gz,EOFError\n")
    _evaluator(tmp_path, torch.eye(3), ["s0", "s1", "s2"]).run()
    assert (tmp_path / "failures.csv").read_text() == "subject,file,reason\n"
    assert [r["subject"] for r in read_rows(tmp_path / "predictions.csv")] == ["s0", "s1", "s2"]


def _fail_on_odd(item: dict) -> dict:
    if item["n"] % 2:
        raise ValueError(f"odd {item['n']}")
    return {**item, "image": torch.full((2,), float(item["n"]))}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_failed_loader_keeps_batch_mates_and_records_failures(num_workers, tmp_path):
    """The records come through worker processes; a batch whose items all failed is not yielded."""
    for n in range(8):
        (tmp_path / f"f{n}").touch()  # the files exist: the reasons are the transform's errors
    data = [{"n": n, "image": str(tmp_path / f"f{n}"), "subject": f"s{n}"} for n in (0, 1, 2, 3, 5, 7, 4)]
    loader = SkipFailedLoader(SkipFailedDataset(data, _fail_on_odd), batch_size=2, num_workers=num_workers)
    for _ in range(2):  # each pass starts a new list
        batches = [batch["subject"] for batch in loader]
        assert batches == [["s0"], ["s2"], ["s4"]]  # [0, 1], [2, 3], [5, 7] (none left), [4]
        assert loader.failures == [
            {"id": f"s{n}", "file": str(tmp_path / f"f{n}"), "reason": f"ValueError: odd {n}"} for n in (1, 3, 5, 7)
        ]
    assert skip_failed_collate([{FAILURE_KEY: {"id": "x"}}]) == {FAILURE_KEY: [{"id": "x"}]}


def test_atomic_nibabel_writer_keeps_the_earlier_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "case_seg.nii.gz"
    writer = AtomicNibabelWriter()
    writer.set_data_array(np.ones((4, 4, 2), np.uint8), channel_dim=None)
    writer.write(target)
    assert np.asarray(nib.load(target).dataobj).sum() == 32 and [p.name for p in tmp_path.iterdir()] == [target.name]
    earlier = target.read_bytes()

    def save_half(img, filename):  # a write that stops part-way, as a full disk or a kill would
        shutil.copyfile(target, filename)
        with open(filename, "r+b") as f:
            f.truncate(10)
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", save_half)
    writer.set_data_array(np.zeros((4, 4, 2), np.uint8), channel_dim=None)
    with pytest.raises(OSError, match="No space left"):
        writer.write(target)
    assert target.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == [target.name]
    assert issubclass(AtomicNibabelWriter, NibabelWriter)


def test_a_killed_writer_s_temporary_mask_is_removed_as_a_checkpoint_s(tmp_path, monkeypatch):
    """A mask's temporary file ends with ``.nii.gz`` (nibabel chooses the format by it) and is named as a
    checkpoint's is, so ``remove_temporary_files`` removes the one a killed run left, and no other file."""
    target, saved, save = tmp_path / "case_seg.nii.gz", [], nib.save
    monkeypatch.setattr(nib, "save", lambda img, filename: (saved.append(Path(filename)), save(img, filename)))
    writer = AtomicNibabelWriter()
    writer.set_data_array(np.ones((4, 4, 2), np.uint8), channel_dim=None)
    writer.write(target)
    assert saved[0].parent == tmp_path and saved[0].name.startswith(".case_seg.nii.gz~groupdistil-tmp~")
    assert saved[0].name.endswith(f"~{os.getpid()}.nii.gz") and target.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / saved[0].name.replace(f"~{os.getpid()}.", f"~{dead.pid}.")
    earlier_version = tmp_path / saved[0].name.replace(f"~{os.getpid()}.nii.gz", f"~{dead.pid}")  # no suffix
    for path in (stale, earlier_version, tmp_path / ".case_seg.nii.gz.tmp", tmp_path / "notes.nii.gz"):
        path.write_bytes(b"half a mask")
    assert sorted(remove_temporary_files(tmp_path)) == sorted([stale, earlier_version])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".case_seg.nii.gz.tmp", target.name, "notes.nii.gz"]


def test_waterbirds_keeps_the_readable_images(tmp_path):
    """The Waterbirds bundle's inference, batches of 4: a truncated image and a missing one among eight good ones
    are listed under their ``img_id``; the good ones are predicted as in a run without them."""
    from scripts import make_synthetic_waterbirds

    bundle = Bundle("waterbirds_groupdistil")
    root = Path(make_synthetic_waterbirds(tmp_path / "wb", n_images=8, seed=1, image_size=40))
    images = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    assert len(images) == 8
    data = Path(images[0]).read_bytes()
    (tmp_path / ("broken" + Path(images[0]).suffix)).write_bytes(data[: len(data) // 3])
    bad = {"broken": str(tmp_path / ("broken" + Path(images[0]).suffix)), "missing": str(tmp_path / "missing.jpg")}
    good = [{"image": f, "img_id": f"good{i}"} for i, f in enumerate(images)]
    mixed = [
        *good[:3],
        {"image": bad["broken"], "img_id": "broken"},
        *good[3:6],
        {"image": bad["missing"], "img_id": "missing"},
    ]
    mixed += good[6:]
    for name, entries in (("good", good), ("mixed", mixed)):
        (tmp_path / f"{name}.json").write_text(json.dumps(entries))
    torch.save({"model": network_state(bundle.name)}, tmp_path / "model.pt")
    common = {"bundle_root": str(bundle.root), "ckpt_dir": str(tmp_path), "device": "cpu", "batch_size": 4}
    common.update(spatial_size=[32, 32], resize=[36, 36])
    runs = {}
    for name in ("good", "mixed"):
        overrides = {
            **common,
            "dataset_dir": str(tmp_path / f"{name}.json"),
            "output_file": str(tmp_path / name / "p.csv"),
        }
        wf = bundle.workflow(bundle.configs("inference"), overrides, "infer")
        if name == "good":
            wf.run()
        else:
            with pytest.raises(RuntimeError) as err:
                wf.run()
            failed = root_error(err.value)
            assert isinstance(failed, InferenceFailedError), error_chain(err.value)
            assert "inference failed for 2 of 10 studies (the other 8 were predicted" in str(failed)
        runs[name] = read_rows(tmp_path / name / "p.csv")
    assert [r["img_id"] for r in runs["mixed"]] == [g["img_id"] for g in good]
    columns = ["prob_landbird", "prob_waterbird"]
    got = torch.tensor([[float(r[c]) for c in columns] for r in runs["mixed"]])
    want = torch.tensor([[float(r[c]) for c in columns] for r in runs["good"]])
    assert torch.allclose(got, want, atol=2e-6, rtol=0) and len({r[columns[0]] for r in runs["good"]}) > 1
    rows = read_rows(tmp_path / "mixed" / "failures.csv")
    assert [(r["img_id"], r["file"]) for r in rows] == list(bad.items())
    # LoadImage's message (its first line: it appends every reader's traceback), not MONAI's "applying transform"
    assert rows[0]["reason"] == f"RuntimeError: LoadImage cannot find a suitable reader for file: {bad['broken']}."
    assert rows[1]["reason"] == f"FileNotFoundError: '{bad['missing']}' does not exist"


def test_every_pass_runs_to_the_loaders_end(tmp_path):
    """ignite keeps the first pass's batch count for the next run of an evaluator; the handler makes a later pass
    over a loader of more batches (here: studies added to the datalist) predict all of them."""
    logits = torch.eye(3)
    evaluator = _evaluator(tmp_path, logits[:2], ["s0", "s1"], batch_size=1)
    evaluator.run()
    assert [r["subject"] for r in read_rows(tmp_path / "predictions.csv")] == ["s0", "s1"]
    dataset = evaluator.data_loader.loader.dataset
    dataset.data.append({"image": logits[2], "label": 0, "subject": "s2", "path": "/data/s2.nii.gz"})
    evaluator.run()
    assert [r["subject"] for r in read_rows(tmp_path / "predictions.csv")] == ["s0", "s1", "s2"]
