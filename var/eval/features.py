"""Feature networks for the distribution metrics: uint8 images (N,3,H,W) -> (features (N,D), logits (N,K)).

Two implementations share that protocol, so FID and its synthetic stand-in run through the same code:

  inception             torch-fidelity's FID-Inception (the TF 2015-12-05 graph ported bit-exactly): pool3
                        features (2048) for FID/KID/precision/recall, unbiased logits (1008) for IS.
                        Weights from a local file, never downloaded.
  synthetic_classifier  var/eval/classifier.py, trained on the synthetic train split; labelled apart so
                        nobody mistakes its Fréchet distance for ImageNet FID.

``ident`` names the network *and its weights*; reference-statistics caches are keyed by it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from var.checkpoints import CheckpointError, safe_load
from var.data.shards import sha256_file
from var.errors import UserError

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


class WeightsMissing(CheckpointError, UserError):
    """A weight file the evaluation needs is absent: reported as one line naming the file and its source."""


class FeatureNet(nn.Module):
    """Protocol: ``name`` (metric label), ``ident`` (cache key), ``feature_dim``, ``forward(uint8) -> (f, logits)``."""

    name: str
    ident: str
    feature_dim: int

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class InceptionFeatures(FeatureNet):
    name = "inception"
    feature_dim = 2048

    def __init__(self, weights_path: str | Path):
        super().__init__()
        path = Path(weights_path)
        if path.is_dir():
            path = path / INCEPTION_FILE
        if not path.is_file():
            raise WeightsMissing(f"Inception weights not found: {path}; FID needs {INCEPTION_FILE} "
                                 f"(download {INCEPTION_URL}, save it as {INCEPTION_FILE} and set "
                                 f"task.inception_weights)")
        state = safe_load(path, "Inception weights")  # weights_only: a pickle that runs code is refused
        from torch_fidelity import feature_extractor_inceptionv3 as fe

        # torch-fidelity reads a local file with weights_only=False; hand it the safely loaded dict through
        # its download hook instead, which also guarantees nothing is fetched.
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
            try:
                self.net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
            except RuntimeError as e:
                first = str(e).strip().splitlines()[0]
                raise CheckpointError(f"Inception weights {path} do not match the network: {first}") from None
        self.ident = f"inception-{sha256_file(path)[:8]}"

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.net(images_uint8)  # resizes to 299 itself, as the TF graph does
        return feats, logits


class ClassifierFeatures(FeatureNet):
    name = "synthetic_classifier"

    def __init__(self, classifier: nn.Module, meta: dict):
        super().__init__()
        self.net = classifier.eval().requires_grad_(False)
        self.feature_dim = classifier.feature_dim
        self.meta = meta
        digest = hashlib.sha1()
        for t in classifier.state_dict().values():
            digest.update(t.detach().cpu().numpy().tobytes())
        self.ident = f"synthetic_classifier-{digest.hexdigest()[:8]}"

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.meta.get("resolution")
        if res and images_uint8.shape[-1] != res:  # generated at another size: match the training size
            x = torch.nn.functional.interpolate(images_uint8.float(), size=(res, res), mode="bilinear",
                                                antialias=True, align_corners=False)
            images_uint8 = x.round().clamp(0, 255).to(torch.uint8)
        return self.net(images_uint8)


def resolve_feature(kind: str, data_name: str | None) -> str:
    """``auto``: the synthetic classifier on the synthetic data (no Inception there), Inception elsewhere."""
    if kind == "auto":
        return "synthetic_classifier" if data_name == "synthetic" else "inception"
    if kind not in ("inception", "synthetic_classifier"):
        raise UserError(f"task.feature={kind}: expected auto | inception | synthetic_classifier")
    return kind


def build_feature_net(kind: str, *, inception_weights=None, data_root=None, cache_dir=None,
                      classifier: dict | None = None, device="cpu", progress: bool = True) -> FeatureNet:
    if kind == "inception":
        return InceptionFeatures(inception_weights).to(device)
    if kind == "synthetic_classifier":
        from var.eval.classifier import load_or_train_classifier

        model, meta = load_or_train_classifier(data_root, cache_dir, progress=progress, **(classifier or {}))
        return ClassifierFeatures(model, meta).to(device)
    raise UserError(f"task.feature={kind}: expected inception | synthetic_classifier")


@torch.no_grad()
def extract(net: FeatureNet, images_uint8: torch.Tensor, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of a uint8 batch, in chunks; returned float32 on CPU."""
    fs, ls = [], []
    for s in range(0, len(images_uint8), batch_size):
        f, lg = net(images_uint8[s:s + batch_size].to(device))
        fs.append(f.float().cpu())
        ls.append(lg.float().cpu())
    return torch.cat(fs), torch.cat(ls)
