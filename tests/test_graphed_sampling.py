"""Graphed sampling's two savings compute what the eager step does: the blocks' Linear layers on bf16
copies (bitwise what autocast computes, and following the model's weights), and the compiled blocks
(one set of graphs for every scale, equal to the uncompiled step)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from var.models.vqvae import PRESETS, VQVAE
from var.models.zoo import VARConfig, build_var
from var.sampling.graphed import GraphedScaleSteps
from var.sampling.sampler import run_scales

PN8 = (1, 2, 3, 4, 5, 6, 8, 10)  # more scales than Dynamo's default recompile limit of 8


def _model(patch_nums=PN8, depth=3, **kw):
    torch.manual_seed(0)
    return build_var(VARConfig(depth=depth, num_classes=10, patch_nums=patch_nums, vocab_size=64, cvae=8,
                               init_head=1.0, init_adaln_gamma=1.0, **kw)).eval()


def _all_scales(steps, var, rows: int, seed: int = 0) -> list[torch.Tensor]:
    """Logits of every scale for fixed random inputs, stepping as run_scales does."""
    g = torch.Generator().manual_seed(seed)
    cond = var.class_emb(torch.arange(rows) % (var.num_classes + 1))
    out = []
    for si, pn in enumerate(var.patch_nums):
        x = torch.randn(rows, pn * pn, var.Cvae, generator=g)
        out.append(steps(cond, x, si).clone())
    return out


def _eager_autocast(var, rows: int, seed: int = 0) -> list[torch.Tensor]:
    def step(cond, x, si):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return var.forward_scale(cond, x, si)

    var.enable_kv_cache(True)
    try:
        return _all_scales(step, var, rows, seed)
    finally:
        var.enable_kv_cache(False)


@torch.no_grad()
def test_bf16_weight_copies_compute_what_autocast_does_and_follow_the_weights():
    var = _model()
    steps = GraphedScaleSteps(var, rows=4, dtype=torch.bfloat16, graphs=False)
    assert steps.low is not None and len(steps.low.copies) == 5 * 2 * var.depth - var.depth  # qkv has no bias
    for got, ref in zip(_all_scales(steps, var, 4), _eager_autocast(var, 4)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in var.parameters())  # the model keeps its fp32 weights

    var.blocks[1].ffn.fc1.weight.mul_(1.5)  # an in-place update (as an optimizer step makes) is picked up
    for got, ref in zip(_all_scales(steps, var, 4), _eager_autocast(var, 4)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    var.blocks[1].ffn.fc1.weight.data.mul_(2.0)  # a write through .data needs refresh_weights
    assert not torch.equal(_all_scales(steps, var, 4)[-1], _eager_autocast(var, 4)[-1])
    steps.refresh_weights()
    torch.testing.assert_close(_all_scales(steps, var, 4)[-1], _eager_autocast(var, 4)[-1], rtol=0, atol=0)


@pytest.mark.parametrize("shared_aln, defer", [(False, False), (True, False), (False, True)])
@torch.no_grad()
def test_compiled_blocks_share_graphs_over_all_scales_and_equal_the_plain_step(shared_aln, defer):
    """Also with each block's second residual add deferred to the next block (defer_residual): the first
    block, which takes no deferred branch, is also the one without drop path, so the graphs stay as many."""
    var = _model(shared_aln=shared_aln, drop_path_rate=0.1)
    plain = _all_scales(GraphedScaleSteps(var, rows=4, dtype=None, graphs=False), var, 4)
    if defer:
        var = _model(shared_aln=shared_aln, drop_path_rate=0.1, defer_residual=True)
    torch._dynamo.reset()
    counters.clear()
    steps = GraphedScaleSteps(var, rows=4, dtype=None, graphs=False, compile=True, compile_backend="aot_eager")
    for _ in range(2):
        got = _all_scales(steps, var, 4)
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Graphs: first block (no drop path) / the rest, times scale 0 (one token: a size Dynamo specialises) /
    # the middle scales / the last (its keys fill the cache: a contiguity check specialises). One per
    # scale would be 2 x 8 and run past the recompile limit into eager.
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["recompiles"])
    assert all(not b.attn.caching and b.attn.static_k is None for b in var.blocks)
    torch._dynamo.reset()


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiled_steps_on_bf16_copies_follow_the_eager_autocast_step():
    """What task=sample runs on a GPU, minus the CUDA graphs: Inductor-compiled blocks on bf16 copies."""
    var = _model(drop_path_rate=0.1)
    steps = GraphedScaleSteps(var, rows=4, dtype=torch.bfloat16, graphs=False, compile=True)
    for got, ref in zip(_all_scales(steps, var, 4), _eager_autocast(var, 4)):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("defer", [False, True])
def test_compiled_cuda_graph_steps_equal_eager_steps_on_gpu(defer):
    var = _model(patch_nums=(1, 2, 3, 4), depth=4, defer_residual=defer).cuda()
    vq = VQVAE(PRESETS["vq_test32"]).cuda().eval()
    labels, seeds = torch.tensor([1, 4, 10], device="cuda"), [3, 4, 5]
    auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    ref_logits, got_logits = [], []
    ref, _ = run_scales(var, vq, labels, seeds, cfg=1.5, autocast=auto, logits_out=ref_logits)
    steps = GraphedScaleSteps(var, rows=6, compile=True)
    for _ in range(2):  # the second run replays the graphs
        got_logits.clear()
        run_scales(var, vq, labels, seeds, cfg=1.5, logits_out=got_logits, scale_step=steps)
        for a, b in zip(got_logits, ref_logits):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@torch.no_grad()
@pytest.mark.parametrize("device, labels", [
    ("cpu", [1, 4, 10]),
    pytest.param("cuda", [4], marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_compiled_draws_give_the_eager_tokens_with_two_graphs_for_all_scales(device, labels):
    """The fast path's compiled draw_scale (guidance mix, top-k/top-p, softmax, counter streams, inverse
    CDF) draws the tokens the eager one draws, at every scale, and the ten scales (each its own guidance
    weight, size and token offset) share two graphs even where Dynamo specialises floats by default. On a
    GPU at batch 1, where Triton once typed the counter streams' 64-bit arithmetic int32."""
    from torch._dynamo import config as dynamo_config

    from var.sampling import fast

    var = _model(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)).to(device)
    vq = VQVAE(dataclasses.replace(PRESETS["vq_test32"], resolution=128, patch_nums=var.patch_nums)).to(device).eval()
    labels, seeds = torch.tensor(labels, device=device), [3, 4, 5][: len(labels)]
    settings = dict(cfg=1.5, top_k=40, top_p=0.9)
    ref, _ = run_scales(var, vq, labels, seeds, **settings)
    torch._dynamo.reset()
    counters.clear()
    patch = {"specialize_float": True} if "specialize_float" in dynamo_config._config else {}
    with dynamo_config.patch(**patch):
        got, _ = run_scales(var, vq, labels, seeds, draw=fast.compiled_draw, **settings)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["recompiles"])
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert len({tuple(t[0].tolist()) for t in ref[4:]}) > 1  # real draws, not one repeated token
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_gelu_in_the_gemm_epilogue_is_the_autocast_linear_and_gelu_on_gpu():
    """fc1 and its tanh GELU as one cuBLASLt GEMM: autocast's two kernels up to one bf16 rounding of the
    pre-activation, at every row count sampling uses (one row included) and for 3-D inputs."""
    from var.models.ffn import linear_tanh_gelu

    torch.manual_seed(0)
    fc1 = torch.nn.Linear(64, 256).cuda()
    for shape in ((1, 64), (2, 64), (6, 9, 64), (128, 256, 64)):
        x = torch.randn(shape, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = torch.nn.functional.gelu(fc1(x), approximate="tanh")
            got = linear_tanh_gelu(x, fc1.weight, fc1.bias, torch.bfloat16)
        assert got.dtype == ref.dtype == torch.bfloat16 and got.shape == ref.shape
        torch.testing.assert_close(got.float(), ref.float(), rtol=1.6e-2, atol=1e-2)


@torch.no_grad()
def test_graphed_steps_leave_the_ffn_as_training_runs_it():
    """The GELU epilogue is on only while the graphed steps run (it has no backward, and the test loss must
    round as training does)."""
    var = _model(patch_nums=(1, 2))
    steps = GraphedScaleSteps(var, rows=2, dtype=torch.bfloat16, graphs=False)
    cond = var.class_emb(torch.tensor([0, 10]))
    steps(cond, None, 0)
    assert all(b.ffn.gelu_epilogue_dtype is None for b in var.blocks)
