"""load_teacher / load_network on checkpoints written as a user of MONAI would write them."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointSaver

from monai_groupdistil.engines import load_network, load_teacher


def _net(out: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, out))


def _save_with_checkpoint_saver(tmp_path, save_dict) -> str:
    engine = Engine(lambda e, b: None)
    CheckpointSaver(str(tmp_path), save_dict, save_final=True, final_filename="teacher.pt").attach(engine)
    engine.run([0], max_epochs=1)
    return str(tmp_path / "teacher.pt")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("entries", [("model",), ("model", "optimizer"), ("net",)])
def test_checkpoint_saver_files_load_as_the_trained_teacher(tmp_path, entries):
    """One entry: CheckpointSaver writes the bare state dict (torch.load(...)["model"] fails on it); several:
    a dict keyed by the entries."""
    trained = _net()
    objects = {"model": trained, "net": trained, "optimizer": torch.optim.SGD(trained.parameters(), 0.1)}
    path = _save_with_checkpoint_saver(tmp_path, {k: objects[k] for k in entries})
    teacher = load_teacher(_net(), path, num_classes=3)
    assert _same_weights(teacher, trained)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_errors_name_the_file_and_what_to_do(tmp_path):
    trained = _net()
    path = _save_with_checkpoint_saver(
        tmp_path, {"net": trained, "optimizer": torch.optim.SGD(trained.parameters(), 1)}
    )
    with pytest.raises(ValueError, match=r"has no 'model' entry; it holds \['net', 'optimizer'\]: pass .* as `key`"):
        load_teacher(_net(), path)
    assert _same_weights(load_teacher(_net(), path, key="net"), trained)
    with pytest.raises(ValueError, match=r"does not fit .*2.weight: checkpoint \(3, 8\) vs network \(5, 8\)"):
        load_network(_net(5), path, key="net")
    with pytest.raises(ValueError, match="predicts 3 classes but the student predicts 4"):
        load_teacher(_net(), path, key="net", num_classes=4)
    with pytest.raises(FileNotFoundError) as info:
        load_teacher(_net(), tmp_path / "missing.pt")
    message = str(info.value)
    assert f"teacher checkpoint '{tmp_path / 'missing.pt'}' not found: train the teacher first" in message
    assert "CheckpointSaver" in message and "monai.bundle" not in message
