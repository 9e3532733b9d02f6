"""Wall time of a recoverability study against the cores it gets: more threads per job, or more jobs.

A study is a set of independent pieces (one recovery and measurement per kept-set, one pruning run per
selector). They spread two ways: torch's threads inside one job, or Hydra jobs that each take every
n-th piece (`recoverability.num_shards`, through hydra-joblib-launcher on one machine). This script
times one small study (the embedded digits DiT, `--choices` kept-sets, three selectors, short recovery)
under layouts written JOBSxTHREADS, e.g. `1x1 1x2 2x1`: JOBS jobs with THREADS threads each
(OMP_NUM_THREADS), so JOBS x THREADS cores. Every run starts from an empty study folder and a teacher
pretrained once beforehand; the layouts rotate every round (A B C, B C A, ...), so drifts in machine load
hit each alike, and the median round counts. The speedup is against the first layout.

Needs the joblib launcher: pip install hydra-joblib-launcher.

Examples:
    python benchmarks/bench_study_scaling.py --layouts 1x1 1x2 2x1 --out bench_study_scaling.json
    python benchmarks/bench_study_scaling.py --layouts 1x1 1x16 4x4 16x1 --choices 32 --rounds 1   # 16 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
KEPT_SELECTORS = ("learnable_lora", "learnable_straight_through", "bi_score")
# every selector the study runs, read from its config: the others are left out with ~compare.selectors.<name>
STUDY_SELECTORS = list(OmegaConf.load(REPO / "conf" / "experiment" / "recoverability.yaml").compare.selectors)


def parse_layout(text: str) -> tuple[int, int]:
    try:
        jobs, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JOBSxTHREADS, e.g. 2x1") from None
    if jobs < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: jobs and threads must be >= 1")
    return jobs, threads


def study_overrides(arguments: argparse.Namespace, cache: Path) -> list[str]:
    """The study's settings, the same for every layout (and for the teacher's pretraining)."""
    return [
        "experiment=recoverability", "logger=none", "trainer.enable_progress_bar=false",
        f"paths.cache_dir={cache}", f"recoverability.max_choices={arguments.choices}",
        f"recover.max_steps={arguments.recover_steps}", f"pruning.max_steps={arguments.pruning_steps}",
        f"evaluate.num_samples={arguments.samples}", f"evaluate.batch_size={arguments.samples}",
        f"sampling.steps={arguments.sampling_steps}", f"pretrain.max_steps={arguments.pretrain_steps}",
        *(f"~compare.selectors.{name}" for name in STUDY_SELECTORS if name not in KEPT_SELECTORS),
    ]


def run(command: list[str], threads: int, log: Path) -> float:
    """Seconds `command` takes with `threads` threads per process; its output goes to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with log.open("w") as output:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}); its output: {log}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=[(1, 1), (1, 2), (2, 1)],
                        help="JOBSxTHREADS per layout (default: 1x1 1x2 2x1)")
    parser.add_argument("--choices", type=int, default=8, help="kept-sets in the study's ground truth")
    parser.add_argument("--recover-steps", type=int, default=30)
    parser.add_argument("--pruning-steps", type=int, default=30)
    parser.add_argument("--pretrain-steps", type=int, default=200, help="the teacher's (its quality does not matter)")
    parser.add_argument("--samples", type=int, default=100, help="samples per recovered model")
    parser.add_argument("--sampling-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_study_scaling_") as folder:
        root = Path(folder)
        settings = study_overrides(arguments, root / "cache")
        widest = max(jobs * threads for jobs, threads in arguments.layouts)
        # the teacher, cached under the study's settings: the jobs find it instead of each pretraining one
        run([sys.executable, "train.py", *settings, "stage=pretrain", f"hydra.run.dir={root / 'pretrain'}"],
            widest, root / "pretrain.log")
        seconds: dict[str, list[float]] = {f"{jobs}x{threads}": [] for jobs, threads in arguments.layouts}
        layouts = list(arguments.layouts)
        for round_index in range(arguments.rounds):
            shift = round_index % len(layouts)
            for jobs, threads in layouts[shift:] + layouts[:shift]:
                name = f"{jobs}x{threads}"
                study = root / f"study_{name}_{round_index}"
                command = [sys.executable, "train.py", "-m", *settings, "hydra/launcher=joblib",
                           f"hydra.launcher.n_jobs={jobs}", f"hydra.sweep.dir={study}_sweep",
                           f"recoverability.study_dir={study}", f"recoverability.num_shards={jobs}",
                           f"recoverability.shard={','.join(str(shard) for shard in range(jobs))}"]
                seconds[name].append(run(command, threads, root / f"{name}_{round_index}.log"))
                if not (study / "report.md").is_file():
                    raise SystemExit(f"layout {name} ended without a report in {study}")
                print(f"round {round_index}: {name} {seconds[name][-1]:.1f} s", flush=True)

    first = f"{layouts[0][0]}x{layouts[0][1]}"
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rows = [{"layout": name, "cores": int(name.split("x")[0]) * int(name.split("x")[1]),
             "median_seconds": medians[name], "seconds": seconds[name], "speedup": medians[first] / medians[name]}
            for name in seconds]
    print(f"\nstudy of {arguments.choices} kept-sets and {len(KEPT_SELECTORS)} selectors; speedup against {first}")
    print("| layout (jobs x threads) | cores | median wall | speedup |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['layout']} | {row['cores']} | {row['median_seconds']:.1f} s | {row['speedup']:.2f}x |")
    result = {"settings": {key: value for key, value in vars(arguments).items() if key != "out"},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
              "layouts": rows}
    result["settings"]["layouts"] = [f"{jobs}x{threads}" for jobs, threads in arguments.layouts]
    if arguments.out is not None:
        arguments.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
