"""One resolved config -> one run directory -> one tracked run.

`run` reads top to bottom as the stages of a run; each stage is a plain
function of a few arguments. Every hook of every method is called (the ones a
method does not implement do nothing), and what a method needs it declares
(`CompressionMethod.dense_reference`); nothing here names a particular method.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from llmk_lab import console, hardware, jobs, tracking
from llmk_lab.compression import AS_LOADED
from llmk_lab.compression.weight_sharing import untie_shared_weights
from llmk_lab.config import RunConfig
from llmk_lab.context import RunContext
from llmk_lab.data import load_data
from llmk_lab.data.module import TaskDataModule
from llmk_lab.errors import UserError
from llmk_lab.export import export_adapter, export_model
from llmk_lab.lm_evaluation import run_lm_eval
from llmk_lab.manifest import build_manifest, write_json
from llmk_lab.masks import MaskKeeper, masked_linears, sparsity_report
from llmk_lab.measure import (compression_figures, deployed, keep_fitted_reference, needs_reference, parameter_counts,
                              peak_memory_mb)
from llmk_lab.models import load_model, load_tokenizer
from llmk_lab.module import TaskModule, ThroughputMonitor
from llmk_lab.peft import PeftStrategy
from llmk_lab.plan import Plan, plan
from llmk_lab.reference import record_test_stage
from llmk_lab.quantized_base import quantize_base
from llmk_lab.sweep import config_fingerprint
from llmk_lab.tasks import get_task, optimized_metric
from llmk_lab.training.selection import restore_best, selection_callbacks

log = logging.getLogger(__name__)


def build_trainer(settings: RunConfig, loggers: list, callbacks: list, run_dir: Path) -> pl.Trainer:
    hw, train = settings.hardware, settings.train
    hardware.reset_after_previous_job()  # a sweep's earlier DDP job in this process must not be joined
    callbacks = list(callbacks)
    if hw.gradient_checkpointing:
        callbacks.append(hardware.gradient_checkpointing_callback())
    if hw.strategy in hardware.DISTRIBUTED_STRATEGIES:
        callbacks.append(hardware.replica_check_callback())  # every rank built the same model
    # fast_dev_run of a run that does not train (max_steps=0) is one batch of each evaluation, not one
    # training step: Lightning's fast_dev_run would train (and a 135M LM's training step needs ~20 GB).
    smoke_eval_only = train.fast_dev_run and train.max_steps == 0
    limits = {"limit_val_batches": 1, "limit_test_batches": 1} if smoke_eval_only else {}
    return pl.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes, strategy=hardware.strategy(hw),
        precision=hw.precision, max_epochs=train.max_epochs, max_steps=train.max_steps,
        gradient_clip_val=train.grad_clip, accumulate_grad_batches=train.accumulate_grad_batches,
        log_every_n_steps=train.log_every_n_steps, fast_dev_run=train.fast_dev_run and not smoke_eval_only,
        check_val_every_n_epoch=train.val_every_n_epochs or train.max_epochs + 1,
        num_sanity_val_steps=0, logger=loggers, callbacks=callbacks, default_root_dir=str(run_dir),
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_model_summary=False, deterministic="warn",
        # FSDP writes its sharded checkpoints itself; every other strategy through our atomic writer.
        plugins=[] if hw.strategy == "fsdp" else [jobs.AtomicCheckpointIO()], **limits,
    )


def evaluate(trainer: pl.Trainer, module: TaskModule, datamodule) -> dict[str, float]:
    results: dict[str, float] = {}
    for stage_results in (trainer.validate(module, datamodule=datamodule, verbose=False),
                          trainer.test(module, datamodule=datamodule, verbose=False)):
        for entry in stage_results:
            results.update({k: float(v) for k, v in entry.items()})
    # validate/test reset the metrics under inference mode, which makes their states inference tensors;
    # training's own validation (under no_grad) could not add to them. Reset them again out here.
    with torch.inference_mode(False):
        for metrics in module.metrics.values():
            metrics.reset()
    return results


def measure_sparsity(ctx: RunContext, strategy: PeftStrategy, methods) -> dict[str, Any]:
    """Sparsity of the pruned layers in the trained model, and after merging the adapter."""
    masked = masked_linears(ctx.model)
    if not masked:
        return {}
    report = sparsity_report(ctx.model, masked)
    figures: dict[str, Any] = {"sparsity/pruned_layers": report["overall"]}
    ctx.reports["sparsity_per_layer"] = report["per_layer"]
    requested = [m.requested_sparsity for m in methods if m.requested_sparsity is not None]
    if requested:
        figures["sparsity/requested"] = requested[-1]
    if strategy.mergeable and ctx.settings.measure.enabled:
        report = sparsity_report(deployed(ctx, strategy))
        figures["sparsity/after_merge"] = report["overall"]
        ctx.reports["sparsity_per_layer_after_merge"] = report["per_layer"]
    return figures


def final_checkpoint(settings: RunConfig, run_dir: Path) -> Optional[Path]:
    """Where the export's Lightning checkpoint goes, or None when none is written."""
    if settings.export.checkpoint and not settings.train.fast_dev_run:
        return run_dir / "checkpoints" / "last.ckpt"
    return None


def export(ctx: RunContext, strategy: PeftStrategy, trainer: pl.Trainer) -> dict[str, str]:
    settings, run_dir, written = ctx.settings, ctx.run_dir, {}
    path = final_checkpoint(settings, run_dir)
    if path is not None:
        hardware.save_checkpoint(trainer, path)  # an FSDP run's processes saved it together (leave_distributed)
        written["checkpoint"] = str(path)
    if settings.export.adapter:
        written.update(export_adapter(ctx, strategy))
    if settings.export.merged:
        merged = deployed(ctx, strategy)  # plan() refused export.merged for unmergeable strategies
        # transformers' format has no cross-layer sharing: each block saves its own copy of a shared weight.
        untie_shared_weights(merged)
        merged.save_pretrained(run_dir / "merged", safe_serialization=True)
        ctx.tokenizer.save_pretrained(run_dir / "merged")
        written["merged"] = str(run_dir / "merged")
        ctx.reports["export/merged_max_logit_diff"] = merged_logit_gap(ctx, run_dir / "merged")
    if settings.export.model:
        written.update(export_model(ctx, strategy))
    return written


@torch.no_grad()
def merged_logit_gap(ctx: RunContext, merged_dir: Path, tolerance: float = 1e-3) -> float:
    """Largest |logit difference| between the trained model and its merged export reloaded with
    `from_pretrained`, on one validation batch: the export must predict what the run measured."""
    reloaded, loading = ctx.task.auto_class.from_pretrained(merged_dir, dtype=torch.float32,
                                                            output_loading_info=True)
    reloaded.eval()
    wrong = {k: sorted(v)[:3] for k, v in loading.items() if k != "error_msgs" and v}
    if wrong:
        # Keys from_pretrained did not find, or found no place for, are layers it initialised at random.
        raise RuntimeError(f"the merged export in {merged_dir} does not reload as the trained model: {wrong}")
    batch = next(iter(ctx.datamodule.val_dataloader()))
    device = next(ctx.model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = ctx.model.training
    ctx.model.eval()
    trained = ctx.task.logits(ctx.model(**batch)).float()
    ctx.model.train(was_training)
    exported = ctx.task.logits(reloaded.to(device)(**batch)).float()
    gap = float((trained - exported).abs().max())
    if not gap <= tolerance * (1.0 + float(trained.abs().max())):
        raise RuntimeError(f"the merged export in {merged_dir} does not predict what the trained model predicts: "
                           f"max |logit difference| {gap:.3g}")
    return gap


def reference_measures(ctx: RunContext, model_info: dict, measure):
    """Fidelity needs a reference that predicts something: a model as loaded whose task head was
    newly initialised predicts noise, so agreement with it would say nothing about the compression."""
    if ctx.reports.get("measure/reference") == AS_LOADED and model_info.get("newly_initialised"):
        ctx.reports["measure/fidelity"] = ("skipped: the uncompressed reference's task head is untrained; "
                                           "compare with a fine-tuned dense run (or use compression=distillation)")
        return dataclasses.replace(measure, fidelity=False)
    return measure


class PostTrainingStages:
    """Runs the stages after training so that a failure in one (export, a measurement) loses nothing:
    before each stage `metrics.json` holds every figure measured so far and names the stage about to run;
    a stage that raises leaves `metrics.json` with `failed_stage` and `error`, and the error goes on (the
    run still fails, exit code non-zero). Only a run that ends normally has no `failed_stage`."""

    def __init__(self, run_dir: Path, metrics: dict, ctx: RunContext, methods, raw, datamodule, started: float):
        self.run_dir, self.metrics, self.ctx, self.methods = run_dir, metrics, ctx, methods
        self.raw, self.datamodule, self.started = raw, datamodule, started
        self.begun = time.perf_counter()

    def _write(self, **extra: Any) -> None:
        self.metrics.update({
            "data/train_examples": len(self.raw.splits["train"]),
            "data/tokenization_cache_hit": self.datamodule.cache_hit,
            "wall_time_s": time.perf_counter() - self.started,
            "run_dir": str(self.run_dir),
            "compression": [{"method": m.registered_name, **m.report} for m in self.methods],
            **self.ctx.reports,
        })
        self.metrics.pop("failed_stage", None)
        self.metrics.pop("error", None)
        self.metrics.update(extra)
        write_json(self.run_dir / "metrics.json", self.metrics)

    @contextlib.contextmanager
    def stage(self, name: str):
        # Written before the stage, so even a process killed inside it leaves the figures and the stage's name.
        self._write(failed_stage=name, error="did not finish (the process ended inside this stage)")
        begun = time.perf_counter()
        try:
            yield
            # What each stage after training costs, next to time/fit_s (benchmarks/compressed_training.py).
            self.metrics[f"time/{name}_s"] = time.perf_counter() - begun
        except BaseException as err:
            line = str(err).splitlines()[0] if str(err) else ""
            with contextlib.suppress(OSError):  # a full disk: metrics.json as written before the stage stays
                self._write(failed_stage=name, error=f"{type(err).__name__}: {line}")
            log.error("stage %r failed; what was measured before it is in %s", name, self.run_dir / "metrics.json")
            raise

    def finish(self) -> None:
        self.metrics["time/post_training_s"] = time.perf_counter() - self.begun
        self._write()


# What the console table shows; metrics.json has every figure.
SUMMARY_FIGURES = ("sparsity/requested", "sparsity/pruned_layers", "sparsity/after_merge", "params/trainable",
                   "params/total", "params/trainable_fraction", "size/ratio", "latency/bs32/speedup",
                   "fidelity/agreement", "train/examples_per_s", "train/peak_memory_mb", "wall_time_s")


def summary_table(metrics: dict[str, Any], task) -> str:
    keys = [f"{stage}/{name}" for stage in ("val", "test") for name in task.summary_metrics] + list(SUMMARY_FIGURES)
    rows = [(k, metrics[k]) for k in keys if k in metrics]
    rows.append(("run_dir", metrics["run_dir"]))
    width = max(len(k) for k, _ in rows)

    return "\n".join(f"  {k:<{width}}  {console.figure_text(v)}" for k, v in rows)


def run(cfg: DictConfig, run_dir: Path, run_name: str = "run", group: Optional[str] = None,
        overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """The stages of a run, in order; each is a function below."""
    started = time.perf_counter()
    p = plan(cfg)  # 0. every value and combination checked before anything expensive
    console.quiet_libraries()  # each thing said once: no per-load bars or reports that repeat our own lines
    settings = p.settings
    hardware.prepare(settings.hardware)  # the hardware asked for is there; torch threads (threads=auto)
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    ctx, raw, model_info = load_inputs(cfg, p, run_dir, overrides)  # 1-3. data, model, manifest
    compress_before_fit(ctx, p)  # 4. one-shot compression
    adapt(ctx, p)  # 5. the PEFT strategy (over a 4-bit base for QLoRA)
    callbacks, throughput = build_module(ctx, p)  # 6. the Lightning module and its callbacks
    loggers = tracking.build_loggers(settings.logger, run_dir, run_name, group,
                                     OmegaConf.to_container(cfg, resolve=True))
    failed = True
    try:
        trainer = build_trainer(settings, loggers, callbacks, run_dir)
        metrics = fit(ctx, trainer, callbacks, throughput, config_fingerprint(cfg))
        # 7-9. post-training stages; what is measured is on disk before each stage that can still fail
        stages = PostTrainingStages(run_dir, metrics, ctx, p.methods, raw, ctx.datamodule, started)
        after_fit_and_measure(stages, ctx, p, trainer, model_info)
        with stages.stage("export"):
            metrics["exports"] = export(ctx, p.strategy, trainer)
        stages.finish()
        jobs.discard_resume_checkpoint(run_dir)
        tracking.log_summary(loggers, metrics)
        failed = False
    finally:
        tracking.finish(loggers, failed=failed)
    log.info("results (every figure: %s)\n%s", run_dir / "metrics.json", summary_table(metrics, ctx.task))
    return metrics


def load_inputs(cfg: DictConfig, p: Plan, run_dir: Path, overrides: Optional[list[str]]):
    """Data, tokenizer and model, checked against every step; then the manifest and the resolved config."""
    settings = p.settings
    raw = load_data(settings.data)
    task = get_task(raw.task, raw.labels)
    tokenizer = load_tokenizer(settings.model)
    datamodule = TaskDataModule(raw, task, tokenizer, settings.data, settings.train, settings.seed)
    if settings.eval.lm_eval.tasks and not task.scores_text_continuations:
        raise UserError(f"eval.lm_eval.tasks={settings.eval.lm_eval.tasks} needs a causal language model; "
                        f"data.task is {task.registered_name!r} (use a causal_lm dataset, e.g. data=shakespeare)")
    model, model_info = load_model(settings.model, task, tokenizer)
    # What the loaded model cannot take, refused for every step before anything is written or any step runs
    # (a chain's distillation teacher trains in its before_fit).
    for method in p.methods:
        method.check_model(model)
    # The manifest after the assets are resolved, so their checksums are known.
    write_json(run_dir / "manifest.json", build_manifest(settings.seed, overrides or [], {"model": model_info},
                                                         raw.source))
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    ctx = RunContext(settings=settings, run_dir=run_dir, task=task, tokenizer=tokenizer, model=model,
                     datamodule=datamodule)
    ctx.reports["optimized_metric"] = optimized_metric(settings.optimized_metric, task)  # what sweeps rank by
    return ctx, raw, model_info


def compress_before_fit(ctx: RunContext, p: Plan) -> None:
    """The one-shot steps. The uncompressed model (1x the weights) is kept only when something compresses and
    a figure compares with it or a step starts from it."""
    measure = ctx.settings.measure
    wants_uncompressed = needs_reference(measure) or any(m.reads_uncompressed_model for m in p.methods)
    if wants_uncompressed and any(m.dense_reference for m in p.methods):
        ctx.dense_model, ctx.reports["measure/reference"] = copy.deepcopy(ctx.model), AS_LOADED
    for method in p.methods:
        method.before_fit(ctx)
    if ctx.dense_model is not None and not needs_reference(measure):
        # No figure compares with it (the methods before fit, e.g. a distillation teacher, have had it).
        ctx.dense_model = None
        ctx.reports.pop("measure/reference", None)


def adapt(ctx: RunContext, p: Plan) -> None:
    """The PEFT strategy; pruning masks are kept through it (a low-rank update over pruned weights masks itself).
    QLoRA: the (compressed) base's block linears are stored in 4-bit NF4 before LoRA wraps them."""
    quantize = ctx.settings.model.quantize_base
    if quantize is not None:
        ctx.reports["quantized_base"] = {**quantize_base(ctx.model, quantize),
                                         "merged_export": "float: the 4-bit base dequantised plus the update"}
    ctx.model = p.strategy.apply(ctx.model, ctx)


def build_module(ctx: RunContext, p: Plan) -> tuple[list, ThroughputMonitor]:
    """The Lightning module with every method's loss term, and the callbacks of the strategy, the methods,
    the job (divergence, resumable checkpoints) and checkpoint selection."""
    settings = ctx.settings
    loss_terms = [term for term in (m.loss_term(ctx) for m in p.methods) if term is not None]
    ctx.module = TaskModule(ctx.model, ctx.task, settings.train, loss_terms)
    ctx.module.no_decay_names = p.strategy.no_decay_parameter_names(ctx.model)
    throughput = ThroughputMonitor()
    callbacks = [throughput, console.progress_bar(), *p.strategy.callbacks(ctx)]
    if masked_linears(ctx.model):
        callbacks.append(MaskKeeper(ctx.model))
    for method in p.methods:
        callbacks.extend(method.callbacks(ctx))
    # stop on a diverged loss; checkpoints a job resumes from exactly
    callbacks.extend(jobs.job_callbacks(settings, ctx.run_dir, ctx.datamodule))
    callbacks.extend(selection_callbacks(settings.train, ctx.run_dir))  # train.monitor: best checkpoint, early stop
    return callbacks, throughput


def fit(ctx: RunContext, trainer: pl.Trainer, callbacks: list, throughput: ThroughputMonitor,
        fingerprint: str) -> dict[str, Any]:
    """Training (resumed from the job's checkpoint where there is one), and what it measured."""
    settings = ctx.settings
    if settings.measure.before_fit:
        # The compressed (and adapter-wrapped: a fresh LoRA update is zero) model before any training step.
        before = evaluate(trainer, ctx.module, ctx.datamodule)
        ctx.reports.update({f"before_fit/{key}": value for key, value in before.items()})
    # Pretrained models load in eval mode; Lightning keeps each submodule's mode, so switch to train mode
    # explicitly (dropout on).
    ctx.module.train()
    fit_started = time.perf_counter()
    resume_from = jobs.checkpoint_to_resume(settings, ctx.run_dir, fingerprint)
    trainer.fit(ctx.module, datamodule=ctx.datamodule, ckpt_path=resume_from)
    figures = {"train/examples_per_s": throughput.examples_per_second, "train/peak_memory_mb": peak_memory_mb(),
               "train/examples": throughput.examples, "train/steps": trainer.global_step,
               "train/seconds": throughput.seconds,
               # examples per optimiser step, over every process of a distributed run
               "train/effective_batch_size": (settings.train.batch_size * trainer.world_size
                                              * settings.train.accumulate_grad_batches),
               "train/world_size": trainer.world_size, "time/fit_s": time.perf_counter() - fit_started}
    figures.update(restore_best(ctx.module, trainer, callbacks))  # the selected weights from here on
    if ctx.module.adversary is not None:
        figures.update(ctx.module.adversary.figures())
    return figures


def after_fit_and_measure(stages: "PostTrainingStages", ctx: RunContext, p: Plan, trainer: pl.Trainer,
                          model_info: dict) -> None:
    """Compression after training, then evaluation and every measured figure, each stage on disk before the
    next one can fail."""
    settings, metrics = ctx.settings, stages.metrics
    with stages.stage("after_fit"):
        keep_fitted_reference(ctx, p.methods, p.strategy)
        for method in p.methods:
            method.after_fit(ctx)
    with stages.stage("evaluate"):
        if settings.export.model:  # the test stage's outputs are the export's reference (llmk_lab.reference)
            ctx.module.test_outputs = record_test_stage(ctx, trainer)
        metrics.update(evaluate(trainer, ctx.module, ctx.datamodule))
    # A distributed run's other ranks end here (an FSDP run's after gathering its model onto rank zero and
    # saving the checkpoint with it); rank zero goes on alone.
    hardware.leave_distributed(trainer, final_checkpoint(settings, ctx.run_dir))
    if settings.eval.lm_eval.tasks:
        with stages.stage("lm_eval"):
            metrics.update(run_lm_eval(ctx.model, ctx.tokenizer, settings.eval.lm_eval, ctx.run_dir))
    with stages.stage("parameter_counts"):
        metrics.update({f"params/{k}": v for k, v in parameter_counts(ctx.model).items()})
    with stages.stage("sparsity"):
        metrics.update(measure_sparsity(ctx, p.strategy, p.methods))
    if ctx.dense_model is not None:
        with stages.stage("compression_figures"):
            metrics.update(compression_figures(ctx, p.strategy,
                                               reference_measures(ctx, model_info, settings.measure)))
        ctx.dense_model = None  # nothing after the figures compares with it
