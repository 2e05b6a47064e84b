"""Feature networks and reference statistics, offline: the FID code path with a small feature network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from var.eval import reference as refmod
from var.eval.classifier import SmallClassifier, accuracy, load_or_train_classifier, train_classifier
from var.eval.features import INCEPTION_FILE, INCEPTION_URL, ClassifierFeatures, InceptionFeatures, extract
from var.eval.images import load_split


def make_dataset(root, seed=0):
    from var.data.prepare import prepare_synthetic

    data = OmegaConf.create(dict(name="synthetic", root=str(root), seed=seed, resolution=16, num_classes=4,
                                 samples_per_shard=50, splits=dict(train=80, val=20, test=60)))
    return prepare_synthetic(data, force=True)


def small_net(seed=0):
    torch.manual_seed(seed)
    return ClassifierFeatures(SmallClassifier(4, width=8), {"resolution": 16})


def test_distance_of_a_split_to_itself_is_zero_and_grows_with_noise(tmp_path):
    make_dataset(tmp_path / "data")
    net = small_net()
    ref = refmod.split_reference(net, tmp_path / "data", "test", tmp_path / "cache", batch_size=32, progress=False)
    x, y = load_split(tmp_path / "data", "test")
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    fds = []
    for sigma in (0, 10, 30, 80):
        noisy = (x.float() + sigma * noise).round().clamp(0, 255).to(torch.uint8)
        f, lg = extract(net, noisy, 32, "cpu")
        m = refmod.compare(f.numpy(), lg.numpy(), ref, net.name, labels=y.numpy(), kid_subsets=5)
        fds.append(m["fd_synthetic_classifier"])
        if sigma == 0:
            assert m["fd_synthetic_classifier"] == pytest.approx(0.0, abs=1e-6)
            assert m["precision_synthetic_classifier"] == m["recall_synthetic_classifier"] == 1.0
    assert all(b > a for a, b in zip(fds, fds[1:])), fds
    # Labels name the feature network, so nobody takes the number for ImageNet FID.
    assert m["feature_extractor"] == "synthetic_classifier" and "fid_inception" not in m
    assert {"kid_synthetic_classifier", "is_synthetic_classifier", "class_accuracy_synthetic_classifier"} <= set(m)


def test_reference_cache_is_reused_and_invalidated_when_the_split_changes(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    first = make_dataset(data, seed=0)
    net = small_net()
    before = dict(refmod.CACHE_STATS)
    a = refmod.split_reference(net, data, "test", cache, batch_size=32, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and first["fingerprint"] in files[0].name
    mtime = files[0].stat().st_mtime_ns
    b = refmod.split_reference(net, data, "test", cache, batch_size=32, progress=False)
    assert refmod.CACHE_STATS["computed"] == before["computed"] + 1
    assert refmod.CACHE_STATS["loaded"] == before["loaded"] + 1
    assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(a.mu, b.mu)
    # Regenerated with another seed: new fingerprint, new statistics.
    second = make_dataset(data, seed=1)
    assert second["fingerprint"] != first["fingerprint"]
    c = refmod.split_reference(net, data, "test", cache, batch_size=32, progress=False)
    assert refmod.CACHE_STATS["computed"] == before["computed"] + 2
    assert c.source["fingerprint"] == second["fingerprint"] and not np.allclose(a.mu, c.mu)
    # Another feature network (other weights): its own file.
    refmod.split_reference(small_net(seed=1), data, "test", cache, batch_size=32, progress=False)
    assert len(list(cache.glob("*.npz"))) == 3


def test_adm_npz_reference(tmp_path):
    make_dataset(tmp_path / "data")
    net = small_net()
    x, _ = load_split(tmp_path / "data", "test")
    npz = tmp_path / "ref.npz"
    np.savez(npz, arr_0=x.permute(0, 2, 3, 1).numpy())
    ref = refmod.npz_reference(net, npz, tmp_path / "cache", batch_size=32, progress=False)
    split = refmod.split_reference(net, tmp_path / "data", "test", tmp_path / "cache", batch_size=32, progress=False)
    np.testing.assert_allclose(ref.mu, split.mu, rtol=1e-5, atol=1e-6)
    # Inception mu/sigma alone are of no use to another feature network: one clear error.
    np.savez(tmp_path / "stats.npz", mu=ref.mu, sigma=ref.sigma)
    with pytest.raises(refmod.DataError, match="mu/sigma"):
        refmod.npz_reference(net, tmp_path / "stats.npz", tmp_path / "cache", progress=False)


def test_missing_inception_weights_is_one_line_naming_the_file(tmp_path):
    from var.errors import UserError

    with pytest.raises(UserError) as e:
        InceptionFeatures(tmp_path / "weights")
    msg = str(e.value)
    assert "\n" not in msg and INCEPTION_FILE in msg and INCEPTION_URL in msg


def test_inception_loads_a_local_file_without_network(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    # A random-weight file of the right layout stands in for the real one.
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    state = fe.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    monkeypatch.undo()
    torch.save(state, tmp_path / INCEPTION_FILE)

    def refuse(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)
    net = InceptionFeatures(tmp_path)
    f, lg = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert f.shape == (2, 2048) and lg.shape == (2, 1008) and net.ident.startswith("inception-")


def test_synthetic_classifier_learns_and_is_cached(small_dataset, tmp_path):
    _, root = small_dataset
    x, y = load_split(root, "train")
    xv, yv = load_split(root, "val")
    model = train_classifier(x, y, 10, epochs=8, width=16, batch_size=32, progress=False)
    assert accuracy(model, xv, yv) >= 0.85
    recipe = {"epochs": 2, "width": 8, "seed": 0}
    m1, meta = load_or_train_classifier(root, tmp_path, progress=False, **recipe)
    files = list(tmp_path.glob("classifier_*.pt"))
    assert len(files) == 1 and meta["fingerprint"] in files[0].name and "val_accuracy" in meta
    m2, _ = load_or_train_classifier(root, tmp_path, progress=False, **recipe)  # read back, not retrained
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    f, lg = ClassifierFeatures(m2, meta)(x[:4])
    assert f.shape == (4, m2.feature_dim) and lg.shape == (4, 10)
