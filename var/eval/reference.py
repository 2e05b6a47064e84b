"""Reference statistics: the real-image side of FID/KID/precision/recall, computed once and cached.

Two sources:
  * an image-shard split: features of every image, cached at ``<cache_dir>/<fingerprint>_<split>_<net>.npz``.
    The dataset's manifest fingerprint changes whenever its shards do, so a regenerated or reconverted split
    never reuses stale statistics, and a feature network with other weights gets its own file.
  * a standard ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): its ``mu``/``sigma`` (pool3 of
    the TF Inception, which torch-fidelity's network reproduces) serve FID as in the ADM evaluator, and its
    images ``arr_0`` give the feature sets of KID and precision/recall (features cached as above, keyed
    by the file's path, size and modification time).

``compare`` turns generated features against a reference into metrics whose keys name the network.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from var.data.shards import atomic_write_bytes
from var.errors import DataError
from var.eval import frechet
from var.eval.features import FeatureNet, extract
from var.eval.images import dataset_manifest, gather_concat, iter_split, rank_world

CACHE_STATS = {"computed": 0, "loaded": 0}  # how often features were computed vs read back (tests use it)


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    source: dict
    features: np.ndarray | None = None   # (N, D), for KID and precision/recall
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def _save(path: Path, **arrays) -> None:
    if rank_world()[0] != 0:
        return
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def split_reference(net: FeatureNet, data_root: str | Path, split: str, cache_dir: str | Path, batch_size: int = 100,
                    device="cpu", num_workers: int = 0, progress: bool = True) -> Reference:
    """Features of every image of ``split`` (all ranks take part), through the fingerprint-keyed cache."""
    manifest = dataset_manifest(data_root)
    fp = manifest.get("fingerprint")
    path = Path(cache_dir) / f"{fp}_{split}_{net.ident}.npz"
    source = {"kind": "split", "root": str(data_root), "split": split, "fingerprint": fp}
    if path.is_file():
        with np.load(path) as z:
            if str(z["fingerprint"]) == fp and str(z["net"]) == net.ident:
                CACHE_STATS["loaded"] += 1
                return Reference(z["mu"], z["sigma"], {**source, "n": len(z["labels"]), "cache": str(path)},
                                 z["features"], z["logits"], z["labels"])
    rank, world = rank_world()
    batches = iter_split(data_root, split, batch_size, rank, world, num_workers)
    if progress and rank == 0:
        from tqdm import tqdm
        total = int(manifest["splits"][split]["count"])
        batches = tqdm(batches, total=-(-total // (batch_size * world)), desc=f"reference {split}", unit="batch")
    fs, ls, ys = [], [], []
    for x, y in batches:
        f, lg = extract(net, x, batch_size, device)
        fs.append(f)
        ls.append(lg)
        ys.append(y)
    feats = gather_concat(torch.cat(fs), device).numpy()
    logits = gather_concat(torch.cat(ls), device).numpy()
    labels = gather_concat(torch.cat(ys), device).numpy()
    mu, sigma = frechet.feature_stats(feats)
    CACHE_STATS["computed"] += 1
    _save(path, mu=mu, sigma=sigma, features=feats, logits=logits, labels=labels, fingerprint=fp, net=net.ident)
    _barrier()
    return Reference(mu, sigma, {**source, "n": len(labels), "cache": str(path)}, feats, logits, labels)


def npz_reference(net: FeatureNet, npz_path: str | Path, cache_dir: str | Path, batch_size: int = 100,
                  device="cpu", progress: bool = True) -> Reference:
    """An ADM-style reference batch: ``mu``/``sigma`` and/or images ``arr_0`` (N, H, W, 3) uint8."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise DataError(f"task.reference={npz_path}: no such file (an ADM reference batch such as "
                        f"VIRTUAL_imagenet256_labeled.npz, or 'split')")
    st = npz_path.stat()
    key = hashlib.sha1(f"{npz_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    source = {"kind": "npz", "path": str(npz_path), "size": st.st_size}
    with np.load(npz_path) as z:
        names = set(z.files)
        has_stats = {"mu", "sigma"} <= names
        # The file's mu/sigma are Inception pool3 statistics: valid for FID only with that network.
        use_stats = has_stats and net.name == "inception"
        mu, sigma = (z["mu"], z["sigma"]) if use_stats else (None, None)
        if "arr_0" not in names:
            if not use_stats:
                raise DataError(f"task.reference={npz_path}: holds neither images (arr_0) nor "
                                f"{'Inception ' if has_stats else ''}mu/sigma usable with task.feature={net.name}")
            return Reference(mu, sigma, {**source, "stats_from": "file"})
        cache = Path(cache_dir) / f"npz_{key}_{net.ident}.npz"
        if cache.is_file():
            with np.load(cache) as c:
                CACHE_STATS["loaded"] += 1
                feats, logits = c["features"], c["logits"]
        else:
            images = z["arr_0"]
            rank, world = rank_world()
            idx = np.arange(rank, len(images), world)
            steps = range(0, len(idx), batch_size)
            if progress and rank == 0:
                from tqdm import tqdm
                steps = tqdm(steps, desc="reference npz", unit="batch")
            fs, ls = [], []
            for s in steps:
                x = torch.from_numpy(np.ascontiguousarray(images[idx[s:s + batch_size]])).permute(0, 3, 1, 2)
                f, lg = extract(net, x, batch_size, device)
                fs.append(f)
                ls.append(lg)
            feats = gather_concat(torch.cat(fs), device).numpy()
            logits = gather_concat(torch.cat(ls), device).numpy()
            CACHE_STATS["computed"] += 1
            _save(cache, features=feats, logits=logits)
            _barrier()
    if mu is None:
        mu, sigma = frechet.feature_stats(feats)
    return Reference(mu, sigma, {**source, "n": len(feats), "stats_from": "file" if use_stats else "arr_0"},
                     feats, logits)


def compare(fake_feats: np.ndarray, fake_logits: np.ndarray, ref: Reference, name: str,
            labels: np.ndarray | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
            prc_k: int = 3, device="cpu") -> dict:
    """Metrics of generated features against ``ref``, every key naming the feature network.

    Inception gives ``fid_inception`` (the number papers report); any other network gives ``fd_<name>``
    (a Fréchet distance in its own feature space). Class accuracy exists where the network classifies the
    generated classes (the synthetic classifier).
    """
    mu, sigma = frechet.feature_stats(fake_feats)
    fd_key = "fid_inception" if name == "inception" else f"fd_{name}"
    out = {"feature_extractor": name, fd_key: frechet.frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ref.features is not None:
        kid_mean, kid_std = frechet.kid(ref.features, fake_feats, kid_subsets, kid_subset_size)
        out[f"kid_{name}"], out[f"kid_std_{name}"] = kid_mean, kid_std
        if min(len(ref.features), len(fake_feats)) > prc_k:
            p, r = frechet.precision_recall(ref.features, fake_feats, k=prc_k, device=device)
            out[f"precision_{name}"], out[f"recall_{name}"] = p, r
    is_mean, is_std = frechet.inception_score(fake_logits)
    out[f"is_{name}"], out[f"is_std_{name}"] = is_mean, is_std
    if name != "inception" and labels is not None:
        out[f"class_accuracy_{name}"] = frechet.class_accuracy(fake_logits, labels)
    return out
