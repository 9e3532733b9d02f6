"""Checkpoint layouts, config inference, registry matching and strict loading with explained mismatches."""

import argparse
import re

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from tests.test_dit import REGISTRY_SPEC, dit_block_shapes, dit_state_dict_shapes, meta_state_dict
from tinyfusion_pl.models import (
    CheckpointMismatchError,
    DiT,
    build_dit,
    dit_from_checkpoint,
    extract_state_dict,
    infer_dit_config,
    load_checkpoint_file,
    load_dit_state_dict,
    match_registry,
)

DIGITS = dict(input_size=8, in_channels=1, num_classes=10)


def random_tiny_dit(seed: int, **overrides) -> DiT:
    """A DiT-Tiny/2 for 8x8 single-channel digits with every weight random (so outputs tell models apart)."""
    torch.manual_seed(seed)
    model = build_dit("DiT-Tiny/2", **{**DIGITS, **overrides}).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(0.2 * torch.randn_like(parameter))
    return model


def digits_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (
        torch.randn(4, 1, 8, 8, generator=generator),
        torch.tensor([1.0, 50.0, 500.0, 999.0]),
        torch.tensor([0, 3, 9, 5]),
    )


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def renumbered(state_dict: dict, kept_blocks: list[int]) -> dict:
    """Keep the given blocks of a state dict and number them 0..K-1, as depth-pruning export does."""
    new_index = {old: new for new, old in enumerate(kept_blocks)}
    result = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match is None:
            result[key] = value
        elif int(match.group(1)) in new_index:
            result[f"blocks.{new_index[int(match.group(1))]}.{match.group(2)}"] = value
    return result


class NotAWeight:
    """An arbitrary pickled class, which weights-only loading must refuse."""


# ----------------------------------------------------------------------------------------------------
# extract_state_dict: the layouts
# ----------------------------------------------------------------------------------------------------


def test_plain_state_dict_passes_through_and_loads_into_an_equal_model():
    model = random_tiny_dit(0)
    state_dict = model.state_dict()
    assert same_tensors(extract_state_dict(state_dict), state_dict)
    loaded = dit_from_checkpoint(state_dict).eval()
    x, t, y = digits_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_loaded_model_owns_its_weights():
    model = random_tiny_dit(0)
    loaded = dit_from_checkpoint(model.state_dict())
    with torch.no_grad():
        loaded.blocks[0].attn.qkv.weight.zero_()
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0


def test_reference_dict_honours_prefer_and_falls_back_with_a_warning():
    raw, ema = random_tiny_dit(0).state_dict(), random_tiny_dit(1).state_dict()
    checkpoint = {
        "model": raw,
        "ema": ema,
        "opt": {"state": {}},
        "args": argparse.Namespace(model="DiT-Tiny/2"),
    }
    assert same_tensors(extract_state_dict(checkpoint), ema)
    assert same_tensors(extract_state_dict(checkpoint, prefer="model"), raw)
    with pytest.warns(UserWarning, match=r"no 'ema' weights; using its 'model' weights"):
        assert same_tensors(extract_state_dict({"model": raw, "opt": {}}), raw)


def test_lightning_checkpoint_with_net_and_averaged_model_ema():
    net, other = random_tiny_dit(0), random_tiny_dit(1)

    class Module(nn.Module):  # the attribute layout of our DiffusionModule: net + AveragedModel ema
        def __init__(self):
            super().__init__()
            self.net = net
            self.ema = AveragedModel(other)

    lightning_state = Module().state_dict()
    assert "ema.n_averaged" in lightning_state and "ema.module.pos_embed" in lightning_state
    checkpoint = {"epoch": 3, "global_step": 120, "state_dict": lightning_state, "optimizer_states": []}
    assert same_tensors(extract_state_dict(checkpoint), other.state_dict())
    assert same_tensors(extract_state_dict(checkpoint, prefer="model"), net.state_dict())
    without_ema = {"state_dict": {key: v for key, v in lightning_state.items() if key.startswith("net.")}}
    with pytest.warns(
        UserWarning, match=r"no EMA \('ema.module.'\) weights; using its raw \('net.'\) weights"
    ):
        assert same_tensors(extract_state_dict(without_ema), net.state_dict())


def test_ddp_and_compile_prefixes_are_stripped():
    model = random_tiny_dit(0)
    # DistributedDataParallel prefixes 'module.', torch.compile's OptimizedModule '_orig_mod.'.
    ddp_keys = {f"module.{key}": value for key, value in model.state_dict().items()}
    compiled_ddp_keys = {f"module._orig_mod.{key}": value for key, value in model.state_dict().items()}
    assert same_tensors(extract_state_dict(ddp_keys), model.state_dict())
    assert same_tensors(extract_state_dict({"ema": compiled_ddp_keys}), model.state_dict())
    lightning = {"state_dict": {f"net._orig_mod.{key}": v for key, v in model.state_dict().items()}}
    with pytest.warns(UserWarning, match="no EMA"):
        assert same_tensors(extract_state_dict(lightning), model.state_dict())


def test_extract_state_dict_errors_name_what_was_found():
    with pytest.raises(ValueError, match=r"prefer='best' is not allowed: use 'ema' .* or 'model'"):
        extract_state_dict({"w": torch.zeros(1)}, prefer="best")
    with pytest.raises(
        ValueError, match=r"unknown checkpoint layout with top-level keys step, weights, notes"
    ):
        extract_state_dict({"step": 3, "weights": [1, 2], "notes": "x"})
    with pytest.raises(ValueError, match=r"got an object of type list"):
        extract_state_dict([torch.zeros(1)])
    with pytest.raises(ValueError, match=r"got an empty dict"):
        extract_state_dict({})
    with pytest.raises(ValueError, match=r"no denoiser weights.*found the prefixes student., teacher."):
        extract_state_dict({"state_dict": {"teacher.w": torch.zeros(1), "student.w": torch.zeros(1)}})


# ----------------------------------------------------------------------------------------------------
# infer_dit_config and match_registry
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-L/4", "DiT-B/8", "DiT-S/2", "DiT-D7/2", "DiT-Mini/1"])
def test_infer_dit_config_reads_the_constructor_arguments_back(name):
    depth, hidden, heads, patch = REGISTRY_SPEC[name]
    data = dict(input_size=16, in_channels=3, num_classes=7, learn_sigma=False)
    shapes = dit_state_dict_shapes(depth, hidden, patch, **data)
    config = infer_dit_config(meta_state_dict(shapes))
    assert config == dict(
        depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, mlp_ratio=4.0, **data
    )
    assert match_registry(meta_state_dict(shapes)) == [name]


def test_head_count_rule_for_widths_outside_the_registry():
    # 192 is a multiple of 64: 64-wide heads, so 3; 96 is not: the largest count up to 16 dividing 96 is 16.
    for hidden, heads in [(192, 3), (96, 16)]:
        with torch.device("meta"):
            model = DiT(hidden_size=hidden, num_heads=2, depth=2, input_size=8, patch_size=2)
        assert infer_dit_config(model.state_dict())["num_heads"] == heads
        assert match_registry(model.state_dict()) is None


def test_infer_dit_config_errors():
    with pytest.raises(ValueError, match=r"lacks x_embedder.proj.weight, pos_embed.*Is it a DiT state dict"):
        infer_dit_config({"encoder.weight": torch.zeros(2, 2)})
    gapped = {
        key: v
        for key, v in meta_state_dict(dit_state_dict_shapes(4, 128, 2)).items()
        if "blocks.1." not in key
    }
    with pytest.raises(ValueError, match=r"block indices 0, 2, 3 are not 0..2.*Renumber the kept blocks"):
        infer_dit_config(gapped)
    assert match_registry(gapped) is None


# ----------------------------------------------------------------------------------------------------
# Depth-pruned checkpoints and mismatch messages
# ----------------------------------------------------------------------------------------------------

BK_SDM_KEPT = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]


def test_xl_pruned_to_14_renumbered_blocks_loads_into_dit_d14():
    with torch.device("meta"):
        teacher = build_dit("DiT-XL/2")
        student = build_dit("DiT-D14/2")
    pruned = renumbered(teacher.state_dict(), BK_SDM_KEPT)
    assert match_registry(pruned) == ["DiT-D14/2"]
    assert infer_dit_config(pruned)["depth"] == 14
    load_dit_state_dict(student, pruned)
    assert student.blocks[13].attn.qkv.weight.shape == (3 * 1152, 1152)
    assert not student.pos_embed.requires_grad  # a meta model takes the tensors but keeps pos_embed frozen


def test_small_pruned_checkpoint_loads_and_computes_the_kept_blocks():
    model = random_tiny_dit(0)
    kept = [1, 2, 5, 7]
    shallow = dit_from_checkpoint(renumbered(model.state_dict(), kept)).eval()
    assert len(shallow.blocks) == 4
    x, t, y = digits_batch()
    with torch.no_grad():
        tokens = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, train=False)
        for index in kept:
            tokens = model.blocks[index](tokens, c)
        expected = model.unpatchify(model.final_layer(tokens, c))
        torch.testing.assert_close(shallow(x, t, y), expected, rtol=0, atol=0)


def test_d14_checkpoint_into_xl_names_missing_keys_and_the_fitting_entry():
    with torch.device("meta"):
        xl = build_dit("DiT-XL/2")
    d14 = meta_state_dict(dit_state_dict_shapes(14, 1152, 2))
    missing_count = 14 * len(dit_block_shapes(1152))
    with pytest.raises(CheckpointMismatchError) as caught:
        load_dit_state_dict(xl, d14)
    message = str(caught.value)
    assert f"missing keys ({missing_count}): blocks.14." in message
    assert "unexpected keys" not in message
    assert "fits DiT-D14/2 (depth 14, hidden_size 1152, patch_size 2)" in message
    assert isinstance(caught.value, RuntimeError)


def test_xl_checkpoint_into_d14_names_unexpected_keys_and_xl():
    with torch.device("meta"):
        d14 = build_dit("DiT-D14/2")
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)unexpected keys \(140\): blocks.14.*fits DiT-XL/2"
    ):
        load_dit_state_dict(d14, meta_state_dict(dit_state_dict_shapes(28, 1152, 2)))


def test_shape_mismatch_names_the_tensors_and_the_fitting_entry():
    model = random_tiny_dit(0)
    with pytest.raises(CheckpointMismatchError) as caught:
        dit_from_checkpoint(model.state_dict(), name="DiT-Tiny/4")
    message = str(caught.value)
    assert "x_embedder.proj.weight: checkpoint (128, 1, 2, 2) vs model (128, 1, 4, 4)" in message
    assert "pos_embed: checkpoint (1, 16, 128) vs model (1, 4, 128)" in message
    assert "fits DiT-Tiny/2" in message


def test_checkpoint_outside_the_registry_and_non_dit_state_dicts_are_explained():
    with torch.device("meta"):
        odd_width = DiT(hidden_size=96, num_heads=4, depth=2, input_size=8).state_dict()
        target = build_dit("DiT-Tiny/2")
    with pytest.raises(
        CheckpointMismatchError, match=r"No registry entry fits this checkpoint \(depth 2, hidden_size 96"
    ):
        load_dit_state_dict(target, odd_width)
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)unexpected keys \(1\): encoder.weight.*not look like a DiT"
    ):
        load_dit_state_dict(target, {"encoder.weight": torch.zeros(2)})


def test_named_build_uses_the_checkpoint_data_keywords_and_rejects_unknown_names():
    model = random_tiny_dit(0, learn_sigma=False)
    loaded = dit_from_checkpoint(model.state_dict(), name="DiT-Tiny/2")
    assert (loaded.in_channels, loaded.out_channels, loaded.num_classes, loaded.input_size) == (1, 1, 10, 8)
    with pytest.raises(ValueError, match=r"unknown DiT model name='DiT-Huge/2'; valid names: DiT-XL/2"):
        dit_from_checkpoint(model.state_dict(), name="DiT-Huge/2")


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def test_checkpoint_files_in_every_layout_load_through_dit_from_checkpoint(tmp_path):
    raw, ema = random_tiny_dit(0), random_tiny_dit(1)
    x, t, y = digits_batch()
    plain_path, reference_path = tmp_path / "tiny.pt", tmp_path / "0010000.pt"
    torch.save(ema.state_dict(), plain_path)
    args = argparse.Namespace(model="DiT-Tiny/2", image_size=8)  # the reference code stores its args so
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args}, reference_path)

    assert isinstance(load_checkpoint_file(reference_path)["args"], argparse.Namespace)
    with torch.no_grad():
        for path, prefer, source in [
            (plain_path, "ema", ema),
            (reference_path, "ema", ema),
            (reference_path, "model", raw),
        ]:
            loaded = dit_from_checkpoint(path, prefer=prefer).eval()
            torch.testing.assert_close(loaded(x, t, y), source(x, t, y), rtol=0, atol=0)


def test_unreadable_files_fail_with_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(
        FileNotFoundError, match=rf"checkpoint path='{re.escape(str(missing))}' does not exist"
    ):
        dit_from_checkpoint(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match=rf"could not read checkpoint '{re.escape(str(garbage))}'"):
        load_checkpoint_file(garbage)
    pickled_object = tmp_path / "object.pt"
    torch.save({"weights": torch.zeros(1), "extra": NotAWeight()}, pickled_object)
    with pytest.raises(
        RuntimeError, match=r"weights-only loading refuses.*load_checkpoint_file\(path, weights_only=False\)"
    ):
        load_checkpoint_file(pickled_object)
    assert isinstance(load_checkpoint_file(pickled_object, weights_only=False)["extra"], NotAWeight)
