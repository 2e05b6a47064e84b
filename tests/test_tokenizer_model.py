"""Tokenizer model: architecture counts, quantizer semantics, released-weight layout, losses."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from var.checkpoints import CheckpointError
from var.models.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from var.models.perceptual import LPIPS, load_lpips
from var.models.quantizer import phi_indices
from var.models.vqvae import PRESETS, VQVAE, VQVAEConfig, count_params, load_released_vqvae


def official_ticks_choice(K: int, n: int) -> list[int]:
    """The released selection rule, written with numpy as the reference does it."""
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    return [int(np.argmin(np.abs(ticks - si / (K - 1)))) for si in range(K)]


def tiny_model(name: str = "vq_tiny64", seed: int = 0) -> VQVAE:
    """Random model whose codebook is spread like the encoder output, so many distinct codes get used."""
    torch.manual_seed(seed)
    m = VQVAE(PRESETS[name]).eval()
    with torch.no_grad():
        f = m.img_to_f(torch.rand(4, 3, m.config.resolution, m.config.resolution) * 2 - 1)
        m.quantize.embedding.weight.normal_(0, float(f.std()))
    return m


@functools.cache
def shared_tiny() -> VQVAE:
    """One vq_tiny64 instance for the read-only tests (they run in eval mode and never train it)."""
    return tiny_model("vq_tiny64")


def images(m: VQVAE, B: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = m.config.resolution
    return torch.rand(B, 3, r, r, generator=g) * 2 - 1


# --------------------------------------------------------------------------------------------- architecture
def test_official_param_counts():
    with torch.device("meta"):
        m = VQVAE(PRESETS["vae_ch160v4096z32"])
    n = count_params(m)
    assert n["total"] == 108_948_355
    assert n["encoder"] == 44_107_872
    assert n["decoder"] == 64_653_923
    assert n["quantize"] == 168_064
    assert n["quant_conv"] == n["post_quant_conv"] == 9_248
    assert m.config.num_tokens == 680


def test_phi_mapping():
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    for K in (4, 7, 10, 13, 14):
        for n in (2, 3, 4, 5, 6):
            assert phi_indices(K, n) == official_ticks_choice(K, n), (K, n)
        assert phi_indices(K, K) == list(range(K))
    with torch.device("meta"):
        assert VQVAE(PRESETS["vae_ch160v4096z32"]).quantize.phi_index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # the three sharing modes give the three released key layouts
    base = PRESETS["vq_test32"]
    keys = {s: {k for k in VQVAE(base, share_quant_resi=s).state_dict() if ".quant_resi." in k} for s in (0, 1, 4)}
    assert keys[0] == {f"quantize.quant_resi.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    assert keys[1] == {"quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"}
    assert keys[4] == {f"quantize.quant_resi.qresi_ls.{i}.{p}" for i in range(4) for p in ("weight", "bias")}


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"patch_nums\[-1\]=16 must equal the latent size 8"):
        VQVAE(PRESETS["vq_tiny64"], patch_nums=(1, 2, 4, 16))
    with pytest.raises(ValueError, match="patch_nums must be strictly increasing"):
        VQVAEConfig(patch_nums=(1, 2, 2, 16)).validate()
    with pytest.raises(ValueError, match="resolution 100 is not divisible"):
        VQVAEConfig(resolution=100).validate()
    with pytest.raises(ValueError, match="norm_groups"):
        VQVAEConfig(ch=40).validate()
    VQVAEConfig(resolution=512, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)).validate()  # 512 px schedule


# --------------------------------------------------------------------------------------------- quantizer
def test_indices_to_fhat_matches_quantizer():
    m = shared_tiny()
    x = images(m)
    f = m.img_to_f(x)
    idx = m.img_to_idxBl(x)
    assert [t.shape for t in idx] == [(2, pn * pn) for pn in m.patch_nums]
    assert all(t.dtype == torch.long for t in idx)
    assert len(torch.cat(idx, 1).unique()) > 10  # the test exercises many codes
    pyramid = m.quantize.f_to_fhat_pyramid(f)
    assert torch.equal(m.idxBl_to_fhat(idx), pyramid[-1])
    f_hat_train, _, info = m.quantize(f)
    torch.testing.assert_close(f_hat_train, pyramid[-1], rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(info.indices, idx))
    # fewer scales -> coarser f_hat equal to the pyramid's intermediate entry
    torch.testing.assert_close(m.idxBl_to_fhat(idx[:3]), pyramid[2])


def slow_var_input(m: VQVAE, idx: list[torch.Tensor]) -> torch.Tensor:
    """Plain reference: embed, bicubic up, Phi conv by hand, accumulate, area down to the next scale."""
    q, pns = m.quantize, m.patch_nums
    K, H, C, B = len(pns), pns[-1], m.Cvae, idx[0].shape[0]
    choice = official_ticks_choice(K, m.config.share_quant_resi)
    f_hat = torch.zeros(B, C, H, H)
    out = []
    for si in range(K - 1):
        h = q.embedding.weight[idx[si]].view(B, pns[si], pns[si], C).permute(0, 3, 1, 2)
        h = F.interpolate(h, size=(H, H), mode="bicubic")
        conv = q.quant_resi.qresi_ls[choice[si]]
        r = m.config.quant_resi
        f_hat = f_hat + (1 - r) * h + r * F.conv2d(h, conv.weight, conv.bias, padding=1)
        nxt = F.interpolate(f_hat, size=(pns[si + 1], pns[si + 1]), mode="area")
        out.append(nxt.reshape(B, C, -1).permute(0, 2, 1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_teacher_forcing_input_matches_reference():
    m = shared_tiny()
    idx = m.img_to_idxBl(images(m))
    got = m.idxBl_to_var_input(idx)
    L = m.config.num_tokens
    assert got.shape == (2, L - 1, m.Cvae) and got.dtype == torch.float32
    torch.testing.assert_close(got, slow_var_input(m, idx), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sampling_chain_reproduces_teacher_forcing():
    m = shared_tiny()
    idx = m.img_to_idxBl(images(m))
    want = m.idxBl_to_var_input(idx)
    for as_embedding in (False, True):
        f_hat, inputs = None, []
        for si, pn in enumerate(m.patch_nums):
            h = idx[si]
            if as_embedding:  # the caller-mixed-embedding form
                h = m.quantize.embedding(h).transpose(1, 2).reshape(2, m.Cvae, pn, pn)
            f_hat, nxt = m.get_next_autoregressive_input(si, f_hat, h)
            if si < len(m.patch_nums) - 1:
                assert nxt.shape == (2, m.Cvae, m.patch_nums[si + 1], m.patch_nums[si + 1])
                inputs.append(nxt.flatten(2).transpose(1, 2))
            else:
                assert nxt is f_hat
        torch.testing.assert_close(torch.cat(inputs, 1), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_hat, m.idxBl_to_fhat(idx), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_image_round_trip_shape_and_range():
    m = shared_tiny()
    x = images(m) * 3  # out-of-range input still decodes into [-1, 1]
    for y in (m.img_to_reconstructed_img(x), m.idxBl_to_img(m.img_to_idxBl(x))):
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    ys = m.img_to_reconstructed_img(x, all_scales=True)
    assert len(ys) == len(m.patch_nums)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # quantizer stays fp32 under autocast
        assert m.idxBl_to_var_input(m.img_to_idxBl(x)).dtype == torch.float32


def test_vq_loss_and_gradients():
    m = tiny_model("vq_test32").train()
    x = images(m, B=4)
    rec, vq_loss, info = m(x)
    assert rec.shape == x.shape and torch.isfinite(vq_loss) and vq_loss > 0
    (F.mse_loss(rec, x) + vq_loss).backward()
    q = m.quantize
    for name, p in [
        ("encoder", m.encoder.conv_in.weight), ("decoder", m.decoder.conv_out.weight),
        ("codebook", q.embedding.weight), ("quant_conv", m.quant_conv.weight),
    ] + [(f"phi{i}", phi.weight) for i, phi in enumerate(q.quant_resi.qresi_ls)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # histograms: one hit per token; EMA recorded in training mode
    assert info.hits.shape == (4, 64)
    assert info.hits.sum(1).tolist() == [4 * pn * pn for pn in m.patch_nums]
    assert torch.equal(q.ema_vocab_hit_SV, info.hits) and q.records == 1
    assert ((info.perplexity() >= 1) & (info.perplexity() <= 64)).all()
    assert q.usage_percent(4 * 16).shape == (4,)


@torch.no_grad()
def test_dead_code_reseed_overwrites_exactly_masked_rows():
    m = tiny_model("vq_test32")
    q = m.quantize
    before = q.embedding.weight.clone()
    dead = torch.zeros(q.vocab_size, dtype=torch.bool)
    dead[[3, 10, 11, 40]] = True
    cands = torch.randn(100, m.Cvae) + 50  # far from every existing code
    assert q.reseed_codes(dead, cands, generator=torch.Generator().manual_seed(0)) == 4
    after = q.embedding.weight
    changed = (after != before).any(dim=1)
    assert torch.equal(changed, dead)
    assert all(any(torch.equal(row, c) for c in cands) for row in after[dead])
    # the mask helper: codes without hits at any scale are dead
    q.ema_vocab_hit_SV.zero_()
    q.ema_vocab_hit_SV[0, 5] = 10.0
    q.ema_vocab_hit_SV[2, 7] = 10.0
    mask = q.dead_code_mask(tokens_per_step=64)
    assert not mask[5] and not mask[7] and mask.sum() == 62


# --------------------------------------------------------------------------------------------- released weights
def official_vae_layout() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of vae_ch160v4096z32.pth, generated from the released architecture's rules."""
    ch, mult, z, V, K = 160, (1, 1, 2, 2, 4), 32, 4096, 10
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k, bias=True):
        out[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            out[f"{name}.bias"] = (cout,)

    def norm(name, c):
        out[f"{name}.weight"] = out[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", c, 3 * c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    def mid(prefix, c):
        resblock(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        resblock(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(2):
            resblock(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i == len(mult) - 1:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, z, 3)

    cin = ch * mult[-1]
    conv("decoder.conv_in", z, cin, 3)
    mid("decoder", cin)
    for i in reversed(range(len(mult))):
        for j in range(3):
            resblock(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i == len(mult) - 1:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, 3, 3)

    out["quantize.ema_vocab_hit_SV"] = (K, V)
    out["quantize.embedding.weight"] = (V, z)
    for i in range(4):
        conv(f"quantize.quant_resi.qresi_ls.{i}", z, z, 3)
    conv("quant_conv", z, z, 3)
    conv("post_quant_conv", z, z, 3)
    return out


def test_released_layout_loads_strictly(tmp_path):
    layout = official_vae_layout()
    assert sum(int(np.prod(s)) for k, s in layout.items() if "ema_vocab" not in k) == 108_948_355
    # Every tensor is a view of one shared buffer, so the 109M-entry file stays a few MB on disk.
    biggest = max(int(np.prod(s)) for s in layout.values())
    buf = torch.randn(biggest, generator=torch.Generator().manual_seed(0))
    sd = {k: buf[: int(np.prod(s))].view(s) for k, s in layout.items()}
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(sd, path)
    m = load_released_vqvae(path)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert torch.equal(m.quantize.embedding.weight, sd["quantize.embedding.weight"])
    assert torch.equal(m.decoder.up[4].attn[2].qkv.weight, sd["decoder.up.4.attn.2.qkv.weight"])
    del m

    bad = dict(sd)
    del bad["decoder.mid.attn_1.proj_out.bias"]
    bad["decoder.mid.attn_1.bogus"] = buf[:3]
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        load_released_vqvae(path)
    assert "decoder.mid.attn_1.proj_out.bias" in str(e.value) and "decoder.mid.attn_1.bogus" in str(e.value)

    with pytest.raises(CheckpointError, match="huggingface.co/FoundationVision/var"):
        load_released_vqvae(tmp_path / "missing" / "vae_ch160v4096z32.pth")


# --------------------------------------------------------------------------------------------- training losses
def test_lpips_random_weights_and_missing_files(tmp_path):
    torch.manual_seed(0)
    lp = load_lpips(random_weights=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lp(x, x), torch.zeros(2))
    d = lp(x, y)
    assert d.shape == (2,) and (d > 0).all()
    lp.train()
    assert not lp.training  # stays in eval under a parent's .train()

    with pytest.raises(CheckpointError, match=r"vgg16-397923af\.pth.*download\.pytorch\.org.*vgg\.pth.*PerceptualSimilarity"):
        load_lpips(tmp_path)
    with pytest.raises(CheckpointError, match="no path configured"):
        load_lpips()

    # single-file layout
    torch.save(lp.state_dict(), tmp_path / "lpips_vgg16.pth")
    assert torch.equal(load_lpips(tmp_path)(x, y), d)
    # two-file layout: torchvision names (+ classifier, ignored) and the LPIPS heads file
    tv = {"features." + k[4:]: v for k, v in lp.state_dict().items() if k.startswith("vgg.")}
    tv["classifier.0.weight"] = torch.zeros(1)
    heads = {k: v for k, v in lp.state_dict().items() if k.startswith("lin")}
    assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(5)]
    two = tmp_path / "two"
    two.mkdir()
    torch.save(tv, two / "vgg16-397923af.pth")
    torch.save(heads, two / "vgg.pth")
    torch.testing.assert_close(load_lpips(two)(x, y), d)
    assert isinstance(load_lpips(vgg_path=two / "vgg16-397923af.pth", lin_path=two / "vgg.pth"), LPIPS)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_discriminator_shape_and_hinge_losses(norm):
    torch.manual_seed(0)
    D = NLayerDiscriminator(ndf=16, n_layers=3, norm=norm)
    logits = D(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6

    good_real, good_fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert hinge_d_loss(good_real, good_fake) == 0  # margins satisfied
    assert hinge_d_loss(good_fake, good_real) == 3.0  # fully fooled: 0.5 * (3 + 3)
    assert hinge_g_loss(good_real) < hinge_g_loss(good_fake)  # the generator prefers high D scores
