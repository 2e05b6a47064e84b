"""task=evaluate: test loss, sample quality (FID/IS/precision/recall/KID) and tokenizer reconstruction.

    python run.py task=evaluate "task.ckpt='runs/scaling_demo/model.depth=4'"    # test_loss + generation
    python run.py task=evaluate task.ckpt=RUN task.what=[test_loss]
    python run.py task=evaluate task.what=[tokenizer] task.tokenizer_path=runs/tokenizer/x.pt
    python run.py task=evaluate task.ckpt=RUN trainer=ddp task.generation.per_class=50   # all GPUs

Each evaluation becomes one entry of the run's record.json under ``evaluations`` (kind, tag, step, settings,
metrics, timestamp) and a ``metrics_<tag>.json`` beside its samples in ``task.out``. The test loss goes
through var.eval.test_loss.evaluate_token_loss with the run's own split, limit, batch size and precision,
so it equals what training logged at the checkpoint's step. A re-run finds its tag in the record and skips
(task.force=true recomputes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from var.checkpoints import CheckpointError, safe_load
from var.data.shards import atomic_write_json
from var.errors import ConfigError, DataError
from var.record import RunRecord, now, read_record

KINDS = ("test_loss", "generation", "tokenizer")
_PRECISION = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16": "fp16"}


class Context:
    """What the evaluations share: ranks, the run and its recorded config, models loaded once."""

    def __init__(self, cfg: DictConfig):
        from var.sampling.loading import Ranks, run_dir_of_checkpoint

        self.cfg, self.task = cfg, cfg.task
        self.ranks = Ranks(cfg)
        self.device = self.ranks.device
        self.ckpt = self.task.get("ckpt")
        if self.ckpt and not Path(self.ckpt).exists():
            raise DataError(f"task.ckpt={self.ckpt}: no such file or directory")
        self.run_dir = run_dir_of_checkpoint(self.ckpt) if self.ckpt else None
        self.record = (read_record(self.run_dir / "record.json") if self.run_dir else None) or {}
        self.run_cfg = self.record.get("config") or {}
        # The run's record.json receives the entries; without one (a released file, a bare tokenizer), this
        # task's own directory does.
        has_record = self.run_dir is not None and (self.run_dir / "record.json").is_file()
        self.record_dir = self.run_dir if has_record else Path(cfg.paths.output_dir)
        self.out = Path(self.task.out) if self.task.get("out") else self.record_dir / "eval"
        self._models = None
        self._step = "unset"

    @property
    def rank0(self) -> bool:
        return self.ranks.rank == 0

    def run_value(self, dotted: str, default=None):
        node = self.run_cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def models(self):
        """(VAR, VQVAE) of task.ckpt, the tokenizer checked against the codebook the run trained with."""
        if self._models is None:
            from var.sampling.loading import load_models

            if not self.ckpt:
                raise ConfigError("task.ckpt: required for test_loss and generation (a training run directory "
                                  "or a checkpoint file)")
            model, vqvae, _ = load_models(self.task, self.device)
            self._models = (model, vqvae)
        return self._models

    def step(self) -> int | None:
        """The training step of the checkpoint (None for a released file)."""
        if self._step == "unset":
            from var.var_file import resolve_checkpoint

            try:
                obj = safe_load(resolve_checkpoint(self.ckpt), "VAR checkpoint")
            except CheckpointError as e:
                raise DataError(str(e)) from None
            self._step = int(obj["global_step"]) if isinstance(obj, dict) and "global_step" in obj else None
        return self._step

    def data_root(self) -> str:
        root = str(self.task.get("data_root") or self.run_value("data.root") or self.cfg.data.root)
        if not Path(root).is_dir():
            raise DataError(f"task.data_root: the image dataset {root} is not here (run `python run.py task=prepare` "
                            f"with the run's data config, or set task.data_root=DIR)")
        return root

    def data_name(self) -> str | None:
        if self.task.get("data_root"):  # data named on the command line: its data config says what it is
            return self.cfg.data.get("name")
        return self.run_value("data.name", self.cfg.data.get("name"))

    def test_loss_autocast(self):
        """task.precision's autocast for the test loss; auto: the precision training evaluated in. (Generation
        takes task.precision as it is, through image_sampler.)"""
        from var.sampling.loading import autocast_for

        precision = str(self.task.precision)
        if precision == "auto":
            precision = _PRECISION.get(str(self.run_value("trainer.precision", "32-true")), "fp32")
        return autocast_for(precision, self.device)

    def image_sampler(self, fast: bool):
        """The transformer and tokenizer as one image sampler (on the fast path: var/sampling/fast.py)."""
        from var.sampling.fast import ImageSampler

        model, vqvae = self.models()
        return ImageSampler(model, vqvae, str(self.task.precision), self.device, fast)

    def feature_kind(self) -> str:
        from var.eval.features import resolve_feature

        return resolve_feature(str(self.task.feature), self.data_name())

    def feature_net(self):
        from var.eval.features import build_feature_net

        kind = self.feature_kind()
        plain = OmegaConf.to_container(self.task.classifier, resolve=True)

        def build():
            return build_feature_net(kind, inception_weights=self.task.inception_weights, data_root=self.data_root(),
                                     cache_dir=self.task.cache_dir, classifier=plain, device=self.device,
                                     progress=self.rank0)

        if kind != "synthetic_classifier" or self.ranks.world == 1:
            return build()
        # Rank 0 trains (or finds) the cached classifier; the others read it once it is written.
        net = build() if self.rank0 else None
        self.ranks.barrier()
        return net if net is not None else build()

    # ------------------------------------------------------------------------------------------ results
    def existing(self, tag: str) -> dict | None:
        if self.task.force:
            return None
        old = read_record(self.record_dir / "record.json") or {}
        return next((e for e in old.get("evaluations", []) if e.get("tag") == tag), None)

    def write(self, entry: dict) -> dict:
        entry = {**entry, "timestamp": now()}
        if not self.rank0:
            return entry
        if self.ckpt:
            entry.setdefault("checkpoint", str(self.ckpt))
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / f"metrics_{entry['tag']}.json", entry)
        record = RunRecord(self.record_dir)
        if "run_dir" not in record.data:
            record.update(run_dir=str(self.record_dir), run_name=self.record_dir.name, status="complete")
        kept = [e for e in record.data.get("evaluations", []) if e.get("tag") != entry["tag"]]
        record.update(evaluations=kept + [entry])
        record.save()
        return entry


# ------------------------------------------------------------------------------------------- test loss
def eval_test_loss(ctx: Context) -> dict:
    from var.data.tokens import TokenDataModule
    from var.eval.test_loss import evaluate_token_loss

    node = ctx.task.test_loss
    step, split = ctx.step(), str(node.split)
    tag = f"test_loss_{split}_step{step}"
    if (old := ctx.existing(tag)) is not None:
        return _skipped(ctx, old)
    limit = ctx.run_value("task.eval_limit") if node.limit == "auto" else node.limit
    batch = ctx.run_value("task.eval_batch_size", 256) if node.batch_size == "auto" else node.batch_size
    tokens = node.get("tokens") or (None if ctx.run_value("task.source") == "images" else ctx.run_value("task.tokens"))
    model, vqvae = ctx.models()
    if tokens:
        ds = TokenDataModule(str(tokens), batch_size=int(batch), eval_batch_size=int(batch),
                             eval_limit=limit).dataset(split)
    elif ctx.run_value("task.source") == "images":
        tokens = f"images:{ctx.data_root()}"  # encoded as training encoded its evaluation splits
        ds = _image_split(ctx, vqvae, split, limit, int(batch))
    else:
        raise ConfigError("task.test_loss.tokens: not set and the run's record.json names no token cache")
    metrics = evaluate_token_loss(model, vqvae.quantize, ds.tokens, ds.labels, list(model.patch_nums), int(batch),
                                  ctx.device, ctx.ranks.rank, ctx.ranks.world, ctx.test_loss_autocast(), ctx.rank0)
    entry = {"kind": "test_loss", "tag": tag, "step": step, "split": split,
             "settings": {"tokens": str(tokens), "limit": limit, "batch_size": int(batch)}, "metrics": metrics}
    logged = next((e for e in ctx.record.get("evals", []) if e.get("step") == step and e.get("split") == split), None)
    if logged is not None:  # what training logged at this step, for the reader to compare
        entry["logged_by_training"] = {k: logged[k] for k in ("L_mean", "L_last") if k in logged}
    entry = ctx.write(entry)
    if ctx.rank0:
        print(f"test loss ({split}, step {step}): L_mean {metrics['L_mean']:.4f}  L_last {metrics['L_last']:.4f}  "
              f"err_mean {metrics['err_mean']:.4f}  ({metrics['n_images']} images)")
    return entry


def _image_split(ctx: Context, vqvae, split: str, limit, batch: int):
    """A run trained from images (task.source=images) has no token cache: its split, encoded by the run's
    tokenizer exactly as training encoded it (unflipped, first ``limit`` images)."""
    from var.data.datamodule import ImageShardDataModule
    from var.data.image_tokens import ImageTokenDataModule

    resolution = int(ctx.run_value("data.resolution", ctx.cfg.data.resolution))
    images = ImageShardDataModule(ctx.data_root(), resolution, batch, batch, num_workers=0)
    classes = int(ctx.run_value("data.num_classes", ctx.cfg.data.num_classes))
    dm = ImageTokenDataModule(images, vqvae, num_classes=classes, eval_limit=limit)
    return dm.dataset(split, device=ctx.device)


# ------------------------------------------------------------------------------------------ generation
def _reference(ctx: Context, net, node):
    from var.eval.reference import npz_reference, split_reference

    fb = int(ctx.task.feature_batch_size)
    if str(node.reference) == "split":
        return split_reference(net, ctx.data_root(), str(node.reference_split), ctx.task.cache_dir, fb, ctx.device,
                               progress=ctx.rank0)
    return npz_reference(net, node.reference, ctx.task.cache_dir, fb, ctx.device, progress=ctx.rank0)


def eval_generation(ctx: Context) -> dict:
    from var.eval.generation import generate_features
    from var.eval.reference import compare, split_reference
    from var.sampling.config import SamplingConfig
    from var.sampling.fast import resolve_fast
    from var.tasks.sample import class_list

    node = ctx.task.generation
    scfg = SamplingConfig.from_node(OmegaConf.to_container(node.sampling, resolve=True), seed=int(node.seed))
    scfg.validate("task.generation.sampling.")
    fast = resolve_fast(node.get("fast", "auto"), ctx.device, "task.generation.fast")
    if int(node.per_class) < 1 or int(node.batch_size) < 1:
        raise ConfigError("task.generation.per_class and batch_size: must be >= 1")
    model, _ = ctx.models()
    raw = OmegaConf.to_container(node.classes) if OmegaConf.is_list(node.classes) else node.classes
    classes = class_list(raw, model.num_classes)
    n = len(classes) * int(node.per_class)
    step = ctx.step()
    tag = f"generation_step{step}_{scfg.tag()}_n{n}_{ctx.feature_kind()}"
    if (old := ctx.existing(tag)) is not None:
        return _skipped(ctx, old)
    net = ctx.feature_net()
    ref = _reference(ctx, net, node)
    baseline = None
    bsplit = node.baseline_split
    if bsplit == "auto":  # a real-vs-real floor at this sample size: cheap with the small classifier only
        bsplit = "val" if net.name == "synthetic_classifier" else None
    if bsplit and str(node.reference) == "split" and bsplit != node.reference_split:
        baseline = split_reference(net, ctx.data_root(), str(bsplit), ctx.task.cache_dir,
                                   int(ctx.task.feature_batch_size), ctx.device, progress=ctx.rank0)
    gen = generate_features(ctx.image_sampler(fast), net, classes, int(node.per_class), scfg, int(node.batch_size),
                            ctx.device, keep_images=True, progress=ctx.rank0)
    if not ctx.rank0:
        return {"tag": tag}
    kw = {"kid_subsets": int(node.kid_subsets), "kid_subset_size": int(node.kid_subset_size),
          "prc_k": int(node.prc_k), "device": ctx.device}
    metrics = compare(gen["features"], gen["logits"], ref, net.name, labels=gen["labels"], **kw)
    entry = {"kind": "generation", "tag": tag, "step": step, "feature_extractor": net.name,
             "settings": {**dataclasses.asdict(scfg), "per_class": int(node.per_class), "classes": raw,
                          "fast": fast},
             "num_samples": n, "reference": ref.source, "metrics": metrics}
    if baseline is not None:
        entry["baseline"] = {"what": f"real '{bsplit}' images instead of samples", "n": len(baseline.labels),
                             **compare(baseline.features, baseline.logits, ref, net.name, labels=baseline.labels, **kw)}
    if net.name == "synthetic_classifier":
        entry["note"] = ("feature network: a small CNN trained on the synthetic train split, not Inception; "
                         "fd_* is not ImageNet FID. Chance class accuracy = 1/num_classes.")
        entry["classifier"] = {k: v for k, v in net.meta.items() if k != "fingerprint"}
    _write_samples(ctx, tag, gen, classes, int(node.per_class), bool(node.save_npz), entry)
    entry = ctx.write(entry)
    _print_metrics(f"generation ({n} samples, step {step}, {scfg.tag()})", metrics, entry.get("baseline"))
    return entry


def _write_samples(ctx: Context, tag: str, gen: dict, classes: list[int], per_class: int, save_npz: bool,
                   entry: dict) -> None:
    from var.sampling.files import grid, save_image
    from var.sampling.files import save_npz as write_npz

    ctx.out.mkdir(parents=True, exist_ok=True)
    imgs = gen["images"]
    rows = [[imgs[k * per_class + i] for i in range(min(per_class, 8))] for k in range(min(len(classes), 20))]
    save_image(ctx.out / f"grid_{tag}.png", grid(rows))
    entry["grid"] = str(ctx.out / f"grid_{tag}.png")
    if save_npz:  # the ADM evaluator's input: uint8 NHWC under arr_0
        write_npz(ctx.out / f"samples_{tag}.npz", imgs)
        entry["samples"] = str(ctx.out / f"samples_{tag}.npz")


# ------------------------------------------------------------------------------------------- tokenizer
def eval_tokenizer(ctx: Context) -> dict:
    from var.eval.reconstruction import evaluate_tokenizer
    from var.models.perceptual import load_lpips
    from var.tokenizer_file import load_tokenizer

    node = ctx.task.tokenizer
    if ctx.task.get("tokenizer_path"):
        tok_path = Path(ctx.task.tokenizer_path)
    elif ctx.ckpt:
        from var.sampling.loading import find_tokenizer_path

        tok_path = find_tokenizer_path(ctx.ckpt, None)
    else:
        raise ConfigError("task.tokenizer_path: required for task.what=[tokenizer] without task.ckpt")
    tag = f"tokenizer_{tok_path.stem}_{node.split}" + (f"_{ctx.feature_kind()}" if node.rfid else "")
    if (old := ctx.existing(tag)) is not None:
        return _skipped(ctx, old)
    net = ctx.feature_net() if node.rfid else None
    try:
        vqvae = load_tokenizer(tok_path, device=ctx.device)
        lpips = load_lpips(node.lpips_weights).to(ctx.device) if node.lpips else None
    except CheckpointError as e:
        hint = "; or task.tokenizer.lpips=false to skip LPIPS" if "LPIPS" in str(e) else ""
        raise DataError(f"{e}{hint}") from None
    metrics = evaluate_tokenizer(vqvae, ctx.data_root(), str(node.split), net, lpips, int(node.batch_size),
                                 ctx.device, node.limit, ctx.rank0)
    entry = {"kind": "tokenizer", "tag": tag, "step": None, "tokenizer": str(tok_path), "split": str(node.split),
             "data_root": ctx.data_root(), "settings": {"limit": node.limit, "lpips": bool(node.lpips)},
             "metrics": metrics}
    entry = ctx.write(entry)
    _print_metrics(f"tokenizer {tok_path.name} on {node.split}", metrics)
    return entry


# ----------------------------------------------------------------------------------------------- task
def _skipped(ctx: Context, old: dict) -> dict:
    if ctx.rank0:
        print(f"skip {old['tag']}: already in {ctx.record_dir / 'record.json'} (task.force=true recomputes)")
    return old


def _print_metrics(title: str, metrics: dict, baseline: dict | None = None) -> None:
    def fmt(m: dict) -> str:
        return "  ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float))

    print(f"{title}: {fmt(metrics)}")
    if baseline is not None:
        print(f"  baseline, {baseline['what']}: {fmt(baseline)}")


def run(cfg: DictConfig) -> dict:
    what = cfg.task.what
    what = [what] if isinstance(what, str) else list(what)
    bad = [w for w in what if w not in KINDS]
    if bad or not what:
        raise ConfigError(f"task.what={what}: expected a list of {' | '.join(KINDS)}")
    if any(w != "tokenizer" for w in what) and not cfg.task.get("ckpt"):
        raise ConfigError("task.ckpt: required (a training run directory or a checkpoint file)")
    ctx = Context(cfg)
    torch.manual_seed(int(cfg.seed))
    results = {}
    for w in what:
        results[w] = {"test_loss": eval_test_loss, "generation": eval_generation, "tokenizer": eval_tokenizer}[w](ctx)
    ctx.ranks.barrier()
    if ctx.rank0:
        print(f"results in {ctx.record_dir / 'record.json'} (evaluations) and {ctx.out}/metrics_*.json")
    return json.loads(json.dumps(results, default=str))
