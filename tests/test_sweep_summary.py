"""The multirun summary: rows per job, the Pareto front, files written, and the jobs that stopped on a mistake."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.test_configs import CONF, REPO
from tinyfusion_pl.evaluation.sweep_summary import (
    SweepSummary,
    failed_rows,
    job_rows,
    pareto_front,
    summarize_sweep,
)


def write_job(sweep_dir, job, overrides, speedup, fid):
    folder = sweep_dir / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    pruned = {"blocks": 4, "params": 10, "gflops": 1.0, "samples_per_s": 3.0, "fid": fid, "conditional_accuracy": 0.9}
    (folder / "metrics.json").write_text(json.dumps({"teacher": {}, "pruned": pruned, "speedup": speedup}))


def test_pareto_front_keeps_only_undominated_points():
    rows = [{"speedup": s, "fid": f} for s, f in [(1.3, 5.0), (2.0, 9.0), (1.9, 12.0), (4.0, 30.0), (1.2, 6.0)]]
    front = pareto_front(rows)
    # brute force: a point is on the front iff nothing is at least as fast and at least as good, and different
    expected = [r for r in rows if not any(o is not r and o["speedup"] >= r["speedup"] and o["fid"] <= r["fid"]
                                           for o in rows)]
    assert front == sorted(expected, key=lambda r: r["speedup"])
    assert [(r["speedup"], r["fid"]) for r in front] == [(1.3, 5.0), (2.0, 9.0), (4.0, 30.0)]


def test_summary_has_one_row_per_job_in_job_order(tmp_path):
    for job, (ratio, speedup, fid) in enumerate([(0.25, 3.5, 20.0), (0.5, 1.9, 8.0), (0.75, 1.3, 5.0)]):
        write_job(tmp_path, job, [f"pruning.keep_ratio={ratio}", "seed=3"], speedup, fid)
    write_job(tmp_path, 10, ["pruning.keep_ratio=0.9", "seed=3"], 1.1, 4.0)
    csv_path, png_path = summarize_sweep(tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["job"] for row in rows] == ["0", "1", "2", "10"]
    assert rows[1]["overrides"] == "pruning.keep_ratio=0.5" and float(rows[1]["fid"]) == 8.0  # seed=3 is shared
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_summary_of_an_empty_sweep_writes_nothing(tmp_path):
    assert summarize_sweep(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- a job that stops on a mistake

def compose_sweep_job(sweep_dir, num, overrides):
    """Job `num` of a sweep, as Hydra's launcher starts it: its HydraConfig set, and the config without `hydra`."""
    folder = sweep_dir / str(num)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            *overrides, f"paths.cache_dir={sweep_dir}/cache", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}", f"hydra.job.num={num}",
            f"hydra.runtime.output_dir={folder}"])
    HydraConfig.instance().set_config(cfg)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    task_cfg = cfg.copy()
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    return cfg, task_cfg


@pytest.fixture
def clear_hydra_config():
    yield
    HydraConfig.instance().cfg = None


def test_a_failed_job_is_listed_and_the_sweep_ends_with_status_1(tmp_path, capsys, clear_hydra_config):
    import train

    write_job(tmp_path, 1, ["pruning.max_steps=5", "seed=3"], 1.9, 8.0)  # the job that finished
    cfg, task_cfg = compose_sweep_job(tmp_path, 0, ["pruning.max_steps=-5", "seed=3"])
    returned = train.main(task_cfg)  # returns, so that the launcher runs the next job
    message = "pruning.max_steps=-5 must be a whole number >= 1"
    assert message in returned["error"]
    err = capsys.readouterr().err
    assert re.fullmatch(rf"Error: job 0 \(pruning.max_steps=-5 seed=3 [^)]*\): {message}\.\n", err), err
    assert message in (tmp_path / "0" / "error.txt").read_text()
    assert {path.name for path in (tmp_path / "0").iterdir()} == {".hydra", "error.txt"}  # nothing else written
    assert not (tmp_path / "cache").exists()

    with pytest.raises(SystemExit) as ended:
        SweepSummary().on_multirun_end(config=cfg)
    assert ended.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"Error: 1 of 2 jobs failed: job 0 \(pruning.max_steps=-5\)\. .*failed.csv", err), err
    assert [row["job"] for row in csv.DictReader((tmp_path / "summary.csv").open())] == ["1"]
    failed = list(csv.DictReader((tmp_path / "failed.csv").open()))
    assert [(row["job"], row["overrides"]) for row in failed] == [("0", "pruning.max_steps=-5")]
    assert message in failed[0]["error"]


def test_a_single_run_still_exits_1_on_a_mistake(tmp_path, capsys):
    import train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["pruning.max_steps=-5", f"paths.run_dir={tmp_path}/run",
                                                      f"paths.cache_dir={tmp_path}/cache"])
    with pytest.raises(SystemExit) as ended:
        train.main(cfg)
    assert ended.value.code == 1 and "Error: pruning.max_steps=-5 must be" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_latest_attempt_of_a_job_folder_counts(tmp_path):
    """A sweep run again into the same folder: a job that now finishes is no longer failed, and the reverse."""
    write_job(tmp_path, 0, ["pruning.keep_ratio=0.5"], 1.9, 8.0)
    write_job(tmp_path, 1, ["pruning.keep_ratio=0.25"], 3.5, 20.0)
    (tmp_path / "0" / "error.txt").write_text("an earlier mistake\n")
    os.utime(tmp_path / "0" / "error.txt", ns=(1, 1))  # older than metrics.json: the job finished since
    (tmp_path / "1" / "error.txt").write_text("a mistake this time\n")
    os.utime(tmp_path / "1" / "metrics.json", ns=(1, 1))  # older than error.txt: the job failed this time
    assert [row["job"] for row in job_rows(tmp_path)] == ["0"]
    assert failed_rows(tmp_path) == [{"job": "1", "overrides": "pruning.keep_ratio=0.25", "error": "a mistake this time"}]


# About 19 s each on 2 cores (a pipeline job): -m slow. The fast test above runs the same code: train.main in a
# sweep job's HydraConfig, then the real SweepSummary.
@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic launcher", "joblib launcher"])
def test_a_sweep_goes_on_past_a_job_with_a_mistake(tmp_path, launcher):
    """The real thing: `python train.py -m` with one swept value that cannot work, before the one that can.

    With the joblib launcher the jobs run in worker processes: the failure travels through the job's folder.
    """
    from tests.test_pipeline import SHRUNKEN
    from tests.test_stage_prune import TINY

    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, TINYFUSION_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "pruning.keep_ratio=7,0.5", "pruning.group_size=4", *TINY, *SHRUNKEN,
         f"hydra.sweep.dir={sweep_dir}", *launcher], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"Error: job 0 \(pruning.keep_ratio=7 .*\): DifferentiableBlockMask: keep_ratio=7", result.stderr)
    assert "Error: 1 of 2 jobs failed: job 0 (pruning.keep_ratio=7)" in result.stderr
    assert [row["overrides"] for row in csv.DictReader((sweep_dir / "summary.csv").open())] == ["pruning.keep_ratio=0.5"]
    assert [row["job"] for row in csv.DictReader((sweep_dir / "failed.csv").open())] == ["0"]
    assert (sweep_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
