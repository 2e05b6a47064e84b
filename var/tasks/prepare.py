"""task=prepare: build image shards for the configured dataset."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from var.data.prepare import convert_imagefolder, prepare_synthetic, synthetic_matches
from var.data.shards import read_manifest
from var.errors import ConfigError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    data, task = cfg.data, cfg.task
    if data.name == "synthetic":
        reused = not task.get("force", False) and synthetic_matches(read_manifest(data.root), data)
        manifest = prepare_synthetic(data, force=task.get("force", False), workers=int(task.get("workers", 1)))
        print(f"{'found' if reused else 'generated'} synthetic dataset at {data.root}")
    elif data.name == "imagefolder":
        manifest = convert_imagefolder(data, workers=int(task.get("workers", 1)))
        print(f"converted {data.src} -> {data.root}")
    else:
        raise ConfigError(f"data.name={data.name}: task=prepare knows 'synthetic' and 'imagefolder'")
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"  {manifest['num_classes']} classes at {manifest['resolution']} px: {counts}")
    skipped = manifest.get("skipped", [])
    if skipped:
        print(f"  skipped {len(skipped)} unreadable files (listed in {data.root}/manifest.json):")
        for item in skipped[:20]:
            print(f"    {item['path']}: {item['reason']}")
        if len(skipped) > 20:
            print(f"    ... and {len(skipped) - 20} more")
    return manifest
