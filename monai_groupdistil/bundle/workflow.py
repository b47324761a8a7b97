"""Running one bundle workflow from another (e.g. training the teacher when the student needs it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_workflow"]


def run_workflow(
    config_file: str | Sequence[str],
    meta_file: str | os.PathLike | None = None,
    logging_file: str | os.PathLike | bool | None = False,
    workflow_type: str = "train",
    **override: Any,
) -> None:
    """Build a ``monai.bundle.ConfigWorkflow`` from ``config_file`` (merged in order) and run it to the end.

    Args:
        config_file: one config file or several, merged in order.
        meta_file: the bundle's ``metadata.json``; default ``configs/metadata.json`` next to the first config.
        logging_file: a logging config file, or False to keep the current logging set-up.
        workflow_type: ``"train"`` or ``"infer"``.
        override: config ids to override, e.g. ``epochs=2``, ``**{"train#trainer#max_epochs": 2}``.
    """
    from monai.bundle import ConfigWorkflow

    files = [str(f) for f in ([config_file] if isinstance(config_file, (str, os.PathLike)) else config_file)]
    if meta_file is None:
        meta_file = str(Path(files[0]).parent / "metadata.json")
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(meta_file),
        logging_file=logging_file if logging_file else None,
        workflow_type=workflow_type,
        **override,
    )
    workflow.initialize()
    try:
        workflow.run()
    finally:
        workflow.finalize()
