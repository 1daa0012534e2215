"""A Hydra launcher that runs the jobs of a sweep as Ray tasks, on a running Ray cluster or on one it starts
on this machine: `python -m llmk_lab -m +launcher=ray ...` (conf/launcher/ray.yaml).

Hydra's own Ray plugin (hydra-ray-launcher) pins cloudpickle < 3, which the joblib launcher's joblib (>= 1.4)
cannot install beside, so the sweep machinery goes through Ray's task API directly, as Hydra's joblib
launcher goes through joblib: each job is Hydra's `run_job` on the job's own config, in a Ray worker that
asks for the job's share of the cluster (`num_cpus`, `num_gpus`), so Ray runs as many at once as fit.
Every job writes its own directory under `hydra.sweep.dir`, which must be on storage every node sees.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.llmk_lab_ray_launcher.ray_launcher.RayLauncher"
    # A running cluster's address (`auto`: the one `ray start` made on this machine; `ray://host:10001`: a
    # remote one through Ray Client), or null to start a private Ray on this machine for the sweep.
    address: Optional[str] = None
    num_cpus: int = 1  # what each job asks for: Ray runs a job where this much of the cluster is free
    num_gpus: float = 0  # a fraction shares a GPU between jobs
    # Further keyword arguments of ray.init (e.g. num_cpus of a private Ray, runtime_env).
    init: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="llmk_lab_ray", node=RayLauncherConf,
                             provider="llmk_lab")


def _execute_job(index: int, overrides: Sequence[str], hydra_context: HydraContext, config: DictConfig,
                 task_function: TaskFunction, singleton_state: dict) -> JobReturn:
    """One job in a Ray worker: Hydra's state as the launching process had it, then the job's own config.
    The worker starts where `ray start` ran; the job works where the sweep was launched, as in a sequential
    sweep (relative paths: the sweep directory, data files), which is why that folder must be shared."""
    os.chdir(config.hydra.runtime.cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{index}"
        sweep_config.hydra.job.num = index
    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class RayLauncher(Launcher):
    def __init__(self, address: Optional[str] = None, num_cpus: int = 1, num_gpus: float = 0,
                 init: Optional[dict] = None) -> None:
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.init_kwargs = dict(init or {})
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray  # lazy: Hydra imports every launcher plugin at start-up, Ray takes seconds

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, log_to_driver=True, **OmegaConf.to_container(OmegaConf.create(
                self.init_kwargs), resolve=True))
        log.info("Ray (%s) is launching %d jobs, %s CPU and %s GPU each; sweep output dir: %s",
                 self.address or "started for this sweep", len(job_overrides), self.num_cpus, self.num_gpus,
                 sweep_dir)
        for index, overrides in enumerate(job_overrides):
            log.info("\t#%d : %s", initial_job_idx + index, " ".join(filter_overrides(overrides)))
        remote_job = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_execute_job)
        singleton_state = Singleton.get_state()
        futures = [remote_job.remote(initial_job_idx + index, list(overrides), self.hydra_context, self.config,
                                     self.task_function, singleton_state)
                   for index, overrides in enumerate(job_overrides)]
        try:
            return ray.get(futures)
        finally:
            if started_here:
                ray.shutdown()
