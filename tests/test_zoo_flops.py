"""Zoo rules, the scaling grid, parameter / FLOP conventions, and the peak-FLOP/s table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from var.models import peak_flops as pf
from var.models.flops import (
    FLOP_CONVENTIONS,
    attention_pairs,
    core_params_paper,
    describe,
    flops_per_image,
    forward_flops,
    param_counts,
)
from var.models.zoo import (
    PRESETS,
    SCALING_GRID,
    VARConfig,
    build_var,
    lr_for,
    official_config,
    preset,
)

PN256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# ------------------------------------------------------------------ zoo rules
def test_depth_dial_derives_width_heads_drop_path_and_lr():
    for d in (6, 16, 30):
        cfg = VARConfig(depth=d)
        assert (cfg.width, cfg.num_heads) == (64 * d, d)
        assert cfg.dpr == pytest.approx(0.1 * d / 24)
    assert VARConfig(depth=16).dpr == pytest.approx(0.0667, abs=1e-4)
    assert VARConfig(depth=30).dpr == pytest.approx(0.125)
    assert VARConfig(depth=16, drop_path_rate=0.0).dpr == 0.0
    assert lr_for(256) == pytest.approx(1e-4)
    assert lr_for(768) == pytest.approx(3e-4)  # the README's d16 command
    assert lr_for(1024, base_lr=8e-5) == pytest.approx(3.2e-4)  # the README's d30 command
    assert VARConfig(depth=16).adaln_gamma == 1e-3 and VARConfig(depth=30).adaln_gamma == 1e-5
    assert VARConfig(depth=16).seq_len == 680


def test_presets_cover_every_even_depth_and_the_512px_model():
    assert [f"d{d}" for d in range(2, 37, 2)] == [k for k in PRESETS if k != "d36-s"]
    assert preset("d24").depth == 24
    s = preset("d36-s")
    assert s.shared_aln and s.seq_len == 2240
    with pytest.raises(KeyError, match="unknown VAR preset"):
        preset("d7")
    assert set(describe(VARConfig(depth=2)).keys()) >= {"params", "train_flops_per_image"}


def test_scaling_grid_spans_18m_to_2b():
    assert len(SCALING_GRID) == 12 and {16, 20, 24, 30} <= set(SCALING_GRID)
    totals = [param_counts(VARConfig(depth=d))["total"] for d in SCALING_GRID]
    assert totals == sorted(totals)
    assert 18.0e6 < totals[0] < 19.0e6  # d6: 18.49M, the paper's "18M"
    assert 2.0e9 < totals[-1] < 2.05e9  # d30: 2.01B, the paper's "2B"


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize("depth", SCALING_GRID)
def test_core_params_match_the_paper_formula(depth):
    counts = param_counts(VARConfig(depth=depth))
    assert counts["core"] == core_params_paper(depth) == 18 * depth * (64 * depth) ** 2
    C = 64 * depth
    emb = 1001 * C + C + 680 * C + 10 * C + (32 * C + C) + (4096 * C + 4096)
    assert counts["embedding"] == emb
    assert counts["non_embedding"] == counts["total"] - emb


def test_shared_adaln_core_count():
    counts = param_counts(official_config(36))
    w = 64 * 36
    assert counts["core"] == 12 * 36 * w * w + 6 * w * w
    assert counts["total"] == pytest.approx(2353.9e6, abs=0.1e6)


# --------------------------------------------------------------------- FLOPs
def test_attention_pairs_of_the_official_pyramid():
    causal, dense = attention_pairs(PN256)
    assert dense == 680 * 680
    assert causal / 680 == pytest.approx(421, abs=1)  # mean visible context per token
    assert attention_pairs((1, 2)) == (1 * 1 + 4 * 5, 25)


@pytest.mark.parametrize("depth", SCALING_GRID)
def test_flop_conventions_are_consistent(depth):
    cfg = VARConfig(depth=depth)
    f = flops_per_image(cfg)
    assert set(f) == set(FLOP_CONVENTIONS)
    assert f["exact"] < f["exact_dense_attn"]
    assert f["6NL"] == 6 * param_counts(cfg)["non_embedding"] * 680
    C = 64 * depth
    # official_mfu counts word_embed on all L tokens; exact_dense_attn skips the start token
    assert f["official_mfu"] - f["exact_dense_attn"] == 6 * 32 * C


def test_exact_flops_by_hand_d16():
    C, d, L = 1024, 16, 680
    causal = sum(pn * pn * sum(q * q for q in PN256[: i + 1]) for i, pn in enumerate(PN256))
    fwd = (2 * 12 * C * C * d * L          # qkv + proj + fc1 + fc2, per token
           + 2 * 32 * C * 679              # word_embed on the 679 teacher-forcing tokens
           + 2 * C * 4096 * L              # head
           + 2 * (6 * C * C * d + 2 * C * C)  # AdaLN once per image
           + 4 * C * d * causal)           # QK^T and AV over allowed pairs
    assert flops_per_image(VARConfig(depth=16))["exact"] == 3 * fwd


def _cpu_flash_flops() -> dict:
    """Some torch releases run masked SDPA on the CPU as ``_scaled_dot_product_flash_attention_for_cpu``,
    which their FlopCounterMode does not count (0 FLOPs): count its two products as for the CUDA kernels."""
    from torch.utils.flop_counter import flop_registry

    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is None or cpu_op in flop_registry:
        return {}

    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, s_q, d_qk = query_shape
        return 2 * b * h * s_q * key_shape[-2] * (d_qk + value_shape[-1])  # QK^T and AV

    return {cpu_op: flops}


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_flop_counter_matches_exact_dense_attn_forward(attn_impl):
    """torch's FlopCounterMode on a real forward (small depth, official pyramid and vocabulary)."""
    cfg = VARConfig(depth=4, attn_impl=attn_impl)
    torch.manual_seed(0)
    m = build_var(cfg).eval()
    B = 2
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_cpu_flash_flops()) as counter:
        m(torch.tensor([1, 2]), torch.randn(B, 679, 32))
    measured = counter.get_total_flops() / B
    predicted = flops_per_image(cfg)["exact_dense_attn"] / 3
    assert measured == pytest.approx(predicted, rel=0.01)
    breakdown = forward_flops(cfg)
    assert breakdown["attn_causal"] < breakdown["attn_dense"]


# ---------------------------------------------------------------- peak FLOP/s
@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100_sxm"),
    ("NVIDIA H100 PCIe", "h100_pcie"),
    ("NVIDIA H100 NVL", "h100_nvl"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA H200 NVL", "h200_nvl"),
    ("NVIDIA GH200 480GB", "h100_sxm"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA L40", "l40"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10G", "a10"),
    ("NVIDIA GeForce RTX 4090", "rtx_4090"),
])
def test_gpu_names_map_to_the_table(name, key):
    assert pf.gpu_key(name) == key
    assert pf.peak_flops("bf16", name) == pf.PEAK_FLOPS[key]["bf16"]


def test_peak_flops_values_and_fallbacks(monkeypatch):
    assert pf.peak_flops("bf16", "NVIDIA H100 80GB HBM3") == pytest.approx(989.5e12)
    assert pf.peak_flops(torch.bfloat16, "NVIDIA A100-SXM4-40GB") == pytest.approx(312e12)
    assert pf.peak_flops("tf32", "NVIDIA A100-SXM4-40GB") == pytest.approx(156e12)
    for rates in pf.PEAK_FLOPS.values():
        assert rates["bf16"] == rates["fp16"] > rates["tf32"] >= rates["fp32"]
    assert pf.peak_flops("bf16", "Some Future GPU") is None
    with pytest.raises(ValueError, match="precision"):
        pf.peak_flops("int8", "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pf.peak_flops("bf16") is None  # CPU: MFU unknown
