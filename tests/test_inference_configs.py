"""inference.json of the three bundles: strict checkpoint loading, and class predictions written by MONAI's
ClassificationSaver with ClassProbabilitySaver (checked against the network applied independently)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedEvaluator
from monai.handlers import ClassificationSaver, from_engine
from monai.transforms import Activationsd

from monai_groupdistil.engines.checkpoint_saver import temporary_name
from monai_groupdistil.handlers import ClassProbabilitySaver
from scripts import make_synthetic_mnms, make_synthetic_waterbirds

ROOT = Path(__file__).resolve().parents[1] / "bundles"
BUNDLES = ["cardiac_mri_groupdistil", "waterbirds_groupdistil", "cardiac_mri_seg_groupdistil"]
SMALL = {  # the classification bundles at a small size (the overrides of their bundle tests)
    "cardiac_mri_groupdistil": {"spatial_size": [32, 32], "pixdim": [4.0, 4.0]},
    "waterbirds_groupdistil": {"spatial_size": [32, 32], "resize": [36, 36]},
}


def inference_workflow(bundle: str, **overrides) -> ConfigWorkflow:
    config_dir = ROOT / bundle / "configs"
    wf = ConfigWorkflow(
        config_file=str(config_dir / "inference.json"),
        meta_file=str(config_dir / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(ROOT / bundle),
        device="cpu",
        **overrides,
    )
    wf.initialize()
    return wf


def network_state(bundle: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = inference_workflow(bundle).parser.get_parsed_content("network_def")
    with torch.no_grad():
        for p in net.parameters():  # away from the initialisation, so that a load that did nothing shows
            p.add_(0.1 * torch.randn_like(p))
    return net.state_dict()


def run_checkpoint_loader(bundle: str, checkpoint: dict, tmp_path: Path) -> torch.nn.Module:
    """Save ``checkpoint`` as the bundle's ``models/model.pt``, run the config's ``checkpoint_loader`` on an engine."""
    torch.save(checkpoint, tmp_path / "model.pt")
    wf = inference_workflow(bundle, ckpt_dir=str(tmp_path))
    loader = wf.parser.get_parsed_content("checkpoint_loader")
    assert wf.parser.get_parsed_content("handlers")[0] is loader
    engine = Engine(lambda engine, batch: None)
    loader.attach(engine)
    engine.run([0], max_epochs=1)
    return wf.parser.get_parsed_content("network")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_checkpoint_is_loaded_strictly(bundle, tmp_path):
    state = network_state(bundle)
    network = run_checkpoint_loader(bundle, {"model": state, "epoch": 3}, tmp_path)
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items())
    dropped = sorted(state)[-1]
    missing = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"{dropped}\""):
        run_checkpoint_loader(bundle, {"model": missing}, tmp_path)
    extra = {**state, "head.weight": torch.zeros(2, 2)}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"head.weight\""):
        run_checkpoint_loader(bundle, {"model": extra}, tmp_path)


def _dataset(bundle: str, base: Path) -> str:
    if bundle == "cardiac_mri_groupdistil":
        return make_synthetic_mnms(base, n_subjects=5, seed=1, matrix_scale=0.5, n_frames=4, num_workers=0)
    return make_synthetic_waterbirds(base, n_images=30, seed=1, image_size=40)


@pytest.mark.parametrize("bundle", ["cardiac_mri_groupdistil", "waterbirds_groupdistil"])
def test_predictions_csv_matches_the_network(bundle, tmp_path):
    """One row per input: its id, the class of the largest probability, the softmax of the network's logits."""
    state = network_state(bundle)
    torch.save({"model": state}, tmp_path / "model.pt")
    out_file = tmp_path / "out" / "pred.csv"
    # what a killed earlier run left in the output folder: its partial write is removed at start, nothing else is
    out_file.parent.mkdir()
    stale, other = temporary_name(out_file), out_file.parent / "notes.txt"
    stale.write_text("subject,predicted_cl")
    other.write_text("mine")
    overrides = {"ckpt_dir": str(tmp_path), "dataset_dir": _dataset(bundle, tmp_path / "data"), **SMALL[bundle]}
    wf = inference_workflow(bundle, output_file=str(out_file), **overrides)
    assert not stale.exists() and other.read_text() == "mine"
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    parser = wf.parser
    classes, id_key = parser.get_parsed_content("classes"), parser.get_parsed_content("id_key")
    with open(out_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [id_key, "predicted_class", *[f"prob_{c}" for c in classes]]
    # independently: the network with the checkpoint's weights on every preprocessed input, in datalist order
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state)
    net.eval()
    datalist, preprocessing = parser.get_parsed_content("datalist"), parser.get_parsed_content("preprocessing")
    assert [r[id_key] for r in rows] == [str(d[id_key]) for d in datalist] and len(rows) >= 5
    assert len({r[f"prob_{classes[0]}"] for r in rows}) > 1  # the inputs make a difference
    with torch.no_grad():
        for row, item in zip(rows, datalist):
            probs = torch.softmax(net(preprocessing(dict(item))["image"][None].float()), dim=1)[0]
            written = torch.tensor([float(row[f"prob_{c}"]) for c in classes])
            assert torch.allclose(written, probs, atol=2e-6), (row, probs)
            assert row["predicted_class"] == classes[int(probs.argmax())]


def _evaluator(tmp_path: Path, class_names: list[str], logits: torch.Tensor, ids: list) -> SupervisedEvaluator:
    data = [{"image": logits[i], "label": 0, "subject": ids[i]} for i in range(len(ids))]
    saver = ClassificationSaver(
        batch_transform=lambda batch: {"filename_or_obj": from_engine(["subject"])(batch)},
        output_transform=from_engine(["pred"]),
        saver=ClassProbabilitySaver(class_names, tmp_path / "csv", "p.csv", id_name="case"),
    )
    return SupervisedEvaluator(
        device="cpu",
        val_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=torch.nn.Identity(),  # the "logits" are the inputs
        postprocessing=Activationsd("pred", softmax=True),
        val_handlers=[saver],
    )


def test_class_probability_saver_rows_and_rerun(tmp_path):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [-1.0, -1.0, 0.5]])
    evaluator = _evaluator(tmp_path, ["NOR", "HCM", "DCM"], logits, ["s1", "s2", 7])
    evaluator.run()
    evaluator.run()  # written anew, not appended
    text = (tmp_path / "csv" / "p.csv").read_text()
    probs = torch.softmax(logits, dim=1)
    expected = ["case,predicted_class,prob_NOR,prob_HCM,prob_DCM"] + [
        ",".join([str(i), name, *[f"{p:.6f}" for p in probs[k].tolist()]])
        for k, (i, name) in enumerate([("s1", "NOR"), ("s2", "HCM"), (7, "DCM")])
    ]
    assert text.splitlines() == expected


def test_class_probability_saver_refuses_another_class_count(tmp_path):
    evaluator = _evaluator(tmp_path, ["a", "b"], torch.zeros(2, 3), ["x", "y"])
    with pytest.raises(ValueError, match=r"prediction of 'x' has 3 values but class_names has 2: \['a', 'b'\]"):
        evaluator.run()
