"""``record.json``: the one file per run that analysis reads (format: docs/record_format.md).

Written atomically (temporary file, fsync, rename) so a kill at any moment leaves the previous good
record; only rank 0 writes.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from var.data.shards import atomic_write_json

SCHEMA = 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_record(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


class RunRecord:
    """In-memory record mirrored to ``<run_dir>/record.json`` on every ``save``."""

    def __init__(self, directory: str | Path, **fields):
        self.path = Path(directory) / "record.json"
        old = read_record(self.path)
        self.data = old if old is not None else {"schema": SCHEMA, "status": "running", "error": None,
                                                 "preemptions": 0, "started_at": now(), "evals": []}
        self.data.update(fields)

    def __getitem__(self, key):
        return self.data[key]

    def update(self, **fields) -> None:
        self.data.update(fields)

    def add_eval(self, entry: dict) -> None:
        # A resumed run may re-evaluate a step it had already recorded: keep one entry per step.
        self.data["evals"] = [e for e in self.data["evals"] if e["step"] != entry["step"]] + [entry]
        self.data["evals"].sort(key=lambda e: e["step"])

    def save(self) -> None:
        self.data["updated_at"] = now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)
