"""stage=prune through the real Hydra config: the files users get, and what they hold."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.test_configs import CONF
from tinyfusion_pl.models import build_dit
from tinyfusion_pl.stages import run_stage

TINY = ["++model.depth=4", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=none",
        "callbacks=none", "sampling.samples_per_class=0"]


def compose_run(run_dir, cache_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}",
                                                       *TINY, *overrides])


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """One tiny teacher pretrained on digits, then pruned 2:4 with the learnable selector."""
    run_dir, cache_dir = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    cfg = compose_run(run_dir, cache_dir, "stage=prune", "pretrain.max_steps=3", "pruning.max_steps=6",
                      "pruning=learnable_2_4", "pruning.calibration_batches=1")
    return cfg, run_stage(cfg), run_dir


def test_prune_writes_a_shallow_checkpoint_that_loads_strictly(pruned_run):
    cfg, result, run_dir = pruned_run
    folder = run_dir / "prune"
    state_dict = torch.load(folder / "pruned.pt", weights_only=True)
    shallow = build_dit("DiT-Tiny/2", input_size=8, in_channels=1, num_classes=10, depth=2)
    shallow.load_state_dict(state_dict, strict=True)
    assert result["pruned"] == str(folder / "pruned.pt")


def test_prune_keeps_the_original_weights_of_the_kept_blocks(pruned_run):
    cfg, result, run_dir = pruned_run
    teacher = torch.load(run_dir / "pretrain" / "model.pt", weights_only=False)["ema"]
    pruned = torch.load(run_dir / "prune" / "pruned.pt", weights_only=True)
    for new_index, old_index in enumerate(result["kept_blocks"]):
        for name, value in pruned.items():
            if name.startswith(f"blocks.{new_index}."):
                original = name.replace(f"blocks.{new_index}.", f"blocks.{old_index}.", 1)
                torch.testing.assert_close(value, teacher[original], rtol=0, atol=0)
    torch.testing.assert_close(pruned["final_layer.linear.weight"], teacher["final_layer.linear.weight"], rtol=0, atol=0)


def test_prune_decision_json_describes_the_choice(pruned_run):
    cfg, result, run_dir = pruned_run
    decision = json.loads((run_dir / "prune" / "decision.json").read_text())
    assert decision["selector"] == "learnable" and decision["num_blocks"] == 4
    assert decision["kept_blocks"] == result["kept_blocks"] and len(decision["kept_blocks"]) == 2
    assert len(decision["confidences"]) == 1 and 0.0 < decision["confidences"][0] <= 1.0
    assert decision["history"] and decision["history"][-1]["step"] == 6
    assert decision["calibration_loss"] == pytest.approx(result["calibration_loss"]) and decision["calibration_loss"] > 0
    assert (run_dir / "prune" / "decision_dynamics.png").read_bytes()[:4] == b"\x89PNG"


def test_prune_reuses_the_cached_teacher(pruned_run, tmp_path):
    cfg, _, _ = pruned_run
    other_run = tmp_path / "other"
    again = compose_run(other_run, cfg.paths.cache_dir, "stage=prune", "pretrain.max_steps=3", "pruning.max_steps=2",
                        "pruning=learnable_2_4", "pruning.calibration_batches=1")
    run_stage(again)
    assert not (other_run / "pretrain").exists()  # no second pretraining
    assert (other_run / "prune" / "pruned.pt").is_file()


def test_the_gates_learn_by_the_configured_estimator_even_with_nothing_else_training(pruned_run, tmp_path):
    cfg, _, _ = pruned_run
    confidences = {}
    for estimator in ("straight_through", "score_function"):
        run = compose_run(tmp_path / estimator, cfg.paths.cache_dir, "stage=prune", "pretrain.max_steps=3",
                          "pruning=learnable_2_4", "pruning.calibration_batches=1", "pruning.max_steps=3",
                          "pruning.weight_update=frozen", f"pruning.gate_estimator={estimator}")
        run_stage(run)
        decision = json.loads((tmp_path / estimator / "prune" / "decision.json").read_text())
        confidences[estimator] = decision["history"][-1]["confidences"]
    assert confidences["straight_through"] != confidences["score_function"]  # the same draws, other gradients
    assert all(value > 1 / 6 for value in confidences["score_function"])  # the gates moved from uniform


def test_prune_without_teacher_for_a_real_model_names_the_fix(tmp_path):
    cfg = compose_run(tmp_path, tmp_path, "stage=prune", "model=dit_xl_2", "data=latents", "data.root=/nonexistent")
    with pytest.raises(ValueError, match="pass teacher.checkpoint=/path/to/model.pt"):
        run_stage(cfg)


def test_a_keep_ratio_beside_a_pattern_is_refused_before_the_teacher_is_trained(tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", "stage=prune", "pruning=learnable_2_4",
                      "pruning.keep_ratio=0.25")
    with pytest.raises(ValueError, match=r"pattern='2:4' and keep_ratio=0.25.*were both given"):
        run_stage(cfg)
    assert not (tmp_path / "run" / "pretrain").exists() and not (tmp_path / "cache" / "teachers").exists()
