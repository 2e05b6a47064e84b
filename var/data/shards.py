"""Writing webdataset shards (plain tar files) deterministically and atomically, plus the manifest.

A shard is written under ``<name>.tmp`` and renamed when complete, so an interrupted job never leaves a
half-written file under a final name. Tar headers carry fixed metadata (mtime 0, no owner), which makes
the bytes a pure function of the samples: the same seed gives byte-identical shards. The manifest is
written last; a dataset directory without one is incomplete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    # Per-process temporary name: ranks that build the same cache at once never write the same file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes samples (dicts of extension -> bytes, plus ``__key__``) into numbered tar shards.

    Use as a context manager; ``shards`` lists the finished shard file names.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, samples_per_shard: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.shards: list[str] = []
        self.counts: list[int] = []
        self.class_counts: dict[int, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.directory / (name + ".tmp")
        self._final = self.directory / name
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._final)
        self.shards.append(self._final.name)
        self.counts.append(self._count)
        self._tar = None

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if "cls" in sample:
            label = int(sample["cls"])
            self.class_counts[label] = self.class_counts.get(label, 0) + 1
        if self._count >= self.samples_per_shard:
            self._close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._close()
        elif self._tar is not None:  # interrupted: drop the partial shard, keep the finished ones
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete ``*.tmp`` leftovers of a killed writer; returns how many."""
    n = 0
    for p in Path(directory).glob("*.tmp"):
        p.unlink()
        n += 1
    return n


def read_manifest(root: str | os.PathLike) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def split_urls(root: str | os.PathLike, split: str, manifest: dict | None = None) -> list[str]:
    """Absolute paths of a split's shards, in manifest order."""
    manifest = manifest or read_manifest(root)
    if manifest is None:
        return []
    info = manifest["splits"].get(split)
    if not info:
        return []
    return [str(Path(root) / name) for name in info["shards"]]


def iter_tar_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Group a tar's members into samples by key, like webdataset does; for tools and tests."""
    current: dict | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current
