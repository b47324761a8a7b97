"""Optional initialisation of bundle networks from local pretrained weights (scripts.pretrained)."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import ResNet

from scripts.pretrained import load_pretrained


def _resnet(num_classes: int = 2, inplanes=(16, 32, 64, 128)) -> ResNet:
    return ResNet("basic", [1, 1, 1, 1], list(inplanes), spatial_dims=2, n_input_channels=3, num_classes=num_classes)


@pytest.fixture
def source(tmp_path):
    """A 5-class network's weights, as torchvision-style plain state dict."""
    torch.manual_seed(1)
    net = _resnet(num_classes=5)
    path = tmp_path / "pretrained.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_none_leaves_the_network_unchanged():
    net = _resnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for nothing in (None, "", "null", "None"):  # the bundle CLI (fire) passes --pretrained_weights null as a string
        assert load_pretrained(net, nothing) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_loads_everything_but_the_classifier_of_another_class_count(source, caplog):
    pretrained, path = source
    torch.manual_seed(2)
    net = _resnet(num_classes=2)
    fc_before = net.fc.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="monai_groupdistil.bundle"):
        assert load_pretrained(net, path) is net
    ref = pretrained.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith("fc."):
            continue
        assert torch.equal(value, ref[key]), key
    assert torch.equal(net.fc.weight, fc_before)  # kept its own initialisation
    message = caplog.text
    assert str(path) in message and "fc.weight: checkpoint (5, 128) vs network (2, 128)" in message
    n_loaded = len(ref) - 2
    assert f"loaded {n_loaded} of the network's {len(ref)} tensors" in message


@pytest.mark.parametrize("wrap", ["model", "state_dict", "ddp"])
def test_checkpoint_wrappers_and_prefixes(source, tmp_path, wrap):
    pretrained, _ = source
    state = pretrained.state_dict()
    if wrap == "ddp":
        content = {f"module.{k}": v for k, v in state.items()}
    else:
        content = {wrap: state, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(content, path)
    net = load_pretrained(_resnet(num_classes=5), path, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_explicit_key(source, tmp_path):
    pretrained, _ = source
    path = tmp_path / "ckpt.pt"
    torch.save({"teacher": pretrained.state_dict(), "student": {}}, path)
    net = load_pretrained(_resnet(num_classes=5), path, key="teacher")
    assert torch.equal(net.conv1.weight, pretrained.conv1.weight)
    with pytest.raises(ValueError, match="no state dict under 'nothing'"):
        load_pretrained(_resnet(), path, key="nothing")


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "resnet.pt"
    with pytest.raises(FileNotFoundError, match=f"pretrained weights '{missing}' not found.*nothing is downloaded"):
        load_pretrained(_resnet(), missing)


def test_strict_refuses_a_different_classifier(source):
    _, path = source
    with pytest.raises(ValueError, match=r"strict=True.*fc.weight: checkpoint \(5, 128\) vs network \(2, 128\)"):
        load_pretrained(_resnet(num_classes=2), path, strict=True)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ValueError, match="no tensor of pretrained weights .* fits ResNet"):
        load_pretrained(_resnet(), path)
    torch.save({"epoch": 1, "note": "no tensors"}, path)
    with pytest.raises(ValueError, match="hold no tensors"):
        load_pretrained(_resnet(), path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="hold a list, not a state dict"):
        load_pretrained(_resnet(), path)


def test_wider_teacher_weights_load_into_the_matching_width(source, tmp_path):
    """A state dict from a network with other channel counts fits nowhere but the classifier-free layers it shares."""
    _, path = source
    with pytest.raises(ValueError, match="no tensor of pretrained weights"):
        load_pretrained(_resnet(inplanes=(32, 64, 128, 256)), path)


def test_distributed_wrapper_is_looked_through(source, monkeypatch):
    pretrained, path = source

    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed: only .module is used
            torch.nn.Module.__init__(self)
            self.module = module

    wrapped = FakeDDP(_resnet(num_classes=5))
    assert load_pretrained(wrapped, path, strict=True) is wrapped
    assert torch.equal(wrapped.module.conv1.weight, pretrained.conv1.weight)
