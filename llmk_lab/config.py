"""Schemas of the config nodes that every run has (model, data, train, hardware, logger).

Method-specific nodes (`compression`, `peft`) get their schema from the method's
registry entry. Every field has a docstring-style comment: this file is the
reference for what a key means. Range checks live in `__post_init__` and raise
`InvalidValue`, which the registry turns into one line naming the full key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from llmk_lab.errors import check


@dataclass
class ModelConfig:
    # `asset:NAME` (an offline asset, see `python -m llmk_lab.assets list`),
    # a local directory with a Hugging Face model, or a hub model id.
    name_or_path: Optional[str] = "asset:minilm-l6"
    # Build a fresh, randomly initialised model from this config instead of
    # loading weights (tiny test models): keys of the transformers config class.
    from_config: Optional[dict[str, Any]] = None
    # Tokenizer to use when it differs from `name_or_path` (same forms allowed).
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    # Running code shipped with a hub model is opt-in.
    trust_remote_code: bool = False
    # Name of the module list holding the transformer blocks (e.g. `model.layers`), for
    # models whose block list llmk_lab cannot find from their structure (null: discover it).
    blocks: Optional[str] = None
    # QLoRA: store the frozen block linears in 4-bit NormalFloat with double quantisation (bitsandbytes) after
    # the one-shot compression and before LoRA wraps them; computing in float (llmk_lab/quantized_base.py).
    # null: the base stays float.
    quantize_base: Optional[str] = None

    def __post_init__(self) -> None:
        check(bool(self.name_or_path) or self.from_config is not None, "name_or_path", self.name_or_path,
              "a model path, hub id or asset:NAME (or set model.from_config)")
        # A model built from a config loads no weights: a path set beside it would be silently ignored.
        check(not (self.name_or_path and self.from_config is not None), "name_or_path", self.name_or_path,
              "null while model.from_config is set (that model is built with random weights and loads nothing); "
              "set model.from_config=null to load this path")
        check(self.quantize_base in (None, "nf4"), "quantize_base", self.quantize_base,
              "null (a float base) or nf4 (QLoRA's 4-bit NormalFloat base)")


@dataclass
class DataConfig:
    # Registered dataset (`movie_reviews`, ...) or a loader for user files.
    name: str = "movie_reviews"
    # Task the data is for; null lets the dataset decide.
    task: Optional[str] = None
    # Input file or directory for datasets read from the user's disk.
    path: Optional[str] = None
    # Text encoding of those files (CSV, TSV, JSON lines, plain text): e.g. latin-1, cp1252, utf-16.
    encoding: str = "utf-8"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    # Tokens per example; longer inputs are truncated.
    max_length: int = 64
    # Use at most this many training / evaluation examples (null: all).
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    # Seed of the fixed train/val/test split of datasets that ship without one;
    # independent of the run seed so every run of a sweep sees the same split.
    split_seed: int = 0
    val_size: int = 1000
    test_size: int = 1000
    # Extra options a particular dataset understands.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.max_length >= 8, "max_length", self.max_length, "an integer >= 8")
        for key in ("limit_train", "limit_eval"):
            value = getattr(self, key)
            check(value is None or value > 0, key, value, "a positive integer or null")
        check(self.val_size > 0, "val_size", self.val_size, "a positive integer")
        check(self.test_size > 0, "test_size", self.test_size, "a positive integer")


SCHEDULERS = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    max_epochs: int = 1
    # Stop after this many optimiser steps (-1: run `max_epochs`; 0: no training, only evaluate).
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    # Learning-rate schedule after warm-up: linear | cosine | constant.
    scheduler: str = "linear"
    # Fraction of the optimiser steps spent warming up linearly from 0.
    warmup_ratio: float = 0.06
    grad_clip: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    # Run one batch of each stage only (smoke test).
    fast_dev_run: bool = False
    # Validate during fit every N epochs (0: only at the end).
    val_every_n_epochs: int = 0
    # Best-checkpoint selection: the validation metric (e.g. val/acc, val/loss) whose best value
    # picks the weights that are tested, measured and exported (null: the final weights).
    # Validation then runs every epoch unless val_every_n_epochs says otherwise.
    monitor: Optional[str] = None
    # max | min | auto (min for names ending in loss, nll or perplexity, max otherwise).
    monitor_mode: str = "auto"
    # Early stopping: stop after this many validations without an improvement of the
    # monitored metric by more than `early_stopping_min_delta` (null: never stop early).
    early_stopping_patience: Optional[int] = None
    early_stopping_min_delta: float = 0.0
    # Layer-wise learning-rate decay: the head trains at `lr`, transformer block i of L
    # (0 nearest the input) at lr * decay^(L - i), the embeddings at lr * decay^(L + 1);
    # adapter weights inside block i get block i's rate. 1.0: one rate for everything.
    layer_lr_decay: float = 1.0
    # Adaptive weight decay (Ghiasi et al. 2023): lambda_awd > 0 replaces `weight_decay` on the
    # decayed tensors by lambda_awd * ||grad|| / ||w|| each step, averaged over steps (the previous
    # value's weight: `adaptive_weight_decay_average`); logged as train/effective_weight_decay.
    adaptive_weight_decay: float = 0.0
    adaptive_weight_decay_average: float = 0.1
    # Dropout probability for every dropout layer of the model (null: as the model was configured).
    dropout: Optional[float] = None
    # Label smoothing of the cross-entropy (classification and masked-LM tasks; 0: none).
    label_smoothing: float = 0.0
    # Adversarial training on the input embeddings: none | fgm (one normalised gradient step of
    # length epsilon) | pgd (`adversarial_steps` steps of `adversarial_alpha`, null: epsilon / steps,
    # kept within epsilon). The loss is clean + adversarial; the attack's time is in metrics.json.
    # epsilon is the L2 norm of one example's whole perturbation (all its tokens), on embeddings whose
    # per-token norm is ~1.1 in BERT-family checkpoints. Measured with LoRA on MiniLM (1,000 sentences, 63
    # steps): epsilon 1.0 and 0.25 kept the model at chance (test acc 0.527; clean + adversarial loss stuck
    # at 2 x 0.69), 0.05 trained (0.777). Scale it with the model's embedding norms.
    adversarial: str = "none"
    adversarial_epsilon: float = 0.05
    adversarial_steps: int = 3
    adversarial_alpha: Optional[float] = None
    # Cross-layer task head (llmk_lab/training/pooling.py), classification tasks. `pooling`: how a
    # sequence becomes one vector: model (the model's own head) | cls | mean | max | last_token.
    # `layer_mix`: which layers feed the head: last | last_k (the last `layer_mix_k` concatenated) |
    # scalar_mix (ELMo's softmax-weighted mix of all layers). Not exportable as a plain model.
    pooling: str = "model"
    layer_mix: str = "last"
    layer_mix_k: int = 4

    def __post_init__(self) -> None:
        check(self.max_epochs >= 1, "max_epochs", self.max_epochs, "an integer >= 1")
        check(self.max_steps >= -1, "max_steps", self.max_steps,
              "-1 (run max_epochs), 0 (no training: evaluate the model as loaded and compressed) or a positive integer")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "an integer >= 1")
        check(self.lr > 0, "lr", self.lr, "a positive number")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(self.scheduler in SCHEDULERS, "scheduler", self.scheduler, f"one of {list(SCHEDULERS)}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "a positive number or null")
        check(self.accumulate_grad_batches >= 1, "accumulate_grad_batches", self.accumulate_grad_batches, "an integer >= 1")
        check(self.val_every_n_epochs >= 0, "val_every_n_epochs", self.val_every_n_epochs, "an integer >= 0")
        # Selection on the test split would report a tuned number as a held-out one.
        check(self.monitor is None or self.monitor.startswith("val/"), "monitor", self.monitor,
              "a validation metric such as val/acc or val/loss, or null")
        check(self.monitor_mode in ("auto", "max", "min"), "monitor_mode", self.monitor_mode,
              "one of ['auto', 'max', 'min']")
        check(self.early_stopping_patience is None or (self.early_stopping_patience >= 0 and self.monitor),
              "early_stopping_patience", self.early_stopping_patience,
              "an integer >= 0 together with train.monitor, or null")
        check(self.early_stopping_min_delta >= 0, "early_stopping_min_delta", self.early_stopping_min_delta,
              "a number >= 0")
        check(0 < self.layer_lr_decay <= 1, "layer_lr_decay", self.layer_lr_decay,
              "a number in (0, 1] (1: no decay)")
        check(self.adaptive_weight_decay >= 0, "adaptive_weight_decay", self.adaptive_weight_decay,
              "a number >= 0 (0: off)")
        check(0 <= self.adaptive_weight_decay_average < 1, "adaptive_weight_decay_average",
              self.adaptive_weight_decay_average, "a number in [0, 1)")
        check(self.dropout is None or 0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1) or null")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a number in [0, 1)")
        check(self.adversarial in ("none", "fgm", "pgd"), "adversarial", self.adversarial,
              "one of ['none', 'fgm', 'pgd']")
        check(self.adversarial_epsilon > 0, "adversarial_epsilon", self.adversarial_epsilon, "a positive number")
        check(self.adversarial_steps >= 1, "adversarial_steps", self.adversarial_steps, "an integer >= 1")
        check(self.adversarial_alpha is None or self.adversarial_alpha > 0, "adversarial_alpha",
              self.adversarial_alpha, "a positive number or null")
        check(self.pooling in ("model", "cls", "mean", "max", "last_token"), "pooling", self.pooling,
              "one of ['model', 'cls', 'mean', 'max', 'last_token']")
        check(self.layer_mix in ("last", "last_k", "scalar_mix"), "layer_mix", self.layer_mix,
              "one of ['last', 'last_k', 'scalar_mix']")
        check(self.layer_mix_k >= 1, "layer_mix_k", self.layer_mix_k, "an integer >= 1")
        if self.monitor and self.val_every_n_epochs == 0:
            self.val_every_n_epochs = 1


PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", "single_device")


@dataclass
class HardwareConfig:
    # Lightning accelerator: cpu | gpu | cuda | mps | auto. `gpu` without a CUDA GPU is refused in one line.
    accelerator: str = "cpu"
    # Devices per node: a count, -1 (every visible GPU), a list of GPU indices, or auto.
    devices: Any = 1
    # Machines; with SLURM, one task per device on each (`srun`, or `+launcher=slurm`'s tasks_per_node).
    num_nodes: int = 1
    # Lightning strategy: auto | ddp (one process per device; on CPU with gloo) | fsdp (GPUs, sharded
    # parameters, gradients and optimiser state) | ddp_spawn | deepspeed.
    strategy: str = "auto"
    # Lightning precision: 32-true | bf16-mixed (CPU or GPU) | 16-mixed (GPU, with loss scaling) | bf16-true.
    precision: str = "32-true"
    # CPU threads per process: a number, `auto` (this machine's cores divided by the jobs running at
    # once, the joblib launcher's n_jobs, and by the processes of a DDP job), or null (torch's default).
    # The manifest records the number and the rule.
    threads: Any = None
    # Recompute activations in the backward pass instead of storing them (less memory; each block runs twice).
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check(self.accelerator in ("cpu", "gpu", "cuda", "mps", "auto"), "accelerator", self.accelerator,
              "one of ['cpu', 'gpu', 'cuda', 'mps', 'auto']")
        check(self.num_nodes >= 1, "num_nodes", self.num_nodes, "an integer >= 1")
        check(self.threads is None or self.threads == "auto" or (isinstance(self.threads, int)
                                                                 and not isinstance(self.threads, bool)
                                                                 and self.threads >= 1),
              "threads", self.threads, "a positive integer, auto or null")
        check(str(self.precision) in PRECISIONS, "precision", self.precision, f"one of {list(PRECISIONS)}")
        check(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {list(STRATEGIES)}")
        devices_ok = (self.devices == "auto" or (isinstance(self.devices, int) and not isinstance(self.devices, bool)
                                                 and (self.devices >= 1 or self.devices == -1))
                      or (isinstance(self.devices, (list, tuple)) and len(self.devices) > 0))
        check(devices_ok, "devices", self.devices, "a count >= 1, -1 (all GPUs), a list of GPU indices or auto")


LOGGER_KINDS = ("wandb", "tensorboard", "csv", "none")


@dataclass
class LoggerConfig:
    # wandb | tensorboard | csv | none. Every kind but none also writes the per-step CSV log to the run
    # directory (`csv/metrics.csv`); none writes no per-step log at all (metrics.json is always written).
    kind: str = "wandb"
    # Several trackers at once, e.g. `logger.kinds=[wandb,tensorboard]`; when non-empty
    # it replaces `kind`. TensorBoard event files go to `<run_dir>/tensorboard/`.
    kinds: list[str] = field(default_factory=list)
    project: str = "llmk_lab"
    entity: Optional[str] = None
    # auto: online when a W&B API key is configured, offline otherwise.
    mode: str = "auto"
    # W&B group: a multirun uses its sweep directory's name unless set.
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.kind in LOGGER_KINDS, "kind", self.kind, f"one of {list(LOGGER_KINDS)}")
        check(all(k in LOGGER_KINDS for k in self.kinds), "kinds", self.kinds,
              f"a list of entries from {list(LOGGER_KINDS)}")
        check("none" not in self.kinds or set(self.kinds) == {"none"}, "kinds", self.kinds,
              "either trackers to log to or [none], not both")
        check(self.mode in ("auto", "online", "offline", "disabled"), "mode", self.mode,
              "one of ['auto', 'online', 'offline', 'disabled']")

    @property
    def active(self) -> list[str]:
        """The trackers this run writes to, besides the CSV log."""
        return [k for k in dict.fromkeys(self.kinds or [self.kind]) if k not in ("csv", "none")]

    @property
    def csv(self) -> bool:
        """Whether the per-step CSV log is written: with every kind but none."""
        return (self.kinds or [self.kind]) != ["none"]


@dataclass
class ExportConfig:
    # Lightning checkpoint of the final state.
    checkpoint: bool = True
    # PEFT adapter (`save_pretrained`, safetensors).
    adapter: bool = True
    # The adapted model with adapters merged into plain weights, loadable with
    # `from_pretrained` (only for strategies that can be merged).
    merged: bool = False
    # model/: the final model as a plain transformers folder (adapter merged where possible, zeros kept)
    # and reference/: the run's outputs on its test split; written only when reloading reproduces the run.
    model: bool = True


@dataclass
class MeasureConfig:
    # What compression runs report next to the task metric, compressed vs dense, in one process.
    # false: only the task metric and the parameter counts (no after-merge sparsity, size, latency or
    # fidelity, and no dense reference kept in memory): for sweeps that only read the task metric.
    enabled: bool = True
    # Batch sizes for the CPU latency / throughput measurement (empty: skip).
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    # Timed passes per model and batch size (alternating dense and compressed, after warm-up): the
    # measurement costs (latency_warmup + latency_repeats) x 2 forward passes per batch size, all recorded
    # in metrics.json (latency/repeats, latency/warmup, latency/batch_sizes).
    latency_repeats: int = 5
    latency_warmup: int = 2
    # Bytes on disk of the dense save (safetensors) and of the compressed save (bitmask-sparse or quantised).
    size: bool = True
    # Prediction agreement and mean KL(dense || compressed) on the test split.
    fidelity: bool = True
    # Evaluate the compressed model before training too (validation and test, as `before_fit/<stage>/<metric>`):
    # the figure a recovery run (prune, then LoRA) is judged against, in the same run as the final one.
    before_fit: bool = False

    def __post_init__(self) -> None:
        check(all(b >= 1 for b in self.latency_batch_sizes), "latency_batch_sizes", self.latency_batch_sizes,
              "a list of positive integers (empty: skip)")
        check(self.latency_repeats >= 1, "latency_repeats", self.latency_repeats, "an integer >= 1")
        check(self.latency_warmup >= 0, "latency_warmup", self.latency_warmup, "an integer >= 0")


@dataclass
class LmEvalConfig:
    # lm-evaluation-harness tasks run after training on the final model (empty: none), e.g.
    # [llmk_movie_sentiment, llmk_shakespeare_cloze] (local, offline) or lm-eval's [hellaswag, arc_easy]
    # (their datasets come from the hub). Figures: metrics.json `lm_eval/<task>/<metric>` (llmk_lab/lm_evaluation.py).
    tasks: list[str] = field(default_factory=list)
    # Few-shot examples per prompt (null: each task's own default, zero for the local ones).
    num_fewshot: Optional[int] = None
    # Documents per task (null: all).
    limit: Optional[int] = None
    batch_size: int = 8
    # Bootstrap resamples for the standard errors of non-mean metrics (lm-eval's default is 100,000: minutes on CPU).
    bootstrap_iters: int = 1000

    def __post_init__(self) -> None:
        check(all(isinstance(t, str) and t for t in self.tasks), "lm_eval.tasks", self.tasks, "a list of lm-eval task names")
        check(self.num_fewshot is None or self.num_fewshot >= 0, "lm_eval.num_fewshot", self.num_fewshot, "null or >= 0")
        check(self.limit is None or self.limit >= 1, "lm_eval.limit", self.limit, "null (all documents) or >= 1")
        check(self.batch_size >= 1, "lm_eval.batch_size", self.batch_size, "an integer >= 1")
        check(self.bootstrap_iters >= 0, "lm_eval.bootstrap_iters", self.bootstrap_iters, "an integer >= 0")


@dataclass
class EvalConfig:
    # Evaluations beyond the task's own metric.
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class SweepConfig:
    # Rerun into the same run/sweep directory (`hydra.sweep.dir=...`): skip jobs
    # that completed with the same resolved config, continue interrupted ones
    # from their last checkpoint, run the rest.
    resume: bool = False
    # With `resume`: run every job again from scratch, completed or not.
    force: bool = False
    # How often a job saves the checkpoint it can be resumed from (removed when
    # the job completes); steps, when > 0, take precedence over minutes; 0 and 0: never.
    checkpoint_every_n_steps: int = 0
    checkpoint_every_minutes: float = 10.0

    def __post_init__(self) -> None:
        check(self.checkpoint_every_n_steps >= 0, "checkpoint_every_n_steps", self.checkpoint_every_n_steps,
              "an integer >= 0")
        check(self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", self.checkpoint_every_minutes,
              "a number >= 0")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The PEFT strategy: schema from the `peft` registry, selected by `peft.method`.
    peft: Any = None
    # The compression method (or `chain`): schema from the `compression` registry.
    compression: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 42
    # Metric the run returns to Hydra's sweepers (e.g. Optuna) and a sweep report ranks by; null: the task's
    # primary metric on the test split (test/acc, test/f1, test/perplexity), see `tasks.optimized_metric`.
    optimized_metric: Optional[str] = None


def register_schemas() -> None:
    ConfigStore.instance().store(name="schema_run", node=RunConfig)
