"""Decoding on a second CUDA stream, overlapped with the next batch's sampling.

A batch of samples is two phases with different shapes of work: the transformer's ten scale steps (the
first six are small and leave most of the GPU idle, and token drawing between them is a string of short
kernels) and the VQVAE decoder (a few large convolutions). Run one after the other, each leaves the other's
idle time unused. Here a batch's decoding, its uint8 conversion and the copy to host memory go on a side
stream, so that they run while the caller already samples the next batch on the current stream:

    decode = OverlappedDecoding(vqvae, autocast, channels_last=True)
    pending = None
    for batch in batches:
        _, f_hat = sample_tokens(...)
        handle = decode.submit(f_hat)      # returns at once
        if pending: save(pending())         # the previous batch's uint8 (B, H, W, 3), waited for here
        pending = handle

Nothing is computed differently: the same ``decode_fhat`` and rounding as ``to_uint8_nhwc``. Without CUDA
``submit`` decodes at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from var.sampling.sampler import decode_fhat, to_uint8_nhwc, unit_to_uint8


class OverlappedDecoding:
    def __init__(self, vqvae, autocast: Callable = contextlib.nullcontext, channels_last: bool = False,
                 overlap: bool = True):
        """autocast / channels_last: as in ``decode_fhat``. overlap=False decodes at once (as without CUDA)."""
        self.vqvae, self.autocast, self.channels_last = vqvae, autocast, channels_last
        device = vqvae.quantize.embedding.weight.device
        self.stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def _decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return decode_fhat(self.vqvae, f_hat, autocast=self.autocast, channels_last=self.channels_last)

    def submit(self, f_hat: torch.Tensor) -> Callable[[], np.ndarray]:
        """Queue the decoding of f_hat (B, Cvae, h, w); the returned function waits for it and gives
        uint8 images (B, H, W, 3)."""
        if self.stream is None:
            images = to_uint8_nhwc(self._decode(f_hat))
            return lambda: images
        self.stream.wait_stream(torch.cuda.current_stream(f_hat.device))  # f_hat is complete
        with torch.cuda.stream(self.stream):
            pixels = unit_to_uint8(self._decode(f_hat)).permute(0, 2, 3, 1)
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        f_hat.record_stream(self.stream)  # made on the current stream, read on the side one

        def result() -> np.ndarray:
            done.synchronize()
            return host.numpy()

        return result
