"""diffusers transformers (DiT, PixArt, SD3, Flux): the callbacks in a user's own module, export back to the model's
own format (config depth, save_pretrained / from_pretrained), the refusals, and the DiT adapter the stages use."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

diffusers = pytest.importorskip("diffusers")

from tests.conftest import quick_trainer  # noqa: E402
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask  # noqa: E402
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate  # noqa: E402
from tinyfusion_pl.families import family_of  # noqa: E402
from tinyfusion_pl.families.diffusers import DiffusersDiTFamily  # noqa: E402
from tinyfusion_pl.models.checkpoints import CheckpointMismatchError  # noqa: E402
from tinyfusion_pl.models.diffusers import DiffusersDiT, build_diffusers, import_diffusers  # noqa: E402
from tinyfusion_pl.pruning.containers import resolve_block_sequence  # noqa: E402
from tinyfusion_pl.pruning.export import prune_blocks  # noqa: E402
from tinyfusion_pl.pruning.lora import LoRALinear, inject_block_lora  # noqa: E402

BATCH = 2

# ---------------------------------------------------------------------------- tiny models and their inputs


def image_inputs(generator):
    return {"hidden_states": torch.randn(BATCH, 2, 4, 4, generator=generator),
            "timestep": torch.randint(0, 1000, (BATCH,), generator=generator)}


def text_inputs(generator, pooled=True):
    inputs = {"encoder_hidden_states": torch.randn(BATCH, 3, 8, generator=generator)}
    if pooled:
        inputs["pooled_projections"] = torch.randn(BATCH, 8, generator=generator)
    return inputs


def dit():
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                           num_layers=4, sample_size=4, patch_size=2, num_embeds_ada_norm=3)


def dit_inputs(generator):
    return {**image_inputs(generator), "class_labels": torch.randint(0, 3, (BATCH,), generator=generator)}


def pixart():
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                              out_channels=4, num_layers=4, sample_size=4, patch_size=2,
                                              cross_attention_dim=16, caption_channels=8)


def pixart_inputs(generator):
    return {**image_inputs(generator), **text_inputs(generator, pooled=False),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def sd3():
    # Blocks 0 and 2 carry SD3.5's second self-attention: export must renumber them in the config.
    return diffusers.SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=2, out_channels=2, num_layers=4,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                           caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=4,
                                           dual_attention_layers=(0, 2))


def sd3_inputs(generator):
    return {**image_inputs(generator), **text_inputs(generator)}


def flux():
    return diffusers.FluxTransformer2DModel(in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                            axes_dims_rope=(2, 2, 4))


def flux_inputs(generator):
    image_ids = torch.zeros(4, 3)
    image_ids[:, 1] = torch.arange(4)  # (image tokens, 3) rotary positions
    return {"hidden_states": torch.randn(BATCH, 4, 4, generator=generator),  # (N, image tokens, C), packed latents
            "timestep": torch.rand(BATCH, generator=generator), **text_inputs(generator),
            "img_ids": image_ids, "txt_ids": torch.zeros(3, 3)}


# name -> (model, its inputs, a pattern whose every decision the family can export, the family's block lists)
MODELS = {
    "dit": (dit, dit_inputs, [[1, 1], [1, 3]], ["transformer_blocks"]),  # per-block random embedders: 0 stays
    "pixart": (pixart, pixart_inputs, "2:4", ["transformer_blocks"]),
    "sd3": (sd3, sd3_inputs, [[1, 3], [1, 1]], ["transformer_blocks"]),  # the context-pre-only last block stays
    "flux": (flux, flux_inputs, "1:2", ["transformer_blocks", "single_transformer_blocks"]),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def inputs_for(name, seed):
    return MODELS[name][1](torch.Generator().manual_seed(seed))


def predict(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def with_blocks_passed_through(model, dropped, inputs):
    """The model's prediction with the blocks at the global indices `dropped` returning their input streams."""

    def pass_through(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (kwargs["encoder_hidden_states"], hidden) if isinstance(output, tuple) else hidden

    blocks = [block for path in family_of(model).blocks for block in model.get_submodule(path)]
    handles = [blocks[index].register_forward_hook(pass_through, with_kwargs=True) for index in dropped]
    try:
        return predict(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------- a user's own module


class UserModule(L.LightningModule):
    """Written the way a user would: their diffusers transformer under `transformer`, trained to predict noise."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.transformer = make(name).train()

    def training_step(self, batch, batch_index):
        inputs = inputs_for(self.name, seed=100 + self.global_step)
        prediction = self.transformer(**inputs).sample
        return (prediction - torch.randn_like(prediction)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_a_users_diffusers_model_is_pruned_exported_and_reloads_at_its_new_depth(name, tmp_path):
    module = UserModule(name)
    model = module.transformer
    family = family_of(model)
    _, _, pattern, lists = MODELS[name]
    assert list(family.blocks) == lists
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    flags_before = {key: parameter.requires_grad for key, parameter in model.named_parameters()}
    hooks_before = hook_count(model)

    mask = DifferentiableBlockMask([f"transformer.{path}" for path in family.blocks], pattern=pattern, plot=False)
    trainer = quick_trainer(tmp_path, max_steps=3, callbacks=[mask, CoOptimizedWeightUpdate(method="lora", rank=2)])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(torch.arange(3)), batch_size=1))

    after = model.state_dict()  # the model exactly as it was: same keys, weights, flags, no hooks
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert {key: parameter.requires_grad for key, parameter in model.named_parameters()} == flags_before
    assert hook_count(model) == hooks_before

    model.eval()
    kept = mask.kept_blocks
    total = sum(family.block_counts(model))
    dropped = [index for index in range(total) if index not in kept]
    shallow = prune_blocks(model, blocks=list(family.blocks), keep=kept)
    assert type(shallow) is type(model)
    counts = family.block_counts(shallow)
    assert sum(counts) == len(kept)
    assert [shallow.config[argument] for argument in family.depth_arguments] == counts

    inputs = inputs_for(name, seed=7)
    expected = with_blocks_passed_through(model, dropped, inputs)
    torch.testing.assert_close(predict(shallow, inputs), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(predict(model, inputs), expected), "the dropped blocks must have mattered"

    shallow.save_pretrained(tmp_path / "pruned")
    reloaded, info = type(model).from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert [reloaded.config[argument] for argument in family.depth_arguments] == counts
    torch.testing.assert_close(predict(reloaded.eval(), inputs), expected, rtol=1e-5, atol=1e-6)
    if name == "sd3":
        assert list(reloaded.config.dual_attention_layers) == [new for new, old in enumerate(kept) if old in (0, 2)]


def test_sd3_refuses_a_decision_that_drops_its_context_pre_only_last_block():
    model = make("sd3")
    assert family_of(model).required_blocks(model) == (3,)
    with pytest.raises(ValueError, match=r"drops block 3, the last block.*context-pre-only.*would not load strictly"):
        prune_blocks(model, blocks="transformer_blocks", keep=[0, 2])


def test_dit_keeps_block_0_unless_the_next_kept_block_holds_the_same_embedder():
    model = make("dit")  # diffusers initialises every block's timestep/label embedder on its own
    family = family_of(model)
    assert family.required_blocks(model) == (0,)
    with pytest.raises(ValueError, match=r"drops block 0 .*output layer is conditioned on the timestep/label embedder"):
        prune_blocks(model, blocks="transformer_blocks", keep=[1, 3])

    shared = model.transformer_blocks[0].norm1.emb.state_dict()  # as in checkpoints converted from DiT
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    assert family.required_blocks(model) == ()
    inputs = inputs_for("dit", seed=3)
    shallow = prune_blocks(model, blocks="transformer_blocks", keep=[1, 3])
    torch.testing.assert_close(predict(shallow, inputs), with_blocks_passed_through(model, [0, 2], inputs))


# ---------------------------------------------------------------------------- lookup and the optional extra


def test_family_of_finds_every_diffusers_class_and_the_adapter():
    names = {name: family_of(make(name)).name for name in MODELS}
    assert names == {"dit": "dit_transformer_2d", "pixart": "pixart_transformer_2d", "sd3": "sd3_transformer_2d",
                     "flux": "flux_transformer_2d"}
    assert isinstance(family_of(DiffusersDiT(make("dit"))), DiffusersDiTFamily)
    with pytest.raises(TypeError, match=r"called the diffusers way.*build_diffusers"):
        family_of(make("pixart")).sample_shape(make("pixart"))


def test_importing_the_families_leaves_diffusers_unimported():
    code = "import sys, tinyfusion_pl.families, tinyfusion_pl.pruning; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_without_diffusers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what a missing package looks like to `import`
    with pytest.raises(ImportError, match=r'pip install -e "\.\[diffusers\]"'):
        import_diffusers()


# ---------------------------------------------------------------------------- the DiT adapter of the stages

TINY_DIT = dict(depth=4, learn_sigma=True, num_attention_heads=2, attention_head_dim=8, in_channels=1, sample_size=4,
                patch_size=2, num_embeds_ada_norm=3)


def adapter_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 1, 4, 4, generator=generator), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2]))


def test_the_dit_adapter_is_described_like_our_dit_and_drops_labels_once_per_sample():
    torch.manual_seed(0)
    net = build_diffusers("dit", **TINY_DIT)
    family = family_of(net)
    assert family.blocks == ("model.transformer_blocks",)
    assert (family.sample_shape(net), family.num_classes(net), family.null_label(net)) == ((1, 4, 4), 3, 3)
    assert family.label_dropout(net) == 0.1 and net.model.config.out_channels == 2
    embedders = {id(block.norm1.emb) for block in net.model.transformer_blocks}
    assert len(embedders) == 1, "a random DiT gets one embedder, shared by every block, as DiT has"

    x, t, y = adapter_inputs()
    net.eval()
    null = torch.full_like(y, 3)
    with torch.no_grad():
        assert net(x, t, y).shape == (3, 2, 4, 4)
        forced = net(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
        torch.testing.assert_close(forced, net(x, t, torch.where(torch.tensor([True, False, True]), null, y)))
        net.class_dropout_prob = 0.5
        net.train()
        torch.manual_seed(1)
        drawn = net(x, t, y)
        torch.manual_seed(1)
        drop = torch.rand(3) < 0.5
        net.eval()
        torch.testing.assert_close(drawn, net(x, t, torch.where(drop, null, y)))


def test_the_dit_adapter_saves_a_diffusers_folder_and_loads_it_or_a_state_dict(tmp_path):
    torch.manual_seed(0)
    net = build_diffusers("dit", **TINY_DIT).eval()
    family = family_of(net)
    x, t, y = adapter_inputs()
    shallow = prune_blocks(net, blocks=family.blocks, keep=[1, 2])  # block 0 may go: one shared embedder
    folder = family.save(shallow, tmp_path / "pruned.pt")
    assert len({id(block.norm1.emb) for block in shallow.model.transformer_blocks}) == 1, "still one embedder"
    reloaded_model = diffusers.DiTTransformer2DModel.from_pretrained(folder)
    assert reloaded_model.config.num_layers == 2
    loaded = family.load(folder, like=net).eval()
    assert isinstance(loaded, DiffusersDiT) and loaded.model.transformer_blocks[1].norm1.emb is \
        loaded.model.transformer_blocks[0].norm1.emb
    with torch.no_grad():
        expected = shallow(x, t, y)
        torch.testing.assert_close(loaded(x, t, y), expected)
        torch.testing.assert_close(family.load(shallow.state_dict(), like=net).eval()(x, t, y), expected)

    own = DiffusersDiT(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=4, sample_size=4,
        patch_size=2, num_embeds_ada_norm=3)).eval()
    assert len({id(block.norm1.emb) for block in own.model.transformer_blocks}) == 4, "unequal embedders stay apart"
    loaded = family.load(own.state_dict(), like=net).eval()  # built shared, loaded per block
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), own(x, t, y))


def test_build_diffusers_refuses_what_it_cannot_build(tmp_path):
    with pytest.raises(ValueError, match=r"kind='unet' is not one of \['dit', 'flux', 'pixart', 'sd3'\]"):
        build_diffusers("unet")
    with pytest.raises(ValueError, match=r"\['hidden_size'\] are not config keywords of DiTTransformer2DModel"):
        build_diffusers("dit", hidden_size=8)
    with pytest.raises(ValueError, match=r"learn_sigma=False but .* in_channels=1 and out_channels=2"):
        build_diffusers("dit", **{**TINY_DIT, "learn_sigma": False}, out_channels=2)
    build_diffusers("dit", **TINY_DIT).save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match=r"is not the model the config describes \(sample_size: config.json 4, model config 8\)"):
        build_diffusers("dit", pretrained=tmp_path / "dit", sample_size=8)
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        build_diffusers("dit", pretrained=tmp_path / "missing")


def test_a_folder_with_fewer_blocks_than_its_config_is_refused(tmp_path):
    net = build_diffusers("dit", **TINY_DIT)
    del net.model.transformer_blocks[3]  # what prune_blocks did before it recorded the depth
    net.save_pretrained(tmp_path / "stale")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: \['transformer_blocks\.3\."):
        family_of(net).load(tmp_path / "stale", like=net)


def test_the_diffusers_digits_experiment_composes_with_smoke():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.test_configs import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=[diffusers_digits,smoke]", "paths.run_dir=unused"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert isinstance(net, DiffusersDiT) and family_of(net).block_counts(net) == [4]
    assert instantiate(cfg.objective).learn_sigma


# ---------------------------------------------------------------------------- where LoRA goes, and shared products


def graph_node_names(output):
    """The names of every autograd node `output` was computed through, each node once."""
    seen, names, stack = set(), [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.append(type(node).__name__)
        stack += [next_node for next_node, _ in node.next_functions]
    return names


# name -> the layers of block 0 that share a product, one group per tuple (Flux: a double-, then a single-stream block)
SHARED_GROUPS = {
    "dit": [("attn1.to_q", "attn1.to_k", "attn1.to_v")],
    "pixart": [("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn2.to_k", "attn2.to_v")],  # attn2's q reads the image
    "sd3": [("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            ("attn2.to_q", "attn2.to_k", "attn2.to_v")],  # block 0 has SD3.5's second attention
    "flux": [[("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")],
             [("proj_mlp", "attn.to_q", "attn.to_k", "attn.to_v")]],  # a single-stream block: one normalised input
}


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_shares_the_products_of_layers_that_read_one_tensor_and_computes_what_separate_layers_do(name):
    family = family_of(make(name))
    models = {}
    for products in ("separate", "shared"):
        model = make(name).double().requires_grad_(False)
        sequence = resolve_block_sequence(model, list(family.blocks))
        inject_block_lora(model, sequence, rank=2)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        if products == "separate":
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.shared_input = None
        models[products] = model

    shared = models["shared"]
    for path, expected_groups in zip(family.blocks, SHARED_GROUPS[name], strict=False) if name == "flux" else \
            [(family.blocks[0], SHARED_GROUPS[name])]:
        block = shared.get_submodule(path)[0]
        names_of = {id(module): module_name for module_name, module in block.named_modules()}
        actual = {tuple(sorted(names_of[id(layer)] for layer in module.shared_input.layers))
                  for module in block.modules() if isinstance(module, LoRALinear) and module.shared_input is not None}
        assert actual == {tuple(sorted(group)) for group in expected_groups}

    inputs = {key: value.double() if torch.is_tensor(value) and value.is_floating_point() else value
              for key, value in inputs_for(name, seed=2).items()}
    results = {}
    for products, model in models.items():
        hidden = inputs["hidden_states"].clone().requires_grad_()
        output = model(**{**inputs, "hidden_states": hidden}).sample
        nodes = graph_node_names(output)
        output.pow(2).sum().backward()
        adapters = {key: parameter.grad for key, parameter in model.named_parameters() if parameter.requires_grad}
        results[products] = (output.detach(), hidden.grad, adapters, nodes.count("SharedInputLoRAFunctionBackward"))
    blocks = sum(family.block_counts(shared))
    expected_products = {"dit": blocks, "pixart": 2 * blocks, "sd3": 3 * 2 + 2 * 2,  # blocks 0 and 2: dual attention
                         "flux": 2 * 2 + 4}[name]
    assert (results["separate"][3], results["shared"][3]) == (0, expected_products)
    torch.testing.assert_close(results["shared"][0], results["separate"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results["shared"][1], results["separate"][1], rtol=1e-10, atol=1e-10)
    assert results["shared"][2].keys() == results["separate"][2].keys()
    for key in results["separate"][2]:
        torch.testing.assert_close(results["shared"][2][key], results["separate"][2][key], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", [None, ["to_q", "timestep_embedder.linear_1"]])
def test_the_weight_update_takes_the_familys_lora_target_unless_given_one(target, tmp_path):
    module = UserModule("dit")
    update = CoOptimizedWeightUpdate(method="lora", rank=2, target=target)
    mask = DifferentiableBlockMask("transformer.transformer_blocks", pattern=[[1, 1], [1, 3]], plot=False)
    trainer = quick_trainer(tmp_path, max_steps=1, callbacks=[mask, update])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(torch.arange(1)), batch_size=1))
    per_block = sorted({name.partition(".")[2] for name in update.wrapped_layers})
    if target is None:  # the Linears of DiT's block; not the copy of the timestep embedder each block holds
        assert per_block == sorted(["norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                    "ff.net.0.proj", "ff.net.2"])
        assert family_of(module.transformer).lora_target == family_of(DiffusersDiT(make("dit"))).lora_target
    else:
        assert per_block == ["attn1.to_q", "norm1.emb.timestep_embedder.linear_1"]
    assert len(update.wrapped_layers) == 4 * len(per_block)
