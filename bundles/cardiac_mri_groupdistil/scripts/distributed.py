"""Leaving a multi-process (``torchrun``) bundle run so that every process exits."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch.distributed as dist

__all__ = ["close_process_group"]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger


def close_process_group(timeout_s: float = 600.0) -> None:
    """Synchronise the processes, then destroy the default process group and tell ignite (the bundles' ``finalize``).

    Every rank first waits for the others (``monitored_barrier`` under gloo, which raises naming the missing rank
    after ``timeout_s`` instead of waiting forever; ``barrier`` under nccl), so that no rank tears the group down
    while another one still runs a collective operation or is still writing with rank 0 (checkpoints, reports);
    then the group is destroyed on every rank, so that no gloo/nccl communicator is left for the interpreter's
    exit to tear down (see ``docs/operations.md``). ``ignite.distributed.sync()`` then makes ignite see the
    single-process state, so later workflows in the same process run undistributed. Does nothing but the ignite
    sync when no process group is initialised.

    Args:
        timeout_s: how long a rank waits for the others at the barrier.

    Raises:
        RuntimeError: when another rank does not reach the barrier within ``timeout_s`` (gloo); the process group
            is destroyed all the same.
    """
    import ignite.distributed as idist

    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_backend() == dist.Backend.GLOO:
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            logger.debug("process group destroyed")
    idist.sync()
