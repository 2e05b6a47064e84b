"""Peak dense FLOP/s per GPU, for model-FLOPs utilisation (MFU = achieved / peak).

Numbers are the vendor datasheet figures for *dense* math: NVIDIA quotes tensor-core throughput "with
sparsity" (2:4 structured), and we halve those. bf16/fp16 are tensor-core rates with fp32 accumulation
(what PyTorch uses; on GeForce cards fp16 accumulation would be twice as fast). tf32 is the tensor-core
rate for fp32 matmuls with TF32 enabled; fp32 is the plain CUDA-core rate. Boost clocks, maximum board
power (real runs under power or thermal limits reach less).

Sources (datasheets): H100 (SXM5 / PCIe / NVL), H200 (SXM / NVL), A100 (SXM4 and PCIe share the rates),
L40S, L40, L4, A10, RTX 4090 (Ada architecture whitepaper, appendix table), RTX A6000. H800 / A800 are the
export variants with the compute of the H100 SXM / A100. GH200's GPU has the H100 SXM rates.
"""

from __future__ import annotations

import re

import torch

TERA = 1e12

# key -> {precision: dense FLOP/s}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100_sxm": {"bf16": 989.5 * TERA, "fp16": 989.5 * TERA, "tf32": 494.5 * TERA, "fp32": 67.0 * TERA},
    "h100_pcie": {"bf16": 756.5 * TERA, "fp16": 756.5 * TERA, "tf32": 378.0 * TERA, "fp32": 51.0 * TERA},
    "h100_nvl": {"bf16": 835.5 * TERA, "fp16": 835.5 * TERA, "tf32": 417.5 * TERA, "fp32": 60.0 * TERA},
    "h200": {"bf16": 989.5 * TERA, "fp16": 989.5 * TERA, "tf32": 494.5 * TERA, "fp32": 67.0 * TERA},
    "h200_nvl": {"bf16": 835.5 * TERA, "fp16": 835.5 * TERA, "tf32": 417.5 * TERA, "fp32": 60.0 * TERA},
    "a100": {"bf16": 312.0 * TERA, "fp16": 312.0 * TERA, "tf32": 156.0 * TERA, "fp32": 19.5 * TERA},
    "l40s": {"bf16": 362.05 * TERA, "fp16": 362.05 * TERA, "tf32": 183.0 * TERA, "fp32": 91.6 * TERA},
    "l40": {"bf16": 181.05 * TERA, "fp16": 181.05 * TERA, "tf32": 90.5 * TERA, "fp32": 90.5 * TERA},
    "l4": {"bf16": 121.0 * TERA, "fp16": 121.0 * TERA, "tf32": 60.0 * TERA, "fp32": 30.3 * TERA},
    "a10": {"bf16": 125.0 * TERA, "fp16": 125.0 * TERA, "tf32": 62.5 * TERA, "fp32": 31.2 * TERA},
    "rtx_4090": {"bf16": 165.2 * TERA, "fp16": 165.2 * TERA, "tf32": 82.6 * TERA, "fp32": 82.6 * TERA},
    "rtx_a6000": {"bf16": 154.8 * TERA, "fp16": 154.8 * TERA, "tf32": 77.4 * TERA, "fp32": 38.7 * TERA},
}

# (regex on torch.cuda.get_device_name(), key); first match wins, so specific names come first.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"GH200", "h100_sxm"),  # Grace Hopper: the H100 SXM rates
    (r"H200\s*NVL", "h200_nvl"),
    (r"H200", "h200"),
    (r"H100\s*NVL", "h100_nvl"),
    (r"H100.*PCIe", "h100_pcie"),
    (r"H100|H800", "h100_sxm"),  # e.g. "NVIDIA H100 80GB HBM3"
    (r"A100|A800", "a100"),
    (r"L40S", "l40s"),
    (r"L40\b", "l40"),
    (r"\bL4\b", "l4"),
    (r"\bA10G?\b", "a10"),
    (r"RTX\s*4090", "rtx_4090"),
    (r"RTX\s*A6000", "rtx_a6000"),
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_key(device_name: str) -> str | None:
    """Table key of a ``torch.cuda.get_device_name()`` string, or None if unknown."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return key
    return None


def peak_flops(precision: str | torch.dtype = "bf16", device_name: str | None = None) -> float | None:
    """Dense peak FLOP/s of one GPU at ``precision`` (bf16 | fp16 | tf32 | fp32, or a torch dtype).

    ``device_name`` defaults to the current CUDA device; None when there is no GPU (CPU runs) or the
    GPU is not in the table, so callers report MFU as unknown rather than wrong.
    """
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    key = gpu_key(device_name)
    if key is None:
        return None
    precision = _DTYPE_KEYS.get(precision, precision) if isinstance(precision, torch.dtype) else precision
    if precision not in PEAK_FLOPS[key]:
        raise ValueError(f"unknown precision {precision!r}; choose from bf16, fp16, tf32, fp32")
    return PEAK_FLOPS[key][precision]
