"""Hydra entry point: `python train.py` runs the embedded default; see conf/train.yaml for the groups.

A mistake in the settings, paths or files (a `tinyfusion_pl.UsageError`) is shown as its message alone, with exit
status 1; `HYDRA_FULL_ERROR=1` shows its traceback too. In a sweep (`-m`) such a job is reported and recorded, the
other jobs run, and the sweep exits with status 1 once SweepSummary has summarised the jobs that finished.
"""

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    # Imported here, not above: a config that Hydra itself refuses fails without waiting for torch and Lightning.
    from tinyfusion_pl.distributed import stop_launched_ranks
    from tinyfusion_pl.errors import find_usage_error
    from tinyfusion_pl.evaluation.sweep_summary import record_failed_job, sweep_job
    from tinyfusion_pl.stages import run_stage

    # Lightning's package logger has its own console handler; imported after Hydra set up logging, its records
    # would reach Hydra's console handler as well and show twice.
    logging.getLogger("lightning").propagate = False
    try:
        return run_stage(cfg)
    except Exception as error:
        usage_error, job = find_usage_error(error), sweep_job()
        if job is None:  # the run ends here: ranks this process launched must not wait for it
            stop_launched_ranks()
        if usage_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a bug: in a sweep too, Hydra shows its traceback once the running jobs are done
        if job is not None:  # one job's mistake: the sweep goes on (exiting here would end it, summary unwritten)
            print(f"Error: {job.describe()}: {usage_error}", file=sys.stderr)
            return record_failed_job(job, usage_error)
        print(f"Error: {usage_error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
