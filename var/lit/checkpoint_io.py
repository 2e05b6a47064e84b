"""Checkpoints that a kill at any moment cannot corrupt, and finding the one to resume from.

Lightning's own save is not atomic on every set-up: it writes the file in the system temp directory and
moves it with ``shutil.move``, which falls back to copying onto the target when the temp directory is on
another filesystem (as on most clusters), and FSDP2's distributed checkpoints are written into the target
folder in place. Here a checkpoint (a file, or a folder of shards) is written complete under
``<name>.tmp`` beside its target, flushed to disk, and then put in place by ``promote``:

- a file replaces the old one with one ``os.replace``;
- a folder cannot replace a folder in one rename, so the old one is parked as ``<name>.old``, the new one
  renamed in, and the old one deleted. A kill between the two renames leaves only ``<name>.old``, which
  is whole, and ``resume_checkpoint`` falls back to it.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from var.checkpoints import CheckpointError

LAST = "last.ckpt"


def remove_path(path: Path) -> None:
    """Delete a file, a symlink or a folder of shards; nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a folder, to disk before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        _fsync_dir(path)


def promote(tmp: Path, final: Path) -> None:
    """Put the complete ``tmp`` (file or folder) at ``final``; at every moment one whole copy exists."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_file() and not final.is_dir():
        os.replace(tmp, final)
    else:
        old = final.with_name(final.name + ".old")
        if final.exists():
            remove_path(old)  # left by an earlier kill after its swap: final is the newer, whole copy
            os.replace(final, old)
        os.replace(tmp, final)
        remove_path(old)
    _fsync_dir(final.parent)  # the rename itself survives a power loss


def resume_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """``last.ckpt`` (file or folder of shards), else the whole previous one a kill mid-swap left parked."""
    checkpoint_dir = Path(checkpoint_dir)
    for name in (LAST, LAST + ".old"):
        path = checkpoint_dir / name
        if path.exists():
            if path.is_dir():
                check_shard_metadata(path)
            return path
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Distributed checkpoints keep their index (``.metadata``) as a pickle that torch unpickles without
    restriction; here only its own classes, torch dtypes and sizes, paths and plain containers may appear."""

    SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("builtins", "set"), ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        if "." not in name:  # a dotted name would reach through a module to any function in it
            if (module, name) in self.SAFE:
                return super().find_class(module, name)
            if module == "torch.distributed.checkpoint.metadata":  # its own classes, not what it imports
                value = super().find_class(module, name)
                if isinstance(value, type) and value.__module__ == module:
                    return value
            value = getattr(torch, name, None) if module == "torch" else None
            if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
                return value
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def check_shard_metadata(path: Path) -> None:
    """Refuse a sharded checkpoint whose index would run code when torch unpickles it."""
    meta = Path(path) / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"sharded checkpoint {path} has no .metadata: it is incomplete")
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f"sharded checkpoint {path} cannot be loaded safely: {meta.name}: {e}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Whole-file checkpoints (single process, DDP): written beside the target, fsynced, then renamed."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".tmp")  # only rank 0 writes; a fixed name replaces a killed one's
        remove_path(tmp)
        torch.save(checkpoint, tmp)
        fsync_tree(tmp)
        promote(tmp, final)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """FSDP2 through Lightning, with each folder of shards written as ``<name>.tmp`` and then promoted."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # one file, AtomicCheckpointIO
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(final.name + ".tmp")  # one name for all ranks: they write shards of one folder
        if self.global_rank == 0:
            remove_path(tmp)  # what a kill mid-save left behind
        self.barrier("atomic_checkpoint_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("atomic_checkpoint_written")  # every rank's shards are on disk
        if self.global_rank == 0:
            fsync_tree(tmp)
            promote(tmp, final)
        self.barrier("atomic_checkpoint_promoted")
