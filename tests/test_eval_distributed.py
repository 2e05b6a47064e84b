"""Two CPU ranks (gloo): sampled features and reference statistics come back complete and in order."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf


def fake_sampler(labels, seeds, **kwargs):
    """Images that depend on (label, seed) only, as the real sampler's do."""
    g = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.rand(3, 16, 16, generator=gi) for gi in g])
    return (x + labels.view(-1, 1, 1, 1).float()) / 3  # labels 0..2 here


def run_eval(data_root, cache_dir):
    from var.eval.classifier import SmallClassifier
    from var.eval.features import ClassifierFeatures
    from var.eval.generation import generate_features
    from var.eval.images import gather_interleaved, rank_indices, rank_world
    from var.eval.reference import split_reference
    from var.sampling.config import SamplingConfig

    torch.manual_seed(0)
    net = ClassifierFeatures(SmallClassifier(4, width=8), {"resolution": 16})
    rank, world = rank_world()
    idx, _ = rank_indices(11, rank, world)
    order = gather_interleaved(idx, 11, "cpu")
    gen = generate_features(fake_sampler, net, [0, 1, 2], 5, SamplingConfig(seed=3), batch_size=4, device="cpu",
                            keep_images=True, progress=False)
    ref = split_reference(net, data_root, "test", cache_dir, batch_size=8, progress=False)
    return order, gen, ref


def worker(rank, world, init, data_root, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        order, gen, ref = run_eval(data_root, out)
        if rank == 0:
            np.savez(f"{out}/dist.npz", order=order.numpy(), feats=gen["features"], images=gen["images"],
                     labels=gen["labels"], mu=ref.mu, n=len(ref.labels))
        else:
            assert gen is None
    finally:
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
    # Gloo's worker threads can abort the interpreter's finalisation once everything is done ("terminate called
    # without an active exception", SIGABRT; 1 run in 7 here): the results are written, so leave without it.
    os._exit(0)


def test_two_ranks_match_one(tmp_path):
    from var.data.prepare import prepare_synthetic

    data = OmegaConf.create(dict(name="synthetic", root=str(tmp_path / "data"), seed=0, resolution=16,
                                 num_classes=4, samples_per_shard=50, splits=dict(train=40, val=10, test=30)))
    prepare_synthetic(data)
    mp.spawn(worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path / "data"), str(tmp_path / "two")), nprocs=2)
    two = np.load(tmp_path / "two" / "dist.npz")
    _, gen, ref = run_eval(tmp_path / "data", tmp_path / "one")
    np.testing.assert_array_equal(two["order"], np.arange(11))
    np.testing.assert_array_equal(two["labels"], np.repeat([0, 1, 2], 5))
    np.testing.assert_array_equal(two["images"], gen["images"])  # same images, same order
    np.testing.assert_allclose(two["feats"], gen["features"], rtol=1e-5, atol=1e-6)
    assert int(two["n"]) == len(ref.labels) == 30
    np.testing.assert_allclose(two["mu"], ref.mu, rtol=1e-5, atol=1e-6)
