"""The library functions behind the bundle configs: dataset preparation, splits, inference datalists, checkpoints."""

from __future__ import annotations

import functools
import json
import logging
import re

import pytest
import torch

from scripts import (
    check_booleans,
    find_mnms_root,
    group_counts,
    inference_datalist,
    load_network,
    load_teacher,
    make_synthetic_mnms,
    mnms_splits,
    output_classes,
    prepare_mnms_dataset,
    require_file,
    teacher_loss,
)


@pytest.fixture(scope="module")
def mnms(tmp_path_factory):
    base = tmp_path_factory.mktemp("mnms")
    # vendor D only in the test split: its training split lacks a vendor, like the real M&Ms release
    fractions = {"train": {"A": 0.5, "B": 0.5}, "val": {"A": 0.5, "B": 0.5}, "test": {"A": 0.3, "B": 0.3, "D": 0.4}}
    make_synthetic_mnms(base, n_subjects=20, seed=2, matrix_scale=0.4, n_frames=4, vendor_fractions=fractions)
    return base


def test_prepare_uses_release_and_refuses_other_folders(mnms, tmp_path):
    assert prepare_mnms_dataset(mnms) == str(mnms / "OpenDataset") == find_mnms_root(mnms / "OpenDataset")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"is neither empty nor an M&Ms release"):
        prepare_mnms_dataset(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]  # nothing written


def test_splits_pool_and_resplit_when_training_lacks_a_group(mnms):
    official = mnms_splits(mnms, resplit=False)
    assert {d["vendor"] for d in official["train"]} == {"A", "B"}
    pooled = mnms_splits(mnms)
    assert pooled["resplit"] is True
    assert "D" in {d["vendor"] for d in pooled["train"]}
    ids = [d["subject"] for part in ("train", "val", "test") for d in pooled[part]]
    assert len(ids) == len(set(ids)) == 20
    assert pooled["group_names"] == ["A", "B", "C", "D"]
    assert pooled["group_counts"] == group_counts(pooled["train"], 4)
    assert sum(pooled["group_counts"]) == len(pooled["train"])


def test_group_counts_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match=r"group ids \[5\] outside \[0, 4\)"):
        group_counts([{"group": 5}], 4)


def test_inference_datalist_forms(mnms, tmp_path):
    from_release = inference_datalist(mnms)
    assert len(from_release) == 20 and {"image", "ed", "es", "subject"} <= set(from_release[0])
    image = from_release[0]["image"]
    (tmp_path / "list.json").write_text(
        json.dumps([{"image": image, "ed": 2, "subject": "s1"}, {"image": "rel.nii.gz"}])
    )
    entries = inference_datalist(tmp_path / "list.json", frame=1)
    assert entries[0] == {"image": image, "ed": 2, "es": 2, "subject": "s1"}
    assert entries[1] == {"image": str(tmp_path / "rel.nii.gz"), "ed": 1, "es": 1, "subject": "rel"}
    (tmp_path / "bad.json").write_text(json.dumps([{"img": "x"}]))
    with pytest.raises(ValueError, match=r"bad.json: entry 0 must be an object with an 'image' key"):
        inference_datalist(tmp_path / "bad.json")
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "p1_sa.nii.gz").symlink_to(image)
    (folder / "p1_sa_gt.nii.gz").symlink_to(image)
    assert inference_datalist(folder) == [{"image": str(folder / "p1_sa.nii.gz"), "ed": 0, "es": 0, "subject": "p1_sa"}]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inference_datalist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no NIfTI study"):
        inference_datalist(_empty(tmp_path))


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_load_network_and_teacher(tmp_path, caplog):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    torch.save({"model": net.state_dict(), "loss": {}}, tmp_path / "teacher.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with caplog.at_level(logging.INFO, logger="monai_groupdistil.bundle"):
        teacher = load_teacher(fresh, tmp_path / "teacher.pt", num_classes=3)
    # which teacher a student learns from is in the run's log
    assert f"teacher: '{tmp_path / 'teacher.pt'}' (teacher_method erm)" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), net.state_dict().values()))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert output_classes(teacher) == 3
    with pytest.raises(ValueError, match="predicts 3 classes but the student predicts 4"):
        load_teacher(fresh, tmp_path / "teacher.pt", num_classes=4)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"does not fit .*2.weight: checkpoint \(3, 8\) vs network \(5, 8\)"):
        load_network(wider, tmp_path / "teacher.pt")
    with pytest.raises(FileNotFoundError) as info:
        load_teacher(fresh, tmp_path / "missing.pt", bundle_root="/b")
    message = str(info.value)
    assert f"teacher checkpoint '{tmp_path / 'missing.pt'}' not found. Train the teacher first" in message
    files = "['configs/train.json','configs/train_teacher.json']"  # from the bundle folder, which imports scripts/
    command = f'cd /b && python -m monai.bundle run --config_file "{files}" --meta_file configs/metadata.json'
    command += f" --ckpt_dir {tmp_path} --teacher_method erm"
    assert (
        f"\n\n    {command}\n\n" in message
        and "this run's data and size overrides (the teacher's epochs are --teacher_epochs" in message
    )
    # a teacher_ckpt of another name than the teacher run writes: the message says which file to pass then
    written = tmp_path / "teacher.pt"
    assert message.endswith(f"It writes '{written}': then rerun this command with --teacher_ckpt {written}.")
    with pytest.raises(FileNotFoundError) as info:
        load_teacher(fresh, tmp_path / "teacher_group_dro.pt", teacher_method="group_dro")
    assert "\n\n    python -m monai.bundle run" in str(info.value)  # from the bundle folder: no cd
    assert str(info.value).count("--teacher_method group_dro") == 1
    assert str(info.value).endswith("then rerun this command.")  # the name the teacher run writes: no --teacher_ckpt
    with pytest.raises(FileNotFoundError, match="the trained model; run"):
        require_file(tmp_path / "none.pt", "the trained model; run the training config first")


@pytest.mark.parametrize("value", [True, False, 1, 0])
def test_check_booleans_accepts_booleans(value):
    check_booleans(augment=value, resume=True)


@pytest.mark.parametrize("value", ["false", "False", "no", "true", "maybe", "", 2, 0.5, None, [True]])
def test_check_booleans_names_the_id_for_anything_else(value):
    with pytest.raises(ValueError, match=rf"'use_dro' must be a boolean, got {re.escape(repr(value))}"):
        check_booleans(augment=True, use_dro=value)


def test_teacher_loss_of_each_method_and_a_custom_supervised_loss():
    from monai_groupdistil.losses import GroupDROLoss, PerSampleDiceCELoss

    assert type(teacher_loss("erm", 4, 0.1)) is torch.nn.CrossEntropyLoss
    robust = teacher_loss("group_dro", 4, 0.3, absent_groups="zero")
    assert isinstance(robust, GroupDROLoss) and (robust.num_groups, robust.step_size) == (4, 0.3)
    assert robust.absent_groups == "zero" and robust.loss_fn.reduction == "none"
    seg = teacher_loss("erm", 4, 0.1, loss_fn=functools.partial(PerSampleDiceCELoss, dice_weight=0.5))
    assert type(seg) is PerSampleDiceCELoss and seg.dice_weight == 0.5 and seg.reduction == "mean"
    seg = teacher_loss("group_dro", 4, 0.1, loss_fn=functools.partial(PerSampleDiceCELoss, dice_weight=0.5))
    assert type(seg.loss_fn) is PerSampleDiceCELoss and seg.loss_fn.reduction == "none"
    with pytest.raises(ValueError, match=r"teacher_method must be one of \('erm', 'group_dro'\), got 'kd'"):
        teacher_loss("kd", 4, 0.1)


def test_a_missing_or_empty_dataset_dir_gets_synthetic_data_with_a_warning_naming_it(tmp_path, caplog):
    """A misspelled dataset_dir does not train on synthetic data unnoticed: a WARNING names the folder, says the data
    are synthetic and where to point at a real release; a folder that already holds the data is used quietly."""
    from scripts import prepare_waterbirds_dataset
    from scripts.segmentation_datasets import prepare_seg_dataset

    small = {"matrix_scale": 0.3, "n_frames": 4}
    cases = [
        (functools.partial(prepare_mnms_dataset, synthetic_subjects=6, **small), "6 synthetic subjects", "OpenDataset"),
        (functools.partial(prepare_seg_dataset, synthetic_subjects=6, **small), "6 synthetic subjects", "'MnM2'"),
        (functools.partial(prepare_waterbirds_dataset, synthetic_images=8, image_size=16), "8 synthetic images", ""),
    ]
    for index, (prepare, generated, hint) in enumerate(cases):
        folder = tmp_path / f"dataset_typo{index}"
        if index == 2:
            folder.mkdir()  # an empty folder: the same, said so
        with caplog.at_level(logging.INFO, logger="monai_groupdistil.bundle"):
            caplog.clear()
            prepare(folder)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        message = warnings[0].getMessage()
        state = "is empty" if index == 2 else "does not exist"
        assert f"dataset_dir '{folder}' {state}: generating {generated} there" in message
        assert "SYNTHETIC data" in message and "point --dataset_dir at" in message and hint in message
        with caplog.at_level(logging.INFO, logger="monai_groupdistil.bundle"):
            caplog.clear()
            prepare(folder)  # the second run finds the generated data
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        # a run asking for other data (e.g. the default size after a quick check at tiny size) is told that the data
        # are used as they are, not generated anew
        count = "synthetic_images" if index == 2 else "synthetic_subjects"
        with caplog.at_level(logging.INFO, logger="monai_groupdistil.bundle"):
            caplog.clear()
            prepare(folder, **{count: 12, "seed": 3})
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        before = 8 if index == 2 else 6
        assert f"dataset_dir '{folder}' holds synthetic data generated with {count}={before}, seed=0;" in warnings[0]
        assert f"this run's settings ({count}=12, seed=3) apply only when the data are generated" in warnings[0]
        assert "Delete the folder, or pass another --dataset_dir" in warnings[0]


def test_the_generators_command_line_records_its_settings_under_the_bundles_names(tmp_path, caplog):
    """Data generated with python -m scripts, then a bundle run with another size: the run says so."""
    from scripts import prepare_waterbirds_dataset
    from scripts.synthetic_waterbirds import main as waterbirds_main

    waterbirds_main(["--root", str(tmp_path / "wb"), "--n-images", "8", "--image-size", "16", "--seed", "2"])
    record = json.loads((tmp_path / "wb" / "synthetic_data.json").read_text())
    assert record == {
        "synthetic_images": 8, "seed": 2, "correlation": 0.95, "image_size": 16, "split_fractions": [0.6, 0.2, 0.2],
        "bird_scale": 1.0, "noise": 0.05, "colour_cue": 1.0, "landbird_colour_cue": None, "group_bird_scale": None,
        "place_noise": None,
    }  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="monai_groupdistil.bundle"):
        prepare_waterbirds_dataset(tmp_path / "wb", 8, 2, correlation=0.95, image_size=16)
        assert not caplog.records  # the same settings
        prepare_waterbirds_dataset(tmp_path / "wb", 600, 2, correlation=0.95, image_size=16)
    assert "generated with synthetic_images=8;" in caplog.records[0].getMessage()
    # regenerated in place (overwrite): the record follows the data
    waterbirds_main(["--root", str(tmp_path / "wb"), "--n-images", "12", "--image-size", "16", "--overwrite"])
    assert json.loads((tmp_path / "wb" / "synthetic_data.json").read_text())["synthetic_images"] == 12
    # the cardiac generator, from Python, records too; a record that is not ours is ignored; a folder left with the
    # record alone (the data deleted by hand) is empty to the data set-up, which generates there again
    make_synthetic_mnms(tmp_path / "mnms", n_subjects=6, seed=4, matrix_scale=0.3, n_frames=4)
    assert json.loads((tmp_path / "mnms" / "synthetic_data.json").read_text()) == {
        "synthetic_subjects": 6, "seed": 4, "vendor_fractions": None, "split_fractions": [0.6, 0.2, 0.2],
        "pathology_fractions": None, "pathology_vendor_correlation": 0.0, "correlated_pathology": None,
        "correlation_splits": ["train"], "n_unlabeled": 0, "n_frames": 4, "matrix_scale": 0.3,
    }  # fmt: skip
    (tmp_path / "mnms" / "synthetic_data.json").write_text("[1, 2]")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monai_groupdistil.bundle"):
        prepare_mnms_dataset(tmp_path / "mnms", synthetic_subjects=60)
    assert not caplog.records
    import shutil

    shutil.rmtree(tmp_path / "mnms" / "OpenDataset")
    assert prepare_mnms_dataset(tmp_path / "mnms", 6, matrix_scale=0.3, n_frames=4) == str(
        tmp_path / "mnms" / "OpenDataset"
    )
