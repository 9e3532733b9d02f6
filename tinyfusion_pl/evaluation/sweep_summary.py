"""The summary of a Hydra multirun: one CSV row and one Pareto-plot point (FID against speedup) per job."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl.io import save_text, write_atomically

COLUMNS = ["job", "overrides", "blocks", "params", "gflops", "samples_per_s", "speedup", "fid", "conditional_accuracy"]


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of the sweep that wrote metrics.json, in job order.

    `overrides` lists only the overrides that differ between jobs: the swept values.
    """
    paths = sorted(sweep_dir.glob("*/metrics.json"), key=lambda path: _job_order(path.parent.name))
    overrides = [_job_overrides(path.parent) for path in paths]
    shared = set.intersection(*map(set, overrides)) if len(overrides) > 1 else set()
    rows = []
    for metrics_path, job_overrides in zip(paths, overrides, strict=True):
        metrics = json.loads(metrics_path.read_text())
        pruned = metrics.get("pruned", {})
        rows.append({
            "job": metrics_path.parent.name,
            "overrides": " ".join(item for item in job_overrides if item not in shared),
            **{key: pruned.get(key) for key in COLUMNS[2:] if key != "speedup"},
            "speedup": metrics.get("speedup"),
        })
    return rows


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that no other row beats on both speedup (higher) and FID (lower), sorted by speedup."""
    scored = [row for row in rows if row["fid"] is not None and row["speedup"] is not None]
    front = [row for row in scored if not any(
        other["speedup"] >= row["speedup"] and other["fid"] <= row["fid"]
        and (other["speedup"], other["fid"]) != (row["speedup"], row["fid"]) for other in scored)]
    return sorted(front, key=lambda row: row["speedup"])


def summarize_sweep(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """Write summary.csv and pareto.png into `sweep_dir`; None when no job finished."""
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir)
    if not rows:
        return None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    csv_path = save_text(buffer.getvalue(), sweep_dir / "summary.csv")
    return csv_path, plot_pareto(rows, sweep_dir / "pareto.png")


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    scored = [row for row in rows if row["fid"] is not None and row["speedup"] is not None]
    axes.scatter([row["speedup"] for row in scored], [row["fid"] for row in scored], color="tab:blue", zorder=3)
    for row in scored:
        axes.annotate(row["overrides"] or row["job"], (row["speedup"], row["fid"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    front = pareto_front(rows)
    axes.plot([row["speedup"] for row in front], [row["fid"] for row in front], color="tab:red", label="Pareto front")
    axes.set_xlabel("sampling speedup over the teacher (x)")
    axes.set_ylabel("FID (lower is better)")
    axes.set_title("Quality against speed, one point per job")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)
    return path


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(item) for item in OmegaConf.load(path)] if path.is_file() else []


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, summarise its jobs in the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # every rank of a data-parallel sweep ends it; one writes the summary
            return
        written = summarize_sweep(config.hydra.sweep.dir)
        if written:
            print(f"Sweep summary: {written[0]} and {written[1]}")
