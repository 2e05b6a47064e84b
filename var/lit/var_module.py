"""LightningModule training the VAR transformer by teacher forcing on cached tokens.

The frozen tokenizer's quantizer turns ground-truth tokens into the transformer's input (the
downsampled cumulative f_hat of the previous scales); the transformer predicts every token of every
scale in one pass under the block-causal mask. Loss: token-weighted cross-entropy with label smoothing.
Evaluation of the *test* split at points spaced in log-compute is done by ScalingRecordCallback through
``evaluate_split``; Lightning's validation loop reports the val split.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from var.eval.test_loss import evaluate_token_loss, split_scales
from var.lit.schedules import lr_factor, progressive_scale, warmup_steps_of
from var.lit.token_metrics import TokenMetricSums
from var.models.transformer import param_groups
from var.models.zoo import VARConfig, build_var

# The frozen quantizer is in eval mode on purpose, and val metrics are all-reduced by TokenMetricSums
# before logging, so these two Lightning warnings do not apply.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
# Linear layers return views of their 2-D matmul, so the sharded blocks (with defer_residual) and the model
# hand views on; FSDP2 warns that an in-place op on one would skip its hook, and nothing here writes in place.
warnings.filterwarnings("ignore", message=".*FSDP2-wrapped module .* returned a view tensor.*")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shard_var(var: nn.Module, mesh, parallelism: dict, mixed_precision: bool) -> None:
    """FSDP2: ``fully_shard`` each block, then the root, over ``mesh`` (None: the default process group).

    parallelism: ``trainer.parallelism`` (param_dtype, reduce_dtype, reshard_after_forward). Mixed precision
    applies on GPUs only (CPU gloo runs keep fp32). Module names stay as they are, so checkpoints load into
    a plain model.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": bool(parallelism.get("reshard_after_forward", True))}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[parallelism.get("param_dtype", "bf16")],
                                                   reduce_dtype=DTYPES[parallelism.get("reduce_dtype", "fp32")])
    for block in var.blocks:
        fully_shard(block, **kwargs)
    fully_shard(var, **kwargs)


class VARTrainingModule(L.LightningModule):
    def __init__(self, model: dict, quantizer: nn.Module, optim: dict, schedule: dict, loss: dict,
                 progressive: dict | None = None, parallelism: dict | None = None, global_batch: int = 1,
                 speed: dict | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["quantizer"])
        self.model_cfg = VARConfig(**{**model, "patch_nums": tuple(model["patch_nums"])})
        self.var = build_var(self.model_cfg)
        self.quantizer = quantizer.eval().requires_grad_(False)
        self.patch_nums = list(self.model_cfg.patch_nums)
        self.optim_cfg, self.schedule_cfg, self.loss_cfg = dict(optim), dict(schedule), dict(loss)
        self.progressive_cfg = dict(progressive or {})
        self.parallelism = dict(parallelism or {"kind": "none"})
        self.global_batch = global_batch
        self.speed = dict(speed or {})

    # ----------------------------------------------------------------------------------- distributed
    def configure_model(self) -> None:
        """Activation checkpointing and torch.compile per block, then FSDP2: shard each block, then the
        root (ModelParallelStrategy calls this on every rank). Module names stay as they are, so
        checkpoints load into a plain model."""
        if getattr(self, "_configured", False):
            return
        self._configured = True
        ac = self.parallelism.get("activation_checkpointing", 0)
        self.var.set_grad_checkpointing(int(ac))  # true = 1: every block
        if self.speed.get("compile", False):
            from torch import _dynamo  # `import torch._dynamo` here would make `torch` local to this method

            # Progressive training runs up to one sequence length per scale: one graph each.
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 32)
            mode = self.speed.get("compile_mode")
            self.var.compile_blocks(**({"mode": mode} if mode else {}))
        if self.parallelism.get("kind") != "fsdp":
            return
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        on_gpu = self.device.type == "cuda" or str(self.trainer.strategy.root_device).startswith("cuda")
        shard_var(self.var, mesh, self.parallelism, mixed_precision=on_gpu)

    # --------------------------------------------------------------------------------------- forward
    def teacher_forcing_input(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.quantizer.idxBl_to_var_input(split_scales(tokens_BL, self.patch_nums))

    def prog_si(self) -> int | None:
        cfg = self.progressive_cfg
        if not cfg or cfg.get("fraction", 0) <= 0:
            return None
        return progressive_scale(self.global_step, self.trainer.max_steps, len(self.patch_nums),
                                 cfg["fraction"], cfg.get("start_scale", 4), self._warmup_steps())

    def training_loss(self, tokens: torch.Tensor, labels: torch.Tensor, prog_si: int | None) -> torch.Tensor:
        """Mean cross-entropy over every trained token (each the same weight, as the official trainer)."""
        x = self.teacher_forcing_input(tokens)
        prog = -1 if prog_si is None else prog_si
        smoothing = self.loss_cfg.get("label_smoothing", 0.0)
        if self.speed.get("fused_head_ce", False):
            return self.var(labels, x, prog_si=prog, target=tokens, label_smoothing=smoothing,
                            ce_chunk_tokens=int(self.speed.get("ce_chunk_tokens", 8192)),
                            ce_compiled=bool(self.speed.get("compile_head_ce", False)))
        logits = self.var(labels, x, prog_si=prog)
        target = tokens[:, : logits.shape[1]]
        return F.cross_entropy(logits.float().transpose(1, 2), target, label_smoothing=smoothing)

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        prog_si = self.prog_si()
        loss = self.training_loss(tokens, labels, prog_si)
        # Checked with the gradients before the optimizer step (var/callbacks/fault_guard.NonFiniteGuard, which
        # task=train installs), so the bad step never reaches the weights and the GPU is not waited on here.
        self.last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        if prog_si is not None:
            self.log("train/prog_si", float(prog_si))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = TokenMetricSums(self.patch_nums, device=self.device)

    def validation_step(self, batch, batch_idx):
        tokens, labels = batch
        logits = self.var(labels, self.teacher_forcing_input(tokens))
        self._val_sums.update(logits, tokens)

    def on_validation_epoch_end(self) -> None:
        self._val_sums.all_reduce()
        m = self._val_sums.compute()
        for key in ("L_mean", "L_last", "err_mean", "err_last"):
            self.log(f"val/{key}", m[key], rank_zero_only=True)
        for i, (loss, pn) in enumerate(zip(m["per_scale_loss"], self.patch_nums)):
            if not math.isnan(loss):
                self.log(f"val_scale/L_{i}_{pn}x{pn}", loss, rank_zero_only=True)

    def evaluate_split(self, split: str = "test", progress: bool = False) -> dict:
        """Exact metrics over a whole token split (all ranks take part)."""
        ds = self.trainer.datamodule.dataset(split)
        precision = self.trainer.strategy.precision_plugin
        ctx = precision.forward_context if precision is not None else contextlib.nullcontext
        return evaluate_token_loss(self.var, self.quantizer, ds.tokens, ds.labels, self.patch_nums,
                                   self.trainer.datamodule.eval_batch_size, self.device,
                                   self.global_rank, self.trainer.world_size, ctx, progress)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Global-norm clipping done here: Lightning refuses to clip for fused AdamW under mixed precision
        (it assumes a gradient scaler), but bf16 has none, and FSDP2's DTensor grads clip the same way."""
        if gradient_clip_val:
            norm = torch.nn.utils.clip_grad_norm_(self.var.parameters(), gradient_clip_val)
            self.log("train/grad_norm", norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # ------------------------------------------------------------------------------------- optimiser
    def _warmup_steps(self) -> int:
        return warmup_steps_of(self.schedule_cfg, self.trainer.max_steps)

    def peak_lr(self) -> float:
        lr = self.optim_cfg.get("lr")
        return float(lr) if lr else self.optim_cfg.get("base_lr", 1e-4) * self.global_batch / 256

    def configure_optimizers(self):
        groups = param_groups(self.var, self.optim_cfg.get("weight_decay", 0.05))
        fused = self.optim_cfg.get("fused", True) and torch.cuda.is_available() and \
            self.parallelism.get("kind") != "fsdp"
        opt = torch.optim.AdamW(groups, lr=self.peak_lr(), betas=tuple(self.optim_cfg.get("betas", (0.9, 0.95))),
                                eps=self.optim_cfg.get("eps", 1e-8), fused=fused or None)
        s = self.schedule_cfg
        max_steps, warmup = self.trainer.max_steps, self._warmup_steps()

        def factor(step: int) -> float:
            return lr_factor(step, max_steps, s.get("kind", "official"), warmup, s.get("end_ratio", 0.01),
                             s.get("cooldown_fraction", 0.2), s.get("cooldown_shape", "1-sqrt"))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
