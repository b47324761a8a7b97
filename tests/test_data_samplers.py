"""GroupBalancedSampler: equal group frequencies, determinism per seed and epoch, rank shards."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import from_engine
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from monai_groupdistil.data import GroupBalancedSampler
from tests.distributed_helpers import exit_worker, init_gloo

IMBALANCED = [0] * 900 + [1] * 90 + [2] * 10


def test_groups_drawn_equally_often():
    n = 30000
    sampler = GroupBalancedSampler(IMBALANCED, num_samples=n, seed=0)
    groups = torch.tensor(IMBALANCED)[list(sampler)]
    freq = torch.bincount(groups, minlength=3).double() / n
    tol = 4 * np.sqrt(1 / 3 * 2 / 3 / n)  # 4 standard deviations of a binomial proportion
    assert torch.all((freq - 1 / 3).abs() < tol), freq
    # within a group every member is equally likely: group 2's 10 members each ~1/30 of the draws
    members = Counter(i for i in sampler if i >= 990)
    assert set(members) == set(range(990, 1000))
    expected = n / 30
    assert all(abs(c - expected) < 5 * np.sqrt(expected) for c in members.values()), members


def test_non_contiguous_and_absent_groups():
    groups = [5] * 10 + [0] * 90  # groups 1-4 absent: two groups present, drawn half each
    sampler = GroupBalancedSampler(groups, num_samples=20000, seed=3)
    assert sampler.num_groups_present == 2
    drawn = Counter(groups[i] for i in sampler)
    assert set(drawn) == {0, 5} and abs(drawn[5] / 20000 - 0.5) < 0.015
    single = Counter(GroupBalancedSampler([2, 2, 2], num_samples=3000))  # one group: plain uniform sampling
    assert set(single) == {0, 1, 2} and all(abs(c - 1000) < 150 for c in single.values())


def test_weights_and_draw_match_reference():
    """The draw equals torch.multinomial over weights N / N_g with a generator seeded with seed + epoch."""
    groups = [0, 0, 0, 1, 2, 2]
    sampler = GroupBalancedSampler(groups, seed=10)
    np.testing.assert_allclose(sampler.weights.numpy(), [2, 2, 2, 6, 3, 3])
    sampler.set_epoch(4)
    gen = torch.Generator().manual_seed(14)
    ref = torch.multinomial(torch.tensor([2.0, 2, 2, 6, 3, 3], dtype=torch.double), 6, True, generator=gen)
    assert list(sampler) == ref.tolist()


def test_deterministic_per_seed_and_epoch():
    a = GroupBalancedSampler(IMBALANCED, seed=1)
    b = GroupBalancedSampler(IMBALANCED, seed=1)
    assert list(a) == list(b) and list(a) == list(a)  # same seed, same epoch: same order, every time
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(GroupBalancedSampler(IMBALANCED, seed=2)) != first
    assert len(a) == len(IMBALANCED) and len(GroupBalancedSampler(IMBALANCED, num_samples=7)) == 7


@pytest.mark.parametrize("num_samples, replicas", [(100, 3), (99, 3), (10, 4), (1000, 1), (5, 8)])
def test_rank_shards_disjoint_and_covering(num_samples, replicas):
    shards = [
        list(GroupBalancedSampler(IMBALANCED, num_samples=num_samples, seed=5, num_replicas=replicas, rank=r))
        for r in range(replicas)
    ]
    per_rank = -(-num_samples // replicas)
    assert all(len(s) == per_rank for s in shards)
    assert all(len(GroupBalancedSampler(IMBALANCED, num_samples=num_samples, num_replicas=replicas, rank=r)) ==
               per_rank for r in range(replicas))  # fmt: skip
    draw = list(GroupBalancedSampler(IMBALANCED, num_samples=num_samples, seed=5))  # the single-process draw
    padded = (draw * (per_rank * replicas // num_samples + 1))[: per_rank * replicas]
    # the shards are the positions r, r + R, ... of the same global (padded) draw: disjoint and covering
    interleaved = [shards[p % replicas][p // replicas] for p in range(per_rank * replicas)]
    assert interleaved == padded
    assert sum((Counter(s) for s in shards), Counter()) == Counter(padded)


def _reference_draw(groups: list[int], n: int, seed: int) -> list[int]:
    """The draw of one epoch computed independently: weights N / N_g, generator seeded with ``seed``."""
    counts = Counter(groups)
    weights = torch.tensor([len(groups) / counts[g] for g in groups], dtype=torch.double)
    return torch.multinomial(weights, n, True, generator=torch.Generator().manual_seed(seed)).tolist()


def test_unmodified_supervised_trainer_draws_anew_every_epoch():
    """MONAI's Workflow calls set_epoch on DistributedSampler instances only: the sampler is one, so an unmodified
    SupervisedTrainer gets a new draw every epoch (epoch e draws with seed + e, MONAI's epochs counting from 1)."""
    groups = [0] * 12 + [1] * 3 + [2] * 1
    gen = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(4, generator=gen), "label": g, "index": i} for i, g in enumerate(groups)]
    sampler = GroupBalancedSampler(groups, seed=7)
    assert isinstance(sampler, DistributedSampler)
    net = torch.nn.Linear(4, 3)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=4,
        train_data_loader=DataLoader(data, batch_size=5, sampler=sampler),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    seen: dict[int, list[int]] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.setdefault(e.state.epoch, []).extend(int(i) for i in from_engine(["index"])(e.state.batch)),
    )
    trainer.run()
    assert seen == {e: _reference_draw(groups, len(groups), 7 + e) for e in (1, 2, 3, 4)}
    assert len({tuple(v) for v in seen.values()}) == 4  # four different draws


@pytest.mark.parametrize("num_samples", [3000, 3001])
def test_two_ranks_without_process_group(num_samples):
    """Rank 0 and 1 read the even and odd positions of one global draw (padded by its head to an even length):
    disjoint positions, together the draw, each shard and their union balanced over the groups."""
    ranks = [GroupBalancedSampler(IMBALANCED, num_samples=num_samples, seed=4, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 3):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shards = [list(s) for s in ranks]
        draw = _reference_draw(IMBALANCED, num_samples, 4 + epoch)
        padded = draw + draw[: num_samples % 2]
        assert [len(s) for s in shards] == [len(padded) // 2] * 2 == [len(r) for r in ranks]
        assert shards[0] == padded[0::2] and shards[1] == padded[1::2]
        for part in (shards[0], shards[1], shards[0] + shards[1]):
            freq = torch.bincount(torch.tensor(IMBALANCED)[part], minlength=3).double() / len(part)
            assert torch.all((freq - 1 / 3).abs() < 4 * np.sqrt(2 / 9 / len(part))), freq
    uneven = [
        list(GroupBalancedSampler(IMBALANCED, num_samples=5, seed=4, num_replicas=2, rank=r, even_divisible=False))
        for r in (0, 1)
    ]
    draw = _reference_draw(IMBALANCED, 5, 4)
    assert uneven == [draw[0::2], draw[1::2]]  # nothing repeated: 3 and 2 indices
    with pytest.raises(ValueError, match="dataset length is less than the number of participating ranks"):
        GroupBalancedSampler([0], num_replicas=2, rank=1, even_divisible=False)


def test_dataloader_integration():
    groups = torch.tensor(IMBALANCED)
    ds = TensorDataset(torch.arange(len(groups)), groups)
    loader = DataLoader(ds, batch_size=100, sampler=GroupBalancedSampler(groups, num_samples=3000, seed=0))
    counts = torch.zeros(3)
    for _, g in loader:
        counts += torch.bincount(g, minlength=3)
    assert counts.sum() == 3000 and torch.all((counts / 3000 - 1 / 3).abs() < 0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": []}, "non-empty 1-D"),
        ({"groups": [[0, 1]]}, "non-empty 1-D"),
        ({"groups": [0.0, 1.0]}, "integer group ids"),
        ({"groups": [0, -1]}, "non-negative, got minimum -1"),
        ({"groups": [0, 1], "num_samples": 0}, "num_samples must be a positive integer"),
        ({"groups": [0, 1], "num_replicas": 2}, "rank must be given with num_replicas=2"),
        ({"groups": [0, 1], "num_replicas": 2, "rank": 2}, r"rank must be in \[0, 2\), got 2"),
        ({"groups": [0, 1], "num_replicas": 0, "rank": 0}, "num_replicas must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupBalancedSampler(**kwargs)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    sampler = GroupBalancedSampler(IMBALANCED, num_samples=101, seed=9)  # rank and world from the group
    sampler.set_epoch(2)
    torch.save({"rank": sampler.rank, "replicas": sampler.num_replicas, "indices": list(sampler)},
               os.path.join(out_dir, f"{rank}.pt"))  # fmt: skip
    # a rank that tore its group down at once could close the connection its peer is still setting up
    # ("Gloo connectFullMesh failed ... Connection closed by peer"): every rank waits for the others first
    exit_worker()


def test_process_group_shards(tmp_path):
    world = 2
    # fork: the children need not re-import torch (spawn works too, several seconds slower)
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, start_method="fork")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    assert [(r["rank"], r["replicas"]) for r in results] == [(0, 2), (1, 2)]
    reference = GroupBalancedSampler(IMBALANCED, num_samples=101, seed=9, num_replicas=1, rank=0)
    reference.set_epoch(2)
    draw = list(reference)
    padded = draw + draw[:1]
    assert results[0]["indices"] == padded[0::2] and results[1]["indices"] == padded[1::2]
