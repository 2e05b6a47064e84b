"""Distribution metrics over feature sets: Fréchet distance, KID, precision/recall, Inception Score.

All take plain arrays (N, D) of features (or (N, K) logits) so they serve any feature network: Inception
(FID as papers report it) or the small classifier of the synthetic data. Statistics are float64.

  Fréchet distance  ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)   (Heusel et al. 2017)
  KID               unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean over random subsets (Bińkowski 2018)
  precision/recall  k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019)
  IS                exp E_x KL(p(y|x) || p(y)), mean over splits (Salimans et al. 2016)
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64, the covariance unbiased as in the reference code."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats: need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians.

    tr((S1 S2)^1/2) is computed as tr((A S2 A)^1/2) with A = S1^1/2: the same eigenvalues, but of a
    symmetric PSD matrix, so ``eigh`` is exact where ``sqrtm`` of the non-symmetric S1 S2 goes complex or
    singular on rank-deficient covariances (fewer samples than dimensions).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"frechet_distance: shapes differ ({mu1.shape} vs {mu2.shape})")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    tr_covmean = float(np.sqrt(np.clip(scipy.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean), 0.0)


def kid(real, fake, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float | None]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets (torch-fidelity's recipe).

    When the subsets are both sets whole (fewer samples than ``subset_size`` in each), every subset gives
    the same value: the mean is then the MMD^2 of the two sets and the std is None, not a spurious 0.
    """
    r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(r), len(f), subset_size)
    if m < 2:
        raise ValueError("kid: need at least 2 samples in each set")
    if m == len(r) == len(f):
        num_subsets = 1
    d = r.shape[1]
    rng = np.random.RandomState(seed)
    out = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f[rng.choice(len(f), m, replace=False)]
        y = r[rng.choice(len(r), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = m * (m - 1)
        out[i] = ((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(out.mean()), (float(out.std()) if num_subsets > 1 else None)


def _kth_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour within the set (itself excluded)."""
    out = []
    for s in range(0, len(x), batch):
        d = torch.cdist(x[s:s + batch], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def _covered(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Whether each query lies within the k-NN ball of some support point."""
    out = []
    for s in range(0, len(query), batch):
        d = torch.cdist(query[s:s + batch], support)
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3, batch: int = 1024, device="cpu") -> tuple[float, float]:
    """Precision: fraction of fake samples inside the real manifold; recall: real inside the fake one."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} samples in each set")
    precision = _covered(f, r, _kth_radii(r, k, batch), batch).float().mean().item()
    recall = _covered(r, f, _kth_radii(f, k, batch), batch).float().mean().item()
    return precision, recall


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` chunks of exp(E KL(p(y|x) || p(y))), from unnormalised logits."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for chunk in torch.chunk(logp, min(splits, len(logp))):
        log_py = torch.logsumexp(chunk, dim=0) - np.log(len(chunk))  # log of the marginal p(y)
        kl = (chunk.exp() * (chunk - log_py[None])).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def class_accuracy(logits, labels) -> float:
    """Fraction of samples whose predicted class is the label they were generated for."""
    pred = np.asarray(logits).argmax(axis=1)
    return float((pred == np.asarray(labels)).mean())
