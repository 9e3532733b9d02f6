"""SiT: parity with the functional DiT reference in float time, CFG, registry shapes, sizes, checkpoints."""

import pytest
import torch

from tests.test_dit import (
    TINY,
    dit_block_shapes,
    dit_state_dict_shapes,
    meta_state_dict,
    reference_dit_forward,
)
from tinyfusion_pl.models import (
    CheckpointMismatchError,
    DiT,
    SiT,
    SiT_models,
    build_dit,
    build_sit,
    load_dit_state_dict,
    match_registry,
    sit_from_checkpoint,
)

# The SiT registry as published (willisma/SiT, the DiT sizes), TinyFusion's TinySiT-D14 and the CPU sizes:
# name -> (depth, hidden_size, num_heads, patch_size).
SIT_REGISTRY_SPEC = {
    "SiT-XL/2": (28, 1152, 16, 2), "SiT-XL/4": (28, 1152, 16, 4), "SiT-XL/8": (28, 1152, 16, 8),
    "SiT-L/2": (24, 1024, 16, 2), "SiT-L/4": (24, 1024, 16, 4), "SiT-L/8": (24, 1024, 16, 8),
    "SiT-B/2": (12, 768, 12, 2), "SiT-B/4": (12, 768, 12, 4), "SiT-B/8": (12, 768, 12, 8),
    "SiT-S/2": (12, 384, 6, 2), "SiT-S/4": (12, 384, 6, 4), "SiT-S/8": (12, 384, 6, 8),
    "TinySiT-D14/2": (14, 1152, 16, 2),
    "SiT-Tiny/1": (8, 128, 4, 1), "SiT-Tiny/2": (8, 128, 4, 2), "SiT-Tiny/4": (8, 128, 4, 4),
    "SiT-Mini/1": (12, 256, 4, 1), "SiT-Mini/2": (12, 256, 4, 2), "SiT-Mini/4": (12, 256, 4, 4),
}  # fmt: skip

# SiT-XL/2 (the size of DiT-XL/2): 675.1M parameters, the frozen pos_embed counted as in the state dict.
SIT_XL_2_PARAMS = 675_129_632
DIGITS = dict(input_size=8, in_channels=1, num_classes=10)


def randomise(model: SiT, seed: int, std: float = 0.3) -> SiT:
    """Make every weight but the fixed pos_embed random, so adaLN gates and the output layer are non-zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(std * torch.randn_like(parameter))
    return model.eval()


def tiny_sit(seed: int = 0) -> SiT:
    """A float64 tiny SiT (learned sigma) with random weights."""
    return randomise(SiT(**TINY).double(), seed)


def float_time_inputs(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.0, 0.137, 0.5, 1.0][:batch], dtype=torch.float64)
    y = torch.tensor([0, 3, 4, 1][:batch])
    return x, t, y


# ----------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------


def test_forward_matches_functional_reference_in_float_time_and_drops_the_sigma_half():
    model = tiny_sit()
    x, t, y = float_time_inputs()
    # The reference embeds t as given: a SiT that rescaled t (e.g. by 1000) or rounded it would differ.
    full = reference_dit_forward(model.state_dict(), x, t, y, patch=2, num_heads=4, out_channels=8)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (4, TINY["in_channels"], 8, 8)
    assert full[:, 4:].abs().mean() > 0.1  # the dropped sigma half is really computed and non-zero
    torch.testing.assert_close(out, full[:, :4], rtol=1e-9, atol=1e-9)


def test_fractional_times_are_distinct_inputs():
    model = tiny_sit()
    x, _, y = float_time_inputs(batch=2)
    with torch.no_grad():
        early = model(x, torch.tensor([0.2, 0.2], dtype=torch.float64), y)
        later = model(x, torch.tensor([0.4, 0.4], dtype=torch.float64), y)  # the same step if cast to int
    assert (early - later).abs().max() > 1e-3


def test_sit_is_dit_backbone_with_the_first_in_channels_returned():
    sit = tiny_sit(seed=2)
    dit = DiT(**TINY).double().eval()
    dit.load_state_dict(sit.state_dict(), strict=True)
    x, t, y = float_time_inputs()
    drop = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            sit(x, t, y, force_drop_ids=drop), dit(x, t, y, force_drop_ids=drop)[:, :4]
        )


def test_without_learned_sigma_the_output_is_the_whole_prediction():
    config = dict(
        input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=4
    )
    model = randomise(SiT(**config, learn_sigma=False).double(), seed=3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([0.05, 0.9], dtype=torch.float64), torch.tensor([2, 0])
    expected = reference_dit_forward(model.state_dict(), x, t, y, patch=4, num_heads=2, out_channels=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_channels, guided", [("default", 3), (None, 4), (1, 1)])
def test_forward_with_cfg_matches_manual_guidance(guidance_channels, guided):
    model = tiny_sit()
    x, t, y = float_time_inputs(batch=2)
    null, scale = TINY["num_classes"], 4.0
    sd = model.state_dict()
    cond = reference_dit_forward(sd, x, t, y, patch=2, num_heads=4, out_channels=8)[:, :4]
    uncond = reference_dit_forward(sd, x, t, torch.full_like(y, null), patch=2, num_heads=4, out_channels=8)[
        :, :4
    ]
    guided_part = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    expected = torch.cat(
        [torch.cat([guided_part, cond[:, guided:]], 1), torch.cat([guided_part, uncond[:, guided:]], 1)]
    )

    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]), scale)
    options = {} if guidance_channels == "default" else {"guidance_channels": guidance_channels}
    with torch.no_grad():
        out = model.forward_with_cfg(*args, **options)
    assert out.shape == (4, 4, 8, 8)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_forward_with_cfg_guides_at_most_the_returned_channels():
    model = tiny_sit()
    x, t, y = float_time_inputs(batch=2)
    with pytest.raises(ValueError, match=r"guidance_channels=5 .* use an int from 1 to in_channels=4"):
        model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 1.5, guidance_channels=5
        )


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


def test_registry_has_exactly_the_specified_names():
    assert list(SiT_models) == list(SIT_REGISTRY_SPEC)


@pytest.mark.parametrize("name", list(SIT_REGISTRY_SPEC))
def test_every_registry_entry_strict_loads_a_state_dict_of_the_specified_shapes(name):
    depth, hidden, heads, patch = SIT_REGISTRY_SPEC[name]
    with torch.device("meta"):
        model = build_sit(name)
    assert type(model) is SiT
    assert (len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size) == (depth, heads, patch)
    assert (model.in_channels, model.out_channels, model.num_classes, model.input_size) == (4, 8, 1000, 32)
    shapes = dit_state_dict_shapes(depth, hidden, patch)
    result = model.load_state_dict(meta_state_dict(shapes), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == shapes


def test_sit_xl_2_has_dit_xl_2_parameter_count_and_tinysit_has_14_blocks():
    with torch.device("meta"):
        sit_xl, dit_xl, tiny_sit_d14 = (
            build_sit("SiT-XL/2"),
            build_dit("DiT-XL/2"),
            build_sit("TinySiT-D14/2"),
        )
    count = sum(parameter.numel() for parameter in sit_xl.parameters())
    assert count == SIT_XL_2_PARAMS == sum(parameter.numel() for parameter in dit_xl.parameters())
    assert len(tiny_sit_d14.blocks) == 14


def test_registry_factories_take_data_keywords_and_refuse_to_change_the_width():
    model = build_sit("SiT-Tiny/2", input_size=16, in_channels=1, num_classes=10, learn_sigma=False, depth=3)
    shapes = dit_state_dict_shapes(3, 128, 2, in_channels=1, input_size=16, num_classes=10, learn_sigma=False)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == shapes
    with pytest.raises(
        ValueError, match=r"SiT-S/2 fixes hidden_size \(hidden_size=384.*got hidden_size=512.*SiT\(\.\.\.\)"
    ):
        build_sit("SiT-S/2", hidden_size=512)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(
        ValueError,
        match=r"unknown SiT model name='SiT-XXL/2'; valid names: SiT-XL/2, .*TinySiT-D14/2, .*SiT-Mini/4\. ",
    ):
        build_sit("SiT-XXL/2")


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def digits_sit(seed: int) -> SiT:
    return randomise(build_sit("SiT-Tiny/2", **DIGITS), seed, std=0.2)


def digits_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (
        torch.randn(3, 1, 8, 8, generator=generator),
        torch.tensor([0.0, 0.31, 0.97]),
        torch.tensor([0, 3, 9]),
    )


def test_checkpoint_files_load_through_sit_from_checkpoint(tmp_path):
    raw, ema = digits_sit(0), digits_sit(1)
    plain_path, reference_path = tmp_path / "SiT-Tiny-2-8x8.pt", tmp_path / "0010000.pt"
    torch.save(ema.state_dict(), plain_path)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}}, reference_path)
    x, t, y = digits_batch()
    with torch.no_grad():
        for path, name, prefer, source in [
            (plain_path, None, "ema", ema),
            (plain_path, "SiT-Tiny/2", "ema", ema),
            (reference_path, None, "ema", ema),
            (reference_path, "SiT-Tiny/2", "model", raw),
        ]:
            loaded = sit_from_checkpoint(path, name, prefer=prefer).eval()
            assert type(loaded) is SiT and loaded.learn_sigma
            out = loaded(x, t, y)
            assert out.shape == (3, 1, 8, 8)
            torch.testing.assert_close(out, source(x, t, y), rtol=0, atol=0)


def test_wrong_checkpoints_raise_mismatch_errors_that_name_the_fitting_sit_entry():
    state_dict = digits_sit(0).state_dict()
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)x_embedder.proj.weight: checkpoint .*fits SiT-Tiny/2"
    ):
        sit_from_checkpoint(state_dict, name="SiT-Tiny/4")
    with pytest.raises(ValueError, match=r"unknown SiT model name='DiT-Tiny/2'; valid names: SiT-XL/2"):
        sit_from_checkpoint(state_dict, name="DiT-Tiny/2")

    with torch.device("meta"):
        xl = build_sit("SiT-XL/2")
    d14 = meta_state_dict(dit_state_dict_shapes(14, 1152, 2))
    with pytest.raises(CheckpointMismatchError) as caught:
        load_dit_state_dict(xl, d14)
    message = str(caught.value)
    assert (
        f"does not fit this SiT:\n  missing keys ({14 * len(dit_block_shapes(1152))}): blocks.14." in message
    )
    assert (
        "fits TinySiT-D14/2 (depth 14, hidden_size 1152, patch_size 2): build_sit('TinySiT-D14/2'" in message
    )
    assert "sit_from_checkpoint(checkpoint) loads it" in message
    assert match_registry(d14, SiT_models) == ["TinySiT-D14/2"] and match_registry(d14) == ["DiT-D14/2"]
