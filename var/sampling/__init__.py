"""Sampling from a trained VAR (next-scale prediction with a KV cache and CFG) and zero-shot editing."""

from var.sampling.config import SamplingConfig
from var.sampling.edit import box_mask, edit_image, edit_tokens
from var.sampling.sampler import sample_images, sample_tokens, to_uint8_nhwc, top_k_top_p_filter

__all__ = ["SamplingConfig", "box_mask", "edit_image", "edit_tokens", "sample_images", "sample_tokens",
           "to_uint8_nhwc", "top_k_top_p_filter"]
