"""The transformer's per-scale sampling steps, each captured once as a CUDA graph over a preallocated cache.

Eager sampling launches ~20 kernels per block per scale (d16: ~3,500 per image batch) and, at small
batches, the GPU waits on Python for most of that time. Here each scale's ``forward_scale`` for a fixed
number of rows is captured once into a CUDA graph: the KV cache is a fixed buffer per block
(``SelfAttention.use_static_cache``), the inputs are copied into fixed tensors, and a replay runs the
whole scale with one launch. What runs is the same module code as the eager step, so the logits equal
the eager ones (tests/test_fast_paths.py compares them on the GPU; on the CPU the static cache path is
compared with the growing cache).

Use: ``steps = GraphedScaleSteps(var, rows)`` then ``run_scales(..., scale_step=steps)`` with
``rows = 2 * batch`` under guidance. Graphs keep pointers to the weights: build them after loading the
weights and do not swap parameters afterwards (in-place updates are seen).
"""

from __future__ import annotations

import contextlib

import torch


class GraphedScaleSteps:
    def __init__(self, var_model, rows: int, dtype: torch.dtype | None = torch.bfloat16, graphs: bool = True,
                 tf32_head: bool = True):
        """rows: the doubled batch under guidance. dtype: autocast dtype (None: no autocast). graphs=False
        keeps the static cache but runs eagerly (the CPU test path). tf32_head: the fp32 head matmul
        takes TF32 inputs in the graphs (10-bit mantissa, still finer than the official bf16 head; 8x
        the fp32 rate: the head was 14 ms of a d16 batch of 64)."""
        self.var, self.rows, self.dtype, self.tf32_head = var_model, rows, dtype, tf32_head
        p = var_model.class_emb.weight
        self.device = p.device
        H, L, C = var_model.num_heads, var_model.L, var_model.C
        cache_dtype = dtype or p.dtype
        self.caches = [(torch.zeros(rows, H, L, C // H, dtype=cache_dtype, device=self.device),
                        torch.zeros(rows, H, L, C // H, dtype=cache_dtype, device=self.device))
                       for _ in var_model.blocks]
        self.cond = torch.zeros(rows, C, dtype=p.dtype, device=self.device)
        self.inputs = [None] + [torch.zeros(rows, pn * pn, var_model.Cvae, dtype=p.dtype, device=self.device)
                                for pn in var_model.patch_nums[1:]]
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[torch.Tensor] = []
        if graphs:
            if self.device.type != "cuda":
                raise ValueError("CUDA graphs need the model on a CUDA device; use graphs=False elsewhere")
            self._capture()

    # The model's attention modules use the static buffers only while attached, so eager use elsewhere
    # (training, evaluation) is untouched.
    @contextlib.contextmanager
    def _attached(self):
        self.var.enable_kv_cache(True)
        for b, (k, v) in zip(self.var.blocks, self.caches):
            b.attn.use_static_cache(k, v)
        try:
            yield
        finally:
            for b in self.var.blocks:
                b.attn.use_static_cache(None, None)
            self.var.enable_kv_cache(False)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _step(self, si: int) -> torch.Tensor:
        with self._autocast():
            return self.var.forward_scale(self.cond, self.inputs[si], si)

    def _rewind(self) -> None:
        for b in self.var.blocks:
            b.attn.static_len = 0

    @torch.no_grad()
    def _capture(self) -> None:
        was_training, was_tf32 = self.var.training, torch.backends.cuda.matmul.allow_tf32
        self.var.eval()
        torch.backends.cuda.matmul.allow_tf32 = self.tf32_head or was_tf32  # read when kernels are captured
        try:
            with self._attached():
                # Warm-up on a side stream (cuBLAS/cuDNN pick and allocate their workspaces here).
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._rewind()
                        for si in range(len(self.var.patch_nums)):
                            self._step(si)
                torch.cuda.current_stream(self.device).wait_stream(side)
                # Scales replay in the order they were captured, so they can share one memory pool.
                pool = torch.cuda.graph_pool_handle()
                self._rewind()
                for si in range(len(self.var.patch_nums)):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self._step(si)
                    self.graphs.append(graph)
                    self.outputs.append(out)
        finally:
            self.var.train(was_training)
            torch.backends.cuda.matmul.allow_tf32 = was_tf32

    @torch.no_grad()
    def __call__(self, cond_BD: torch.Tensor, x: torch.Tensor | None, si: int) -> torch.Tensor:
        """Logits of scale si (rows, pn^2, V); scales must come in order 0, 1, ... as in run_scales."""
        if cond_BD.shape[0] != self.rows:
            raise ValueError(f"these graphs were captured for {self.rows} rows, got {cond_BD.shape[0]}")
        if si == 0:
            self.cond.copy_(cond_BD)
        else:
            self.inputs[si].copy_(x)
        if self.graphs:
            self.graphs[si].replay()
            return self.outputs[si]
        with self._attached():
            for b in self.var.blocks:
                b.attn.static_len = self.var.begin_ends[si][0]
            return self._step(si)


class GraphedStepsByRows:
    """GraphedScaleSteps per number of rows, captured on first use (the last batch is often smaller)."""

    def __init__(self, var_model, dtype: torch.dtype | None):
        self.var, self.dtype, self.by_rows = var_model, dtype, {}

    def __call__(self, rows: int) -> GraphedScaleSteps:
        if rows not in self.by_rows:
            self.by_rows[rows] = GraphedScaleSteps(self.var, rows, dtype=self.dtype)
        return self.by_rows[rows]
