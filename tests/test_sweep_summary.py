"""The multirun summary: rows per job, the Pareto front, files written."""

import csv
import json

from tinyfusion_pl.evaluation.sweep_summary import pareto_front, summarize_sweep


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
