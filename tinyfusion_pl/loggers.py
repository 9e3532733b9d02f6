"""Logger factories: W&B that works with no account and no network."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.io import save_text


def wandb_is_configured() -> bool:
    """True when the user set up W&B: an API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str | None) -> str:
    """`mode`, else WANDB_MODE, else online when W&B is configured and offline when not; checked."""
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_is_configured() else "offline")
    mode = "offline" if mode == "dryrun" else mode  # wandb's own older name, which it still sets in os.environ
    if mode not in ("online", "offline", "disabled"):
        raise UsageError(f"logger.wandb.mode='{mode}' must be 'online', 'offline' or 'disabled' "
                         "(or null: online when you are logged in to W&B, else offline).")
    return mode


def wandb_logger(save_dir: str, project: str = "tinyfusion_pl", mode: str | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that runs offline unless W&B is configured (or WANDB_MODE / `mode` says otherwise)."""
    mode = wandb_mode(mode)
    return WandbLogger(save_dir=save_dir, project=project, offline=mode == "offline", mode=mode, **kwargs)


def describe_offline_runs(loggers: list[Logger], folder: Path) -> Path | None:
    """Write `WANDB.md` in `folder` naming each offline W&B run and the `wandb sync` command for it."""
    lines = []
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.experiment.settings.mode == "offline":
            run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-<time>-<id>
            lines.append(f"- offline run `{run_dir}`: upload it with `wandb sync {run_dir}`")
    if not lines:
        return None
    text = "# Weights & Biases\n\nThis stage logged to W&B offline (no account or network was configured).\n\n"
    path = save_text(text + "\n".join(lines) + "\n", folder / "WANDB.md")
    print(f"W&B offline run(s): see {path}")
    return path


def wandb_loggers(loggers: list[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def log_images(loggers: list[Logger], images: dict[str, Path]) -> None:
    """Log PNG files as images to every logger that takes images (W&B); others keep them as files."""
    for logger in wandb_loggers(loggers):
        for key, path in images.items():
            logger.log_image(key=key, images=[str(path)])


def log_table(loggers: list[Logger], key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a table to every logger that takes tables (W&B: a wandb.Table)."""
    for logger in wandb_loggers(loggers):
        logger.log_table(key=key, columns=columns, data=rows)


def log_artifact(loggers: list[Logger], name: str, path: Path, kind: str = "model") -> None:
    """Attach a file (or a folder, e.g. a save_pretrained model) as a versioned artifact to every W&B run."""
    import wandb

    for logger in wandb_loggers(loggers):
        artifact = wandb.Artifact(name=name, type=kind)
        if Path(path).is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        logger.experiment.log_artifact(artifact)
