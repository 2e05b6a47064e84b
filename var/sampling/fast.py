"""Sampling many batches of images, on the fast path where there is one: what task=sample and the
generation metrics of task=evaluate share.

The fast path (CUDA only) runs each scale as a CUDA graph of compiled blocks on bf16 weight copies
(graphed.py), draws each scale's tokens with one Triton kernel computing the plain path's ``draw_scale``
(draw_kernel.py; the same per-image counter streams), and decodes with the compiled channels-last decoder
under autocast, so an image differs from the plain one by kernel rounding only; bench/results/ has the speed
(d16, batch 64 on an H100: 112.6 img/s plain, 348.9 fast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from var.errors import ConfigError
from var.sampling.graphed import GraphedStepsByRows
from var.sampling.loading import autocast_dtype, autocast_for
from var.sampling.sampler import draw_scale, draw_with_uniforms, sample_images, token_uniforms

# The draws' levers (the benchmark's ablations, bench.sample_speed --off draw-kernel / eager-draws): the
# Triton kernel (draw_kernel.py) where it applies, else draw_scale through torch.compile, else eagerly.
DRAW_KERNEL = True
COMPILE_DRAWS = True
_COMPILED_DRAW: list = []


def compiled_draw(logits, keys, begin, t, temperature, top_k, top_p) -> torch.Tensor:
    """``draw_scale`` with its draw through torch.compile: the guidance mix, filters, softmax and inverse-CDF
    draw fuse into a few kernels around the sort (eagerly ~30 per scale: ~14 ms of a d16 batch of 64 on an
    H100). Sizes and the guidance weight stay symbolic (floats unspecialised, else each scale's weight would
    compile a graph of its own), so the ten scales share two graphs.

    The counter streams' uniforms are computed eagerly (a dozen tiny kernels): compiled, Inductor folds the
    token positions (an arange from the symbolic offset) into index arithmetic that it types int32 at small
    sizes, where SplitMix64's 64-bit constants overflow it (batch 1 failed to compile on an H100)."""
    import torch._dynamo.config as dynamo_config

    if not _COMPILED_DRAW:
        _COMPILED_DRAW.append(torch.compile(draw_with_uniforms, dynamic=True))
    uniforms = token_uniforms(keys, begin, logits.shape[1])
    patch = {"specialize_float": False} if hasattr(dynamo_config, "specialize_float") else {}
    with dynamo_config.patch(**patch):
        return _COMPILED_DRAW[0](logits, uniforms, t, temperature, top_k, top_p)


def fast_draw(logits, keys, begin, t, temperature, top_k, top_p) -> torch.Tensor:
    """``draw_scale`` as the fast path draws: by the Triton kernel for fp32 CUDA logits (the graphed steps'
    head), else compiled, as the levers above allow."""
    if DRAW_KERNEL and logits.is_cuda:
        from var.sampling import draw_kernel

        if draw_kernel.supports(logits):
            return draw_kernel.kernel_draw(logits, keys, begin, t, temperature, top_k, top_p)
    draw = compiled_draw if COMPILE_DRAWS else draw_scale
    return draw(logits, keys, begin, t, temperature, top_k, top_p)


def resolve_fast(setting, device: torch.device, key: str) -> bool:
    """A ``fast`` setting (auto | true | false) for this device; auto is on with CUDA. key names it in errors."""
    if setting == "auto":
        return device.type == "cuda"
    if setting not in (True, False):
        raise ConfigError(f"{key}={setting}: expected auto, true or false")
    if setting and device.type != "cuda":
        raise ConfigError(f"{key}=true needs a CUDA device (this run samples on {device.type})")
    return bool(setting)


def prepare_fast_decoder(vqvae) -> None:
    """Make the tokenizer's decoder fast for ``decode_fhat(..., channels_last=True)`` under bf16 autocast:
    NHWC weights, the decoder compiled (fusing GroupNorm, SiLU and the casts around the cuDNN
    convolutions), and cuDNN's per-shape algorithm search switched on for the process (+6% img/s at d16,
    batch 64: the decoder's few large shapes repeat every batch). In place; the weights and outputs are
    unchanged up to kernel rounding."""
    torch.backends.cudnn.benchmark = True
    vqvae.to(memory_format=torch.channels_last)
    vqvae.decoder.compile(dynamic=False)


class ImageSampler:
    """``sampler(labels, seeds, **sampling_kwargs)`` -> float images (B, 3, R, R) in [0, 1].

    Set up once per model pair: with ``fast`` the per-scale graphs are captured on the first batch of each
    size (the last batch is often smaller), the decoder and the token draws are compiled on the first call.
    ``precision`` is task.precision (see loading.autocast_dtype); ``compile=False`` keeps the graphs but runs
    the blocks and the draws eagerly (a benchmark ablation).
    """

    def __init__(self, var_model, vqvae, precision: str, device: torch.device, fast: bool, compile: bool = True):
        self.var, self.vqvae, self.fast, self.compile = var_model, vqvae, fast, compile
        self.autocast = autocast_for(precision, device)
        self.graphs = GraphedStepsByRows(var_model, autocast_dtype(precision, device), compile) if fast else None
        if fast:
            prepare_fast_decoder(vqvae)

    def __call__(self, labels: torch.Tensor, seeds: Sequence[int], **sampling_kwargs) -> torch.Tensor:
        rows = labels.shape[0] * (2 if sampling_kwargs.get("cfg", 0) > 0 else 1)  # guidance doubles the batch
        return sample_images(self.var, self.vqvae, labels, seeds, autocast=self.autocast,
                             scale_step=self.graphs(rows) if self.fast else None,
                             draw=fast_draw if self.fast and self.compile else draw_scale,
                             decode_autocast=self.fast, channels_last=self.fast, **sampling_kwargs)
