"""MAR (LTH14/mar): sizes, strict loads, each piece against reference functions written from the published
description, masks, pruning across encoder + decoder, and the pruned export round trip."""

import argparse
import copy
import math

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import quick_trainer
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.families import MARFamily, family_of
from tinyfusion_pl.models import MAR, MAR_models, build_mar, mar_from_checkpoint
from tinyfusion_pl.models.checkpoints import CheckpointMismatchError
from tinyfusion_pl.models.mar import load_mar_state_dict, read_mar_checkpoint
from tinyfusion_pl.objectives.mar import mask_by_order, random_orders
from tinyfusion_pl.pruning.export import prune_blocks

# ---------------------------------------------------------------------------- the published sizes

# name: (width, heads, depth of encoder and of decoder, head depth, head width, reported parameters in millions)
PUBLIC = {
    "MAR-B": (768, 12, 12, 6, 1024, 208),
    "MAR-L": (1024, 16, 16, 8, 1280, 479),
    "MAR-H": (1280, 16, 20, 12, 1536, 943),
    "TinyMAR-D16": (1024, 16, 8, 8, 1280, None),
}
TOKENS, TOKEN_DIM, CLASSES, BUFFER = 256, 16, 1000, 64  # 256px through KL-16: 16 x 16 tokens of 16 channels


def reference_shapes(width, enc_depth, dec_width, dec_depth, head_depth, head_width, tokens=TOKENS,
                     token_dim=TOKEN_DIM, classes=CLASSES, buffer=BUFFER, mlp_ratio=4):
    """Every tensor of the reference MAR (models/mar.py + models/diffloss.py + timm's Block) and its shape."""
    shapes = {
        "class_emb.weight": (classes, width), "fake_latent": (1, width),
        "z_proj.weight": (width, token_dim), "z_proj.bias": (width,),
        "z_proj_ln.weight": (width,), "z_proj_ln.bias": (width,),
        "encoder_pos_embed_learned": (1, tokens + buffer, width),
        "encoder_norm.weight": (width,), "encoder_norm.bias": (width,),
        "decoder_embed.weight": (dec_width, width), "decoder_embed.bias": (dec_width,),
        "mask_token": (1, 1, dec_width), "decoder_pos_embed_learned": (1, tokens + buffer, dec_width),
        "decoder_norm.weight": (dec_width,), "decoder_norm.bias": (dec_width,),
        "diffusion_pos_embed_learned": (1, tokens, dec_width),
    }
    for prefix, dim, depth in (("encoder_blocks", width, enc_depth), ("decoder_blocks", dec_width, dec_depth)):
        hidden = int(dim * mlp_ratio)
        for index in range(depth):
            block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                     "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                     "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.fc1.weight": (hidden, dim),
                     "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
            shapes.update({f"{prefix}.{index}.{key}": shape for key, shape in block.items()})
    w = head_width
    head = {"time_embed.mlp.0.weight": (w, 256), "time_embed.mlp.0.bias": (w,), "time_embed.mlp.2.weight": (w, w),
            "time_embed.mlp.2.bias": (w,), "cond_embed.weight": (w, dec_width), "cond_embed.bias": (w,),
            "input_proj.weight": (w, token_dim), "input_proj.bias": (w,),
            "final_layer.linear.weight": (2 * token_dim, w), "final_layer.linear.bias": (2 * token_dim,),
            "final_layer.adaLN_modulation.1.weight": (2 * w, w), "final_layer.adaLN_modulation.1.bias": (2 * w,)}
    for index in range(head_depth):
        head.update({f"res_blocks.{index}.{key}": shape for key, shape in {
            "in_ln.weight": (w,), "in_ln.bias": (w,), "mlp.0.weight": (w, w), "mlp.0.bias": (w,),
            "mlp.2.weight": (w, w), "mlp.2.bias": (w,), "adaLN_modulation.1.weight": (3 * w, w),
            "adaLN_modulation.1.bias": (3 * w,)}.items()})
    shapes.update({f"diffloss.net.{key}": shape for key, shape in head.items()})
    return shapes


def public_shapes(name):
    width, _, depth, head_depth, head_width, _ = PUBLIC[name]
    return reference_shapes(width, depth, width, depth, head_depth, head_width)


def meta_state_dict(shapes):
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


@pytest.mark.parametrize("name", ["MAR-B", "MAR-L", "MAR-H"])
def test_parameter_counts_are_the_published_ones(name):
    with torch.device("meta"):
        model = MAR_models[name]()
    count = sum(parameter.numel() for parameter in model.parameters())
    assert count == sum(math.prod(shape) for shape in public_shapes(name).values())
    # 207.92M, 478.33M, 942.40M: the reported 208M, 479M, 943M are these counts rounded up to millions.
    assert math.ceil(count / 1e6) == PUBLIC[name][5]


@pytest.mark.parametrize("name", list(PUBLIC))
def test_every_size_loads_a_state_dict_of_the_reference_names_and_shapes_strictly(name):
    with torch.device("meta"):
        model = MAR_models[name]()
    state_dict = meta_state_dict(public_shapes(name))
    assert set(model.state_dict()) == set(state_dict)
    load_mar_state_dict(model, state_dict)
    # the reference checkpoint-last.pth: {'model', 'model_ema', 'optimizer', 'epoch', 'scaler', 'args'}
    args = argparse.Namespace(model="mar_large", img_size=256, vae_stride=16, patch_size=1, diffloss_d=8, blr=1e-4,
                              num_sampling_steps="100", diffusion_batch_mul=4)
    wrapped = {"model": state_dict, "model_ema": meta_state_dict(public_shapes(name)), "optimizer": {},
               "epoch": 799, "scaler": {}, "args": args}
    ema, config = read_mar_checkpoint(wrapped)
    assert ema["fake_latent"] is wrapped["model_ema"]["fake_latent"]
    assert read_mar_checkpoint(wrapped, prefer="model")[0]["fake_latent"] is state_dict["fake_latent"]
    with torch.device("meta"):
        rebuilt = MAR(**config)
    assert rebuilt.architecture() == model.architecture()
    assert read_mar_checkpoint(state_dict) == (state_dict, None)  # a plain state dict records no config


def test_a_checkpoint_of_another_size_is_refused_naming_the_size_it_holds():
    with torch.device("meta"):
        model = build_mar("MAR-L")
    with pytest.raises(CheckpointMismatchError, match=r"this MAR \(encoder 16 \+ decoder 16 blocks at width 1024, "
                       r"head 8 x 1280 \(MAR-L\)\)(.|\n)*holds encoder 12 \+ decoder 12 blocks at width 768, "
                       r"head 6 x 1024 \(MAR-B\): mar_from_checkpoint"):
        load_mar_state_dict(model, meta_state_dict(public_shapes("MAR-B")))


def test_reference_checkpoint_file_loads_its_ema_or_its_model(tmp_path):
    raw, ema = build_mar("MAR-Tiny").state_dict(), build_mar("MAR-Tiny").state_dict()
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "optimizer": {}, "epoch": 3, "args": argparse.Namespace(lr=1e-4)},
               path)
    for use_ema, expected in ((True, ema), (False, raw)):
        loaded = mar_from_checkpoint(path, name="MAR-Tiny", ema=use_ema)
        assert all(torch.equal(loaded.state_dict()[key], expected[key]) for key in expected)
    with torch.device("meta"):
        blueprint = build_mar("MAR-Tiny")
    loaded = MARFamily().load(path, like=blueprint)
    assert torch.equal(loaded.fake_latent, ema["fake_latent"])
    with pytest.raises(CheckpointMismatchError, match=r"holds encoder 4 \+ decoder 4 blocks at width 128, head 3 x 128 "
                       r"\(MAR-Tiny\)"):
        mar_from_checkpoint(path, name="MAR-Mini")


def test_registry_refuses_unknown_names_and_fixed_widths():
    with pytest.raises(ValueError, match=r"unknown MAR model name='MAR-XL'; valid names: MAR-B, MAR-L, MAR-H, "
                       r"TinyMAR-D16, MAR-Tiny, MAR-Mini"):
        build_mar("MAR-XL")
    with pytest.raises(ValueError, match=r"MAR-L fixes encoder_embed_dim \(encoder_embed_dim=1024"):
        build_mar("MAR-L", encoder_embed_dim=512)
    with pytest.raises(ValueError, match=r"encoder_embed_dim=100 must be divisible by encoder_num_heads=16.*"
                       r"label_drop_prob=1\.0 must be in \[0, 1\)"):
        MAR(encoder_embed_dim=100, label_drop_prob=1.0)


def test_digits_entries_take_8x8_single_channel_images_as_16_tokens_of_2x2_pixels():
    model = build_mar("MAR-Tiny")
    assert (model.seq_len, model.token_embed_dim, model.num_classes) == (16, 4, 10)
    assert family_of(model).sample_shape(model) == (1, 8, 8)


# ---------------------------------------------------------------------------- reference functions


def ref_layer_norm(x, weight=None, bias=None, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps)
    return out if weight is None else out * weight + bias


def ref_linear(x, params, name):
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def ref_vit_block(x, params, prefix, heads):
    """timm's pre-norm ViT block: softmax(q k^T / sqrt(d)) v with qkv bias, exact-GELU MLP, LayerNorm eps 1e-6."""
    p = {key[len(prefix) + 1:]: value for key, value in params.items() if key.startswith(prefix + ".")}
    n, tokens, dim = x.shape
    h = ref_layer_norm(x, p["norm1.weight"], p["norm1.bias"])
    q, k, v = ref_linear(h, p, "attn.qkv").reshape(n, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    x = x + ref_linear((weights @ v).transpose(1, 2).reshape(n, tokens, dim), p, "attn.proj")
    h = ref_linear(ref_layer_norm(x, p["norm2.weight"], p["norm2.bias"]), p, "mlp.fc1")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + ref_linear(h, p, "mlp.fc2")


def ref_encoder(params, tokens, mask, class_vector, kept, heads, buffer):
    """Buffer of class tokens + projected tokens, position embedding, LayerNorm, the visible rows, the blocks."""
    x = ref_linear(tokens, params, "z_proj")
    x = torch.cat([class_vector[:, None].expand(-1, buffer, -1), x], dim=1) + params["encoder_pos_embed_learned"]
    x = ref_layer_norm(x, params["z_proj_ln.weight"], params["z_proj_ln.bias"])
    x = torch.stack([x[i, [j for j in range(x.shape[1]) if j < buffer or mask[i, j - buffer] == 0]]
                     for i in range(x.shape[0])])
    for index in kept:
        x = ref_vit_block(x, params, f"encoder_blocks.{index}", heads)
    return ref_layer_norm(x, params["encoder_norm.weight"], params["encoder_norm.bias"])


def ref_decoder(params, encoded, mask, kept, heads, buffer):
    """Mask tokens everywhere, the encoded rows at the visible positions, the blocks, z = tokens + diffusion pos."""
    x = ref_linear(encoded, params, "decoder_embed")
    rows = []
    for i in range(x.shape[0]):
        visible = iter(x[i])
        rows.append(torch.stack([next(visible) if j < buffer or mask[i, j - buffer] == 0 else params["mask_token"][0, 0]
                                 for j in range(buffer + mask.shape[1])]))
    x = torch.stack(rows) + params["decoder_pos_embed_learned"]
    for index in kept:
        x = ref_vit_block(x, params, f"decoder_blocks.{index}", heads)
    x = ref_layer_norm(x, params["decoder_norm.weight"], params["decoder_norm.bias"])
    return x[:, buffer:] + params["diffusion_pos_embed_learned"]


def ref_head(params, x, t, c, depth):
    """SimpleMLPAdaLN: y = time MLP([cos, sin](t f)) + cond(c); adaLN residual MLPs; modulated final linear."""
    p = {key[len("diffloss.net."):]: value for key, value in params.items() if key.startswith("diffloss.net.")}
    silu = torch.nn.functional.silu
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    angles = t[:, None].double() * freqs
    t_emb = ref_linear(silu(ref_linear(torch.cat([torch.cos(angles), torch.sin(angles)], -1), p, "time_embed.mlp.0")),
                       p, "time_embed.mlp.2")
    y = t_emb + ref_linear(c, p, "cond_embed")
    x = ref_linear(x, p, "input_proj")
    for index in range(depth):
        shift, scale, gate = ref_linear(silu(y), p, f"res_blocks.{index}.adaLN_modulation.1").chunk(3, -1)
        h = ref_layer_norm(x, p[f"res_blocks.{index}.in_ln.weight"], p[f"res_blocks.{index}.in_ln.bias"])
        h = ref_linear(silu(ref_linear(h * (1 + scale) + shift, p, f"res_blocks.{index}.mlp.0")), p,
                       f"res_blocks.{index}.mlp.2")
        x = x + gate * h
    shift, scale = ref_linear(silu(y), p, "final_layer.adaLN_modulation.1").chunk(2, -1)
    return ref_linear(ref_layer_norm(x) * (1 + scale) + shift, p, "final_layer.linear")


# A MAR with every structural option away from its default: two latent channels in 2x2 patches, different
# encoder and decoder widths and head counts, a buffer of 3.
SMALL = dict(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=2, encoder_embed_dim=32, encoder_depth=2,
             encoder_num_heads=4, decoder_embed_dim=24, decoder_depth=3, decoder_num_heads=3, class_num=5,
             buffer_size=3, diffloss_d=2, diffloss_w=20)


def randomized_small_mar(seed=0, **overrides):
    """SMALL in float64 with every tensor random (the zero-initialised ones too), in eval mode."""
    torch.manual_seed(seed)
    model = MAR(**{**SMALL, **overrides}).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return model


def masked_batch(model, batch=3, num_masked=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, model.vae_embed_dim, 8, 8, generator=generator, dtype=torch.float64)
    orders = random_orders(batch, model.seq_len, generator=generator)
    return latents, mask_by_order(num_masked, orders).float()


def test_vit_block_matches_the_reference_block():
    model = randomized_small_mar()
    params = model.state_dict()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(model.encoder_blocks[1](x), ref_vit_block(x, params, "encoder_blocks.1", heads=4))


def test_encoder_decoder_and_head_match_the_reference_pieces():
    model = randomized_small_mar()
    params = model.state_dict()
    latents, mask = masked_batch(model)
    labels = torch.tensor([0, 4, 2])
    tokens = model.patchify(latents)
    class_vector = model.class_embedding(labels)
    torch.testing.assert_close(class_vector, params["class_emb.weight"][labels])

    encoded = model.forward_mae_encoder(tokens, mask, class_vector)
    expected_encoded = ref_encoder(params, tokens, mask, class_vector, kept=[0, 1], heads=4, buffer=3)
    assert encoded.shape == (3, 3 + 16 - 10, 32)
    torch.testing.assert_close(encoded, expected_encoded)

    z = model.forward_mae_decoder(encoded, mask)
    torch.testing.assert_close(z, ref_decoder(params, expected_encoded, mask, kept=[0, 1, 2], heads=3, buffer=3))
    torch.testing.assert_close(model.forward_mae(tokens, mask, class_vector), z)

    # the head on given token latents x, steps t and conditions z (rows of the masked tokens)
    rows = z[mask.bool()]
    x = torch.randn(len(rows), model.token_embed_dim, dtype=torch.float64)
    t = torch.randint(0, 1000, (len(rows),))
    out = model.diffloss.net(x, t, rows)
    assert out.shape == (len(rows), 2 * model.token_embed_dim)  # eps, then the variance channels
    torch.testing.assert_close(out, ref_head(params, x, t, rows, depth=2))


def test_patchify_is_the_reference_layout_and_unpatchify_inverts_it():
    model = randomized_small_mar()
    latents = torch.arange(2 * 2 * 8 * 8, dtype=torch.float64).reshape(2, 2, 8, 8)
    tokens = model.patchify(latents)
    # token (row 1, col 2) holds channel 0's 2x2 patch, then channel 1's, each row-major
    patch = latents[0, :, 2:4, 4:6].reshape(-1)
    torch.testing.assert_close(tokens[0, 1 * 4 + 2], patch)
    torch.testing.assert_close(model.unpatchify(tokens), latents)


def test_denoiser_view_is_the_head_on_every_token_conditioned_on_the_transformer():
    model = randomized_small_mar()
    latents, mask = masked_batch(model)
    labels, t = torch.tensor([1, 5, 3]), torch.tensor([0, 500, 999])  # 5 = class_num: the fake latent
    out = model(latents, t, labels, mask=mask)
    tokens = model.patchify(latents)
    class_vector = torch.stack([model.class_emb.weight[1], model.fake_latent[0], model.class_emb.weight[3]])
    z = model.forward_mae(tokens, mask, class_vector)
    head = model.diffloss.net(tokens.reshape(48, -1), t.repeat_interleave(16), z.reshape(48, -1))
    assert out.shape == (3, 4, 8, 8)
    torch.testing.assert_close(model.patchify(out), head.reshape(3, 16, -1))
    # without a mask the encoder sees every token
    torch.testing.assert_close(model(latents, t, torch.tensor([1, 0, 3]), mask=torch.zeros(3, 16)),
                               model(latents, t, torch.tensor([1, 0, 3])))


def test_class_embedding_drops_to_the_fake_latent():
    model = randomized_small_mar(label_drop_prob=0.5)
    labels = torch.tensor([0, 5, 2, 3])
    embedding = model.class_embedding(labels, force_drop_ids=torch.tensor([0, 0, 1, 0]))
    for row, expected in zip(embedding, [model.class_emb.weight[0], model.fake_latent[0], model.fake_latent[0],
                                         model.class_emb.weight[3]], strict=True):
        torch.testing.assert_close(row, expected)
    assert torch.equal(model.class_embedding(labels[:1].repeat(100)), model.class_emb.weight[[0] * 100])  # eval
    model.train()
    torch.manual_seed(0)
    dropped = (model.class_embedding(labels[:1].repeat(2000)) == model.fake_latent).all(dim=1).float().mean()
    assert abs(float(dropped) - 0.5) < 0.05
    with pytest.raises(ValueError, match=r"force_drop_ids has shape \(2,\) but the labels have shape \(4,\)"):
        model.class_embedding(labels, force_drop_ids=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- masks


def test_masks_of_different_counts_in_one_batch_are_refused():
    model = randomized_small_mar()
    latents, _ = masked_batch(model, batch=2)
    mask = torch.zeros(2, 16)
    mask[0, :3], mask[1, :5] = 1, 1
    with pytest.raises(ValueError, match=r"masks \[3, 5\] tokens in different samples"):
        model.forward_mae(model.patchify(latents), mask, model.class_embedding(torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 15\); expected \(N, 16\)"):
        model.forward_mae(model.patchify(latents), mask[:, :15], model.class_embedding(torch.tensor([0, 1])))


def test_gradient_checkpointing_changes_nothing_but_memory():
    model = randomized_small_mar()
    checkpointed = copy.deepcopy(model)
    checkpointed.grad_checkpointing = checkpointed.diffloss.net.grad_checkpointing = True
    latents, mask = masked_batch(model)
    outputs = [net(latents, torch.tensor([3, 30, 300]), torch.tensor([0, 1, 2]), mask=mask) for net in
               (model, checkpointed)]
    torch.testing.assert_close(*outputs)
    outputs[0].square().sum().backward()
    outputs[1].square().sum().backward()
    torch.testing.assert_close(model.encoder_blocks[0].attn.qkv.weight.grad,
                               checkpointed.encoder_blocks[0].attn.qkv.weight.grad)


# ---------------------------------------------------------------------------- the family


def test_family_describes_encoder_then_decoder_as_one_sequence():
    model = build_mar("MAR-Tiny")
    family = family_of(model)
    assert isinstance(family, MARFamily) and family.own_objective == "mar"
    assert family.block_argument("net.") == ["net.encoder_blocks", "net.decoder_blocks"]
    assert family.block_counts(model) == [4, 4]
    assert (family.num_classes(model), family.null_label(model), family.label_dropout(model)) == (10, 10, 0.1)
    condition = family.condition(torch.tensor([1, 2]), drop=torch.tensor([0, 1]))
    assert set(condition) == {"y", "force_drop_ids"}
    out = model.eval()(torch.zeros(2, *family.sample_shape(model)), torch.tensor([10, 10]), **condition)
    assert out.shape == (2, 2, 8, 8)
    shallow = family.at_depth(model, [1, 3])
    assert (shallow.encoder_depth, shallow.decoder_depth, shallow.diffloss_d) == (1, 3, 3)


# ---------------------------------------------------------------------------- pruning across encoder + decoder

DIM = 16
PLANTED = [1, 3, 4, 7]  # over 3 encoder + 5 decoder blocks in 2:4 groups; the first group spans both lists


def planted_mar():
    torch.manual_seed(0)
    return MAR(img_size=4, vae_stride=1, patch_size=1, vae_embed_dim=2, encoder_embed_dim=DIM, encoder_depth=3,
               encoder_num_heads=2, decoder_embed_dim=DIM, decoder_depth=5, decoder_num_heads=2, class_num=3,
               buffer_size=2, diffloss_d=1, diffloss_w=8, attn_dropout=0.0, proj_dropout=0.0)


def step_batch(step, batch_size=16):
    generator = torch.Generator().manual_seed(10_000 + step)
    tokens = torch.randn(batch_size, 16, 2, generator=generator)
    orders = torch.rand(batch_size, 16, generator=generator).argsort(dim=1)
    labels = torch.randint(0, 3, (batch_size,), generator=generator)
    return tokens, mask_by_order(10, orders).float(), labels


def keep_only(net, kept):
    """A copy of net whose block lists hold only the kept blocks (global indices), written without prune_blocks."""
    twin = copy.deepcopy(net)
    depth = len(net.encoder_blocks)
    twin.encoder_blocks = nn.ModuleList(twin.encoder_blocks[index] for index in kept if index < depth)
    twin.decoder_blocks = nn.ModuleList(twin.decoder_blocks[index - depth] for index in kept if index >= depth)
    return twin


def z_of(net, tokens, mask, labels):
    with torch.no_grad():
        return net.forward_mae(tokens, mask, net.class_embedding(labels))


class PlantedMARModule(L.LightningModule):
    """Regresses z of a known subset of its own encoder and decoder blocks (the planted answer)."""

    def __init__(self):
        super().__init__()
        self.net = planted_mar().requires_grad_(False)
        self.teacher = keep_only(self.net, PLANTED)
        self.bias = nn.Parameter(torch.zeros(DIM))

    def training_step(self, batch, batch_idx):
        tokens, mask, labels = step_batch(self.global_step)
        target = z_of(self.teacher, tokens, mask, labels)
        z = self.net.forward_mae(tokens, mask, self.net.class_embedding(labels))
        return (z + self.bias - target).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_planted_blocks_are_found_across_encoder_and_decoder(seed, tmp_path):
    L.seed_everything(seed)
    module = PlantedMARModule()
    mask = DifferentiableBlockMask(["net.encoder_blocks", "net.decoder_blocks"], pattern="2:4", plot=False)
    trainer = quick_trainer(tmp_path, max_steps=80, callbacks=[mask])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(torch.arange(80)), batch_size=1))
    assert mask.kept_blocks == PLANTED
    assert min(mask.confidences) > 2 / 6


@pytest.mark.parametrize("kept, depths", [([0, 2, 4, 7], (2, 2)), ([2, 5, 6, 7], (1, 3)), ([0, 1, 2], (3, 0))],
                         ids=["2+2", "1+3", "3+0"])
def test_pruned_export_saves_and_loads_strictly_computing_the_kept_blocks(kept, depths, tmp_path):
    model = planted_mar().eval()
    family = family_of(model)
    shallow = prune_blocks(model, blocks=family.block_argument(), keep=kept)
    path = family.save(shallow, tmp_path / "pruned.pt")
    with torch.device("meta"):
        blueprint = planted_mar()
    for loaded in (family.load(path, like=blueprint), mar_from_checkpoint(path)):
        assert (loaded.encoder_depth, loaded.decoder_depth) == depths
        tokens, mask, labels = step_batch(0)
        z = loaded.eval().forward_mae(tokens, mask, loaded.class_embedding(labels))
        torch.testing.assert_close(z, z_of(keep_only(model, kept), tokens, mask, labels))
        # the reference functions on the original weights, skipping the dropped blocks
        params = {key: value.double() for key, value in model.state_dict().items()}
        encoder_kept, decoder_kept = [i for i in kept if i < 3], [i - 3 for i in kept if i >= 3]
        class_vector = params["class_emb.weight"][labels]
        encoded = ref_encoder(params, tokens.double(), mask, class_vector, encoder_kept, heads=2, buffer=2)
        expected = ref_decoder(params, encoded, mask, decoder_kept, heads=2, buffer=2)
        torch.testing.assert_close(z.double(), expected, atol=1e-5, rtol=1e-5)
    assert read_mar_checkpoint(path)[1]["encoder_depth"] == depths[0]


def test_mar_l_pruned_to_8_plus_8_loads_strictly_as_tinymar_d16(tmp_path):
    with torch.device("meta"):
        model = build_mar("MAR-L")
    family = family_of(model)
    shallow = prune_blocks(model, blocks=family.block_argument(), keep=list(range(0, 32, 2)))
    path = family.save(shallow, tmp_path / "pruned.pt")
    state_dict, config = read_mar_checkpoint(path)
    assert (config["encoder_depth"], config["decoder_depth"]) == (8, 8)
    with torch.device("meta"):
        tiny = build_mar("TinyMAR-D16")
    load_mar_state_dict(tiny, state_dict)
    assert set(state_dict) == set(public_shapes("TinyMAR-D16"))
    uneven = prune_blocks(model, blocks=family.block_argument(), keep=[*range(10), *range(16, 22)])
    with pytest.raises(CheckpointMismatchError, match=r"holds encoder 10 \+ decoder 6 blocks at width 1024, "
                       r"head 8 x 1280: mar_from_checkpoint"):
        load_mar_state_dict(tiny, uneven.state_dict())
