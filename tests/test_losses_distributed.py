"""Two gloo processes with DistributedDataParallel against one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from monai.data import MetaTensor
from torch.nn.parallel import DistributedDataParallel

from monai_groupdistil.losses import GroupDistillationLoss, GroupDROLoss
from tests.distributed_helpers import exit_worker, init_gloo

STEPS = 6
SPLIT = 6  # rank 0 takes the first 6 samples of each global batch of 10, rank 1 the other 4
LOSSES = {
    "groupdistil": lambda: GroupDistillationLoss(num_groups=3, temperature=2.0, alpha=0.5, step_size=0.8),
    "groupdistil_ce": lambda: GroupDistillationLoss(3, temperature=2.0, alpha=0.5, step_size=0.8, weight_by="ce"),
    "groupdistil_held_out": lambda: GroupDistillationLoss(
        3, temperature=2.0, alpha=0.5, step_size=0.8, weight_by="ce", update="held_out"
    ),
    "groupdro_adjusted": lambda: GroupDROLoss(
        torch.nn.CrossEntropyLoss(reduction="none"),
        3,
        step_size=0.5,
        adjustment=1.0,
        group_counts=[30, 20, 5],
        absent_groups="zero",
    ),
}


def _global_batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    teacher = torch.randn(10, 3, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (10,), generator=gen)
    groups = torch.randint(0, 3, (10,), generator=gen)
    if step in (1, 4):
        groups[SPLIT:] = torch.where(groups[SPLIT:] == 2, 0, groups[SPLIT:])  # group 2 absent on rank 1
    if step == 3:
        groups[groups == 1] = 0  # group 1 absent everywhere
    return x, teacher, y, groups


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3).double()


def _call(loss, kind, logits, teacher, y, groups):
    if kind.startswith("groupdistil"):  # MONAI engines hand the loss MetaTensors
        return loss(MetaTensor(logits), MetaTensor(teacher), MetaTensor(y), groups)
    return loss(logits, y, groups)


def _train(model, loss, kind, rank=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    weights, grads, values, running = [], [], [], []
    for step in range(STEPS):
        x, teacher, y, groups = _global_batch(step)
        if rank is not None:
            part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
            x, teacher, y, groups = x[part], teacher[part], y[part], groups[part]
        optimizer.zero_grad()
        value = _call(loss, kind, model(x), teacher, y, groups)
        value.backward()
        weights.append(loss.group_weights.clone())
        running.append(loss.ema_group_losses.clone())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        values.append(value.detach().clone())
        optimizer.step()
        if loss.update == "held_out":  # each rank measures its share of a held-out batch, then one update
            x, teacher, y, groups = _global_batch(100 + step)
            if rank is not None:
                part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
                x, teacher, y, groups = x[part], teacher[part], y[part], groups[part]
            with torch.no_grad():
                loss.update_weights(loss.weighting_losses(model(x), y, teacher), groups)
    return {"weights": weights, "grads": grads, "values": values, "running": running}


def _worker(rank: int, init_file: str, kind: str, out_dir: str):
    init_gloo(rank, 2, init_file)
    model = DistributedDataParallel(_model())
    result = _train(model, LOSSES[kind](), kind, rank=rank)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    exit_worker()


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_two_processes_match_single_process_on_concatenated_batch(kind, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), kind, str(tmp_path)), nprocs=2, join=True)
    single = _train(_model(), LOSSES[kind](), kind)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for step in range(STEPS):
        for rank in ranks:
            assert torch.allclose(rank["weights"][step].double(), single["weights"][step].double(), atol=1e-6), step
            assert torch.allclose(rank["running"][step], single["running"][step], atol=1e-6), step
            assert torch.allclose(rank["grads"][step], single["grads"][step], atol=1e-5), step
        mean_value = (ranks[0]["values"][step] + ranks[1]["values"][step]) / 2
        assert torch.allclose(mean_value, single["values"][step], atol=1e-6), step
    assert not torch.allclose(single["weights"][-1], torch.full((3,), 1 / 3))
