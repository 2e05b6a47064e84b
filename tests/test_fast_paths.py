"""The fast paths compute what the plain ones do: FlexAttention, the fused head cross-entropy, activation
checkpointing, compiled blocks, the static KV cache of graphed sampling, and the counter-based draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_transformer_model import inputs, tiny
from var.models.fused_cross_entropy import linear_cross_entropy
from var.models.vqvae import PRESETS, VQVAE
from var.models.zoo import VARConfig, build_var
from var.sampling.graphed import GraphedScaleSteps
from var.sampling.sampler import inverse_cdf_draw, mix64, run_scales, stream_keys, token_uniforms

PN4 = (1, 2, 3, 4)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, labels, x, target, fused: bool, smoothing: float = 0.1):
    model.zero_grad(set_to_none=True)
    if fused:
        loss = model(labels, x, target=target, label_smoothing=smoothing, ce_chunk_tokens=7)
    else:
        logits = model(labels, x)
        loss = F.cross_entropy(logits.transpose(1, 2), target[:, : logits.shape[1]], label_smoothing=smoothing)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(a, b, tol):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=tol, atol=tol, msg=name)


def compiled_against_plain(device: str = "cpu", tol: float = 1e-4, **overrides):
    """A tiny fp32 VAR built with ``overrides``, its blocks compiled and its head's cross-entropy chunked, gives
    the plain eager model's loss and gradients. Returns (plain, fast, (labels, x, target))."""
    plain = tiny(patch_nums=PN4).float().to(device)
    labels, x = inputs(plain)
    labels, x = labels.to(device), x.float().to(device)
    target = torch.randint(0, plain.V, (3, plain.L), device=device)
    ref = _loss_and_grads(plain, labels, x, target, fused=False)
    fast = tiny(patch_nums=PN4, **overrides).float().to(device)
    fast.load_state_dict(plain.state_dict())
    fast.compile_blocks()
    _assert_same(_loss_and_grads(fast, labels, x, target, fused=True), ref, tol)
    return plain, fast, (labels, x, target)


# -------------------------------------------------------------------------------- attention
@torch.no_grad()
def test_flex_attention_equals_dense_masked_sdpa():
    # FlexAttention has no backward on the CPU: the gradient check runs on the GPU (test below).
    m = tiny(patch_nums=PN4).float()  # FlexAttention's CPU path is float32
    labels, x = inputs(m)
    x = x.float()
    for prog_si in (-1, 0, 2):  # progressive training: shorter sequences get their own block masks
        m.set_attn_impl("sdpa")
        ref = m(labels, x, prog_si=prog_si)
        m.set_attn_impl("flex")
        torch.testing.assert_close(m(labels, x, prog_si=prog_si), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", [0, 5, 14])
@pytest.mark.parametrize("prog_si", [-1, 0, 2])
def test_scalewise_attention_equals_dense_masked_sdpa_forward_and_backward(prog_si, merge, monkeypatch):
    import var.models.attention as attention

    monkeypatch.setattr(attention, "SCALEWISE_MERGE_TOKENS", merge)  # small scales merged into one masked call
    m = tiny(patch_nums=PN4)
    labels, x = inputs(m)
    target = torch.randint(0, m.V, (3, m.L))

    def run():
        m.zero_grad(set_to_none=True)
        logits = m(labels, x, prog_si=prog_si)
        loss = F.cross_entropy(logits.transpose(1, 2), target[:, : logits.shape[1]])
        loss.backward()
        return loss.detach(), _grads(m)

    ref = run()
    m.set_attn_impl("scalewise")
    _assert_same(run(), ref, 1e-10)


def test_bicubic_upsample_as_a_matmul_equals_interpolate():
    from var.models.quantizer import bicubic_upsample

    for pn in (1, 2, 3, 5, 13):
        x = torch.randn(4, 8, pn, pn, dtype=torch.float64)
        torch.testing.assert_close(bicubic_upsample(x, 16), F.interpolate(x, size=(16, 16), mode="bicubic"),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["flex", "scalewise", "fused"])
def test_compiled_fused_training_step_equals_plain_on_gpu(impl):
    compiled_against_plain("cuda", 1e-3, attn_impl=impl)


# --------------------------------------------------------------------------- fused head CE
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(smoothing, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (2, 37), generator=g)
    ref = F.cross_entropy((h @ w.t() + b).transpose(1, 2), t, label_smoothing=smoothing)
    ref_grads = torch.autograd.grad(ref * 3, (h, w, b))  # a non-unit upstream gradient
    got = linear_cross_entropy(h, w, b, t, smoothing, chunk_tokens=chunk)
    got_grads = torch.autograd.grad(got * 3, (h, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_compiled_cross_entropy_chunks_equal_the_eager_ones():
    """compiled=True: the chunks' softmax and gradient through torch.compile, one graph for every chunk length
    (chunks of 16 and a last one of 10 here), with label smoothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 12, generator=g, requires_grad=True)
    w = torch.randn(50, 12, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 37), generator=g)
    torch._dynamo.reset()
    counters.clear()
    results = []
    for compiled in (False, True):
        loss = linear_cross_entropy(h, w, b, t, 0.1, chunk_tokens=16, compiled=compiled)
        results.append((loss, *torch.autograd.grad(loss * 3, (h, w, b))))
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cross_entropy_chunks_equal_the_eager_ones_on_gpu():
    """The official head's shapes (C 1024, V 4096, 680 tokens per image) in bf16, chunks of 8192 tokens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(16, 680, 1024, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(4096, 1024, device="cuda", generator=g) * 0.02).requires_grad_()
    b = torch.zeros(4096, device="cuda", requires_grad=True)
    t = torch.randint(0, 4096, (16, 680), device="cuda", generator=g)
    results = []
    for compiled in (False, True):
        loss = linear_cross_entropy(h, w, b, t, chunk_tokens=8192, compute_dtype=torch.bfloat16, compiled=compiled)
        results.append((loss, *torch.autograd.grad(loss, (h, w, b))))
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())


def test_linear_cross_entropy_without_grad_and_shape_errors():
    h, w, b = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(10)
    t = torch.randint(0, 10, (4,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, b, t)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t() + b, t))
    with pytest.raises(ValueError, match="4 feature rows for 3 targets"):
        linear_cross_entropy(h, w, b, t[:3])


def test_model_with_fused_head_ce_gives_the_plain_loss_and_gradients():
    m = tiny(patch_nums=PN4)
    labels, x = inputs(m)
    target = torch.randint(0, m.V, (3, m.L))
    _assert_same(_loss_and_grads(m, labels, x, target, fused=True),
                 _loss_and_grads(m, labels, x, target, fused=False), 1e-10)


def test_bf16_residual_stream_follows_the_fp32_one_under_autocast():
    """residual_dtype=autocast carries the stream in bf16 between the blocks (as the official code does);
    outside autocast it changes nothing, and under autocast the loss and gradients stay within bf16
    rounding of the fp32 stream's."""
    seen = []
    ref, bf = tiny(patch_nums=PN4).float(), tiny(patch_nums=PN4, residual_dtype="autocast").float()
    bf.load_state_dict(ref.state_dict())
    for m in (ref, bf):
        m.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    labels, x = inputs(ref)
    x = x.float()
    target = torch.randint(0, ref.V, (3, ref.L))
    _assert_same(_loss_and_grads(bf, labels, x, target, fused=True), _loss_and_grads(ref, labels, x, target,
                                                                                     fused=True), 0)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _loss_and_grads(ref, labels, x, target, fused=True)
        b = _loss_and_grads(bf, labels, x, target, fused=True)
    assert seen == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(b[0], a[0], rtol=2e-2, atol=0)
    for name, g in a[1].items():
        rel = (b[1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 0.1, (name, rel.item())


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    m = tiny(patch_nums=PN4, drop_path_rate=0.0)
    m.train()  # checkpointing only acts with grad enabled; class dropout is 0 in tiny()
    labels, x = inputs(m)
    target = torch.randint(0, m.V, (3, m.L))
    ref = _loss_and_grads(m, labels, x, target, fused=True)
    m.set_grad_checkpointing(1)
    assert all(b.grad_checkpointing for b in m.blocks)
    _assert_same(_loss_and_grads(m, labels, x, target, fused=True), ref, 1e-12)
    m.set_grad_checkpointing(2)
    assert [b.grad_checkpointing for b in m.blocks] == [True, False]


def test_compiled_blocks_keep_state_dict_keys_and_outputs():
    m = tiny(patch_nums=PN4)
    labels, x = inputs(m)
    ref = m(labels, x)
    keys = list(m.state_dict())
    m.compile_blocks(backend="aot_eager")  # traced and functionalised as Inductor would see it
    torch.testing.assert_close(m(labels, x), ref, rtol=1e-12, atol=1e-12)
    assert list(m.state_dict()) == keys  # checkpoints of compiled runs load into plain models


@pytest.mark.parametrize("specialize_float, defer", [(True, False), (False, False), (False, True)])
def test_compiled_blocks_share_graphs_whatever_the_depth(specialize_float, defer):
    """Each block has its own drop-path rate; were the rate a compile-time constant, every block would
    compile a graph of its own (d30: 30 compilations, and past the recompile limit the rest run eager).
    Depth 12 in training mode (drop path on): two graphs, the first block (no drop path) and the rest.
    Both settings of Dynamo's float specialisation (the default differs between torch releases); with
    defer_residual the first block is also the only one without a deferred branch to add."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    if "specialize_float" not in dynamo_config._config:
        pytest.skip("this torch has no specialize_float switch")
    torch._dynamo.reset()
    counters.clear()
    m = build_var(VARConfig(depth=12, num_classes=10, patch_nums=PN4, vocab_size=64, cvae=8,
                            defer_residual=defer)).train()
    assert len({b.drop_path.p for b in m.blocks[1:]}) == 11
    m.compile_blocks(backend="eager")
    labels, x = torch.randint(0, 10, (2,)), torch.randn(2, m.L - 1, 8)
    with dynamo_config.patch(specialize_float=specialize_float):
        for _ in range(2):
            m(labels, x).mean().backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["recompiles"])
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("defer", [False, True])
def test_inductor_compiled_blocks_equal_plain(defer):
    compiled_against_plain(defer_residual=defer)


@pytest.mark.parametrize("prog_si", [-1, 1])
def test_deferred_residual_add_computes_what_the_block_adds_itself(prog_si):
    """defer_residual: each block's second residual add done at the start of the next block (the last one's
    after the stack). float64, training mode with drop path on (the same draws in the same order), also with
    every 2nd block checkpointed and over a prefix of the scales: the plain loss and gradients; and the same
    tokens from the KV-cache sampling steps."""
    ref = tiny(patch_nums=PN4, depth=3, drop_path_rate=0.3).train()
    got = tiny(patch_nums=PN4, depth=3, drop_path_rate=0.3, defer_residual=True).train()
    labels, x = inputs(ref)
    target = torch.randint(0, ref.V, (3, ref.L), generator=torch.Generator().manual_seed(4))
    results = []
    for m, every in ((ref, 0), (got, 0), (got, 2)):
        m.set_grad_checkpointing(every)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        logits = m(labels, x, prog_si=prog_si)
        loss = F.cross_entropy(logits.transpose(1, 2), target[:, : logits.shape[1]])
        loss.backward()
        results.append((loss.detach(), _grads(m)))
    _assert_same(results[1], results[0], 1e-12)
    _assert_same(results[2], results[0], 1e-12)
    vq = VQVAE(PRESETS["vq_test32"]).eval()  # scales 1..4, as the model
    a, _ = run_scales(ref.eval(), vq, labels, [1, 2, 3], cfg=1.5, top_k=10)
    b, _ = run_scales(got.eval(), vq, labels, [1, 2, 3], cfg=1.5, top_k=10)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# ------------------------------------------------------------------------------- sampling
def _splitmix_reference(seed: int, index: int) -> float:
    """SplitMix64 in Python integers: mix(mix(seed) + (index + 1) * golden), top 24 bits."""
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    z = mix((mix(seed & mask) + (index + 1) * 0x9E3779B97F4A7C15) & mask)
    return (z >> 40) / (1 << 24)


def test_token_uniforms_follow_the_reference_splitmix_stream():
    seeds = [0, 1, 12345, 2**40 + 7, 2**63 + 5]
    u = token_uniforms(stream_keys(seeds, "cpu"), begin=3, count=6)
    ref = torch.tensor([[_splitmix_reference(s, 3 + j) for j in range(6)] for s in seeds], dtype=torch.float32)
    torch.testing.assert_close(u, ref, rtol=0, atol=0)
    assert mix64(torch.tensor([0])).item() == 0  # the finaliser fixes 0; keys come from mixed seeds


def test_inverse_cdf_draws_follow_the_probabilities_and_skip_zeros():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    u = token_uniforms(stream_keys([7], "cpu"), 0, 60_000)[0]
    idx = inverse_cdf_draw(probs.expand(len(u), -1), u)
    freq = np.bincount(idx.numpy(), minlength=6) / len(u)
    assert freq[[0, 2, 5]].sum() == 0
    np.testing.assert_allclose(freq, probs.numpy(), atol=0.01)  # 4+ sigma at 60k draws
    edges = inverse_cdf_draw(probs.expand(2, -1), torch.tensor([0.0, 0.9999999]))
    assert edges.tolist() == [1, 4]


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_static_cache_sampling_equals_the_growing_cache(cfg):
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=2, num_classes=10, patch_nums=PN4, vocab_size=64, cvae=8,
                              init_head=1.0, init_adaln_gamma=1.0)).double().eval()
    vq = VQVAE(PRESETS["vq_test32"]).eval()
    labels, seeds = torch.tensor([1, 4, 10]), [3, 4, 5]
    kw = dict(cfg=cfg, top_k=20, top_p=0.9)
    ref_logits, got_logits = [], []
    ref, f_ref = run_scales(var, vq, labels, seeds, logits_out=ref_logits, **kw)
    steps = GraphedScaleSteps(var, rows=6 if cfg else 3, dtype=None, graphs=False)
    got, f_got = run_scales(var, vq, labels, seeds, logits_out=got_logits, scale_step=steps, **kw)
    for a, b in zip(got_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    torch.testing.assert_close(f_got, f_ref)
    assert all(blk.attn.static_k is None and not blk.attn.caching for blk in var.blocks)  # detached
    with pytest.raises(ValueError, match="captured for"):
        steps(var.class_emb(labels[:2]), None, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_steps_equal_eager_steps_on_gpu():
    torch.manual_seed(0)
    var = build_var(VARConfig(depth=4, num_classes=10, patch_nums=PN4, vocab_size=64, cvae=8)).cuda().eval()
    vq = VQVAE(PRESETS["vq_test32"]).cuda().eval()
    labels, seeds = torch.tensor([1, 4, 10], device="cuda"), [3, 4, 5]
    auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    ref_logits, got_logits = [], []
    ref, _ = run_scales(var, vq, labels, seeds, cfg=1.5, autocast=auto, logits_out=ref_logits)
    steps = GraphedScaleSteps(var, rows=6)
    got, _ = run_scales(var, vq, labels, seeds, cfg=1.5, logits_out=got_logits, scale_step=steps)
    for a, b in zip(got_logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
