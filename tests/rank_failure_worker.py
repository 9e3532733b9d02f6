"""Run by tests/test_distributed.py as `python tests/rank_failure_worker.py`: two real CPU ranks (gloo); rank zero
fails alone, as train.py meets it, while rank one is busy far from any collective."""

import time

from tinyfusion_pl import distributed


def main() -> None:
    processes = distributed.start_processes("cpu", 2)
    if processes.global_rank == 0:
        try:
            raise RuntimeError("rank zero fails alone")
        except RuntimeError:
            distributed.stop_launched_ranks()  # what train.py does when a run (not a sweep job) fails
            raise
    time.sleep(300)  # rank one: long work; it would reach no collective to notice the failure for minutes
    print("rank one finished its work")


if __name__ == "__main__":
    main()
