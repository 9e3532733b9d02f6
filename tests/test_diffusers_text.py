"""PixArt, SD3 and Flux as class-conditional denoisers: captions per label (a seeded stand-in or a file of text
embeddings), the model called as diffusers' own pipelines call it, folders that reload, and the refusals."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tests.tiny_diffusers import NUM_CLASSES, TINY_TEXT_MODELS, write_captions, write_pretrained_folder  # noqa: E402
from tinyfusion_pl.families import family_of  # noqa: E402
from tinyfusion_pl.families.diffusers import (  # noqa: E402
    DiffusersFluxFamily,
    DiffusersPixArtFamily,
    DiffusersSD3Family,
)
from tinyfusion_pl.models.diffusers import CaptionTable, build_diffusers  # noqa: E402
from tinyfusion_pl.pruning.export import prune_blocks  # noqa: E402

FAMILIES = {"pixart": DiffusersPixArtFamily, "sd3": DiffusersSD3Family, "flux": DiffusersFluxFamily}


def build(kind, seed=0, **options):
    torch.manual_seed(seed)
    config = {**TINY_TEXT_MODELS[kind], "captions": "random", "num_classes": NUM_CLASSES, **options}
    if config["captions"] != "random":
        config.pop("num_classes")
    return build_diffusers(kind, **config).eval()


def batch(kind, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999]) if kind == "pixart" else torch.rand(3, generator=generator)
    return x, t, torch.tensor([0, 2, 1])


def test_pixart_reads_the_caption_of_each_label_and_the_empty_prompt_for_the_null_label(tmp_path):
    net = build("pixart", captions=write_captions(tmp_path / "captions.pt", "pixart", mask=True))
    x, t, y = batch("pixart")
    captions = torch.load(tmp_path / "captions.pt")
    null = torch.full_like(y, NUM_CLASSES)
    drop = torch.tensor([1, 0, 1])
    with torch.no_grad():
        for labels, flags in ((y, None), (torch.where(drop == 1, null, y), None), (y, drop)):
            read = torch.where(drop == 1, null, y) if flags is not None else labels
            expected = net.model(hidden_states=x, timestep=t, encoder_hidden_states=captions["encoder_hidden_states"][read],
                                 encoder_attention_mask=captions["encoder_attention_mask"][read],
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            torch.testing.assert_close(net(x, t, labels, force_drop_ids=flags), expected)
    assert net(x, t, y).shape == (3, 2, 8, 8)  # epsilon and the learned variance
    family = family_of(net)
    assert isinstance(family, DiffusersPixArtFamily) and family.sample_shape(net) == (1, 8, 8)
    assert (family.num_classes(net), family.null_label(net), family.label_dropout(net)) == (3, 3, 0.1)


def test_sd3_is_called_at_sigma_one_minus_t_and_its_velocity_negated():
    net = build("sd3")
    x, t, y = batch("sd3")
    table = net.table
    with torch.no_grad():
        # SD3's pipeline: timestep = 1000 sigma, prediction = noise - data; ours: data - noise at t = 1 - sigma.
        expected = -net.model(hidden_states=x, timestep=1000 * (1 - t), encoder_hidden_states=table.encoder_hidden_states[y],
                              pooled_projections=table.pooled_projections[y]).sample
        torch.testing.assert_close(net(x, t, y), expected)


def pack_by_hand(x):
    """FluxPipeline's packing, written as loops: the token of patch (row, column) lists channel c's 2x2 pixels
    (top left, top right, bottom left, bottom right) at c * 4 + 0..3; its rotary position is (0, row, column)."""
    batch_size, channels, height, width = x.shape
    tokens = torch.zeros(batch_size, (height // 2) * (width // 2), 4 * channels)
    positions = torch.zeros((height // 2) * (width // 2), 3)
    for row in range(height // 2):
        for column in range(width // 2):
            token = row * (width // 2) + column
            positions[token] = torch.tensor([0.0, row, column])
            for channel in range(channels):
                patch = x[:, channel, 2 * row:2 * row + 2, 2 * column:2 * column + 2]  # (N, 2, 2)
                tokens[:, token, 4 * channel:4 * channel + 4] = patch.reshape(batch_size, 4)
    return tokens, positions


def unpack_by_hand(tokens, channels, height, width):
    x = torch.zeros(tokens.shape[0], channels, height, width)
    for row in range(height // 2):
        for column in range(width // 2):
            for channel in range(channels):
                patch = tokens[:, row * (width // 2) + column, 4 * channel:4 * channel + 4]
                x[:, channel, 2 * row:2 * row + 2, 2 * column:2 * column + 2] = patch.reshape(-1, 2, 2)
    return x


def test_flux_packs_latents_as_its_pipeline_does_and_predicts_in_the_project_convention():
    net = build("flux", sample_size=8)
    x, t, y = batch("flux")
    table = net.table
    tokens, positions = pack_by_hand(x)
    assert torch.equal(unpack_by_hand(tokens, 1, 8, 8), x)
    with torch.no_grad():
        # Flux's pipeline: timestep = sigma (the model scales it by 1000), prediction = noise - data.
        velocity = net.model(hidden_states=tokens, timestep=1 - t, img_ids=positions, txt_ids=torch.zeros(4, 3),
                             encoder_hidden_states=table.encoder_hidden_states[y],
                             pooled_projections=table.pooled_projections[y]).sample
        torch.testing.assert_close(net(x, t, y), -unpack_by_hand(velocity, 1, 8, 8))
    assert family_of(net).sample_shape(net) == (1, 8, 8)


def test_flux_depth_splits_the_two_lists_in_their_configured_proportion():
    net = build_diffusers("flux", captions="random", num_classes=3, depth=4,
                          **{**TINY_TEXT_MODELS["flux"], "num_layers": 2, "num_single_layers": 6})
    assert (net.model.config.num_layers, net.model.config.num_single_layers) == (1, 3)
    with pytest.raises(ValueError, match=r"depth=1: Flux has two block lists"):
        build_diffusers("flux", captions="random", num_classes=3, depth=1, **TINY_TEXT_MODELS["flux"])


def test_the_stand_in_captions_are_seeded_and_outside_the_state_dict():
    first, second = CaptionTable.random(3, 4, 8, 6, seed=0), CaptionTable.random(3, 4, 8, 6, seed=0)
    assert torch.equal(first.encoder_hidden_states, second.encoder_hidden_states)
    assert torch.equal(first.pooled_projections, second.pooled_projections)
    assert not torch.equal(first.encoder_hidden_states, CaptionTable.random(3, 4, 8, 6, seed=1).encoder_hidden_states)
    assert first.encoder_hidden_states.shape == (4, 4, 8) and first.num_classes == 3
    net = build("sd3")
    assert not any(key.startswith("table.") for key in net.state_dict())
    assert set(net.state_dict()) == {f"model.{key}" for key in net.model.state_dict()}


@pytest.mark.parametrize("kind", list(TINY_TEXT_MODELS))
def test_a_pruned_text_model_saves_a_diffusers_folder_that_reloads_with_its_captions(kind, tmp_path):
    captions = write_captions(tmp_path / "captions.pt", kind)
    net = build(kind, captions=captions, **({"sample_size": 8} if kind == "flux" else {}))
    family = family_of(net)
    assert isinstance(family, FAMILIES[kind])
    x, t, y = batch(kind)
    keep = [0, 3] if kind != "pixart" else [1, 2]  # SD3's last block stays
    shallow = prune_blocks(net, blocks=list(family.blocks), keep=keep)
    folder = family.save(shallow, tmp_path / family.checkpoint_name("pruned"))
    assert (folder / "config.json").is_file()
    loaded = family.load(folder, like=net).eval()
    assert type(loaded) is type(net) and sum(family.block_counts(loaded)) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), shallow(x, t, y))
        torch.testing.assert_close(family.load(shallow.state_dict(), like=net).eval()(x, t, y), shallow(x, t, y))


def test_a_pretrained_folder_builds_with_a_captions_file_and_is_refused_without_one(tmp_path):
    folder = write_pretrained_folder(tmp_path / "sd3", "sd3")
    captions = write_captions(tmp_path / "captions.pt", "sd3")
    net = build_diffusers("sd3", pretrained=folder, captions=captions, learn_sigma=False)
    assert net.num_classes == NUM_CLASSES and net.model.config.num_layers == 4
    with pytest.raises(ValueError, match=r"SD3Transformer2DModel is text-conditioned: give model.captions=<file>.*"
                                         r"'encoder_hidden_states' \(num_classes \+ 1, tokens, dim\).*width 8, "
                                         r"pooled width 6.*model.captions=random"):
        build_diffusers("sd3", pretrained=folder)


@pytest.mark.parametrize("captions,message", [
    ("missing", r"captions=.*missing is not a file; give a file written by torch.save"),
    ({"hidden": torch.zeros(4, 5, 8)}, r"holds no 'encoder_hidden_states' tensor"),
    ({"encoder_hidden_states": torch.zeros(4, 5, 8), "pooled_projections": torch.zeros(3, 6)},
     r"'pooled_projections' has shape \(3, 6\), not \(4, pooled dim\)"),
    ({"encoder_hidden_states": torch.zeros(4, 5, 7), "pooled_projections": torch.zeros(4, 6)},
     r"does not fit this SD3Transformer2DModel: its embeddings are 7 wide, the model's joint_attention_dim is 8"),
    ({"encoder_hidden_states": torch.zeros(4, 5, 8)}, r"it has no 'pooled_projections', which SD3Transformer2DModel takes"),
    ({"encoder_hidden_states": torch.zeros(6, 5, 8), "pooled_projections": torch.zeros(6, 6)},
     r"it has captions for 5 classes \(and the empty prompt\), the model config says num_classes=3"),
])
def test_a_captions_file_that_does_not_fit_is_refused_naming_the_problem(captions, message, tmp_path):
    path = tmp_path / "captions.pt"
    if isinstance(captions, dict):
        torch.save(captions, path)
    else:
        path = tmp_path / captions
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_diffusers("sd3", captions=path, num_classes=NUM_CLASSES, **TINY_TEXT_MODELS["sd3"])


@pytest.mark.slow  # a train.py process: about 10 s of imports; the same refusal runs in-process above
def test_train_py_on_a_pretrained_text_model_without_captions_stops_with_the_format(tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_configs import REPO

    folder = write_pretrained_folder(tmp_path / "sd3", "sd3")
    result = subprocess.run(
        [sys.executable, "train.py", "model=diffusers_sd3", f"model.pretrained={folder}", "objective=flow_matching",
         "sampling.clip_denoised=null", "sampling.method=heun", "stage=pretrain", f"hydra.run.dir={tmp_path / 'run'}",
         "logger=none", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "SD3Transformer2DModel is text-conditioned: give model.captions=<file>" in result.stderr
    assert "'pooled_projections' (num_classes + 1, pooled dim)" in result.stderr
    assert not any((tmp_path / "run").glob("pretrain/*")), "nothing trained or written"


@pytest.mark.parametrize("experiment,counts,objective", [
    ("diffusers_pixart_digits", [4], "GaussianDiffusion"),
    ("diffusers_sd3_digits", [4], "FlowMatching"),
    ("diffusers_flux_digits", [1, 3], "FlowMatching"),  # 4 blocks in the configured 2:6 proportion
])
def test_the_text_conditioned_digits_experiments_compose_with_smoke(experiment, counts, objective):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.test_configs import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment=[{experiment},smoke]", "paths.run_dir=unused"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    family = family_of(net)
    assert family.block_counts(net) == counts and family.num_classes(net) == 10
    assert family.sample_shape(net) == (1, 8, 8)
    assert type(instantiate(cfg.objective)).__name__ == objective
