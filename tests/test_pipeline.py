"""The default pipeline on a shrunken config, and a two-job keep-ratio sweep, run for real."""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.test_configs import REPO
from tests.test_stage_prune import compose_run
from tinyfusion_pl.models import MAR, DiT, SiT, dit_from_checkpoint, mar_from_checkpoint, sit_from_checkpoint
from tinyfusion_pl.stages import run_stage

SHRUNKEN = ["pretrain.max_steps=4", "pruning.max_steps=4", "pruning.calibration_batches=1", "recover.max_steps=4",
            "recover.calibration_batches=1", "sampling.steps=2", "sampling.samples_per_class=1",
            "evaluate.num_samples=20", "evaluate.batch_size=20", "evaluate.speed.batch_size=4",
            "evaluate.speed.repeats=1"]


# MAR has an encoder and a decoder depth instead of `depth`: 2 + 2 blocks make the same 4-block sequence.
MAR_SHRUNKEN = ["~model.depth", "++model.encoder_depth=2", "++model.decoder_depth=2"]
# The text-conditioned diffusers models (a stand-in caption per digit) take about 20 s of CPU each, as
# diffusers_digits does: they run with -m slow.
TEXT_CONDITIONED = [pytest.param(name, marks=pytest.mark.slow)
                    for name in ("diffusers_pixart_digits", "diffusers_sd3_digits", "diffusers_flux_digits")]


@pytest.fixture(scope="module", params=["dit_digits", "sit_digits", "diffusers_digits", "mar_digits",
                                        *TEXT_CONDITIONED])
def pipeline_run(request, tmp_path_factory):
    """The DiT default, the SiT default (SiT with flow matching), the diffusers models and the MAR default (MAR's
    objective and generation), shrunk to seconds."""
    run_dir, cache_dir = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    experiment = [] if request.param == "dit_digits" else [f"experiment={request.param}"]
    if request.param == "mar_digits":
        experiment += MAR_SHRUNKEN
    cfg = compose_run(run_dir, cache_dir, "stage=pipeline", *experiment, *SHRUNKEN)
    return run_stage(cfg), run_dir


def test_pipeline_writes_every_file_of_the_report(pipeline_run):
    _, run_dir = pipeline_run
    for relative in ["report.md", "metrics.json", "pretrain/model.pt", "prune/decision.json",
                     "prune/decision_dynamics.png", "recover/model.pt", "evaluate/samples_teacher.png",
                     "evaluate/samples_pruned.png", "evaluate/metrics.json"]:
        assert (run_dir / relative).is_file(), relative
    checkpoint = json.loads((run_dir / "prune" / "decision.json").read_text())["checkpoint"]
    assert (run_dir / "prune" / checkpoint).exists()  # pruned.pt, or a save_pretrained folder for diffusers
    report = (run_dir / "report.md").read_text()
    for image in ["evaluate/samples_teacher.png", "evaluate/samples_pruned.png", "prune/decision_dynamics.png"]:
        assert f"]({image})" in report


def test_pipeline_metrics_compare_teacher_and_pruned(pipeline_run):
    returned, run_dir = pipeline_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == returned
    for name in ("teacher", "pruned"):
        assert {"blocks", "params", "gflops", "samples_per_s", "fid", "conditional_accuracy"} <= set(metrics[name])
    assert metrics["teacher"]["blocks"] == 4 and metrics["pruned"]["blocks"] == 2
    assert metrics["pruned"]["params"] < metrics["teacher"]["params"]
    assert metrics["pruned"]["gflops"] < metrics["teacher"]["gflops"]
    assert metrics["speedup"] > 0 and metrics["ideal_speedup"] > 1.0
    assert len(metrics["kept_blocks"]) == 2
    table = (run_dir / "report.md").read_text()
    assert "| blocks | 4 | 2 |" in table


def test_keep_ratio_sweep_writes_a_summary(tmp_path):
    from tests.test_stage_prune import TINY

    sweep_dir = tmp_path / "sweep"
    # one thread: a tiny model gains nothing from a second, and loses a lot when other processes share the cores
    env = dict(os.environ, TINYFUSION_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "pruning.keep_ratio=0.25,0.5", "pruning.group_size=4", *TINY, *SHRUNKEN,
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [row["overrides"] for row in rows] == ["pruning.keep_ratio=0.25", "pruning.keep_ratio=0.5"]
    assert [int(row["blocks"]) for row in rows] == [1, 2]
    assert (sweep_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not (sweep_dir / "1" / "pretrain").exists()  # the second job reuses the cached teacher


def test_compare_selectors_writes_the_table_and_the_scatter_plot(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_run(run_dir, tmp_path / "cache", "experiment=compare_selectors", *SHRUNKEN,
                      "~compare.selectors.sensitivity", "~compare.selectors.oracle", "~compare.selectors.random_2",
                      "~compare.selectors.random_3", "~compare.selectors.bi_score")
    result = run_stage(cfg)
    names = [row["selector"] for row in result["selectors"]]
    assert names == ["learnable", "random_0", "random_1"]
    rows = list(csv.DictReader((run_dir / "comparison.csv").open()))
    assert [row["selector"] for row in rows] == names
    assert all(float(row["calibration_loss"]) > 0 and float(row["fid"]) >= 0 for row in rows)
    random_choices = [row["kept_blocks"] for row in rows[1:]]
    assert all(len(choice.split()) == 2 for choice in random_choices)
    assert (run_dir / "calibration_vs_fid.png").read_bytes()[:4] == b"\x89PNG"
    assert "| learnable |" in (run_dir / "comparison.md").read_text()
    for name in names:
        assert (run_dir / name / "recover" / "model.pt").is_file()


def test_each_family_trains_samples_and_exports_with_its_own_objective(pipeline_run):
    _, run_dir = pipeline_run
    evaluation = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    decision = json.loads((run_dir / "prune" / "decision.json").read_text())
    assert decision["num_blocks"] == 4 and len(decision["kept_blocks"]) == 2
    report = (run_dir / "report.md").read_text()
    if "SiT-Tiny/2" in report:  # flow matching: Heun on the ODE, no x0 clipping option; the export is a SiT
        assert evaluation["settings"]["method"] == "heun" and "clip_denoised" not in evaluation["settings"]
        shallow = sit_from_checkpoint(run_dir / "prune" / "pruned.pt")
        assert type(shallow) is SiT and shallow.depth == 2
    elif "MAR-Tiny" in report:  # MAR's generation; the export is a MAR at the depths the decision kept
        assert evaluation["settings"]["head_steps"] == 50 and "method" not in evaluation["settings"]
        assert "Sampler: 2 steps, clip_denoised True, head_steps 50, temperature 1.0, cfg_schedule linear" in report
        assert decision["blocks"] == ["encoder_blocks", "decoder_blocks"]
        shallow = mar_from_checkpoint(run_dir / "prune" / "pruned.pt")
        assert type(shallow) is MAR and shallow.encoder_depth + shallow.decoder_depth == 2
        encoder_kept = sum(block < 2 for block in decision["kept_blocks"])
        assert (shallow.encoder_depth, shallow.decoder_depth) == (encoder_kept, 2 - encoder_kept)
    elif "DiffusersDiT" in report:  # diffusers' own format: a save_pretrained folder with the new depth
        assert decision["checkpoint"] == "pruned" and decision["blocks"] == "model.transformer_blocks"
        config = json.loads((run_dir / "prune" / "pruned" / "config.json").read_text())
        assert config["_class_name"] == "DiTTransformer2DModel" and config["num_layers"] == 2
    elif "DiffusersPixArt" in report or "DiffusersSD3" in report:  # text-conditioned, one block list
        config = json.loads((run_dir / "prune" / "pruned" / "config.json").read_text())
        pixart = "DiffusersPixArt" in report
        assert config["_class_name"] == ("PixArtTransformer2DModel" if pixart else "SD3Transformer2DModel")
        assert config["num_layers"] == 2 and evaluation["settings"]["method"] == ("ddim" if pixart else "heun")
        if not pixart:
            assert 3 in decision["kept_blocks"], "SD3's context-pre-only last block stays"
    elif "DiffusersFlux" in report:  # two block lists pruned as one sequence, flow matching
        assert decision["blocks"] == ["model.transformer_blocks", "model.single_transformer_blocks"]
        config = json.loads((run_dir / "prune" / "pruned" / "config.json").read_text())
        assert config["_class_name"] == "FluxTransformer2DModel"
        assert config["num_layers"] + config["num_single_layers"] == 2
        assert evaluation["settings"]["method"] == "heun"
    else:  # Gaussian diffusion: DDIM with pixel clipping; the export is a DiT
        assert evaluation["settings"]["method"] == "ddim" and evaluation["settings"]["clip_denoised"] is True
        shallow = dit_from_checkpoint(run_dir / "prune" / "pruned.pt")
        assert type(shallow) is DiT and shallow.depth == 2 and decision["blocks"] == "blocks"
    recovered = json.loads((run_dir / "recover" / "metrics.json").read_text())
    assert recovered["distill"] == "masked_kd" and recovered["feature_pairs"]


@pytest.mark.parametrize("overrides,message", [
    (["evaluate.fid=inception"], "evaluate.fid=inception needs real images"),
    (["+sampling.eta=0.5", "experiment=sit_digits"], "FlowMatching has no sampler option 'eta'"),
    (["sampling.steps=0"], r"steps=0 is invalid: expected an int in \[1, 1000\]"),
    (["sampling.steps=0", "experiment=sit_digits"], "steps=0"),
    (["model=mar_digits", *MAR_SHRUNKEN], r"model=MAR-Tiny is trained and sampled only by its own objective, "
                                          r"objective=mar; got GaussianDiffusion\. Pass objective=mar"),
    (["experiment=mar_digits", *MAR_SHRUNKEN, "sampling.steps=0"], r"steps=0 is invalid: expected a positive int"),
])
def test_a_setting_that_cannot_work_stops_the_pipeline_before_anything_is_trained(overrides, message, tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", "stage=pipeline", *overrides)
    with pytest.raises(ValueError, match=message):
        run_stage(cfg)
    assert not (tmp_path / "run" / "pretrain").exists() and not (tmp_path / "cache" / "teachers").exists()


def test_a_pretraining_that_trains_nothing_is_an_error_and_not_cached(tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", "stage=pretrain", "data.batch_size=4096")
    with pytest.raises(ValueError, match=r"data.batch_size=4096 is larger than the 1617 training samples.*Lower data"):
        run_stage(cfg)
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "run" / "pretrain" / "model.pt").exists()


@pytest.fixture(scope="module")
def mar_cache(tmp_path_factory):
    """One cache for the MAR selector runs: the first trains the shrunken 2 + 2-block teacher, the rest reuse it."""
    return tmp_path_factory.mktemp("mar_cache")


@pytest.mark.parametrize("selector", ["learnable_1_2", "bi_score", "sensitivity", "oracle", "random",
                                      "by_index pruning.kept_blocks=[0,3] pruning.num_keep=2"])
def test_every_selector_prunes_mar_across_encoder_and_decoder(selector, mar_cache, tmp_path):
    selector, *options = selector.split()
    shrunken = [o for o in SHRUNKEN if selector.startswith("learnable") or not o.startswith("pruning.max_steps")]
    cfg = compose_run(tmp_path, mar_cache, "stage=prune", "experiment=mar_digits", *MAR_SHRUNKEN, *shrunken,
                      f"pruning={selector}", *options)
    run_stage(cfg)
    decision = json.loads((tmp_path / "prune" / "decision.json").read_text())
    kept = decision["kept_blocks"]
    assert decision["num_blocks"] == 4 and len(kept) == 2
    if selector == "learnable_1_2":  # one block of each pair: one from the encoder, one from the decoder
        assert kept[0] in (0, 1) and kept[1] in (2, 3)
    if selector == "by_index":
        assert kept == [0, 3]
    # The export is a MAR whose encoder and decoder depths are the kept blocks on each side, loading strictly.
    pruned = mar_from_checkpoint(tmp_path / "prune" / decision["checkpoint"])
    assert isinstance(pruned, MAR)
    assert (pruned.encoder_depth, pruned.decoder_depth) == (sum(b < 2 for b in kept), sum(b >= 2 for b in kept))
