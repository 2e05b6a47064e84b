"""Head matmul + cross-entropy over chunks of tokens, never holding the (tokens, V) logits of the batch.

Teacher forcing produces B x 680 x 4096 logits per step; in fp32 with their gradient that is 1.4 GiB at
batch 64 (d16) and more copies through log_softmax. Here the forward pass walks over chunks of tokens:
for each it forms the logits, adds the chunk's loss, and at once computes the loss's gradient with
respect to the chunk's features and the head's weight and bias (softmax - target, the closed form), so
the backward pass only scales stored gradients. Peak extra memory is one chunk of logits.

The loss equals ``F.cross_entropy(features @ W.T + b, target, label_smoothing=s)`` averaged over all
tokens; with ``compute_dtype`` fp32 it matches to float rounding (tests/test_fast_paths.py). With bf16 the
matmuls take bf16 inputs and accumulate in fp32, as the official model's head does under autocast.
"""

from __future__ import annotations

import torch

from var.models.autocast import compute_dtype as autocast_compute_dtype


def _chunk_loss_and_grad(h, weight, bias, target, smoothing: float, want_grad: bool, compute_dtype,
                         tokens: int):
    """(summed loss of the chunk, d(loss)/d(logits) / tokens in compute_dtype, or None)."""
    acc = torch.promote_types(compute_dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
    logits = (h.to(compute_dtype) @ weight.to(compute_dtype).t()).to(acc) + bias.to(acc)
    lse = logits.logsumexp(dim=-1)
    nll = lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = nll if smoothing == 0 else (1 - smoothing) * nll + smoothing * (lse - logits.mean(dim=-1))
    if not want_grad:
        return loss.sum(), None
    grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, target.unsqueeze(1), grad.new_full((grad.shape[0], 1), -(1 - smoothing)))
    if smoothing:
        grad.sub_(smoothing / grad.shape[1])
    return loss.sum(), grad.div_(tokens).to(compute_dtype)


# torch.compile of the chunk function (``compiled=True``, speed=fast): the softmax, its gradient, the scaling
# and the cast become one pass over each chunk's logits instead of ~9 eager ones (d16 step on an H100: -3.3 ms,
# bench/results note 55; ablation: bench.train_throughput --variants fast_bf16res fast_eager_ce_chunks_bf16res).
# One graph for every chunk length.
_COMPILED_CHUNK = None


def _compiled_chunk():
    global _COMPILED_CHUNK
    if _COMPILED_CHUNK is None:
        _COMPILED_CHUNK = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _COMPILED_CHUNK


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, smoothing, chunk, compute_dtype, compiled):
        n = h.shape[0]
        want_grad = any(ctx.needs_input_grad[:3])
        acc = torch.promote_types(compute_dtype, torch.float32)
        total = h.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if want_grad else None
        grad_b = torch.zeros_like(bias, dtype=acc) if want_grad else None
        w = weight.to(compute_dtype)
        chunk_fn = _compiled_chunk() if compiled else _chunk_loss_and_grad
        for start in range(0, n, chunk):
            hc, tc = h[start:start + chunk], target[start:start + chunk]
            # g: d(mean loss) / d(logits) of this chunk
            loss, g = chunk_fn(hc, w, bias, tc, smoothing, want_grad, compute_dtype, n)
            total += loss
            if want_grad:
                grad_h[start:start + chunk] = (g @ w).to(h.dtype)
                grad_w += (g.t() @ hc.to(compute_dtype)).to(acc)
                grad_b += g.to(acc).sum(0)
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, grad_b * grad_out, None, None, None, None, None


def linear_cross_entropy(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                         label_smoothing: float = 0.0, chunk_tokens: int = 8192,
                         compute_dtype: torch.dtype | None = None, compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``features @ weight.T + bias`` against ``target``, chunked over tokens.

    features (..., C), target (...) int64. compute_dtype: the matmul input dtype (default: the autocast
    dtype when autocast is on for the features' device, else the features' dtype). compiled: each chunk's
    softmax and gradient through torch.compile (see _COMPILED_CHUNK).
    """
    if compute_dtype is None:
        compute_dtype = autocast_compute_dtype(features)
    h = features.reshape(-1, features.shape[-1])
    t = target.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} feature rows for {t.shape[0]} targets")
    with torch.autocast(features.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, bias, t, float(label_smoothing), int(chunk_tokens),
                                         compute_dtype, bool(compiled))
