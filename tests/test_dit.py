"""DiT: parity with an independent functional re-derivation, CFG, label dropout, registry shapes and sizes."""

import math

import numpy as np
import pytest
import torch

from tinyfusion_pl.models import DiT, DiT_models, build_dit
from tinyfusion_pl.models.dit import LabelEmbedder, TimestepEmbedder

# The registry as published (DiT paper Table 1, TinyFusion) and as specified for CPU sizes:
# name -> (depth, hidden_size, num_heads, patch_size).
REGISTRY_SPEC = {
    "DiT-XL/2": (28, 1152, 16, 2), "DiT-XL/4": (28, 1152, 16, 4), "DiT-XL/8": (28, 1152, 16, 8),
    "DiT-L/2": (24, 1024, 16, 2), "DiT-L/4": (24, 1024, 16, 4), "DiT-L/8": (24, 1024, 16, 8),
    "DiT-B/2": (12, 768, 12, 2), "DiT-B/4": (12, 768, 12, 4), "DiT-B/8": (12, 768, 12, 8),
    "DiT-S/2": (12, 384, 6, 2), "DiT-S/4": (12, 384, 6, 4), "DiT-S/8": (12, 384, 6, 8),
    "DiT-D19/2": (19, 1152, 16, 2), "DiT-D14/2": (14, 1152, 16, 2), "DiT-D7/2": (7, 1152, 16, 2),
    "DiT-Tiny/1": (8, 128, 4, 1), "DiT-Tiny/2": (8, 128, 4, 2), "DiT-Tiny/4": (8, 128, 4, 4),
    "DiT-Mini/1": (12, 256, 4, 1), "DiT-Mini/2": (12, 256, 4, 2), "DiT-Mini/4": (12, 256, 4, 4),
}  # fmt: skip

# Published parameter counts: DiT paper (XL/L/B/S at patch 2) and TinyFusion (D19, D14, D7).
PUBLISHED_PARAMS = {
    "DiT-XL/2": 675e6, "DiT-L/2": 458e6, "DiT-B/2": 130e6, "DiT-S/2": 33e6,
    "DiT-D19/2": 459e6, "DiT-D14/2": 340e6, "DiT-D7/2": 173e6,
}  # fmt: skip


def dit_block_shapes(hidden: int, mlp_ratio: float = 4.0) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one DiT block, relative to 'blocks.<i>.'."""
    mlp_hidden = int(hidden * mlp_ratio)
    return {
        "attn.qkv.weight": (3 * hidden, hidden),
        "attn.qkv.bias": (3 * hidden,),
        "attn.proj.weight": (hidden, hidden),
        "attn.proj.bias": (hidden,),
        "mlp.fc1.weight": (mlp_hidden, hidden),
        "mlp.fc1.bias": (mlp_hidden,),
        "mlp.fc2.weight": (hidden, mlp_hidden),
        "mlp.fc2.bias": (hidden,),
        "adaLN_modulation.1.weight": (6 * hidden, hidden),
        "adaLN_modulation.1.bias": (6 * hidden,),
    }


def dit_state_dict_shapes(
    depth: int,
    hidden: int,
    patch: int,
    in_channels: int = 4,
    input_size: int = 32,
    num_classes: int = 1000,
    learn_sigma: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a facebookresearch/DiT state dict, written out from the architecture description."""
    out_channels = 2 * in_channels if learn_sigma else in_channels
    tokens = (input_size // patch) ** 2
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_channels, hidden),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for index in range(depth):
        for name, shape in dit_block_shapes(hidden).items():
            shapes[f"blocks.{index}.{name}"] = shape
    return shapes


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Meta tensors with the given shapes (no memory), for strict loads of full-size models."""
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


# ----------------------------------------------------------------------------------------------------
# Independent functional reference (float64), from the published formulas
# ----------------------------------------------------------------------------------------------------


def reference_pos_embed(hidden: int, grid: int) -> np.ndarray:
    """2-D sin-cos embedding, token by token: channels [0, D/2) encode the column, [D/2, D) the row."""
    quarter = hidden // 4
    table = np.zeros((grid * grid, hidden), dtype=np.float64)
    for row in range(grid):
        for col in range(grid):
            for channel in range(hidden):
                position = col if channel < hidden // 2 else row
                k = channel % (hidden // 2)
                frequency = 10000.0 ** (-(k % quarter) / quarter)
                table[row * grid + col, channel] = (
                    math.sin(position * frequency) if k < quarter else math.cos(position * frequency)
                )
    return table


def reference_timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos(t w_k) for k < dim/2, then sin(t w_k)], w_k = 10000^(-k / (dim / 2))."""
    k = np.arange(dim // 2, dtype=np.float64)
    frequencies = np.power(10000.0, -k / (dim // 2))
    angles = np.outer(t.numpy().astype(np.float64), frequencies)
    return torch.from_numpy(np.concatenate([np.cos(angles), np.sin(angles)], axis=1))


def layer_norm_no_affine(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def reference_dit_forward(
    sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, patch: int, num_heads: int, out_channels: int
) -> torch.Tensor:
    """DiT forward written from the formulas, directly on state-dict tensors."""
    batch, channels, height, width = x.shape
    rows, cols = height // patch, width // patch
    hidden = sd["x_embedder.proj.weight"].shape[0]
    # Patchify: each token is its patch flattened in (channel, dy, dx) order, like the conv weight.
    patches = x.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, rows * cols, channels * patch * patch)
    conv_as_matrix = sd["x_embedder.proj.weight"].reshape(hidden, -1)
    tokens = patches @ conv_as_matrix.T + sd["x_embedder.proj.bias"]
    # pos_embed is a float32 parameter (as in the public checkpoints), so round it as the model stores it.
    tokens = tokens + torch.from_numpy(
        reference_pos_embed(hidden, rows).astype(np.float32).astype(np.float64)
    )

    t_emb = linear(
        silu(linear(reference_timestep_features(t), sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2"
    )
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h * (1 + scale[:, None, :]) + shift[:, None, :]

    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})
    head_dim = hidden // num_heads
    for index in range(depth):
        prefix = f"blocks.{index}"
        mod = linear(silu(c), sd, f"{prefix}.adaLN_modulation.1")
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            mod[:, i * hidden : (i + 1) * hidden] for i in range(6)
        )

        h = modulate(layer_norm_no_affine(tokens), shift_a, scale_a)
        qkv = linear(h, sd, f"{prefix}.attn.qkv")
        q, k, v = qkv[..., :hidden], qkv[..., hidden : 2 * hidden], qkv[..., 2 * hidden :]
        heads_out = []
        for head in range(num_heads):
            cols_h = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols_h] @ k[..., cols_h].transpose(1, 2) / math.sqrt(head_dim)
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            weights = weights / weights.sum(-1, keepdim=True)
            heads_out.append(weights @ v[..., cols_h])
        attention = linear(torch.cat(heads_out, dim=-1), sd, f"{prefix}.attn.proj")
        tokens = tokens + gate_a[:, None, :] * attention

        h = modulate(layer_norm_no_affine(tokens), shift_m, scale_m)
        mlp = linear(gelu_tanh(linear(h, sd, f"{prefix}.mlp.fc1")), sd, f"{prefix}.mlp.fc2")
        tokens = tokens + gate_m[:, None, :] * mlp

    final_mod = linear(silu(c), sd, "final_layer.adaLN_modulation.1")
    shift, scale = final_mod[:, :hidden], final_mod[:, hidden:]
    per_token = linear(modulate(layer_norm_no_affine(tokens), shift, scale), sd, "final_layer.linear")

    # Unpatchify: token (r, c) fills pixels [r*p, (r+1)*p) x [c*p, (c+1)*p); features ordered (dy, dx, channel).
    out = torch.zeros(batch, out_channels, height, width, dtype=per_token.dtype)
    for r in range(rows):
        for col in range(cols):
            block = per_token[:, r * cols + col].reshape(batch, patch, patch, out_channels)
            out[:, :, r * patch : (r + 1) * patch, col * patch : (col + 1) * patch] = block.permute(
                0, 3, 1, 2
            )
    return out


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, num_classes=5)


def randomised_tiny_dit(seed: int = 0) -> DiT:
    """A float64 tiny DiT whose zero-initialised parts (adaLN, final layer) are made non-zero."""
    torch.manual_seed(seed)
    model = DiT(**TINY).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(0.3 * torch.randn_like(parameter))
    return model


def tiny_inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.0, 17.5, 999.0, 421.0][:batch], dtype=torch.float64)
    y = torch.tensor([0, 3, 4, 1][:batch])
    return x, t, y


# ----------------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------------


def test_pos_embed_matches_independent_sincos_and_is_a_frozen_parameter():
    model = DiT(**{**TINY, "hidden_size": 48, "input_size": 12})
    expected = reference_pos_embed(48, 6)
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), expected, atol=1e-6)
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()


def test_timestep_embedding_follows_cos_then_sin_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0], dtype=torch.float64)
    features = TimestepEmbedder.timestep_embedding(t, 256, dtype=torch.float64)
    torch.testing.assert_close(features, reference_timestep_features(t), rtol=0, atol=1e-12)


def test_forward_matches_functional_reference():
    model = randomised_tiny_dit()
    x, t, y = tiny_inputs()
    sd = model.state_dict()
    expected = reference_dit_forward(sd, x, t, y, patch=2, num_heads=4, out_channels=8)
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert expected.abs().mean() > 0.1  # the randomised gates make the output non-trivial
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_parity_with_rectangular_patch_layout_and_no_learned_sigma():
    torch.manual_seed(3)
    config = dict(
        input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=4
    )
    model = DiT(**config, learn_sigma=False).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(0.3 * torch.randn_like(parameter))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([5.0, 250.0], dtype=torch.float64), torch.tensor([2, 0])
    expected = reference_dit_forward(model.state_dict(), x, t, y, patch=4, num_heads=2, out_channels=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), expected, rtol=1e-9, atol=1e-9)


def test_fresh_model_is_adaln_zero_identity_blocks_and_zero_output():
    torch.manual_seed(0)
    model = DiT(**TINY).eval()
    x, t, y = (tensor.float() if tensor.is_floating_point() else tensor for tensor in tiny_inputs())
    with torch.no_grad():
        tokens = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, train=False)
        for block in model.blocks:
            torch.testing.assert_close(block(tokens, c), tokens, rtol=0, atol=0)
        assert torch.count_nonzero(model(x, t, y)) == 0


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance and label dropout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_channels, guided", [(3, 3), (None, 4), (1, 1)])
def test_forward_with_cfg_matches_manual_guidance(guidance_channels, guided):
    model = randomised_tiny_dit()
    x, t, y = tiny_inputs(batch=2)
    null = TINY["num_classes"]
    scale = 4.0
    sd = model.state_dict()
    cond = reference_dit_forward(sd, x, t, y, patch=2, num_heads=4, out_channels=8)
    uncond = reference_dit_forward(sd, x, t, torch.full_like(y, null), patch=2, num_heads=4, out_channels=8)
    guided_eps = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
    expected = torch.cat(
        [torch.cat([guided_eps, cond[:, guided:]], 1), torch.cat([guided_eps, uncond[:, guided:]], 1)]
    )

    with torch.no_grad():
        out = model.forward_with_cfg(
            torch.cat([x, x]),
            torch.cat([t, t]),
            torch.cat([y, torch.full_like(y, null)]),
            scale,
            guidance_channels,
        )
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_cfg_modes_differ_only_on_the_fourth_noise_channel():
    model = randomised_tiny_dit()
    x, t, y = tiny_inputs(batch=2)
    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 5)]), 3.0)
    with torch.no_grad():
        dit_style, standard = (
            model.forward_with_cfg(*args),
            model.forward_with_cfg(*args, guidance_channels=None),
        )
    torch.testing.assert_close(dit_style[:, :3], standard[:, :3])
    torch.testing.assert_close(dit_style[:, 4:], standard[:, 4:])
    assert not torch.allclose(dit_style[:, 3], standard[:, 3])


@pytest.mark.parametrize("bad", [0, 5, True, 2.0])
def test_forward_with_cfg_rejects_bad_guidance_channels(bad):
    model = randomised_tiny_dit()
    x, t, y = tiny_inputs(batch=2)
    with pytest.raises(ValueError, match=r"guidance_channels=.* use an int from 1 to in_channels=4"):
        model.forward_with_cfg(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), 1.5, guidance_channels=bad
        )


def test_forward_with_cfg_rejects_odd_batch():
    model = randomised_tiny_dit()
    x, t, y = tiny_inputs(batch=3)
    with pytest.raises(ValueError, match=r"even batch .* got 3 samples"):
        model.forward_with_cfg(x, t, y, 1.5)


def test_force_drop_ids_use_the_null_row_even_in_eval_mode():
    model = randomised_tiny_dit()
    x, t, y = tiny_inputs()
    null = TINY["num_classes"]
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
        by_hand = model(x, t, torch.tensor([null, y[1].item(), null]))
    torch.testing.assert_close(dropped, by_hand, rtol=0, atol=0)
    expected = reference_dit_forward(model.state_dict(), x, t, torch.tensor([null, y[1], null]), 2, 4, 8)
    torch.testing.assert_close(dropped, expected, rtol=1e-9, atol=1e-9)


def test_label_dropout_in_training_only_and_forced_ids_override_randomness():
    embedder = LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.5)
    null_row = embedder.embedding_table.weight[10]
    labels = torch.arange(4000) % 10
    torch.manual_seed(0)
    with torch.no_grad():
        trained = embedder(labels, train=True)
        evaluated = embedder(labels, train=False)
        forced_none = embedder(labels, train=True, force_drop_ids=torch.zeros_like(labels))
    dropped_share = (trained == null_row).all(-1).float().mean().item()
    assert abs(dropped_share - 0.5) < 0.05  # 4000 Bernoulli(0.5) draws: std 0.008
    assert not (evaluated == null_row).all(-1).any()
    torch.testing.assert_close(forced_none, embedder.embedding_table.weight[labels])


def test_label_table_has_null_row_only_with_dropout_and_force_drop_needs_it():
    assert DiT(**TINY, class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 5
    assert DiT(**TINY).y_embedder.embedding_table.num_embeddings == 6
    model = DiT(**TINY, class_dropout_prob=0.0)
    x, t, y = (v.float() if v.is_floating_point() else v for v in tiny_inputs())
    with pytest.raises(ValueError, match=r"class_dropout_prob=0.*no null row"):
        model(x, t, y, force_drop_ids=torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match=r"force_drop_ids has shape \(2,\) but the labels have shape \(3,\)"):
        DiT(**TINY)(x, t, y, force_drop_ids=torch.tensor([1, 0]))


# ----------------------------------------------------------------------------------------------------
# Constructor validation
# ----------------------------------------------------------------------------------------------------


def test_constructor_reports_every_bad_argument_at_once():
    every_problem = (
        r"input_size=9 must be divisible by patch_size=2.*hidden_size=30 must be divisible by num_heads=4"
        r".*class_dropout_prob=1.0 must be in \[0, 1\)"
    )
    with pytest.raises(ValueError, match=every_problem):
        DiT(input_size=9, hidden_size=30, num_heads=4, depth=1, class_dropout_prob=1.0)
    with pytest.raises(ValueError, match=r"depth=0 must be a positive int"):
        DiT(depth=0)
    with pytest.raises(ValueError, match=r"hidden_size=6 must be divisible by 4"):
        DiT(hidden_size=6, num_heads=2, depth=1)


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


def test_registry_has_exactly_the_specified_names():
    assert set(DiT_models) == set(REGISTRY_SPEC)


@pytest.mark.parametrize("name", list(REGISTRY_SPEC))
def test_every_registry_entry_strict_loads_a_state_dict_of_the_specified_shapes(name):
    depth, hidden, heads, patch = REGISTRY_SPEC[name]
    with torch.device("meta"):
        model = build_dit(name)
    assert (len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size) == (depth, heads, patch)
    assert (model.in_channels, model.out_channels, model.num_classes, model.input_size) == (4, 8, 1000, 32)
    shapes = dit_state_dict_shapes(depth, hidden, patch)
    result = model.load_state_dict(meta_state_dict(shapes), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == shapes


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_parameter_counts_match_published_sizes(name):
    with torch.device("meta"):
        model = build_dit(name)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.01


def test_registry_factories_take_data_keywords_and_a_depth_override():
    model = build_dit("DiT-Tiny/2", input_size=16, in_channels=1, num_classes=10, learn_sigma=False, depth=3)
    shapes = dit_state_dict_shapes(3, 128, 2, in_channels=1, input_size=16, num_classes=10, learn_sigma=False)
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == shapes
    assert model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 4])).shape == (
        2,
        1,
        16,
        16,
    )


def test_registry_entry_refuses_to_change_its_width():
    with pytest.raises(
        ValueError, match=r"DiT-S/2 fixes hidden_size \(hidden_size=384.*got hidden_size=512.*DiT\(\.\.\.\)"
    ):
        build_dit("DiT-S/2", hidden_size=512)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(
        ValueError, match=r"unknown DiT model name='DiT-XXL/2'; valid names: DiT-XL/2, .*DiT-D14/2"
    ):
        build_dit("DiT-XXL/2")
