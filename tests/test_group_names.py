"""MapGroupNamesd: a datalist with group names trains and evaluates like one with ids."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset

from monai_groupdistil.data import MapGroupNamesd
from monai_groupdistil.losses import GroupDROLoss
from monai_groupdistil.metrics import compute_group_accuracy

NAMES = ["H0", "H1", "H2"]


def test_names_become_the_ids_of_their_position_through_a_data_loader():
    items = [{"image": torch.randn(4), "label": i % 2, "group": NAMES[i % 3]} for i in range(6)]
    loader = DataLoader(Dataset(items, transform=MapGroupNamesd("group", NAMES)), batch_size=6)
    batch = next(iter(loader))
    assert batch["group"].dtype == torch.long and batch["group"].tolist() == [0, 1, 2, 0, 1, 2]
    loss = GroupDROLoss(lambda x, y: x.sum(1), num_groups=3, step_size=1.0)
    loss(batch["image"], batch["label"], batch["group"])  # the ids the losses take
    sums = batch["image"].sum(1)
    assert torch.allclose(
        loss.last_group_losses, torch.stack([sums[[0, 3]].mean(), sums[[1, 4]].mean(), sums[[2, 5]].mean()])
    )
    logits = torch.nn.functional.one_hot(batch["label"], 2).float()
    assert compute_group_accuracy(logits, batch["label"], batch["group"], 3)["per_group"].tolist() == [1.0, 1.0, 1.0]


def test_ids_are_kept_and_bad_values_are_named():
    to_ids = MapGroupNamesd("group", NAMES)
    assert int(to_ids({"group": 2})["group"]) == 2 and int(to_ids({"group": torch.tensor(1)})["group"]) == 1
    with pytest.raises(
        ValueError, match=r"'group' holds the group 'H7', which is not one of the names \['H0', 'H1', 'H2'\]"
    ):
        to_ids({"group": "H7"})
    with pytest.raises(ValueError, match=r"'group' holds the id 3, outside \[0, 3\)"):
        to_ids({"group": 3})
    with pytest.raises(ValueError, match="names must be distinct group names"):
        MapGroupNamesd("group", ["A", "A"])
    with pytest.raises(KeyError):
        to_ids({"image": 0})
    assert MapGroupNamesd("group", NAMES, allow_missing_keys=True)({"image": 0}) == {"image": 0}
