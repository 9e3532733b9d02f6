"""stage=compare_selectors: the paper's Table 3 at small scale. Does the calibration loss predict recovery?

Every selector prunes the same teacher, every pruned model gets the same recovery budget, then all are evaluated.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl import distributed
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.io import save_json, save_text, write_atomically
from tinyfusion_pl.stages.common import resolve_teacher_checkpoint
from tinyfusion_pl.stages.evaluate import check_settings, run_evaluate
from tinyfusion_pl.stages.prune import run_prune
from tinyfusion_pl.stages.recover import run_recover

COLUMNS = ["selector", "kept_blocks", "calibration_loss", "fid", "conditional_accuracy"]


def variant_config(cfg: DictConfig, name: str, pruning_changes: DictConfig) -> DictConfig:
    """The run's config with this selector's pruning settings, writing into run_dir/<name>, teacher fixed."""
    variant = OmegaConf.to_container(cfg, resolve=True)
    variant["pruning"].update(OmegaConf.to_container(pruning_changes, resolve=True))
    variant["paths"]["run_dir"] = str(Path(cfg.paths.run_dir) / name)
    variant["teacher"]["checkpoint"] = str(resolve_teacher_checkpoint(cfg))
    variant["evaluate"]["models"] = ["pruned"]
    variant["evaluate"]["pruned_checkpoint"] = None
    return OmegaConf.create(variant)


def comparison_rows(cfg: DictConfig) -> list[dict[str, Any]]:
    """Prune, recover and evaluate once per selector in compare.selectors."""
    rows = []
    for name, changes in cfg.compare.selectors.items():
        variant = variant_config(cfg, name, changes)
        pruned = run_prune(variant)
        run_recover(variant)
        evaluation = run_evaluate(variant)["pruned"]
        rows.append({"selector": name, "kept_blocks": pruned["kept_blocks"],
                     "calibration_loss": pruned["calibration_loss"], "fid": evaluation["fid"],
                     "conditional_accuracy": evaluation.get("conditional_accuracy")})
    return rows


def comparison_markdown(rows: list[dict[str, Any]], teacher: dict[str, Any], cfg: DictConfig) -> str:
    def number(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        "# Selector comparison",
        "",
        f"Each selector keeps {len(rows[0]['kept_blocks'])} of {teacher['blocks']} blocks; every pruned model is "
        f"recovered for {cfg.recover.max_steps} steps (distill={cfg.distill.method}) and sampled the same way.",
        f"Teacher: FID {number(teacher['fid'], '.3f')}, conditional accuracy "
        f"{number(teacher.get('conditional_accuracy'), '.1%')}.",
        "",
        "| selector | kept blocks | calibration loss (after pruning) | FID (after recovery) | conditional accuracy |",
        "|---|---|---|---|---|",
        *[f"| {row['selector']} | {row['kept_blocks']} | {row['calibration_loss']:.4f} | {number(row['fid'], '.3f')} "
          f"| {number(row['conditional_accuracy'], '.1%')} |" for row in rows],
        "",
        "![calibration loss against FID](calibration_vs_fid.png)",
        "",
    ]
    return "\n".join(lines)


def plot_calibration_against_fid(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    scored = [row for row in rows if row["fid"] is not None]
    axes.scatter([row["calibration_loss"] for row in scored], [row["fid"] for row in scored], zorder=3)
    for row in scored:
        axes.annotate(row["selector"], (row["calibration_loss"], row["fid"]), fontsize=8, xytext=(4, 4),
                      textcoords="offset points")
    axes.set_xlabel("calibration loss right after pruning")
    axes.set_ylabel("FID after recovery")
    axes.set_title("Does the loss after pruning predict the quality after recovery?")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)
    return path


def run_compare_selectors(cfg: DictConfig) -> dict[str, Any]:
    """Write comparison.md, comparison.csv, comparison.json and calibration_vs_fid.png in the run folder."""
    if not cfg.get("compare") or not cfg.compare.get("selectors"):
        raise UsageError("stage=compare_selectors needs compare.selectors: use experiment=compare_selectors.")
    check_settings(cfg)  # before the teacher and every selector's run
    run_dir = Path(cfg.paths.run_dir)
    teacher_cfg = OmegaConf.merge(cfg, {"paths": {"run_dir": str(run_dir / "teacher")},
                                        "teacher": {"checkpoint": str(resolve_teacher_checkpoint(cfg))},
                                        "evaluate": {"models": ["teacher"]}})
    teacher = run_evaluate(teacher_cfg)["teacher"]
    rows = comparison_rows(cfg)
    distributed.on_rank_zero(write_comparison, cfg, teacher, rows)
    return {"teacher": teacher, "selectors": rows}


def write_comparison(cfg: DictConfig, teacher: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """comparison.csv, .json, .md and the calibration-against-FID plot (once, on global rank zero)."""
    run_dir = Path(cfg.paths.run_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({**row, "kept_blocks": " ".join(map(str, row["kept_blocks"]))} for row in rows)
    save_text(buffer.getvalue(), run_dir / "comparison.csv")
    save_json({"teacher": teacher, "selectors": rows}, run_dir / "comparison.json")
    plot_calibration_against_fid(rows, run_dir / "calibration_vs_fid.png")
    save_text(comparison_markdown(rows, teacher, cfg), run_dir / "comparison.md")
    print(f"Comparison: {run_dir / 'comparison.md'}")
