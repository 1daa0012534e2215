"""Command line: `python -m llmk_lab [overrides]` / `llmk_lab [overrides]`, Hydra underneath."""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from llmk_lab.config_errors import HELP_FLAGS as _HELP_FLAGS
from llmk_lab.config_errors import help_text, producer_hint
from llmk_lab.config_errors import install as _report_config_errors_in_one_line
from llmk_lab.errors import PREEMPTED_EXIT_CODE, UserError
from llmk_lab.hardware import job_dir, run_dir_for_rank, shared_fingerprint
from llmk_lab.manifest import write_json
from llmk_lab.paths import config_dir, file_lock, lock_holder
from llmk_lab.light_schemas import check_values_lightly, register_all
from llmk_lab.sweep import completed_metrics, config_fingerprint, job_name, mark_completed, sweep_group

log = logging.getLogger("llmk_lab")

RUN_LOCK = ".lock"  # in the run directory, held while a run works in it


def _holds_no_result(run_dir: Path) -> bool:
    return all(p.name in (".hydra", "llmk_lab.log", "manifest.json", "config.yaml", "csv", "wandb", RUN_LOCK)
               for p in run_dir.iterdir())


def _quiet_library_chatter() -> None:
    """Keep the console to what a user acts on: progress, warnings about their run, the result."""
    import warnings

    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=r".*weights_only.*")


def run_job(cfg: DictConfig) -> float:
    """Run one job; the return value is the metric Hydra's sweepers optimise.

    Bad input in a single run: one line on stderr, exit code 2, and the run
    directory removed when it holds nothing but what this run just wrote.
    In a multirun a failing job is recorded in `failed.json` and the sweep goes on.
    """
    _quiet_library_chatter()
    hydra_cfg = HydraConfig.get()
    run_dir = run_dir_for_rank(Path(hydra_cfg.runtime.output_dir))  # only rank zero writes the run dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
    name = job_name(overrides, sweep_dir)
    group = sweep_group(sweep_dir) if multirun else None
    # One run per run directory at a time (two launches aimed at one `hydra.run.dir`, a sweep started twice
    # over one folder): the second is refused before it writes anything. The kernel drops the lock when its
    # holder dies, so a job killed with `kill -9` never blocks its own resume.
    with file_lock(run_dir / RUN_LOCK, wait=False) as held:
        if held is None:
            line = (f"run directory {run_dir} is in use by another run (process {lock_holder(run_dir / RUN_LOCK)}); "
                    "wait for it to end, or give this run another hydra.run.dir / hydra.sweep.dir")
            if multirun:
                log.error("job refused: %s", line)
                return math.nan
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        return _run_unlocked(cfg, run_dir, name, group, overrides, multirun)


def _run_unlocked(cfg: DictConfig, run_dir: Path, name: str, group, overrides: list[str], multirun: bool) -> float:
    fingerprint = config_fingerprint(cfg)
    if cfg.sweep.resume and not cfg.sweep.force:
        # Rank zero's metrics and config hash: every rank of a distributed job decides alike.
        previous = completed_metrics(job_dir(run_dir), shared_fingerprint(fingerprint))
        if previous is not None:
            log.info("skipping %s: it completed with the same config (sweep.force=true runs it again)", run_dir)
            return _objective(previous, cfg.optimized_metric)
    if multirun:  # results of an earlier attempt in this job's directory must not pass for this one's
        for stale in ("metrics.json", "failed.json"):
            (run_dir / stale).unlink(missing_ok=True)
    try:
        check_values_lightly(cfg)  # a bad value is refused in a fraction of a second, before torch is imported
        from llmk_lab.run import run  # heavy imports only once the config's values are known to be good

        metrics = run(cfg, run_dir, run_name=name, group=group, overrides=overrides)
        mark_completed(run_dir, fingerprint)
    except SystemExit as stop:
        # Lightning's SIGTERM path (a scheduler's preemption or time limit; SIGUSR1 is made SIGTERM) ends
        # fit with SIGTERMException once the resume checkpoint is written: exit as an interrupted job.
        # Both imported by the run already (the command line itself stays light).
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        from llmk_lab.jobs import resume_checkpoint_path

        if not isinstance(stop, SIGTERMException):
            raise
        print(f"stopped by a signal; run again with sweep.resume=true to continue from "
              f"{resume_checkpoint_path(run_dir)}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (UserError, Exception) as err:  # noqa: B014  (UserError first: it is the expected case)
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, UserError):
            line += producer_hint(line)  # a missing path that another experiment writes: say which
        if isinstance(err, UserError) and not multirun and not os.environ.get("HYDRA_FULL_ERROR"):
            if _holds_no_result(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                _remove_empty_parents(run_dir.parent)  # the date folder (and outputs/) Hydra made for this run
            else:
                write_json(run_dir / "failed.json", {"error": line, "type": type(err).__name__})
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        full_disk = full_disk_line(err, run_dir)
        if full_disk:
            line = full_disk
        with contextlib.suppress(OSError):  # on a full disk even this small file may not fit
            write_json(run_dir / "failed.json", {"error": line, "type": type(err).__name__,
                                                 "overrides": overrides, "traceback": traceback.format_exc()})
        if multirun:
            log.error("job failed: %s", line)
            return math.nan
        if full_disk and not os.environ.get("HYDRA_FULL_ERROR"):
            print(f"error: {line}", file=sys.stderr)
            sys.exit(1)
        raise
    return _objective(metrics, cfg.optimized_metric)


# How a full file system shows through the libraries that write our files: an OSError's errno (json, shutil),
# torch.save's stream writer (no errno, only its message) and safetensors (Rust's StorageFull).
_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_DISK_MESSAGES = ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed")


def full_disk_line(err: BaseException, run_dir: Path) -> str | None:
    """One line for an error that a full file system caused (naming the path and what is kept), else None."""
    path, seen = None, err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_DISK_ERRNOS:
            path = seen.filename or run_dir
            break
        if any(message in str(seen) for message in _FULL_DISK_MESSAGES):
            path = run_dir
            break
        seen = seen.__cause__ or seen.__context__
    if path is None:
        return None
    kept = " (metrics.json holds every figure measured so far)" if (run_dir / "metrics.json").exists() else ""
    return (f"no space left on the device writing {path}; the files written before it are whole{kept}: "
            f"free space and run the same command with sweep.resume=true")


def _remove_empty_parents(folder: Path) -> None:
    """Remove `folder` and its parents while they are empty, up to (not including) the working directory."""
    cwd = Path.cwd().resolve()
    folder = folder.resolve()
    while folder != cwd and cwd in folder.parents:
        try:
            folder.rmdir()  # refuses (OSError) when anything else is in it
        except OSError:
            return
        folder = folder.parent


def _objective(metrics: dict, setting: str | None) -> float:
    """The value the sweepers optimise: the metric the run recorded as its `optimized_metric` (the setting,
    or the task's primary metric when it is null); NaN, said once in the log, when the run does not have it."""
    key = metrics.get("optimized_metric") or setting
    value = metrics.get(key) if key else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        task_metrics = sorted(k for k, v in metrics.items() if k.startswith(("val/", "test/")) and
                              isinstance(v, (int, float)))
        log.warning("optimized_metric=%s is not among the run's metrics; the sweeper gets NaN (allowed: one of "
                    "%s)", key, task_metrics)
        return math.nan
    return float(value)


def _find_our_hydra_plugins() -> None:
    """Let Hydra's plugin scan (a walk over `hydra_plugins.__path__`) see our Ray launcher in an editable
    install too: there our packages are mapped by an import hook, which a namespace package's path does not
    include. A regular install puts `hydra_plugins/llmk_lab_ray_launcher` beside the other plugins."""
    import hydra_plugins

    ours = Path(__file__).resolve().parent.parent / "hydra_plugins"
    if ours.is_dir() and str(ours) not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(str(ours))


def main() -> None:
    if _HELP_FLAGS & set(sys.argv[1:]):
        print(help_text())  # from the YAML files alone: no schemas, no heavy imports
        return
    register_all()
    _find_our_hydra_plugins()
    _report_config_errors_in_one_line()
    # Hydra reads sys.argv itself; the decorator is applied here so the config
    # directory can be found at run time.
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(run_job)()


if __name__ == "__main__":
    main()
