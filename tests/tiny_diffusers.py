"""Tiny text-conditioned diffusers models for the tests: their configs, a captions file, a save_pretrained folder."""

import torch

# kind -> the diffusers config keywords of a tiny model on 8x8 single-channel latents (3 classes)
TINY_TEXT_MODELS = {
    "pixart": dict(learn_sigma=True, num_layers=4, num_attention_heads=2, attention_head_dim=8, in_channels=1,
                   sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=8),
    "sd3": dict(learn_sigma=False, num_layers=4, num_attention_heads=2, attention_head_dim=8, in_channels=1,
                out_channels=1, sample_size=8, patch_size=2, joint_attention_dim=8, caption_projection_dim=16,
                pooled_projection_dim=6, pos_embed_max_size=4),
    "flux": dict(learn_sigma=False, num_layers=2, num_single_layers=2, num_attention_heads=2, attention_head_dim=8,
                 in_channels=4, joint_attention_dim=8, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4),
                 sample_size=8),
}
NUM_CLASSES = 3


def write_captions(path, kind, tokens=5, mask=False, seed=0):
    """A captions file for a tiny model of `kind`: NUM_CLASSES prompts and the empty one."""
    config = TINY_TEXT_MODELS[kind]
    generator = torch.Generator().manual_seed(seed)
    width = config.get("caption_channels", config.get("joint_attention_dim"))
    captions = {"encoder_hidden_states": torch.randn(NUM_CLASSES + 1, tokens, width, generator=generator)}
    if "pooled_projection_dim" in config:
        captions["pooled_projections"] = torch.randn(NUM_CLASSES + 1, config["pooled_projection_dim"],
                                                     generator=generator)
    if mask:
        captions["encoder_attention_mask"] = torch.ones(NUM_CLASSES + 1, tokens)
        captions["encoder_attention_mask"][:, -2:] = 0  # padding
    torch.save(captions, path)
    return path


def write_pretrained_folder(path, kind, seed=0):
    """A save_pretrained folder of a tiny randomly initialised model of `kind`."""
    from tinyfusion_pl.models.diffusers import build_diffusers

    torch.manual_seed(seed)
    options = {key: value for key, value in TINY_TEXT_MODELS[kind].items() if key != "sample_size" or kind != "flux"}
    build_diffusers(kind, captions="random", num_classes=NUM_CLASSES, **options).save_pretrained(path)
    return path
