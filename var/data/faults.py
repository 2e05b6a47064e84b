"""Corrupt data: skip the sample, count it, log one line, and fail once too much of a split is bad.

The readers of image and token shards call ``FaultCounter.seen`` for every sample they deliver and
``FaultCounter.bad`` for every sample they skip, with one of ``KINDS``:

- ``bad_shard``: a shard that is truncated or cannot be read; the samples it lost (from the manifest's
  per-shard counts when it has them) are counted.
- ``undecodable``: image or token bytes that do not decode, or a missing field.
- ``wrong_length``: a token row whose length is not the sum of the scales' areas.
- ``out_of_range``: a token outside [0, vocabulary size).
- ``bad_label``: a class index outside [0, number of classes).

Counts live in small tensors with one row per DataLoader worker, in shared memory when workers fill them,
so the main process sees every worker's skips without changing what a batch holds. ``summary`` gives a
split's counts; ``combine`` merges splits into the ``data_faults`` field of record.json; ``check`` raises
a one-line DataError naming the worst shard once the bad fraction exceeds ``data.max_bad_fraction``.
"""

from __future__ import annotations

import json
import logging
import math

import torch
from torch.utils.data import get_worker_info

from var.errors import DataError

log = logging.getLogger(__name__)

KINDS = ("bad_shard", "undecodable", "wrong_length", "out_of_range", "bad_label")
MAX_LOGGED = 100      # warning lines per split and worker; past it faults are counted, not logged
MAX_EXAMPLES = 8      # (file, key, kind, detail) kept per split and worker, for the record
_EXAMPLE_BYTES = 320
_OTHER = "<shard unknown>"  # the slot of samples no listed shard can be blamed for


def one_line(e: BaseException | str) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if isinstance(e, BaseException) else first


def min_seen(max_bad_fraction: float) -> int:
    """Samples to see before judging a split mid-pass: enough that one early bad sample is no verdict."""
    return 0 if max_bad_fraction <= 0 else math.ceil(10 / max_bad_fraction)


class FaultCounter:
    """Seen and skipped samples of one split, by shard and kind."""

    def __init__(self, split: str, urls, expected: dict | None = None, workers: int = 1, shared: bool = False):
        self.split = split
        self.urls = [str(u) for u in urls] + [_OTHER]
        self._slot = {u: i for i, u in enumerate(self.urls)}
        self.expected = {str(k): int(v) for k, v in (expected or {}).items()}  # samples per shard
        rows = max(int(workers), 1)
        self.counts = torch.zeros(rows, len(self.urls), 1 + len(KINDS), dtype=torch.int64)
        self.examples = torch.zeros(rows, MAX_EXAMPLES, _EXAMPLE_BYTES, dtype=torch.uint8)
        self.noted = torch.zeros(rows, 2, dtype=torch.int64)  # [examples kept, lines logged]
        if shared:  # DataLoader workers write here; forked or spawned, they see the same memory
            for t in (self.counts, self.examples, self.noted):
                t.share_memory_()

    # ------------------------------------------------------------------------------------- counting
    def _row(self) -> int:
        info = get_worker_info()
        return (info.id if info is not None else 0) % self.counts.shape[0]

    def seen(self, url: str, n: int = 1) -> None:
        self.counts[self._row(), self._slot.get(str(url), -1), 0] += n

    def bad(self, url: str, key: str, kind: str, detail: str, n: int = 1) -> None:
        """Count ``n`` skipped samples (they were seen too) and log one line naming the shard and key."""
        row, slot = self._row(), self._slot.get(str(url), -1)
        self.counts[row, slot, 0] += n
        self.counts[row, slot, 1 + KINDS.index(kind)] += n
        detail = " ".join(str(detail).split())[:200]
        logged = int(self.noted[row, 1])
        if logged < MAX_LOGGED:
            log.warning("data fault: skipped %s in %s (%s split): %s: %s", key, url, self.split, kind, detail)
        elif logged == MAX_LOGGED:
            log.warning("data fault: more bad samples in the %s split are counted but not logged", self.split)
        self.noted[row, 1] += 1
        kept = int(self.noted[row, 0])
        if kept < MAX_EXAMPLES:
            blob = json.dumps({"file": str(url), "key": str(key), "kind": kind, "detail": detail}).encode()
            blob = blob if len(blob) <= _EXAMPLE_BYTES else json.dumps(
                {"file": str(url)[-120:], "key": str(key)[:60], "kind": kind, "detail": detail[:60]}).encode()
            self.examples[row, kept, : len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            self.noted[row, 0] += 1

    def shard_ended(self, url: str, delivered: int, last_key: str | None, error: str | None) -> None:
        """A shard was read to its end or to a read error: count the samples it lost."""
        want = self.expected.get(str(url))
        lost = max(want - delivered, 0) if want is not None else (1 if error else 0)
        if lost or error:
            where = f"after {last_key}" if last_key else "before its first sample"
            why = error or f"ends after {delivered} of {want} samples"
            self.bad(url, where, "bad_shard", f"{why} ({lost} samples lost)", n=lost)

    # ------------------------------------------------------------------------------------ reporting
    def totals(self) -> tuple[int, int]:
        c = self.counts.sum(dim=(0, 1))
        return int(c[0]), int(c[1:].sum())

    def summary(self, reduce: bool = False) -> dict:
        """Counts of this split; ``reduce`` sums over the ranks of a process group (a collective)."""
        counts = self.counts.sum(0)
        examples = [json.loads(bytes(self.examples[r, i][self.examples[r, i] > 0].tolist()))
                    for r in range(self.examples.shape[0]) for i in range(int(self.noted[r, 0]))]
        if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            dist = torch.distributed
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) \
                else torch.device("cpu")
            reduced = counts.to(device)
            dist.all_reduce(reduced)
            counts = reduced.cpu()
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, examples)
            examples = [e for part in gathered for e in part]
        return summarize_counts(self.split, self.urls, counts, examples[:MAX_EXAMPLES])

    def check(self, max_bad_fraction: float, final: bool = True) -> None:
        """Raise DataError when the bad fraction exceeds the limit; mid-pass only after min_seen samples."""
        seen, skipped = self.totals()
        if skipped and (final or seen >= min_seen(max_bad_fraction)) and skipped > max_bad_fraction * seen:
            raise fraction_error(combine([self.summary()], max_bad_fraction), max_bad_fraction, self.split)


def summarize_counts(split: str, urls: list[str], counts: torch.Tensor, examples: list[dict]) -> dict:
    """A split's summary from its (shards, 1 + kinds) count table."""
    files = []
    for url, row in zip(urls, counts.tolist()):
        if sum(row[1:]):
            files.append({"file": url, "split": split, "seen": row[0], "skipped": sum(row[1:]),
                          "by_kind": {k: n for k, n in zip(KINDS, row[1:]) if n}})
    total = counts.sum(0).tolist()
    return {"split": split, "seen": int(total[0]), "skipped": int(sum(total[1:])),
            "by_kind": {k: int(n) for k, n in zip(KINDS, total[1:]) if n}, "files": files, "examples": examples}


def combine(summaries: list[dict], max_bad_fraction: float) -> dict:
    """Split summaries merged into record.json's ``data_faults``: totals, per split, per bad shard."""
    seen = sum(s["seen"] for s in summaries)
    skipped = sum(s["skipped"] for s in summaries)
    by_kind: dict[str, int] = {}
    for s in summaries:
        for k, n in s["by_kind"].items():
            by_kind[k] = by_kind.get(k, 0) + n
    return {"seen": seen, "skipped": skipped, "fraction": skipped / seen if seen else 0.0,
            "max_bad_fraction": max_bad_fraction, "by_kind": by_kind,
            "splits": {s["split"]: {"seen": s["seen"], "skipped": s["skipped"], "by_kind": s["by_kind"]}
                       for s in summaries},
            "files": [f for s in summaries for f in s["files"]],
            "examples": [e for s in summaries for e in s["examples"]][:MAX_EXAMPLES]}


def fraction_error(faults: dict, max_bad_fraction: float, split: str) -> DataError:
    """One line: the worst shard of ``split``, the split's bad fraction and the limit it broke."""
    part = faults["splits"][split]
    files = [f for f in faults["files"] if f["split"] == split]
    worst = max(files, key=lambda f: f["skipped"])
    kinds = ", ".join(f"{k} {n}" for k, n in worst["by_kind"].items())
    others = f"; {len(files) - 1} more shards with bad samples" if len(files) > 1 else ""
    err = DataError(f"{worst['file']}: {part['skipped']} of {part['seen']} {split} samples bad "
                    f"({part['skipped'] / max(part['seen'], 1):.2%} > data.max_bad_fraction={max_bad_fraction:g}); "
                    f"this shard: {worst['skipped']} ({kinds}){others}")
    err.data_faults = faults  # what the failed run's record.json keeps
    return err
