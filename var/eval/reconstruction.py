"""Tokenizer evaluation on a held-out image split: rFID, PSNR, SSIM, LPIPS of the token round trip.

Every image goes image -> tokens of all scales -> image. PSNR and SSIM are per-image means on [0, 1]
(the definitions of the tokenizer's validation metrics), summed across ranks before dividing, so the result
does not depend on the number of ranks. rFID is the Fréchet distance between the features of the originals
and of their reconstructions, with the same feature network as generation (``rfid_inception``, or
``rfd_synthetic_classifier`` on the synthetic data).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from var.eval import frechet
from var.eval.features import FeatureNet
from var.eval.images import gather_concat, iter_split, rank_world, signed_to_uint8


@torch.no_grad()
def evaluate_tokenizer(vqvae, data_root, split: str, net: FeatureNet | None = None, lpips=None,
                       batch_size: int = 64, device="cpu", limit: int | None = None, progress: bool = True) -> dict:
    """Metrics of the round trip over ``split`` (all ranks take part); ``limit`` caps images per rank."""
    rank, world = rank_world()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # psnr, ssim, lpips, count
    real_f, rec_f = [], []
    batches = iter_split(data_root, split, batch_size, rank, world, limit=limit)
    if progress and rank == 0:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f"tokenizer {split}", unit="batch")
    vqvae.eval()
    for x8, _ in batches:
        x8 = x8.to(device)
        x = x8.float() / 127.5 - 1
        rec = vqvae.img_to_reconstructed_img(x).clamp(-1, 1)
        a, b = (rec + 1) / 2, (x + 1) / 2
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
        sums[0] += psnr.double().sum()
        sums[1] += ssim.double().sum()
        if lpips is not None:
            sums[2] += lpips(rec, x).double().sum()
        sums[3] += len(x)
        if net is not None:
            real_f.append(net(x8)[0].float().cpu())
            rec_f.append(net(signed_to_uint8(rec))[0].float().cpu())
    if world > 1:
        torch.distributed.all_reduce(sums)
    n = max(int(sums[3].item()), 1)
    out = {"psnr": sums[0].item() / n, "ssim": sums[1].item() / n, "n_images": int(sums[3].item())}
    if lpips is not None:
        out["lpips"] = sums[2].item() / n
    if net is not None:
        real = gather_concat(torch.cat(real_f), device).numpy()
        recon = gather_concat(torch.cat(rec_f), device).numpy()
        key = "rfid_inception" if net.name == "inception" else f"rfd_{net.name}"
        out["feature_extractor"] = net.name
        out[key] = frechet.frechet_distance(*frechet.feature_stats(recon), *frechet.feature_stats(real))
    return out
