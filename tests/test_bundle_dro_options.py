"""The bundles' group-DRO options of issue 21: weight_by, the held-out update (with its validation split) and weight
decay, through MONAI's ConfigWorkflow as a user's overrides reach them."""

from __future__ import annotations

import pytest
import torch

from tests.bundle_helpers import BUNDLES, TINY, Bundle, make_tiny_data, one_thread, random_teacher  # noqa: F401


@pytest.fixture(scope="module", params=BUNDLES)
def prepared(request, tmp_path_factory):
    bundle = Bundle(request.param)
    base = tmp_path_factory.mktemp(request.param)
    make_tiny_data(bundle.name, base / "data")
    overrides = bundle.run_overrides(base, epochs=2, **TINY[bundle.name])
    (base / "models").mkdir()
    random_teacher(bundle, overrides)
    return bundle, overrides


def test_held_out_update_splits_the_validation_data_and_moves_the_weights_once_per_epoch(prepared):
    bundle, overrides = prepared
    wf = bundle.workflow(
        bundle.configs("train"), {**overrides, "dro_update": "held_out", "weight_by": "ce", "weight_decay": 0.05}
    )
    loss = wf.parser.get_parsed_content("loss")
    assert (loss.update, loss.weight_by) == ("held_out", "ce")
    optimizer = wf.parser.get_parsed_content("optimizer")
    assert all(group["weight_decay"] == 0.05 for group in optimizer.param_groups)
    val = wf.parser.get_parsed_content("splits")["val"]
    selection, held_out = wf.parser.get_parsed_content("val_parts")
    assert len(selection) + len(held_out) == len(val) and len(held_out) > 0 and len(selection) > 0
    assert sorted(map(str, selection + held_out)) == sorted(map(str, val))  # a partition of the validation split
    assert not any(item in selection for item in held_out)
    assert wf.parser.get_parsed_content("validate#dataset").data == selection  # model selection on the other half
    wf.run()
    dro = wf.parser.get_parsed_content("train#dro_handler")
    weights = torch.stack(dro.weight_history)
    per_epoch = len(weights) // 2
    assert torch.equal(weights[0], torch.full_like(weights[0], 1 / len(weights[0])))
    assert all(torch.equal(w, weights[0]) for w in weights[:per_epoch])  # training batches do not move them
    assert all(torch.equal(w, weights[per_epoch]) for w in weights[per_epoch:])
    assert not torch.equal(weights[per_epoch], weights[0])  # the held-out step after epoch 1
    wf.finalize()


def test_defaults_keep_the_per_batch_update_on_the_whole_validation_split(prepared):
    bundle, overrides = prepared
    wf = bundle.workflow(bundle.configs("train"), overrides, initialize=False)
    wf.initialize()
    loss = wf.parser.get_parsed_content("loss")
    # weight_by: each bundle's sweep winner (cardiac classification: the minority-family sweep; docs/results.md)
    expected = {"cardiac_mri_groupdistil": "ce"}.get(bundle.name, "loss")
    assert (loss.update, loss.weight_by) == ("batch", expected)
    assert wf.parser.get_parsed_content("train#held_out_dro_handler") is None
    assert len(wf.parser.get_parsed_content("validate#dataset").data) == len(
        wf.parser.get_parsed_content("splits")["val"]
    )
    wf.finalize()


def test_a_bad_value_names_the_option(prepared):
    bundle, overrides = prepared
    wf = bundle.workflow(bundle.configs("train"), {**overrides, "weight_by": "dice"}, initialize=False)
    with pytest.raises(Exception) as info:
        wf.initialize()
        wf.parser.get_parsed_content("loss")
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("weight_by must be one of ('loss', 'ce', 'kd'), got 'dice'" in m for m in chain), chain
