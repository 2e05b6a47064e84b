"""The transformer's per-scale sampling steps, each captured once as a CUDA graph over a preallocated cache.

Eager sampling launches ~20 kernels per block per scale (d16: ~3,500 per image batch) and, at small
batches, the GPU waits on Python for most of that time. Here each scale's ``forward_scale`` for a fixed
number of rows is captured once into a CUDA graph: the KV cache is a fixed buffer per block
(``SelfAttention.use_static_cache``), the inputs are copied into fixed tensors, and a replay runs the
whole scale with one launch. What runs is the same module code as the eager step, so the logits equal
the eager ones (tests/test_fast_paths.py and tests/test_graphed_sampling.py compare them on the GPU; on
the CPU the static cache path is compared with the growing cache).

Three more things the eager step wastes, removed here (the first and the last without changing what is
computed, the second with one bf16 rounding fewer):

- Autocast rounds every fp32 Linear weight to bf16 again at every scale (d30: 1.3 B weights, ten times per
  batch). Here the blocks' Linear layers run on bf16 copies made once, which is bitwise what autocast
  computes; the copies follow the model's weights (re-copied when a weight's version counter moves, as an
  optimizer step or ``load_state_dict`` does; after writes through ``.data`` call ``refresh_weights``).
- fc1's GELU runs in the GEMM's epilogue (``GELU_EPILOGUE``, CUDA only): the activation from the fp32
  accumulator, rounded once, instead of a bf16 pre-activation written out and read back by a second kernel.
- ``compile=True``: each block runs through torch.compile (one set of graphs for every block and scale:
  shapes and the cache offset are symbolic), which fuses the LayerNorm/AdaLN, q/k normalisation, GELU and
  residual elementwise work that eagerly is ~20 memory-bound kernels per block.

Use: ``steps = GraphedScaleSteps(var, rows)`` then ``run_scales(..., scale_step=steps)`` with
``rows = 2 * batch`` under guidance. Build after loading the weights; for a plain (unsharded) model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Dynamo settings for the compiled block: the cache offset (an int attribute of each attention module)
# stays symbolic, so the ten scales share graphs instead of specialising one each.
_DYNAMO_OPTIONS = {"allow_unspec_int_on_nn_module": True, "recompile_limit": 32}
_COMPILED_BLOCKS: dict = {}
# fc1 and its GELU as one GEMM with the activation in the epilogue (ffn.linear_tanh_gelu); False:
# two kernels as under autocast (the benchmark's ablation, bench.sample_speed --off no-gelu-epilogue).
GELU_EPILOGUE = True


def _block_forward(block, x, cond, mask, branch):
    return block._forward(x, cond, mask, branch)


def compiled_block_forward(backend: str = "inductor"):
    """``run_block`` for ``VAR.forward_scale``: the block's forward through torch.compile (one per backend)."""
    if backend not in _COMPILED_BLOCKS:
        _COMPILED_BLOCKS[backend] = torch.compile(_block_forward, dynamic=True, backend=backend)
    return _COMPILED_BLOCKS[backend]


def _dynamo_options():
    import torch._dynamo.config as config

    return config.patch(**{k: v for k, v in _DYNAMO_OPTIONS.items() if hasattr(config, k)})


class LowPrecisionLinears:
    """bf16 copies of the weights autocast would round at every call: the Linear layers of the blocks
    and of the shared AdaLN projection (the embeddings and the head run outside autocast)."""

    def __init__(self, var_model, dtype: torch.dtype):
        linears = [m for part in (var_model.blocks, var_model.shared_ada_lin) for m in part.modules()
                   if isinstance(m, nn.Linear)]
        self.slots = [(m, n) for m in linears for n in ("weight", "bias") if getattr(m, n, None) is not None]
        self.copies = [nn.Parameter(getattr(m, n).detach().to(dtype), requires_grad=False) for m, n in self.slots]
        self.stamps = [self._stamp(getattr(m, n)) for m, n in self.slots]

    @staticmethod
    def _stamp(p: torch.Tensor) -> tuple:
        return id(p), p.data_ptr(), p._version

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Re-copy the weights that changed since the last copy (all of them with ``force``)."""
        for i, (m, n) in enumerate(self.slots):
            p = getattr(m, n)
            stamp = self._stamp(p)
            if force or stamp != self.stamps[i]:
                self.copies[i].copy_(p.detach())
                self.stamps[i] = stamp

    @contextlib.contextmanager
    def swapped_in(self):
        originals = [getattr(m, n) for m, n in self.slots]
        for (m, n), c in zip(self.slots, self.copies):
            setattr(m, n, c)
        try:
            yield
        finally:
            for (m, n), p in zip(self.slots, originals):
                setattr(m, n, p)


class GraphedScaleSteps:
    def __init__(self, var_model, rows: int, dtype: torch.dtype | None = torch.bfloat16, graphs: bool = True,
                 tf32_head: bool = True, compile: bool = False, compile_backend: str = "inductor",
                 low: LowPrecisionLinears | None = None):
        """rows: the doubled batch under guidance. dtype: autocast dtype (None: no autocast; with one, the
        blocks' Linear layers run on bf16 copies). graphs=False keeps the static cache but runs eagerly
        (the CPU test path). tf32_head: the fp32 head matmul takes TF32 inputs in the graphs (10-bit
        mantissa, still finer than the official bf16 head; 8x the fp32 rate: the head was 14 ms of a d16
        batch of 64). compile: run the blocks through torch.compile (``compile_backend``). low: bf16
        copies to share with other instances on the same model (default: made here)."""
        self.var, self.rows, self.dtype, self.tf32_head = var_model, rows, dtype, tf32_head
        self.run_block = compiled_block_forward(compile_backend) if compile else None
        self.low = low or (LowPrecisionLinears(var_model, dtype) if dtype is not None else None)
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
            b.ffn.gelu_epilogue_dtype = self.dtype if GELU_EPILOGUE else None
        try:
            with contextlib.ExitStack() as stack:
                if self.low is not None:
                    stack.enter_context(self.low.swapped_in())
                if self.run_block is not None:
                    stack.enter_context(_dynamo_options())
                yield
        finally:
            for b in self.var.blocks:
                b.attn.use_static_cache(None, None)
                b.ffn.gelu_epilogue_dtype = None
            self.var.enable_kv_cache(False)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _step(self, si: int) -> torch.Tensor:
        with self._autocast():
            return self.var.forward_scale(self.cond, self.inputs[si], si, run_block=self.run_block)

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
            if self.low is not None:
                self.low.refresh()
        else:
            self.inputs[si].copy_(x)
        if self.graphs:
            self.graphs[si].replay()
            return self.outputs[si]
        with self._attached():
            for b in self.var.blocks:
                b.attn.static_len = self.var.begin_ends[si][0]
            return self._step(si)

    def refresh_weights(self) -> None:
        """Re-copy every bf16 weight from the model (needed only after writes through ``.data``)."""
        if self.low is not None:
            self.low.refresh(force=True)


class GraphedStepsByRows:
    """GraphedScaleSteps per number of rows, captured on first use (the last batch is often smaller)."""

    def __init__(self, var_model, dtype: torch.dtype | None, compile: bool = True):
        self.var, self.dtype, self.compile, self.by_rows = var_model, dtype, compile, {}
        self.low = LowPrecisionLinears(var_model, dtype) if dtype is not None else None  # one copy for all

    def __call__(self, rows: int) -> GraphedScaleSteps:
        if rows not in self.by_rows:
            self.by_rows[rows] = GraphedScaleSteps(self.var, rows, dtype=self.dtype, compile=self.compile,
                                                   low=self.low)
        return self.by_rows[rows]
