"""stage=evaluate through the real Hydra config: the files users get, and that they agree with each other."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import tiny_dit
from tests.test_configs import CONF
from tinyfusion_pl.data.digits import load_digits_tensors
from tinyfusion_pl.evaluation import (
    DigitsClassifier,
    conditional_accuracy,
    count_parameters,
    digits_fid,
    forward_flops,
    images_to_uint8,
    load_npz,
    sample_images,
    uint8_to_images,
)
from tinyfusion_pl.objectives import GaussianDiffusion
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.stages import run_stage

TINY = ["stage=evaluate", "+model.depth=4", "logger=none", "callbacks=none", "sampling.steps=2",
        "sampling.samples_per_class=2", "evaluate.num_samples=30", "evaluate.batch_size=16", "evaluate.device=cpu",
        "evaluate.speed.batch_size=4", "evaluate.speed.steps=1", "evaluate.speed.repeats=1", "evaluate.speed.warmup=0"]


def compose_run(run_dir, cache_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}",
                                                       *TINY, *overrides])


def perturbed_dit(depth: int, seed: int) -> torch.nn.Module:
    """A tiny DiT whose zero-initialised layers are perturbed, so its samples depend on every block."""
    net = tiny_dit(depth=depth)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


def fixed_classifier(cache_dir) -> DigitsClassifier:
    """Put a seeded classifier where the stage looks for the cached one (training it takes minutes here)."""
    torch.manual_seed(0)
    classifier = DigitsClassifier(image_size=8).eval()
    torch.save(classifier.state_dict(), cache_dir / "digits_classifier_8px.pt")
    return classifier


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A run folder as stage=pretrain and stage=prune leave it (4-block teacher, 2-block pruned), then evaluated."""
    run_dir, cache_dir = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    teacher = perturbed_dit(depth=4, seed=0)
    (run_dir / "pretrain").mkdir()
    torch.save({"model": teacher.state_dict(), "ema": teacher.state_dict()}, run_dir / "pretrain" / "model.pt")
    pruned = prune_blocks(teacher, blocks="blocks", keep=[0, 3])
    (run_dir / "prune").mkdir()
    torch.save(pruned.state_dict(), run_dir / "prune" / "pruned.pt")
    classifier = fixed_classifier(cache_dir)
    cfg = compose_run(run_dir, cache_dir)
    return run_stage(cfg), run_dir, {"teacher": teacher, "pruned": pruned}, classifier, cfg


def test_metrics_json_describes_both_models(evaluated_run):
    metrics, run_dir, nets, _, _ = evaluated_run
    written = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    for name, net in nets.items():
        entry = written[name]
        assert entry["blocks"] == len(net.blocks) and entry["params"] == count_parameters(net)
        assert entry["gflops"] == pytest.approx(forward_flops(net) / 1e9)
        assert entry["samples_per_s"] > 0 and entry["steps_per_s"] > 0 and entry["fid"] > 0
        assert 0.0 <= entry["conditional_accuracy"] <= 1.0
    assert written["teacher"]["checkpoint"] == str(run_dir / "pretrain" / "model.pt")
    assert written["pruned"]["checkpoint"] == str(run_dir / "prune" / "pruned.pt")
    assert written["teacher"]["speedup"] == 1.0 and written["speedup"] == written["pruned"]["speedup"]
    ideal = forward_flops(nets["teacher"]) / forward_flops(nets["pruned"])
    assert written["ideal_speedup"] == pytest.approx(ideal) and 1.0 < ideal < 2.0
    assert written["settings"]["num_samples"] == 30 and written["settings"]["steps"] == 2
    for entry in (written["teacher"], written["pruned"]):  # speed timed over 1 step, reported for the 2-step sampler
        assert entry["steps_per_s"] == pytest.approx(1 / entry["seconds"])
        assert entry["samples_per_s"] == pytest.approx(4 * entry["steps_per_s"] / 2)


def test_the_npz_holds_exactly_the_scored_samples(evaluated_run):
    metrics, run_dir, _, classifier, _ = evaluated_run
    scorer = digits_fid(classifier, image_size=8)
    scorer.set_reference(images_to_uint8(load_digits_tensors(8)[0]))
    for name in ("teacher", "pruned"):
        images, labels = load_npz(run_dir / "evaluate" / f"samples_{name}.npz")
        assert images.dtype == torch.uint8 and images.shape == (30, 8, 8, 1)
        assert labels.tolist() == [index % 10 for index in range(30)]
        assert scorer.score(images) == pytest.approx(metrics[name]["fid"], rel=1e-5)
        assert conditional_accuracy(classifier, uint8_to_images(images), labels) == metrics[name]["conditional_accuracy"]


def test_the_samples_come_from_the_configured_sampler_and_seed(evaluated_run):
    _, run_dir, nets, _, cfg = evaluated_run
    images, labels = load_npz(run_dir / "evaluate" / "samples_teacher.npz")
    sampling = cfg.sampling
    expected = sample_images(nets["teacher"], GaussianDiffusion(), labels, steps=2, method=sampling.method,
                             cfg_scale=sampling.cfg_scale, clip_denoised=sampling.clip_denoised, batch_size=16,
                             seed=cfg.seed, progress=False)
    assert torch.equal(images, images_to_uint8(expected))
    pruned, _ = load_npz(run_dir / "evaluate" / "samples_pruned.npz")
    assert not torch.equal(images, pruned)
    for name in ("teacher", "pruned"):
        assert (run_dir / "evaluate" / f"samples_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_a_recovered_model_is_preferred_to_the_freshly_pruned_one(evaluated_run):
    _, run_dir, _, _, cfg = evaluated_run
    recovered, raw = perturbed_dit(depth=3, seed=1), perturbed_dit(depth=3, seed=2)
    (run_dir / "recover").mkdir(exist_ok=True)
    torch.save({"model": raw.state_dict(), "ema": recovered.state_dict()}, run_dir / "recover" / "model.pt")
    try:
        metrics = run_stage(compose_run(run_dir, cfg.paths.cache_dir, "evaluate.models=[pruned]", "evaluate.fid=none",
                                        "evaluate.save_npz=false"))
    finally:
        (run_dir / "recover" / "model.pt").unlink()
    assert metrics["pruned"]["checkpoint"] == str(run_dir / "recover" / "model.pt")
    assert metrics["pruned"]["blocks"] == 3 and metrics["pruned"]["fid"] is None
    assert "teacher" not in metrics and "speedup" not in metrics


def test_an_explicit_pruned_checkpoint_and_the_teacher_alone(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    fixed_classifier(cache_dir)
    teacher = perturbed_dit(depth=4, seed=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    torch.save(prune_blocks(teacher, blocks="blocks", keep=[1]).state_dict(), tmp_path / "d1.pt")
    metrics = run_stage(compose_run(tmp_path / "run", cache_dir, f"teacher.checkpoint={tmp_path / 'teacher.pt'}",
                                    f"evaluate.pruned_checkpoint={tmp_path / 'd1.pt'}"))
    assert metrics["teacher"]["blocks"] == 4 and metrics["pruned"]["blocks"] == 1
    alone = run_stage(compose_run(tmp_path / "run2", cache_dir, f"teacher.checkpoint={tmp_path / 'teacher.pt'}",
                                  "evaluate.models=[teacher]"))
    assert set(alone) == {"teacher", "settings"} and alone["teacher"]["speedup"] == 1.0


@pytest.mark.parametrize("overrides,error,message", [
    (["evaluate.models=[student]"], ValueError, r"evaluate.models=\['student'\] is invalid.*\['teacher', 'pruned'\]"),
    (["evaluate.models=[]"], ValueError, "evaluate.models=\\[\\] is invalid: expected a non-empty list"),
    (["evaluate.fid=kid"], ValueError, "evaluate.fid='kid' is not one of"),
    (["evaluate.fid=inception"], ValueError, "evaluate.fid=inception needs real images.*evaluate.reference_npz"),
    (["evaluate.device=tpu"], ValueError, "evaluate.device='tpu' is not one of"),
    (["data=latents", "data.root=/nonexistent", "model=dit_xl_2"], ValueError,
     "samples 4-channel latents: evaluation needs images, so set evaluate.vae"),
    (["data=latents", "data.root=/nonexistent", "model=dit_xl_2", "evaluate.vae=x", "evaluate.fid=digits"], ValueError,
     "evaluate.fid=digits needs the digits data"),
    (["evaluate.pruned_checkpoint=/nonexistent/model.pt"], FileNotFoundError,
     "evaluate.pruned_checkpoint=/nonexistent/model.pt does not exist"),
])
def test_bad_settings_fail_before_anything_slow_with_the_fix(tmp_path, overrides, error, message):
    torch.save(tiny_dit(depth=4).state_dict(), tmp_path / "teacher.pt")
    cfg = compose_run(tmp_path / "run", tmp_path, f"teacher.checkpoint={tmp_path / 'teacher.pt'}", *overrides)
    with pytest.raises(error, match=message):
        run_stage(cfg)


def test_a_run_folder_without_pruned_outputs_names_the_options(tmp_path):
    torch.save(tiny_dit(depth=4).state_dict(), tmp_path / "teacher.pt")
    cfg = compose_run(tmp_path / "run", tmp_path, f"teacher.checkpoint={tmp_path / 'teacher.pt'}")
    with pytest.raises(FileNotFoundError, match="holds neither recover/model.pt nor prune/pruned.pt.*"
                                                "evaluate.pruned_checkpoint=.*evaluate.models=\\[teacher\\]"):
        run_stage(cfg)
