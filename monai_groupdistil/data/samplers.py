"""Group-balanced sampling (the group-DRO ``reweight_groups`` sampler), optionally sharded across ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["GroupBalancedSampler"]


class GroupBalancedSampler(Sampler[int]):
    """Sample indices so that every group present is drawn equally often, with replacement.

    Each sample ``i`` has weight ``N / N_{g_i}`` (``N`` samples, ``N_g`` in group ``g``), as the group-DRO
    ``reweight_groups`` sampler, so each of the ``G`` groups present is drawn with probability ``1 / G``.
    An epoch draws ``num_samples`` indices with :func:`torch.multinomial` from a generator seeded with
    ``seed + epoch`` (call :meth:`set_epoch` each epoch, as with ``DistributedSampler``). With several replicas
    every rank makes the same global draw, pads it (repeating its head) to a multiple of ``num_replicas`` and
    takes ``indices[rank::num_replicas]``: the shards are disjoint slices of one draw and together cover it.

    Args:
        groups: group id of every sample (non-negative integers; ids need not be contiguous).
        num_samples: indices drawn per epoch over all ranks, default ``len(groups)``.
        seed: base seed, identical on all ranks.
        num_replicas: number of ranks; default the process group's world size when one is initialised, else 1.
        rank: this rank; default the process group's rank when one is initialised, else 0 (it must be given when
            ``num_replicas`` is given without an initialised process group).

    Raises:
        ValueError: empty or non-integer / negative ``groups``, non-positive ``num_samples``, a rank outside
            ``[0, num_replicas)``.

    Example::

        sampler = GroupBalancedSampler([e["group"] for e in train_list], seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            ...
    """

    def __init__(
        self,
        groups: Sequence[int] | np.ndarray | torch.Tensor,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
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
        self.groups = g
        self.seed = int(seed)
        self.epoch = 0
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.total_num_samples = int(num_samples)
        self.num_samples = math.ceil(self.total_num_samples / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        counts = torch.bincount(g)
        self.group_counts = counts
        self.num_groups_present = int((counts > 0).sum())
        self.weights = (g.numel() / counts[g]).double()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the draw of epoch ``e`` uses the seed ``seed + e``."""
        self.epoch = int(epoch)

    def global_indices(self) -> list[int]:
        """The padded draw of the current epoch over all ranks (length ``num_samples * num_replicas``)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.total_num_samples, replacement=True, generator=gen).tolist()
        pad = self.total_size - len(idx)
        while pad > 0:  # like DistributedSampler: repeat the head of the draw
            idx += idx[:pad]
            pad = self.total_size - len(idx)
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
