"""The stages that train.py runs; `run_stage(cfg)` is the plain function behind the Hydra entry point."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.stages.checks import check_config
from tinyfusion_pl.stages.common import run_pretrain, start_processes
from tinyfusion_pl.stages.compare_selectors import run_compare_selectors
from tinyfusion_pl.stages.evaluate import run_evaluate
from tinyfusion_pl.stages.pipeline import run_pipeline
from tinyfusion_pl.stages.prune import run_prune
from tinyfusion_pl.stages.recover import run_recover
from tinyfusion_pl.stages.recoverability import run_recoverability

STAGES = {"pretrain": run_pretrain, "prune": run_prune, "recover": run_recover, "evaluate": run_evaluate,
          "pipeline": run_pipeline, "compare_selectors": run_compare_selectors, "recoverability": run_recoverability}


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage named by `cfg.stage` and return its metrics."""
    if cfg.stage not in STAGES:
        raise UsageError(f"stage='{cfg.stage}' is not one of {sorted(STAGES)}. Pass e.g. stage=pretrain.")
    check_config(cfg)  # a setting that cannot work stops the run here: once, before processes start or files exist
    start_processes(cfg)  # one process per device; every rank then runs the stage
    return STAGES[cfg.stage](cfg)
