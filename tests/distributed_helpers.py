"""Process-group set-up and tear-down shared by the multi-process tests (gloo, file rendezvous)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


def init_gloo(rank: int, world_size: int, init_file: str) -> None:
    """Join a gloo group through a rendezvous file; a peer that never arrives is an error after 2 minutes."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )


def exit_worker() -> None:
    """End a worker whose results are saved, once every rank got here, without tearing down the process group.

    torch's gloo teardown can deadlock: when the last reference to a ``ProcessGroupGloo`` is dropped from Python
    (e.g. by a DistributedDataParallel reducer), its destructor joins the group's worker thread while holding the GIL,
    and that thread may be waiting for the GIL to release a finished work item. A worker that hung there kept a
    test (and CI) waiting forever, so workers leave with ``os._exit(0)`` after a barrier instead.
    """
    dist.barrier()
    os._exit(0)
