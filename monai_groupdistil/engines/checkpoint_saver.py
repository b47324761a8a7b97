"""Checkpoint files that survive a kill at any instant: atomic writes, deferred removal, a finite best model.

MONAI's ``CheckpointSaver`` writes its files in place (its ``DiskSaver`` has ``atomic=False``): a run killed while
saving leaves a truncated file, and the write goes through every hard link of the old file. ignite's atomic
``DiskSaver`` writes a ``tmp*`` file first, but ``Checkpoint`` removes the oldest file *before* writing the new one,
so a kill in between leaves fewer files than the saved state lists. Here:

- :py:func:`atomic_write` (checkpoints through :py:func:`atomic_save`, inference outputs): a temporary file of the
  same folder, ``.<file>~groupdistil-tmp~<host>~<pid><suffixes>`` (never mistaken for anyone else's file), renamed
  over the target (``os.replace``): a kill leaves either the old complete file or the new one.
  :py:func:`remove_temporary_files` removes those a killed write left.
- :py:class:`AtomicDiskSaver`: ignite's ``DiskSaver`` writing through :py:func:`atomic_save`, and removing a file
  that ``Checkpoint`` drops only *after* the next file has been written (a file that is already gone is no error).
- :py:class:`BestModelSaver`: the best model of a validation engine as ``<filename>`` holding the network alone (a
  bare state dict, as the model zoo and ``ckpt_export`` expect), with the DRO state of the same epoch in
  ``<stem>_dro_state.pt``; replaced only by a strictly better key metric and never by a network with non-finite
  weights.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, DiskSaver
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
    DiskSaver, _ = optional_import(
        "ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver", as_type="base"
    )
idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)

__all__ = [
    "AtomicDiskSaver",
    "BestModelSaver",
    "atomic_save",
    "atomic_write",
    "dro_state_filename",
    "process_alive",
    "remove_temporary_files",
    "temporary_name",
]

logger = logging.getLogger("monai_groupdistil.engines")

TEMP_TAG = "groupdistil-tmp"
# the suffixes are optional: files of earlier versions lack them
_TEMP_PATTERN = re.compile(r"\.(?P<target>.+)~" + re.escape(TEMP_TAG) + r"~(?P<host>[^~/]+)~(?P<pid>\d+)(\..*)?")


def _host() -> str:
    return socket.gethostname().replace("~", "-").replace("/", "-") or "host"


def temporary_name(path: str | os.PathLike) -> Path:
    """The temporary file :py:func:`atomic_write` writes before renaming it to ``path``; it names its writer (for
    :py:func:`remove_temporary_files`) and ends with the suffixes of ``path``, by which writers such as nibabel
    choose the format: ``masks/A1.nii.gz`` -> ``masks/.A1.nii.gz~groupdistil-tmp~<host>~<pid>.nii.gz``."""
    path = Path(path)
    return path.with_name(f".{path.name}~{TEMP_TAG}~{_host()}~{os.getpid()}{''.join(path.suffixes)}")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Replace ``path`` only by a complete new file: the ``with`` block writes the :py:func:`temporary_name` it is
    given, which is then renamed over ``path`` (``os.replace``, atomic on POSIX and Windows). When the block raises,
    ``path`` is left as it was and the temporary file is removed. The folder of ``path`` must exist.

    Example::

        with atomic_write("eval/predictions.csv") as temporary:
            temporary.write_text("subject,predicted_class\n")
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fsync_folder(folder: Path) -> None:
    try:  # make the rename durable; not every platform or file system allows opening a folder
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` so that a kill at any instant leaves the old complete file or the new one.

    The object is written by :py:func:`atomic_write`, flushed and synced to disk before the rename. The rename gives
    ``path`` a new inode: a hard link to the old file keeps the old content, and a symbolic link at ``path`` is
    replaced, not written through. The file gets the usual permissions of a new file (the process umask), as
    ``torch.save`` would give it.

    Args:
        obj: what to save (a state dict or a dict of them).
        path: the target file; its folder must exist.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: when the folder is not writable or the disk is full, naming the file; the old file (if any) is
            unchanged and the temporary file removed.
    """
    path = Path(path)
    try:
        with atomic_write(path) as temporary, open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        raise OSError(
            f"could not write checkpoint '{path}' ({type(err).__name__}: {err}); the previous file, if any, is "
            "unchanged."
        ) from err
    _fsync_folder(path.parent)
    return path


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (this process included; one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by another user (or cannot tell: assume alive)
    return True


def remove_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writes of :py:func:`atomic_write` (checkpoints, inference outputs) killed
    before their rename left in ``folder``.

    Only files named as :py:func:`temporary_name` names them are considered (nothing else is ever removed), and of
    those only the ones whose writer is not a live process of this host other than this one; a file of another host
    is removed too, so call this only when no other process writes checkpoints into ``folder`` (the bundles call it
    once they hold the folder's run lock). Each removal is logged at WARNING level.

    Args:
        folder: the checkpoint folder (nothing happens when it does not exist).

    Returns:
        the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host = [], _host()
    for path in sorted(folder.iterdir()):
        match = _TEMP_PATTERN.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group("pid"))
        if match.group("host") == host and pid != os.getpid() and process_alive(pid):
            continue  # a write in progress, by another process of this host
        path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning(
            "removed %s: the partial write of %s by a process that was killed while saving (the file it was "
            "replacing, if any, is intact)",
            path,
            match.group("target"),
        )
    return removed


class AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` whose files survive a kill at any instant: atomic writes, removal after the next write.

    Each file is written by :py:func:`atomic_save`. ``Checkpoint`` calls ``remove`` for the file it drops *before*
    it saves the new one; this saver only notes the name and removes the file once the next file has been written
    (a file that no longer exists, e.g. deleted by hand or by a killed run, is skipped), so a kill at any instant
    leaves at least the files the last complete checkpoint lists. Writes and removals happen on ``save_on_rank``
    only, as with ``DiskSaver``.

    Args:
        dirname: the folder of the checkpoints (created if missing).
        create_dir: create ``dirname`` if it does not exist.
        require_empty: refuse a folder that already holds ``.pt`` files (ignite's default; the bundles pass False).
        save_on_rank: the rank that writes, in a multi-process run.

    Example::

        checkpoint = Checkpoint({"model": net, "optimizer": opt}, AtomicDiskSaver("runs", require_empty=False),
                                n_saved=2, global_step_transform=lambda e, _: e.state.epoch)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    """

    def __init__(
        self, dirname: str | os.PathLike, create_dir: bool = True, require_empty: bool = True, save_on_rank: int = 0
    ) -> None:
        super().__init__(
            dirname, atomic=True, create_dir=create_dir, require_empty=require_empty, save_on_rank=save_on_rank
        )
        self.pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Write ``checkpoint`` to ``<dirname>/<filename>`` atomically, then remove the files dropped before."""
        if idist.get_rank() != self.save_on_rank:
            self.pending_removal = []
            return
        atomic_save(checkpoint, self.dirname / filename)  # when it fails, the files stay noted for the next save
        pending, self.pending_removal = self.pending_removal, []
        for name in pending:
            if name != filename:
                (self.dirname / name).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        """Note ``filename`` for removal once the next file has been written."""
        self.pending_removal.append(filename)


def dro_state_filename(filename: str | os.PathLike) -> str:
    """The name of the DRO-state file :py:class:`BestModelSaver` writes next to the best model ``filename``:
    ``model.pt`` -> ``model_dro_state.pt`` (the folder, if any, is kept)."""
    path = Path(filename)
    return os.fspath(path.with_name(f"{path.stem}_dro_state{path.suffix or '.pt'}"))


def _non_finite(network: torch.nn.Module) -> list[str]:
    if isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return [
        name
        for name, value in network.state_dict().items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


class BestModelSaver:
    """The best model of a validation engine, on disk: the network alone, its DRO state beside it, written atomically.

    At the end of every validation round (the engine's ``EPOCH_COMPLETED``) the key metric is compared with the best
    one so far; when it is strictly greater (an equal score keeps the first model) and every floating-point tensor of
    the network is finite, ``<save_dir>/<filename>`` is replaced with the network's state dict alone (a bare state
    dict, which MONAI's ``CheckpointLoader``, ``ckpt_export`` without ``key_in_ckpt`` and
    :py:func:`monai_groupdistil.engines.load_network` read), and, when ``dro_state`` is given, first
    ``<save_dir>/<stem>_dro_state.pt`` with the state of those objects (e.g. ``{"loss": loss, "dro": dro_handler}``:
    the DRO weights and running losses, and the weight history behind the report's plot). Both are ignite
    ``Checkpoint`` s with an :py:class:`AtomicDiskSaver`, so a kill at any instant leaves complete files. A network
    with a NaN or infinite weight is never saved (logged at WARNING level, naming its first such tensors), so a
    diverged run cannot replace a finite best model; a NaN key metric counts as ``-inf``. A failed write (a full
    disk) raises, and the saver keeps the best score of the files written before, so the next better model is saved;
    until then the DRO-state file may be the newer of the two.

    ``state_dict()`` / ``load_state_dict()`` carry the best score in ignite's ``{"_saved": [(score, filename)]}``
    form, as MONAI's ``CheckpointSaver.load_state_dict`` takes it, so
    :py:class:`monai_groupdistil.engines.BestMetricState` restores it in a resumed run.

    Args:
        save_dir: the folder of the files (created if missing).
        network: the network (a ``DistributedDataParallel`` wrapper is saved without its ``module.`` prefix).
        filename: the best model's file name. Defaults to ``"model.pt"``.
        dro_state: objects with ``state_dict()`` saved with each best model into :py:func:`dro_state_filename`;
            None or empty for none.
        key_metric_name: the metric of ``engine.state.metrics`` to compare; default: the engine's key metric.
        key_metric_negative_sign: compare the negated metric (for error-like metrics, smaller is better).
        name: the logger's name; default: this module's.

    Raises:
        ValueError: at save time, when the engine has no key metric and ``key_metric_name`` is None.

    Example::

        saver = BestModelSaver("runs", net, "model.pt", dro_state={"loss": loss, "dro": dro_handler})
        saver.attach(evaluator)
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: torch.nn.Module,
        filename: str = "model.pt",
        dro_state: Mapping[str, Any] | None = None,
        key_metric_name: str | None = None,
        key_metric_negative_sign: bool = False,
        name: str | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.filename = str(filename)
        self.dro_filename = dro_state_filename(self.filename) if dro_state else None
        self.key_metric_name = key_metric_name
        self.key_metric_negative_sign = key_metric_negative_sign
        self.logger = logging.getLogger(name) if name is not None else logger
        self.model_checkpoint = self._checkpoint({"model": network}, self.filename)
        self.dro_checkpoint = None if self.dro_filename is None else self._checkpoint(dro_state, self.dro_filename)

    def _checkpoint(self, to_save: Mapping[str, Any], filename: str) -> Checkpoint:
        return Checkpoint(
            to_save=dict(to_save),
            save_handler=AtomicDiskSaver(self.save_dir, require_empty=False),
            score_function=self.score,
            score_name="key_metric",
            n_saved=1,
            filename_pattern=filename.replace("{", "{{").replace("}", "}}"),  # a fixed name
            greater_or_equal=False,
        )

    def score(self, engine: Engine) -> float:
        """The key metric of ``engine`` as a float (negated with ``key_metric_negative_sign``; NaN counts as -inf)."""
        name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None:
            raise ValueError("BestModelSaver: the engine has no key metric; pass key_metric_name.")
        value = float(engine.state.metrics[name]) * (-1.0 if self.key_metric_negative_sign else 1.0)
        return -math.inf if math.isnan(value) else value

    def attach(self, engine: Engine) -> None:
        """Save after every validation round of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        bad = _non_finite(self.network)
        if bad:
            self.logger.warning(
                "not saving %s: %d tensor(s) of the network hold NaN or infinite values (%s); the best model saved "
                "so far is kept",
                self.save_dir / self.filename,
                len(bad),
                ", ".join(bad[:3]),
            )
            return
        checkpoints = [c for c in (self.dro_checkpoint, self.model_checkpoint) if c is not None]
        records = [c.state_dict() for c in checkpoints]
        try:
            for checkpoint in checkpoints:  # the DRO state first, so a model file is never newer than its DRO state
                checkpoint(engine)
        except BaseException:
            # ignite records the new score before the write: restore both records, so that the failed score does not
            # stand as the best one and the next better model is saved (both files)
            for checkpoint, record in zip(checkpoints, records):
                checkpoint.load_state_dict(record)
            raise

    def state_dict(self) -> dict[str, Any]:
        """``{"_saved": [(best score, filename)]}`` (empty before the first save)."""
        return dict(self.model_checkpoint.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the best score, in ignite's ``{"_saved": [(score, filename)]}`` form (the file names are this
        saver's own)."""
        scores = [float(item[0]) for item in state_dict["_saved"]]
        self.model_checkpoint.load_state_dict({"_saved": [(s, self.filename) for s in scores]})
        if self.dro_checkpoint is not None and self.dro_filename is not None:
            self.dro_checkpoint.load_state_dict({"_saved": [(s, self.dro_filename) for s in scores]})
