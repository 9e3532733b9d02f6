"""Hydra entry point: `python train.py` runs the embedded default; see conf/train.yaml for the groups."""

from typing import Any

import hydra
from omegaconf import DictConfig

from tinyfusion_pl.stages import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    return run_stage(cfg)


if __name__ == "__main__":
    main()
