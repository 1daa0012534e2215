"""Hardware: the devices a run asks for, CPU threads per process, and distributed runs on Lightning's strategies.

- `check_available`: the hardware asked for is there (`hardware=gpu` without CUDA is one line, exit code 2).
- `resolve_threads`: `hardware.threads=auto` divides this machine's cores among the jobs running at once
  (the joblib launcher's `n_jobs`) and the processes of each job (DDP on CPU); the decision goes in the
  manifest.
- Distributed runs are Lightning's DDP / FSDP strategies, unchanged but for how they start the other
  processes of a run under Hydra: Lightning re-runs the command line (`sys.argv`), which inside a multirun
  re-runs the whole sweep. `HydraJobLauncher` starts them as single runs of the one job instead, with the
  job's own overrides. Every process builds the same data, model and one-shot compression from the same
  config and seed; `ReplicaCheck` asserts they are bit-identical before training. Only rank zero writes
  the run directory (`run_dir_for_rank`): the others work in a scratch folder removed when they exit, so
  a run has one run directory, one `metrics.json`, one tracked run and its exports written once. Every rank
  reads it (`job_dir`, with rank zero's config hash, `shared_fingerprint`) to decide alike whether the job is
  done or continues from a checkpoint.
  Under SLURM the processes are started by `srun` (one task per device) and Lightning reads the layout
  from SLURM's environment.
- FSDP: the one wrapper made for fit also serves validate and test; after evaluation every rank sends its
  shards so that rank zero's modules hold the whole model for the stages it runs alone, and the final
  checkpoint is saved by all ranks (`leave_distributed`); `plan.fsdp_refusal` names what shards rule out.

Only light imports at module level: the command line imports this before a run starts.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from llmk_lab.errors import UserError

log = logging.getLogger(__name__)

DISTRIBUTED_STRATEGIES = ("ddp", "ddp_spawn", "fsdp")
# Environment the launcher sets for a run's processes; removed again before the next job of a sweep starts.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_launched_here = False  # this process started the other processes of a run (and set _LAUNCH_ENV)
# What `prepare` decided, recorded in the manifest (`hardware.threads`, `hardware.threads_rule`).
decisions: dict[str, Any] = {}


# --- ranks ---------------------------------------------------------------------------------------------------

def is_rank_zero() -> bool:
    """Whether this process is rank zero of its run, from the launcher's environment (True outside
    distributed runs), read as Lightning reads it but without importing Lightning."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"]) == 0
    if os.environ.get("SLURM_PROCID", "").isdigit() and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(os.environ["SLURM_PROCID"]) == 0
    return all(int(os.environ.get(key, "0") or 0) == 0 for key in ("NODE_RANK", "LOCAL_RANK", "JSM_NAMESPACE_RANK"))


def run_dir_for_rank(run_dir: Path) -> Path:
    """Rank zero writes the run directory; any other rank of a distributed run gets a scratch folder,
    removed when the process exits (it holds that rank's copy of logs and exports, which nobody reads)."""
    if is_rank_zero():
        return run_dir
    import atexit
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f"llmk_lab-rank{os.environ.get('RANK', os.environ.get('LOCAL_RANK', 'n'))}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    _stands_in_for[scratch] = Path(run_dir)
    return scratch


_stands_in_for: dict[Path, Path] = {}  # a rank's scratch folder -> the run directory rank zero writes
# Rank zero's config hash, passed to the ranks it starts (whose own hash differs: they run without tracking).
CONFIG_HASH_ENV = "LLMK_LAB_RANK_ZERO_CONFIG_HASH"
_config_hash: Optional[str] = None


def shared_fingerprint(own: str) -> str:
    """The config hash every rank of a run decides by (a completed job, a checkpoint of the same config):
    rank zero's. A rank that rank zero started runs the job's overrides with `logger=none` (`child_command`),
    which changes its resolved config, not the experiment; it gets rank zero's hash from the environment."""
    global _config_hash
    if not is_rank_zero() and os.environ.get(CONFIG_HASH_ENV):
        return os.environ[CONFIG_HASH_ENV]
    _config_hash = own
    return own


def job_dir(run_dir: Path) -> Path:
    """The run directory every rank of a run reads: `run_dir` itself, or for another rank's scratch folder the
    run directory rank zero writes. What decides whether a job is done or continues from a checkpoint is
    there, and every rank must decide alike (a rank that started afresh while rank zero resumed would wait on
    collectives rank zero never makes)."""
    return _stands_in_for.get(Path(run_dir), Path(run_dir))


# --- what is there -------------------------------------------------------------------------------------------

def _device_count(hw) -> Optional[int]:
    """Devices per node the run asks for, as a number (None: Lightning decides, e.g. `auto`)."""
    devices = hw.devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        if devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        elif "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        else:
            return None
    if devices == -1:
        if hw.accelerator in ("gpu", "cuda"):
            import torch

            return torch.cuda.device_count()
        return None
    return int(devices)


def check_available(hw) -> None:
    """The accelerator, device count and precision asked for exist here; one line naming the key otherwise."""
    import torch

    if hw.accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"hardware.accelerator={hw.accelerator!r}: no CUDA GPU is visible to torch "
                            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use hardware=cpu, "
                            "or install torch's CUDA build on a GPU machine")
        wanted, present = _device_count(hw), torch.cuda.device_count()
        if wanted is not None and wanted > present:
            raise UserError(f"hardware.devices={hw.devices!r}: this machine has {present} CUDA GPU(s); "
                            f"ask for at most {present} (or -1 for all of them)")
    if hw.accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("hardware.accelerator='mps': Apple's MPS backend is not available here; use hardware=cpu")
    on_cpu = hw.accelerator == "cpu" or (hw.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and str(hw.precision).startswith("16"):
        raise UserError(f"hardware.precision={hw.precision!r} needs a GPU (float16 on CPU is not supported by "
                        "Lightning); on CPU use 32-true or bf16-mixed")
    if on_cpu and not (hw.devices == "auto" or (isinstance(hw.devices, int) and hw.devices >= 1)):
        raise UserError(f"hardware.devices={hw.devices!r} on CPU: give the number of processes (an integer >= 1, "
                        "e.g. 2 with hardware.strategy=ddp); -1 and GPU index lists are for GPUs")
    if hw.strategy == "fsdp" and on_cpu:
        raise UserError("hardware.strategy='fsdp' needs CUDA GPUs (Lightning's FSDP runs on GPUs); on CPU use "
                        "hardware.strategy=ddp")


# --- threads -------------------------------------------------------------------------------------------------

def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (taskset, SLURM's cgroup)
    except AttributeError:
        return os.cpu_count() or 1


def parallel_jobs(cores: int) -> tuple[int, str]:
    """How many jobs of this sweep run at once on this machine, and what says so."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # pragma: no cover
        return 1, "not a Hydra run"
    if not HydraConfig.initialized():
        return 1, "one job"
    hydra_cfg = HydraConfig.get()
    launcher = hydra_cfg.get("launcher") or {}
    target = str(launcher.get("_target_", ""))
    if "joblib" in target.lower():
        n_jobs = launcher.get("n_jobs")
        n_jobs = int(n_jobs) if n_jobs is not None else 1
        # joblib's convention: -1 is every core, -2 all but one, ...
        n = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)
        return n, f"joblib launcher n_jobs={n_jobs}"
    if "submitit" in target.lower() and launcher.get("cpus_per_task"):
        # Each job has its own cores (SLURM) or shares this machine (submitit's local executor).
        return max(1, cores // int(launcher.cpus_per_task)), f"submitit launcher cpus_per_task={launcher.cpus_per_task}"
    return 1, "jobs one after another"


def processes_per_job(hw) -> int:
    """Processes one job runs on this machine: one per device with DDP, one otherwise."""
    if hw.strategy not in DISTRIBUTED_STRATEGIES:
        return 1
    return max(1, _device_count(hw) or 1)


def resolve_threads(hw, cores: Optional[int] = None) -> tuple[Optional[int], str]:
    """(torch threads for this process or None for torch's default, why)."""
    threads = hw.threads
    if threads is None:
        return None, "torch's default"
    if str(threads) != "auto":
        return int(threads), "hardware.threads"
    cores = cores or available_cores()
    jobs, source = parallel_jobs(cores)
    processes = processes_per_job(hw)
    share = max(1, cores // (jobs * processes))
    rule = f"auto: {cores} cores / ({jobs} parallel jobs [{source}] x {processes} processes per job)"
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and 0 < int(limit) < share:  # an explicit limit of the environment (a cluster, a test run)
        return int(limit), f"{rule}, capped by OMP_NUM_THREADS={limit}"
    return share, rule


def prepare(hw) -> dict[str, Any]:
    """Check the hardware, set this process's torch threads; returns (and keeps for the manifest) the decision."""
    import torch

    check_available(hw)
    threads, rule = resolve_threads(hw)
    if threads:
        torch.set_num_threads(threads)
        # Lightning's launcher otherwise picks its own count for the processes it starts.
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    decisions.clear()
    decisions.update({"threads": torch.get_num_threads(), "threads_rule": rule,
                      "processes_per_job": processes_per_job(hw)})
    return dict(decisions)


# --- distributed strategies ----------------------------------------------------------------------------------

def reset_after_previous_job() -> None:
    """A sweep's next job in this process starts its own process group: close the previous one and drop
    the launch environment it left (Lightning would otherwise join the old, finished group)."""
    global _launched_here
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _launched_here:
        for key in _LAUNCH_ENV:
            os.environ.pop(key, None)
        _launched_here = False


def leave_distributed(trainer, final_checkpoint: Optional[Path] = None) -> None:
    """After the distributed evaluation: the other ranks end their run (nothing they would measure or
    export is read), rank zero closes the process group and measures and exports on its own, so that
    nothing after this point waits for a collective.

    FSDP first needs every rank once more: each holds only its shard of every parameter, and the stages
    after this read rank zero's modules directly (parameter counts, sparsity, exports), so rank zero takes
    the full parameters into them (`gather_full_parameters`); and a Lightning checkpoint of an FSDP model is
    gathered from every rank too, so `final_checkpoint` (the export's `last.ckpt`) is saved here, by all of
    them, and `save_checkpoint` later finds it written."""
    import torch.distributed as dist

    if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    if is_sharded(trainer):
        if final_checkpoint is not None:
            trainer.save_checkpoint(final_checkpoint)  # FSDP broadcasts rank zero's path; rank zero writes it
            _saved_together.add(str(final_checkpoint))
        gather_full_parameters(trainer)
    trainer.strategy.barrier("llmk_lab.leave_distributed")
    if not trainer.is_global_zero:
        log.info("rank %d: evaluation done; rank zero measures and exports", trainer.global_rank)
        dist.destroy_process_group()
        sys.exit(0)
    dist.destroy_process_group()


_saved_together: set[str] = set()  # checkpoints the processes of an FSDP run saved before rank zero went on alone


def save_checkpoint(trainer, path: Path) -> None:
    """`trainer.save_checkpoint(path)`, unless the processes of a sharded run saved it together before rank
    zero went on alone (`leave_distributed`): on its own, rank zero cannot gather the other ranks' shards."""
    if str(path) in _saved_together:
        _saved_together.discard(str(path))
        return
    trainer.save_checkpoint(path)


def is_sharded(trainer) -> bool:
    """Whether the trainer's model is wrapped in FSDP (each rank holding a shard of each parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(getattr(trainer.strategy, "model", None), FullyShardedDataParallel)


def gather_full_parameters(trainer) -> None:
    """Every rank sends its shards; rank zero's modules then hold every parameter whole, as plain tensors on
    its device, for the stages it runs alone. (Under FSDP with `use_orig_params`, the module's parameters are
    views of each rank's flat shard outside forward and backward: 1-D and partial.) Collective: call it on
    every rank, after the last forward pass through the FSDP wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped, module = trainer.strategy.model, trainer.lightning_module
    # On GPUs the whole model is gathered into CPU memory, not next to the optimiser state on rank zero's GPU.
    offload = trainer.strategy.root_device.type != "cpu"
    full: dict[str, Any] = {}
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=True,
                                                     offload_to_cpu=offload):
        if trainer.is_global_zero:
            full = {name: param.detach().clone() for name, param in module.named_parameters()}
    if trainer.is_global_zero:
        for name, param in module.named_parameters():
            param.data = full[name].to(param.device)


def child_command(local_rank: int) -> list[str]:
    """The command for another process of this job: a single run with the job's overrides (never the
    sweep), writing nothing to the run directory (see `run_dir_for_rank`), tracking nothing."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").split("=", 1)[0].split(".")[0] == "logger"]
    command = [sys.executable, "-m", "llmk_lab", "--config-name", hydra_cfg.job.config_name]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            command += ["--config-dir", source.path]
    run_dir = str(hydra_cfg.runtime.output_dir).replace("\\", "\\\\").replace("'", "\\'")
    return command + [*overrides, "logger=none", f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null",
                      f"hydra.job.name=rank_{local_rank}"]


def _hydra_job_launcher():
    from lightning_fabric.strategies.launchers.subprocess_script import _launch_process_observer
    from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    class HydraJobLauncher(_SubprocessScriptLauncher):
        """Lightning's launcher for the processes of one run, started as single runs of this Hydra job."""

        def launch(self, function, *args, trainer=None, **kwargs):
            global _launched_here
            self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
            if not self.cluster_environment.creates_processes_externally:
                self._call_children_scripts()
                _launched_here = True
                _launch_process_observer(self.procs)
            _set_num_threads_if_needed(num_processes=self.num_processes)  # as Lightning's launcher does
            return function(*args, **kwargs)

        def _call_children_scripts(self) -> None:
            import subprocess

            self._check_can_spawn_children()
            os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
            os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
            os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
            os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
            os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
            for local_rank in range(1, self.num_processes):
                env = {**os.environ, "LOCAL_RANK": str(local_rank)}
                if _config_hash:
                    env[CONFIG_HASH_ENV] = _config_hash
                if os.environ.get("PL_GLOBAL_SEED") is None:
                    env.pop("PL_GLOBAL_SEED", None)
                command = child_command(local_rank)
                log.info("starting rank %d of this run: %s", local_rank, " ".join(command))
                self.procs.append(subprocess.Popen(command, env=env, cwd=os.getcwd()))

    return HydraJobLauncher


def strategy(hw):
    """What `Trainer(strategy=...)` gets: the name, or for DDP/FSDP inside a Hydra run the same Lightning
    strategy whose other processes are started as single runs of this job."""
    name = hw.strategy
    if name not in ("ddp", "fsdp"):
        return name
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        external = any(key in os.environ for key in ("LOCAL_RANK", "RANK", "SLURM_NTASKS", "JSM_NAMESPACE_RANK"))
        if processes_per_job(hw) > 1 and not external:
            # Lightning would start the other processes by re-running this program's command line (a
            # notebook's kernel, pytest, ...), each then doing whatever that command does.
            raise UserError(f"hardware.strategy={name!r} with {processes_per_job(hw)} processes needs the "
                            "command line (`python -m llmk_lab ...`) or a launcher such as torchrun or srun")
        return name
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

    base = DDPStrategy if name == "ddp" else FSDPStrategy
    launcher_cls = _hydra_job_launcher()

    class HydraAware(base):  # type: ignore[misc, valid-type]
        def _configure_launcher(self) -> None:
            super()._configure_launcher()
            if type(self._launcher).__name__ == "_SubprocessScriptLauncher":
                self._launcher = launcher_cls(self.cluster_environment, self.num_processes, self.num_nodes)

        def _setup_model(self, model):
            # Lightning wraps the module again for validate and test after fit. Under FSDP (with Lightning's
            # use_orig_params=True) the module's parameters are by then views of each rank's flat shard, which a
            # second wrapper would take for whole parameters ("'weight' must be 2-D"): the first one serves all.
            kept = getattr(self, "_llmk_wrapped", None)
            if base is FSDPStrategy and kept is not None and kept.module is model:
                return kept
            wrapped = super()._setup_model(model)
            self._llmk_wrapped = wrapped
            return wrapped

    HydraAware.__name__ = HydraAware.__qualname__ = f"HydraAware{base.__name__}"
    return HydraAware()


# --- every rank holds the same model -------------------------------------------------------------------------

def replica_digest(module) -> str:
    """sha256 over every parameter and buffer (pruning masks included), in name order."""
    digest = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def check_replicas(digests: list[str]) -> None:
    if len(set(digests)) > 1:
        raise RuntimeError("the processes of this distributed run hold different models before training "
                           f"(digests by rank: {[d[:12] for d in digests]}): one-shot compression or "
                           "initialisation is not deterministic across processes")


def replica_check_callback():
    import pytorch_lightning as pl

    class ReplicaCheck(pl.Callback):
        """Before DDP wraps the model (and would broadcast rank zero's weights and buffers over the others'),
        assert every rank built the same model: same weights, same pruning masks, same adapters."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if trainer.world_size < 2 or stage != "fit":
                return
            import torch.distributed as dist

            digests: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(digests, replica_digest(pl_module))
            check_replicas(digests)
            if trainer.is_global_zero:
                log.info("all %d processes hold the same model (sha256 %s)", trainer.world_size, digests[0][:16])

    return ReplicaCheck()


def gradient_checkpointing_callback():
    import pytorch_lightning as pl

    class GradientCheckpointing(pl.Callback):
        """Recompute each block's activations in the backward pass instead of keeping them (transformers'
        gradient checkpointing, non-reentrant so frozen inputs under PEFT still get gradients)."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            model = pl_module.model
            # transformers 5 names it activation checkpointing; older releases gradient checkpointing.
            enable = getattr(model, "activation_checkpointing_enable", None)
            kwargs_name = "activation_checkpointing_kwargs"
            if enable is None:
                enable, kwargs_name = getattr(model, "gradient_checkpointing_enable", None), "gradient_checkpointing_kwargs"
            if enable is None or not getattr(model, "supports_gradient_checkpointing", True):
                raise UserError(f"hardware.gradient_checkpointing=true: {type(model).__name__} does not support "
                                "gradient checkpointing")
            enable(**{kwargs_name: {"use_reentrant": False}})

    return GradientCheckpointing()
