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


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_a_checkpoint"])
def test_a_damaged_teacher_file_is_named_with_what_to_do(tmp_path, damage):
    """A teacher file cut short by a killed write (or not a checkpoint at all) is refused naming the file, saying it
    is damaged and what to do; the bundle's loader adds the command that trains the teacher again."""
    from scripts import load_teacher as bundle_load_teacher

    path = tmp_path / "teacher.pt"
    torch.save(_net().state_dict(), path)
    content = {"empty": b"", "truncated": path.read_bytes()[:300], "not_a_checkpoint": b"teacher weights"}[damage]
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_teacher(_net(), path)
    message = str(info.value)
    assert f"teacher checkpoint '{path}' cannot be read: the file is damaged ({len(content)} bytes" in message
    assert "train again, or copy the file again" in message
    with pytest.raises(ValueError) as info:
        bundle_load_teacher(_net(), path, bundle_root="bundles/b", teacher_method="group_dro")
    message = str(info.value)
    assert f"teacher checkpoint '{path}' cannot be read: the file is damaged" in message
    assert "configs/train_teacher.json" in message and "--teacher_method group_dro" in message


def test_bare_and_earlier_best_model_files_both_load(tmp_path):
    """The bundles' best-model files hold the network alone; those of earlier versions ``{"model", "loss", "dro"}``."""
    trained = _net()
    torch.save(trained.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": trained.state_dict(), "loss": {}, "dro": {"iterations": 3}}, tmp_path / "earlier.pt")
    for name in ("bare.pt", "earlier.pt"):
        assert _same_weights(load_network(_net(), tmp_path / name), trained)
        assert _same_weights(load_teacher(_net(), tmp_path / name, num_classes=3), trained)


def test_a_checkpoint_holding_python_objects_is_refused_without_running_them(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "teacher.pt"
    torch.save({"model": _net().state_dict(), "extra": Payload()}, path)
    with pytest.raises(ValueError, match=r"teacher checkpoint '.*teacher.pt' holds Python objects other than tensors"):
        load_teacher(_net(), path)
