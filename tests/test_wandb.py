"""logger=wandb with no account and no network: every stage logs, and the offline run files hold it all."""

import pytest

from tests.test_pipeline import SHRUNKEN
from tests.test_stage_prune import compose_run
from tinyfusion_pl.stages import run_stage


def offline_runs(folder):
    return sorted((folder / "wandb").glob("offline-run-*"))


def run_records(run) -> bytes:
    (records,) = run.glob("run-*.wandb")
    return records.read_bytes()


@pytest.fixture(scope="module")
def wandb_pipeline(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.setenv("NETRC", str(tmp_path_factory.mktemp("home") / ".netrc"))
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_run(run_dir, tmp_path_factory.mktemp("cache"), "stage=pipeline", "logger=wandb", *SHRUNKEN)
    run_stage(cfg)
    yield run_dir
    mp.undo()


def test_every_training_stage_logs_its_losses_offline(wandb_pipeline):
    for stage, key in [("pretrain", b"train/loss"), ("prune", b"block_mask/tau"), ("recover", b"train/loss")]:
        (run,) = offline_runs(wandb_pipeline / stage)
        assert key in run_records(run), stage
        assert f"wandb sync {run}" in (wandb_pipeline / stage / "WANDB.md").read_text()


def test_images_table_and_artifacts_reach_wandb(wandb_pipeline):
    (pretrain_run,) = offline_runs(wandb_pipeline / "pretrain")
    assert list((pretrain_run / "files" / "media" / "images").glob("pretrain/samples*.png"))
    (prune_run,) = offline_runs(wandb_pipeline / "prune")
    assert list((prune_run / "files" / "media" / "images").glob("prune/decision_dynamics*.png"))
    (report_run,) = offline_runs(wandb_pipeline / "report")
    media = report_run / "files" / "media"
    assert len(list((media / "images" / "report").glob("*.png"))) == 3
    assert list((media / "table" / "report").glob("table*.table.json"))
    records = run_records(report_run)
    assert b"pruned.pt" in records and b"recovered" in records


def test_the_stage_runs_of_one_run_folder_share_a_group(wandb_pipeline):
    for stage in ("pretrain", "prune", "recover", "report"):
        (run,) = offline_runs(wandb_pipeline / stage)
        records = run_records(run)
        assert str(wandb_pipeline).encode() in records and stage.encode() in records, stage  # group, job type
