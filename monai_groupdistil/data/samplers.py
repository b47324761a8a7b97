"""Group-balanced sampling (the group-DRO ``reweight_groups`` sampler) as a MONAI ``DistributedSampler``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DistributedSampler

__all__ = ["GroupBalancedSampler"]


class GroupBalancedSampler(DistributedSampler):
    """Sample indices so that every group present is drawn equally often, with replacement, sharded across ranks.

    Our own class because MONAI's ``DistributedWeightedRandomSampler`` draws within each rank's slice of the dataset
    (not one global draw), needs weights per sample and has no default for a single process.

    Each sample ``i`` has weight ``N / N_{g_i}`` (``N`` samples, ``N_g`` in group ``g``), as the group-DRO
    ``reweight_groups`` sampler, so each of the ``G`` groups present is drawn with probability ``1 / G``.
    An epoch draws ``num_samples`` indices with :func:`torch.multinomial` from a generator seeded with
    ``seed + epoch``. Being a ``DistributedSampler``, MONAI's workflows (``SupervisedTrainer``, ...) call
    :meth:`set_epoch` at every epoch start, so every epoch draws anew. Every rank makes the same global draw and,
    as MONAI's ``DistributedSampler`` over the positions of the draw, takes positions ``rank, rank + R, ...``
    (``R = num_replicas``): with ``even_divisible=True`` the draw is padded by repeating its head to
    ``ceil(num_samples / R) * R`` positions, so every rank has ``ceil(num_samples / R)`` indices; with ``False``
    nothing is repeated and the first ``num_samples % R`` ranks have one more. The shards are disjoint sets of
    positions of one draw (an index may be drawn several times, on one rank or several) and together cover it.
    Multi-process use: ``GroupBalancedSampler(groups, num_replicas=world, rank=rank, seed=seed)``.

    Args:
        groups: ``[N]`` group id of every sample (non-negative integers; ids need not be contiguous).
        num_samples: indices drawn per epoch over all ranks, default ``len(groups)``.
        seed: base seed, identical on all ranks.
        num_replicas: number of ranks; default the process group's world size when one is initialised, else 1.
        rank: this rank; default the process group's rank when one is initialised, else 0 (it must be given when
            ``num_replicas`` is given without an initialised process group).
        even_divisible: pad the draw so that every rank has the same number of indices (as MONAI's
            ``DistributedSampler``); keep True for training, where ranks must run the same number of iterations.

    Raises:
        ValueError: empty or non-integer / negative ``groups``, non-positive ``num_samples``, a rank outside
            ``[0, num_replicas)``, ``even_divisible=False`` with fewer samples than ranks.

    Example::

        sampler = GroupBalancedSampler([e["group"] for e in train_list], seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        trainer = SupervisedTrainer(..., train_data_loader=loader)  # sets the epoch of the sampler every epoch
    """

    def __init__(
        self,
        groups: Sequence[int] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        even_divisible: bool = True,
    ) -> None:
        g = torch.as_tensor(np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups))
        if g.ndim != 1 or g.numel() == 0:
            raise ValueError(f"groups must be a non-empty 1-D sequence of group ids, got shape {tuple(g.shape)}.")
        if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
            raise ValueError(f"groups must hold integer group ids, got dtype {g.dtype}.")
        g = g.long()
        if int(g.min()) < 0:
            raise ValueError(f"groups must be non-negative, got minimum {int(g.min())}.")
        if num_samples is None:
            num_samples = g.numel()
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            if initialised:
                rank = dist.get_rank()
            elif num_replicas == 1:
                rank = 0
            else:
                raise ValueError(
                    f"rank must be given with num_replicas={num_replicas} when no process group is initialised."
                )
        if int(num_replicas) != num_replicas or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}.")
        if int(rank) != rank or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}.")
        # the "dataset" of the parent class: the positions of the epoch's draw, split between ranks unshuffled
        super().__init__(
            dataset=range(int(num_samples)),  # type: ignore[arg-type]
            even_divisible=even_divisible,
            num_replicas=int(num_replicas),
            rank=int(rank),
            shuffle=False,
            seed=int(seed),
        )
        self.groups = g
        self.total_num_samples = int(num_samples)
        counts = torch.bincount(g)
        self.group_counts = counts
        self.num_groups_present = int((counts > 0).sum())
        self.weights = (g.numel() / counts[g]).double()

    def global_indices(self) -> list[int]:
        """The draw of the current epoch over all ranks, padded as the ranks read it (length ``total_size``)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total_num_samples, replacement=True, generator=gen).tolist()
        return [draw[p % self.total_num_samples] for p in range(self.total_size)]

    def __iter__(self) -> Iterator[int]:
        draw = self.global_indices()
        return iter([draw[p] for p in super().__iter__()])  # this rank's positions, as MONAI's DistributedSampler
