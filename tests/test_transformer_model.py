"""The VAR transformer: exact sizes, block-causal attention, KV cache, class dropout, released layout."""

from __future__ import annotations

import math

import pytest
import torch

from var.checkpoints import CheckpointError
from var.models.attention import block_causal_bias
from var.models.block import DropPath
from var.models.transformer import VAR, no_decay_names, param_groups
from var.models.zoo import VARConfig, build_var, load_released_var, official_config

OFFICIAL_COUNTS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}
TINY_PN = (1, 2, 3)


def tiny(**overrides) -> VAR:
    """depth 2 (width 128, 2 heads), 10 classes, scales 1/2/3, V 64, Cvae 8; float64 for exact checks.

    The gamma and head inits are raised to 1 so every block visibly changes the logits.
    """
    torch.manual_seed(0)
    kw = dict(depth=2, num_classes=10, patch_nums=TINY_PN, vocab_size=64, cvae=8, cond_drop_rate=0.0,
              drop_path_rate=0.0, init_adaln_gamma=1.0, init_head=1.0)
    kw.update(overrides)
    return build_var(VARConfig(**kw)).double().eval()


def inputs(m: VAR, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, m.num_classes, (B,), generator=g)
    x = torch.randn(B, m.L - m.first_l, m.Cvae, generator=g, dtype=torch.float64)
    return labels, x


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize("depth", sorted(OFFICIAL_COUNTS))
def test_official_parameter_counts_are_exact(depth):
    with torch.device("meta"):
        m = build_var(official_config(depth))
    assert sum(p.numel() for p in m.parameters()) == OFFICIAL_COUNTS[depth]
    assert (m.C, m.num_heads) == (64 * depth, depth)


def test_logits_shape_and_dtype_under_autocast():
    m = tiny().float()
    labels, x = inputs(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(labels, x.float())
    assert out.shape == (3, m.L, 64) and out.dtype == torch.float32


# --------------------------------------------------------- block-causal mask
def test_mask_lets_tokens_see_own_and_earlier_scales_only():
    bias = block_causal_bias(TINY_PN)[0, 0]
    scale = [0] + [1] * 4 + [2] * 9
    for i in range(14):
        for j in range(14):
            assert (bias[i, j] == 0) == (scale[i] >= scale[j]), (i, j)
            assert (bias[i, j] == -math.inf) == (scale[i] < scale[j])
    m = tiny()
    assert torch.equal(m.attn_bias_for_masking[0, 0], bias)


def test_perturbing_a_scale_changes_only_that_scale_and_later():
    m = tiny()
    labels, x = inputs(m)
    base = m(labels, x)
    for si in range(1, len(TINY_PN)):
        bg, ed = m.begin_ends[si]
        x2 = x.clone()
        x2[:, bg - m.first_l: ed - m.first_l] += 1.0  # the teacher-forcing input of scale si
        out = m(labels, x2)
        torch.testing.assert_close(out[:, :bg], base[:, :bg], rtol=0, atol=1e-12)
        per_token = (out[:, bg:] - base[:, bg:]).abs().amax(dim=-1)
        assert (per_token > 1e-6).all(), f"scale {si}: some token at or after it did not change"
    # the class conditions every token, the start token included
    out = m((labels + 1) % m.num_classes, x)
    assert ((out - base).abs().amax(dim=-1) > 1e-6).all()


def test_appending_a_scale_leaves_earlier_logits_unchanged():
    m = tiny()
    labels, x = inputs(m)
    full = m(labels, x)
    prev = None
    for si, (_, ed) in enumerate(m.begin_ends):
        out = m(labels, x[:, : ed - m.first_l], prog_si=si)  # the sequence follows prog_si
        assert out.shape == (3, ed, m.V)
        torch.testing.assert_close(out, full[:, :ed], rtol=0, atol=1e-12)
        if prev is not None:
            torch.testing.assert_close(out[:, : prev.shape[1]], prev, rtol=0, atol=1e-12)
        prev = out
    m.prog_si = 1  # the attribute form used by the training loop
    assert m(labels, x).shape[1] == m.begin_ends[1][1]


def test_first_scale_only_still_touches_word_embed():
    m = tiny()
    labels, x = inputs(m)
    m(labels, x, prog_si=0).sum().backward()
    assert m.word_embed.weight.grad is not None and m.word_embed.bias.grad is not None


# ------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("cos_attn,shared_aln,attn_impl",
                         [(True, False, "sdpa"), (False, False, "sdpa"), (True, True, "math")])
def test_kv_cache_scale_by_scale_equals_teacher_forcing(cos_attn, shared_aln, attn_impl):
    m = tiny(cos_attn=cos_attn, shared_aln=shared_aln, attn_impl=attn_impl)
    labels, x = inputs(m)
    full = m(labels, x)
    cond = m.class_emb(labels)
    m.enable_kv_cache(True)
    steps = []
    for si, (bg, ed) in enumerate(m.begin_ends):
        x_si = None if si == 0 else x[:, bg - m.first_l: ed - m.first_l]
        steps.append(m.forward_scale(cond, x_si, si))
        assert steps[-1].shape == (3, ed - bg, m.V)
    m.enable_kv_cache(False)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_kv_cache_misuse_is_an_error():
    m = tiny()
    labels, x = inputs(m)
    cond = m.class_emb(labels)
    with pytest.raises(RuntimeError, match="enable_kv_cache"):
        m.forward_scale(cond, x[:, :4], 1)
    m.enable_kv_cache(True)
    with pytest.raises(RuntimeError, match="starts at token"):
        m.forward_scale(cond, x[:, :4], 1)  # scale 0 was skipped


def test_attention_implementations_agree():
    m = tiny()
    labels, x = inputs(m)
    ref = m(labels, x)
    m.set_attn_impl("math")
    torch.testing.assert_close(m(labels, x), ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        m.set_attn_impl("nope")


# ------------------------------------------------------ training-mode behaviour
def test_class_dropout_only_in_training_mode():
    m = tiny(cond_drop_rate=1.0)
    labels, x = inputs(m)
    null = torch.full_like(labels, m.num_classes)
    eval_cond, eval_null = m(labels, x), m(null, x)
    assert (eval_cond - eval_null).abs().max() > 1e-6
    m.train()  # drop path is 0, so dropping every label is the only train-mode difference
    torch.testing.assert_close(m(labels, x), eval_null, rtol=0, atol=1e-12)
    m.eval()
    torch.testing.assert_close(m(labels, x), eval_cond, rtol=0, atol=0)


def test_drop_path_grows_linearly_and_is_off_in_eval():
    m = tiny(depth=4, drop_path_rate=0.3)
    ps = [getattr(b.drop_path, "p", 0.0) for b in m.blocks]
    assert ps == pytest.approx([0.0, 0.1, 0.2, 0.3])
    labels, x = inputs(m)
    torch.testing.assert_close(m(labels, x), m(labels, x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(0)
    assert not torch.equal(m(labels, x), m(labels, x))  # a different set of paths dropped


def test_drop_path_keeps_its_rate_and_rescales_whatever_the_dtype():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    out = dp(torch.ones(200_000, 3))
    kept = out[:, 0] != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.005)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert torch.equal(out[:, 0], out[:, 2])  # whole samples are dropped
    before = dp.keep_threshold.clone()
    dp.to(torch.bfloat16)  # the rate is an integer buffer: a bf16 cast cannot round it
    assert torch.equal(dp.keep_threshold, before)
    assert dp(torch.ones(8, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------ init
def test_official_init_statistics():
    torch.manual_seed(0)
    m = build_var(VARConfig(depth=4, num_classes=100, vocab_size=512, init_adaln_gamma=1e-3))
    C, std = m.C, math.sqrt(1 / (3 * m.C))
    b = m.blocks[1]
    w = b.ada_lin[1].weight
    assert w[2 * C:].std().item() == pytest.approx(std * 0.5, rel=0.05)
    assert w[: 2 * C].std().item() == pytest.approx(std * 1e-3, rel=0.05)
    assert b.attn.mat_qkv.weight.std().item() == pytest.approx(std, rel=0.05)
    assert b.attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.05)
    assert b.ffn.fc2.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.05)
    assert m.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.05)
    assert m.head_nm.ada_lin[1].weight.std().item() == pytest.approx(std * 0.5, rel=0.05)
    assert m.pos_1LC.std().item() == pytest.approx(std, rel=0.05)
    assert torch.allclose(b.attn.scale_mul_1H11, torch.tensor(math.log(4.0)))
    assert all(not p.detach().any() for n, p in m.named_parameters() if n.endswith("bias"))
    assert build_var(VARConfig(depth=4, cos_attn=False)).blocks[0].attn.scale == 0.25 / 8


# ------------------------------------------------------------ param groups
def test_param_groups_skip_norms_biases_embeddings_and_gains():
    m = tiny(shared_aln=True)
    groups = param_groups(m, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())
    names = set(no_decay_names(m))
    for must in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight", "head.bias",
                 "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.scale_mul_1H11",
                 "blocks.0.ada_gss", "blocks.1.ffn.fc1.bias"):
        assert must in names
    for decayed in ("word_embed.weight", "head.weight", "blocks.0.attn.mat_qkv.weight",
                    "blocks.0.ffn.fc2.weight", "shared_ada_lin.1.weight", "head_nm.ada_lin.1.weight"):
        assert decayed not in names
    torch.optim.AdamW(groups, lr=1e-4)  # accepted as is


# ------------------------------------------------------- released checkpoints
def official_layout(depth: int, num_classes=1000, vocab=4096, cvae=32,
                    patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) -> dict[str, tuple]:
    """Names and shapes of the official var_d{depth}.pth, written out from the architecture rules."""
    C, H, L, K = 64 * depth, depth, sum(p * p for p in patch_nums), len(patch_nums)
    layout = {
        "pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
        "word_embed.weight": (C, cvae), "word_embed.bias": (C,), "class_emb.weight": (num_classes + 1, C),
        "lvl_embed.weight": (K, C), "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (vocab, C), "head.bias": (vocab,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        layout.update({
            p + "attn.scale_mul_1H11": (1, H, 1, 1), p + "attn.q_bias": (C,), p + "attn.v_bias": (C,),
            p + "attn.zero_k_bias": (C,), p + "attn.mat_qkv.weight": (3 * C, C),
            p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
            p + "ffn.fc1.weight": (4 * C, C), p + "ffn.fc1.bias": (4 * C,),
            p + "ffn.fc2.weight": (C, 4 * C), p + "ffn.fc2.bias": (C,),
            p + "ada_lin.1.weight": (6 * C, C), p + "ada_lin.1.bias": (6 * C,),
        })
    return layout


def fake_official_state_dict(depth: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(depth)
    sd = {k: torch.randn(shape, generator=g) for k, shape in official_layout(depth).items()}
    pn = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)])
    sd["lvl_1L"] = lvl.view(1, -1)
    sd["attn_bias_for_masking"] = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf)[None, None]
    for k in sd:
        if k.endswith("zero_k_bias"):
            sd[k] = torch.zeros_like(sd[k])
    return sd


@pytest.mark.parametrize("depth", [16, 30])
def test_model_state_dict_has_the_official_layout(depth):
    with torch.device("meta"):
        m = build_var(official_config(depth))
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == official_layout(depth)


def test_official_layout_loads_strictly(tmp_path):
    sd = fake_official_state_dict(2)
    path = tmp_path / "var_d2.pth"
    torch.save(sd, path)
    m = load_released_var(path, depth=2)
    assert not m.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # the drop-path rates (not in the checkpoint) are set again after the empty materialisation
    fresh = build_var(official_config(2))
    assert [b.drop_path.keep_threshold.item() for b in m.blocks[1:]] == \
        [b.drop_path.keep_threshold.item() for b in fresh.blocks[1:]]
    # the official trainer checkpoint layout unwraps too
    torch.save({"epoch": 1, "trainer": {"var_wo_ddp": sd}}, path)
    load_released_var(path, depth=2)
    labels = torch.tensor([3, 1000])
    assert m(labels, torch.randn(2, 679, 32)).shape == (2, 680, 4096)


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    sd = fake_official_state_dict(2)
    del sd["head.bias"]
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    sd["pos_start"] = torch.zeros(1, 1, 64)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_released_var(tmp_path / "bad.pth", depth=2)
    msg = str(e.value)
    assert "head.bias" in msg and "blocks.0.attn.extra" in msg and "pos_start" in msg
    with pytest.raises(CheckpointError, match="huggingface"):
        load_released_var(tmp_path / "var_d16.pth", depth=16)
