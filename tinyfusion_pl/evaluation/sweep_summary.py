"""The summary of a Hydra multirun: one CSV row and one Pareto-plot point (FID against speedup) per job.

A job that stopped on a mistake in its settings (a UsageError: e.g. one swept value that cannot work) does not end
the sweep: train.py records the message in the job's folder (error.txt) and the next job runs. When the sweep ends,
summary.csv and pareto.png hold the jobs that finished, failed.csv the ones that did not, and the sweep exits with
status 1.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl.io import save_text, write_atomically

COLUMNS = ["job", "overrides", "blocks", "params", "gflops", "samples_per_s", "speedup", "fid", "conditional_accuracy"]
FAILED_COLUMNS = ["job", "overrides", "error"]
FAILURE_RECORD = "error.txt"  # in a job's folder: the message of the mistake that stopped it


@dataclass(frozen=True)
class SweepJob:
    """The job of a Hydra sweep that this process runs: its number, command-line overrides and folder."""

    num: int
    overrides: tuple[str, ...]
    folder: Path

    def describe(self) -> str:
        return f"job {self.num} ({' '.join(self.overrides)})"


def sweep_job() -> SweepJob | None:
    """The sweep job running now; None outside a Hydra multirun (a single run, or the stages called from Python)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    return SweepJob(int(hydra.job.num), tuple(hydra.overrides.task), Path(hydra.runtime.output_dir))


def record_failed_job(job: SweepJob, error: BaseException) -> dict[str, str]:
    """Write the error that stopped `job` into its folder, for SweepSummary; the job's return value for Hydra."""
    if rank_zero_only.rank == 0:
        save_text(f"{error}\n", job.folder / FAILURE_RECORD)
    return {"error": str(error)}


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of the sweep that wrote metrics.json (and did not fail after), in job order.

    `overrides` lists only the overrides that differ between the sweep's jobs: the swept values.
    """
    shared = _shared_overrides(sweep_dir)
    rows = []
    for folder in _job_folders(sweep_dir):
        if _failed(folder) or not (folder / "metrics.json").is_file():
            continue
        metrics = json.loads((folder / "metrics.json").read_text())
        pruned = metrics.get("pruned", {})
        rows.append({
            "job": folder.name,
            "overrides": _swept_overrides(folder, shared),
            **{key: pruned.get(key) for key in COLUMNS[2:] if key != "speedup"},
            "speedup": metrics.get("speedup"),
        })
    return rows


def failed_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of the sweep that stopped on a mistake in its settings, in job order, with the message."""
    shared = _shared_overrides(sweep_dir)
    return [{"job": folder.name,
             "overrides": _swept_overrides(folder, shared),
             "error": (folder / FAILURE_RECORD).read_text().strip()}
            for folder in _job_folders(sweep_dir) if _failed(folder)]


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
    csv_path = save_csv(rows, COLUMNS, sweep_dir / "summary.csv")
    return csv_path, plot_pareto(rows, sweep_dir / "pareto.png")


def summarize_failures(sweep_dir: str | Path) -> tuple[Path, list[dict[str, Any]]] | None:
    """Write failed.csv (job, overrides, error) into `sweep_dir`; None when no job failed."""
    rows = failed_rows(Path(sweep_dir))
    return (save_csv(rows, FAILED_COLUMNS, Path(sweep_dir) / "failed.csv"), rows) if rows else None


def save_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return save_text(buffer.getvalue(), path)


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


def _job_folders(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders (Hydra's record of the job's overrides in each), in job order."""
    folders = [path.parent.parent for path in sweep_dir.glob("*/.hydra/overrides.yaml")]
    folders += [path.parent for path in sweep_dir.glob("*/metrics.json") if path.parent not in folders]
    return sorted(folders, key=lambda folder: _job_order(folder.name))


def _failed(folder: Path) -> bool:
    """The job's last attempt in this folder stopped on a mistake (an error record newer than its metrics)."""
    record, metrics = folder / FAILURE_RECORD, folder / "metrics.json"
    return record.is_file() and (not metrics.is_file() or record.stat().st_mtime_ns >= metrics.stat().st_mtime_ns)


def _shared_overrides(sweep_dir: Path) -> set[str]:
    """The overrides every job of the sweep has (none when it has a single job)."""
    overrides = [set(_job_overrides(folder)) for folder in _job_folders(sweep_dir)]
    return set.intersection(*overrides) if len(overrides) > 1 else set()


def _swept_overrides(job_dir: Path, shared: set[str]) -> str:
    """The job's overrides that not every job of the sweep has: its swept values."""
    return " ".join(item for item in _job_overrides(job_dir) if item not in shared)


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return [str(item) for item in OmegaConf.load(path)] if path.is_file() else []


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, summarise its jobs in the sweep folder.

    With failed jobs it lists them in failed.csv and ends the process with status 1 (SystemExit, which Hydra does
    not turn into a warning as it does an Exception), so that scripts notice.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # every rank of a data-parallel sweep ends it; one writes the summary
            return
        written = summarize_sweep(config.hydra.sweep.dir)
        if written:
            print(f"Sweep summary: {written[0]} and {written[1]}")
        failures = summarize_failures(config.hydra.sweep.dir)
        if failures:
            path, rows = failures
            jobs = ", ".join(f"job {row['job']} ({row['overrides']})" if row["overrides"] else f"job {row['job']}"
                             for row in rows)
            total = len(_job_folders(Path(config.hydra.sweep.dir)))
            print(f"Error: {len(rows)} of {total} jobs failed: {jobs}. Their messages are in {path}; "
                  "correct their settings and run them again (summary.csv holds the jobs that finished).",
                  file=sys.stderr)
            raise SystemExit(1)
