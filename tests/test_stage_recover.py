"""stage=prune with the baseline selectors and stage=recover on the embedded default (depth reduced, few steps)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tinyfusion_pl.data import DigitsDataModule
from tinyfusion_pl.module import load_weights
from tinyfusion_pl.objectives import GaussianDiffusion
from tinyfusion_pl.pruning.calibration import calibration_loss
from tinyfusion_pl.stages import run_stage

CONF = Path(__file__).resolve().parents[1] / "conf"
TEACHER_DEPTH = 4


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_overrides(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    """The embedded default with a 4-block DiT, small batches, a short pretraining, no sampling or logging."""
    return [
        f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}", f"+model.depth={TEACHER_DEPTH}",
        "data.batch_size=16", "pretrain.max_steps=60", "sampling.samples_per_class=0", "logger=none",
        "callbacks=none", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "++pruning.progress=false", *extra,
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory, cache_dir):
    """A run folder in which the (cached) teacher was pruned by the oracle: 4 blocks -> [0, 3]."""
    run_dir = tmp_path_factory.mktemp("oracle_run")
    run_stage(compose_train(tiny_overrides(run_dir, cache_dir, "stage=prune", "pruning=oracle")))
    return run_dir


def held_out_loss(net: torch.nn.Module) -> float:
    """Diffusion loss on the digits validation split with its own fixed noise and timesteps."""
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup("fit")
    batches = [(x, {"y": y}) for x, y in datamodule.val_dataloader()]
    return calibration_loss(net, GaussianDiffusion(), batches, seed=1234)


def load_dit(cfg, checkpoint, depth: int, prefer: str = "model") -> torch.nn.Module:
    net = instantiate(cfg.model, depth=depth)
    load_weights(net, checkpoint, prefer=prefer)
    return net


# ---------------------------------------------------------------------------------------- stage=prune


@pytest.mark.parametrize(
    ("pruning", "expected_kept"),
    [("bi_score", None), ("sensitivity", None), ("oracle", [0, 3]), ("random", None),
     ("by_index pruning.kept_blocks=[1,2] pruning.num_keep=2", [1, 2])],
)
def test_every_baseline_selector_writes_the_prune_outputs(pruning, expected_kept, tmp_path, cache_dir):
    selector, *options = pruning.split()
    cfg = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=prune", f"pruning={selector}", *options))
    result = run_stage(cfg)
    decision = json.loads((tmp_path / "prune" / "decision.json").read_text())
    assert decision["selector"] == selector and decision["num_blocks"] == TEACHER_DEPTH
    assert len(decision["scores"]) == TEACHER_DEPTH and len(decision["kept_blocks"]) == 2
    assert decision["group_kept_blocks"] == [decision["kept_blocks"]]
    assert decision["calibration_loss"] == result["calibration_loss"] > 0
    if expected_kept is not None:
        assert decision["kept_blocks"] == expected_kept
    else:  # the two best-scoring blocks
        assert decision["kept_blocks"] == sorted(sorted(range(4), key=lambda b: -decision["scores"][b])[:2])
    # pruned.pt is the teacher's kept blocks, renumbered, loading strictly into a 2-block DiT.
    teacher = load_dit(cfg, decision["teacher"], TEACHER_DEPTH, prefer="ema")
    pruned = instantiate(cfg.model, depth=2)
    pruned.load_state_dict(torch.load(tmp_path / "prune" / "pruned.pt", weights_only=True), strict=True)
    for new_index, old_index in enumerate(decision["kept_blocks"]):
        for name, value in pruned.blocks[new_index].state_dict().items():
            assert torch.equal(value, teacher.blocks[old_index].state_dict()[name])


def test_random_selection_follows_the_seed(oracle_run, tmp_path, cache_dir):
    teacher = json.loads((oracle_run / "prune" / "decision.json").read_text())["teacher"]
    kept = []
    for seed in (0, 0, 1, 2, 3):
        run_dir = tmp_path / f"seed{len(kept)}"
        cfg = compose_train(tiny_overrides(run_dir, cache_dir, "stage=prune", "pruning=random", f"seed={seed}",
                                           "pruning.calibration_batches=1", f"teacher.checkpoint={teacher}"))
        kept.append(run_stage(cfg)["kept_blocks"])
    assert kept[0] == kept[1] and len({tuple(blocks) for blocks in kept}) > 1


# ---------------------------------------------------------------------------------------- stage=recover


@pytest.mark.parametrize("distill", ["masked_kd", "kd", "none"])
def test_recover_lowers_the_students_loss(distill, oracle_run, cache_dir, tmp_path):
    cfg = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=recover", f"distill={distill}",
                                       f"recover.pruned={oracle_run / 'prune'}", "recover.max_steps=40"))
    metrics = run_stage(cfg)
    folder = tmp_path / "recover"
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    checkpoint = torch.load(folder / "model.pt", weights_only=False)
    assert {"model", "ema", "config"} <= set(checkpoint) and checkpoint["kept_blocks"] == [0, 3]
    pruned = instantiate(cfg.model, depth=2)
    pruned.load_state_dict(torch.load(oracle_run / "prune" / "pruned.pt", weights_only=True), strict=True)
    recovered = load_dit(cfg, checkpoint, depth=2, prefer="model")
    assert held_out_loss(recovered) < held_out_loss(pruned)
    assert metrics["steps"] == 40 and metrics["nonfinite_steps"] == 0 and metrics["distill"] == distill
    assert metrics["calibration_loss"]["recovered"] < metrics["calibration_loss"]["pruned"]
    decision = json.loads((oracle_run / "prune" / "decision.json").read_text())
    assert metrics["teacher"] == (None if distill == "none" else decision["teacher"])
    # Student 0 was teacher block 0 and is compared where teacher block 3 starts (after block 2); student 1 with the last.
    assert metrics["feature_pairs"] == ([[0, 2], [1, 3]] if distill == "masked_kd" else [])


def test_recover_with_the_reference_pairing_and_a_named_teacher(oracle_run, cache_dir, tmp_path):
    decision = json.loads((oracle_run / "prune" / "decision.json").read_text())
    cfg = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=recover", "distill.pairing=reference",
                                       f"recover.pruned={oracle_run / 'prune'}", "recover.max_steps=2",
                                       "teacher.name=DiT-Tiny/2", f"teacher.checkpoint={decision['teacher']}"))
    metrics = run_stage(cfg)
    assert metrics["feature_pairs"] == [[0, 1], [1, 3]] and metrics["teacher"] == decision["teacher"]


def test_decision_pairing_refuses_a_teacher_of_another_depth(oracle_run, cache_dir, tmp_path):
    # A 2-block teacher (the pruned model itself, as a checkpoint) cannot host the 4-block decision.
    shallow = tmp_path / "shallow.pt"
    shallow.write_bytes((oracle_run / "prune" / "pruned.pt").read_bytes())
    cfg = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=recover", f"recover.pruned={oracle_run / 'prune'}",
                                       "recover.max_steps=1", f"teacher.checkpoint={shallow}"))
    with pytest.raises(ValueError, match=r"4-block model that was pruned, but the teacher has 2 blocks \(student depth 2\)"):
        run_stage(cfg)


def test_recover_refusals_name_the_setting_to_fix(oracle_run, cache_dir, tmp_path):
    missing = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=recover"))
    with pytest.raises(FileNotFoundError, match=r"lacks pruned.pt, decision.json\. Run stage=prune .* recover.pruned="):
        run_stage(missing)
    nameless = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=recover", "teacher.name=DiT-D7/2",
                                            f"recover.pruned={oracle_run / 'prune'}"))
    with pytest.raises(ValueError, match=r"teacher.name=DiT-D7/2 needs its weights: pass teacher.checkpoint"):
        run_stage(nameless)
    bogus = compose_train(tiny_overrides(tmp_path, cache_dir, "stage=recover", "distill.method=logits",
                                         f"recover.pruned={oracle_run / 'prune'}"))
    with pytest.raises(ValueError, match=r"distill.method='logits' is not one of \('none', 'kd', 'masked_kd'\)"):
        run_stage(bogus)


def test_a_corrupt_decision_is_refused_naming_the_file(oracle_run, cache_dir, tmp_path):
    folder = tmp_path / "prune"
    shutil.copytree(oracle_run / "prune", folder)
    (folder / "decision.json").write_text('{"kept_blocks": [0, ')  # a write cut short
    cfg = compose_train(tiny_overrides(tmp_path / "run", cache_dir, "stage=recover", f"recover.pruned={folder}"))
    with pytest.raises(ValueError, match=r"decision.json changed since the set was written.*Run stage=prune again"):
        run_stage(cfg)  # the manifest of the prune output no longer matches
    (folder / "manifest.json").unlink()  # a folder from before manifests: the file itself is refused
    with pytest.raises(ValueError, match=r"decision.json cannot be read .*Run stage=prune again"):
        run_stage(cfg)
    assert not (tmp_path / "run" / "recover" / "model.pt").exists()


def test_a_scalar_tau_is_a_constant_temperature(tmp_path):
    from tinyfusion_pl.stages.prune import learnable_callbacks

    mask, _ = learnable_callbacks(compose_train(tiny_overrides(tmp_path, tmp_path, "pruning.tau=0.5")), "net.blocks")
    assert mask.current_tau == 0.5
