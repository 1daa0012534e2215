"""Sweeps: naming and grouping the jobs of a multirun, resuming an interrupted one, and the report at its end.

What a sweep directory holds (`sweep.json`: which keys the sweep varies, the
metric it optimises and in which direction) is in `sweep_layout`. Jobs name
their tracked run after the keys they vary; the report reads the same file.
This module depends on the report (it writes it when a multirun ends), never
the other way round.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from llmk_lab.manifest import write_json
from llmk_lab.report import write_report

# Naming of a sweep directory and its jobs lives in sweep_layout, shared with the report.
from llmk_lab.sweep_layout import (CONTROL_KEYS, SWEEP_FILE, infer_direction, is_control_key, override_key,  # noqa: F401
                                   read_sweep_info, sweep_group)
from llmk_lab.paths import write_text_atomically

log = logging.getLogger(__name__)

def swept_keys(multirun_overrides: Iterable[str], sweeper_params: Optional[dict]) -> list[str]:
    """Keys a multirun varies: command-line sweeps (`a=1,2`, `choice(...)`, `range(...)`) and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list((sweeper_params or {}).keys())
    try:
        parsed = OverridesParser.create().parse_overrides(list(multirun_overrides))
    except Exception:  # noqa: BLE001  (an override Hydra itself accepted; naming must never fail a job)
        parsed = []
    keys += [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return sorted({k for k in keys if not is_control_key(k)})


def job_name(overrides: list[str], sweep_dir: Optional[Path]) -> str:
    """A job's tracked-run name: the overrides of the keys its sweep varies (all of them outside a sweep)."""
    varied = set(read_sweep_info(sweep_dir).get("swept_keys", [])) if sweep_dir else set()
    chosen = [o for o in overrides if override_key(o) in varied] if varied else \
        [o for o in overrides if not is_control_key(override_key(o))]
    return ",".join(chosen) or "default"


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of the resolved config without the run controls (`sweep.*`: resume flags, checkpoint timing)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in CONTROL_KEYS:
        plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed_metrics(run_dir: Path, fingerprint: str) -> Optional[dict[str, Any]]:
    """The metrics of a job that finished in `run_dir` with the same config, else None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("config_hash") == fingerprint else None


def mark_completed(run_dir: Path, fingerprint: str) -> None:
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["config_hash"] = fingerprint
    write_json(path, metrics)


# --- the multirun callback -------------------------------------------------------------------------------------

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover  (hydra-core < 1.1)
    Callback = object  # type: ignore[misc,assignment]


def _direction(sweeper_cfg: Any, metric: Optional[str]) -> Optional[str]:
    """The sweeper's direction, else the metric's (None while the metric is the task's, known once a job ran)."""
    direction = OmegaConf.select(sweeper_cfg, "direction", default=None) if sweeper_cfg is not None else None
    if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction):
        direction = direction[0] if len(direction) else None
    if direction is not None:
        return str(getattr(direction, "name", direction)).lower()
    return infer_direction(metric) if metric else None


class SweepReport(Callback):
    """Registered under `hydra.callbacks`: writes `sweep.json` when a multirun starts and the report when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        sweep_dir = Path(hydra_cfg.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = OmegaConf.to_container(hydra_cfg.sweeper.params, resolve=False) \
            if OmegaConf.select(hydra_cfg, "sweeper.params") else {}
        # null: each job's task decides (`tasks.optimized_metric`); the report reads it from the jobs' metrics.json.
        metric = config.get("optimized_metric")
        info = {
            "group": sweep_group(sweep_dir),
            "swept_keys": swept_keys(hydra_cfg.overrides.task, params),
            "optimized_metric": metric,
            "direction": _direction(hydra_cfg.sweeper, metric),
            "sweeper": str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="")),
            "launcher": str(OmegaConf.select(hydra_cfg, "launcher._target_", default="")),
            "overrides": list(hydra_cfg.overrides.task),
        }
        write_text_atomically(sweep_dir / SWEEP_FILE, json.dumps(info, indent=2) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = write_report(sweep_dir)
        except Exception:  # noqa: BLE001  (the jobs' results are on disk; a broken report must not hide them)
            log.exception("the sweep report could not be written; rerun `python -m llmk_lab.report %s`", sweep_dir)
            return
        log.info("sweep report: %s (%d configurations, %d failed jobs)", result.markdown, len(result.rows),
                 len(result.failures))
