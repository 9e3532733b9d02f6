"""stage=pipeline (the default): teacher -> learnable pruning -> recovery -> evaluation -> report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tinyfusion_pl import distributed
from tinyfusion_pl.io import save_json, save_text
from tinyfusion_pl.loggers import log_artifact, log_images, log_table
from tinyfusion_pl.stages.common import (
    SAMPLING_SETTINGS,
    build_loggers,
    finish_loggers,
    model_title,
    pruned_checkpoint_name,
    read_decision,
    resolve_teacher_checkpoint,
    stage_dir,
)
from tinyfusion_pl.stages.evaluate import check_settings, run_evaluate
from tinyfusion_pl.stages.prune import run_prune
from tinyfusion_pl.stages.recover import run_recover

REPORTED = ("blocks", "params", "gflops", "samples_per_s", "steps_per_s", "fid", "conditional_accuracy")


def summary_metrics(evaluation: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: `teacher` and `pruned` with the reported figures, the speedup, and what was kept."""
    metrics = {name: {key: evaluation[name].get(key) for key in REPORTED} for name in ("teacher", "pruned")}
    metrics.update(
        speedup=evaluation["speedup"],
        ideal_speedup=evaluation["ideal_speedup"],
        kept_blocks=decision["kept_blocks"],
        selector=decision["selector"],
        calibration_loss=decision["calibration_loss"],
    )
    return metrics


def _cell(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report_markdown(cfg: DictConfig, metrics: dict[str, Any], seconds: dict[str, float]) -> str:
    """The run's report: the comparison table, the sample grids side by side, the decision dynamics."""
    rows = [("blocks", "d"), ("params", ",d"), ("gflops", ".4f"), ("samples_per_s", ".1f"), ("steps_per_s", ".1f"),
            ("fid", ".3f"), ("conditional_accuracy", ".1%")]
    teacher, pruned = metrics["teacher"], metrics["pruned"]
    lines = [
        f"# TinyFusion report: {model_title(cfg)} on {cfg.data._target_.rsplit('.', 1)[-1]}",
        "",
        f"Selector `{metrics['selector']}` kept blocks {metrics['kept_blocks']} of {teacher['blocks']}; "
        f"calibration loss right after pruning {metrics['calibration_loss']:.4f}.",
        f"Sampler: {sampler_description(cfg)}, CFG {cfg.sampling.cfg_scale}.",
        "",
        "| | teacher | pruned |",
        "|---|---|---|",
        *[f"| {name} | {_cell(teacher[name], spec)} | {_cell(pruned[name], spec)} |" for name, spec in rows],
        f"| speedup | 1.00x | {metrics['speedup']:.2f}x (ideal {metrics['ideal_speedup']:.2f}x) |",
        "",
        "## Samples (one column per class)",
        "",
        "| teacher | pruned |",
        "|---|---|",
        "| ![teacher](evaluate/samples_teacher.png) | ![pruned](evaluate/samples_pruned.png) |",
        "",
        "## Which blocks were kept, over the pruning run",
        "",
        "![decision dynamics](prune/decision_dynamics.png)",
        "",
        "## Time per stage",
        "",
        *[f"- {stage}: {value:.0f} s" for stage, value in seconds.items()],
        "",
    ]
    return "\n".join(lines)


def sampler_description(cfg: DictConfig) -> str:
    """The sampler's options as the report names them: "ddim 50 steps", or every option of a sampler without a method."""
    options = {key: value for key, value in cfg.sampling.items()
               if key not in SAMPLING_SETTINGS and key != "steps" and value is not None}
    if cfg.sampling.get("method") is not None:
        return f"{cfg.sampling.method} {cfg.sampling.steps} steps"
    return ", ".join([f"{cfg.sampling.steps} steps", *(f"{key} {value}" for key, value in options.items())])


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage on the configured model and data; write report.md and metrics.json in the run folder."""
    check_settings(cfg)  # a bad evaluate or sampling setting stops the run before anything is trained
    seconds: dict[str, float] = {}
    for stage, run in (("teacher", resolve_teacher_checkpoint), ("prune", run_prune), ("recover", run_recover),
                       ("evaluate", run_evaluate)):
        start = time.perf_counter()
        result = run(cfg)
        seconds[stage] = time.perf_counter() - start
    return distributed.on_rank_zero(write_report, cfg, result, seconds)


def write_report(cfg: DictConfig, evaluation: dict[str, Any], seconds: dict[str, float]) -> dict[str, Any]:
    """metrics.json, report.md and the W&B report run of a finished pipeline (once, on global rank zero)."""
    run_dir = Path(cfg.paths.run_dir)
    metrics = summary_metrics(evaluation, read_decision(run_dir / "prune"))
    save_json(metrics, run_dir / "metrics.json")
    save_text(report_markdown(cfg, metrics, seconds), run_dir / "report.md")
    log_report(cfg, metrics, run_dir)
    print(f"Report: {run_dir / 'report.md'}")
    return metrics


def log_report(cfg: DictConfig, metrics: dict[str, Any], run_dir: Path) -> None:
    """Send the report to the configured loggers as its own run: table, images, and the pruned checkpoints."""
    loggers = build_loggers(cfg, "report")
    if not loggers:
        return
    columns = ["model", *REPORTED, "speedup"]
    rows = [[name, *[metrics[name][key] for key in REPORTED], 1.0 if name == "teacher" else metrics["speedup"]]
            for name in ("teacher", "pruned")]
    log_table(loggers, "report/table", columns, rows)
    log_images(loggers, {"report/samples_teacher": run_dir / "evaluate" / "samples_teacher.png",
                         "report/samples_pruned": run_dir / "evaluate" / "samples_pruned.png",
                         "report/decision_dynamics": run_dir / "prune" / "decision_dynamics.png"})
    log_artifact(loggers, "pruned", run_dir / "prune" / pruned_checkpoint_name(run_dir / "prune"))
    log_artifact(loggers, "recovered", run_dir / "recover" / "model.pt")
    finish_loggers(loggers, stage_dir(cfg, "report"))
