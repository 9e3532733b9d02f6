"""Class-conditional sampling from any denoiser, images as uint8 NHWC, and the ADM evaluator's .npz format.

uint8 NHWC is the one image format of evaluation: what the .npz files hold, what FID reads, what the
standard ADM evaluator (guided-diffusion's evaluations/evaluator.py, used by DiT and TinyFusion) scores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.families import ModelFamily, family_of
from tinyfusion_pl.io import write_atomically
from tinyfusion_pl.objectives import DiffusionObjective

# Stable Diffusion's VAE latents are scaled by this factor before DiT sees them (DiT, TinyFusion).
SD_VAE_SCALE = 0.18215
IMAGE_CHANNELS = (1, 3)
NPZ_IMAGES_KEY = "arr_0"  # the key the ADM evaluator reads
NPZ_LABELS_KEY = "labels"  # extra key, ignored by the ADM evaluator

Decoder = Callable[[torch.Tensor], torch.Tensor]


def class_balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ... (N,): every class equally often, up to one sample."""
    for name, value in (("num_samples", num_samples), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name}={value!r} is invalid: expected a positive int.")
    return torch.arange(num_samples) % num_classes


def _validate_sampling_arguments(num_classes: int | None, labels: torch.Tensor, cfg_scale: float, batch_size: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.numel() == 0 \
            or labels.is_floating_point() or labels.is_complex():
        described = (f"a {labels.ndim}-D {labels.dtype} tensor of {labels.numel()} elements"
                     if isinstance(labels, torch.Tensor) else type(labels).__name__)
        raise ValueError(f"labels must be a non-empty 1-D integer tensor of class indices, got {described}; "
                         "build them with class_balanced_labels(num_samples, num_classes).")
    if num_classes is not None and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"labels range over [{int(labels.min())}, {int(labels.max())}] but the net has "
                         f"num_classes={num_classes}: use class indices in [0, {num_classes - 1}].")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or cfg_scale < 1.0:
        raise UsageError(f"cfg_scale={cfg_scale!r} is invalid: expected a number >= 1 (1.0 = no guidance, "
                         "DiT's published samples use 1.5).")
    if cfg_scale > 1.0 and num_classes is None:
        raise UsageError(f"cfg_scale={cfg_scale} needs a class-conditional net; this one has no classes. "
                         "Use cfg_scale=1.0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} is invalid: expected a positive int (images per forward batch).")


@torch.no_grad()
def sample_images(
    net: nn.Module,
    objective: DiffusionObjective,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    guidance_channels: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    decode: Decoder | None = None,
    progress: bool = True,
    description: str = "sampling",
    family: ModelFamily | None = None,
    first_index: int = 0,
    **sampler_options: Any,
) -> torch.Tensor:
    """Class-conditional samples (N, ...) for `labels`, drawn batch by batch on the net's device, on the CPU.

    The net's family (`family`, default family_of(net)) gives the sample shape, the conditioning and the null label.
    cfg_scale > 1 applies classifier-free guidance; guidance_channels None guides every noise channel, 3 is
    DiT's reproduction setting. `sampler_options` go to `objective.sample` (GaussianDiffusion: steps, method,
    eta, clip_denoised; FlowMatching: steps, method, ...), which checks them before anything runs. The same
    seed and batch size give the same starting noise to every net, so a teacher and its pruned student can be
    compared sample by sample. Each batch draws its noise from its own stream, seeded by `seed` and the number of
    its first image (`first_index` numbers the first of `labels`): a share of the images, sampled in the same
    batches elsewhere (another rank), comes out as the same images. `decode` maps each batch of the net's samples to images in [-1, 1] (a VAE
    decoder for latent models, see sd_vae_decoder); without it the net's samples are returned as they are.
    """
    family = family_of(net) if family is None else family
    _validate_sampling_arguments(family.num_classes(net), labels, cfg_scale, batch_size)
    objective.check_sampler_options(sampler_options)
    device = next(net.parameters()).device
    model = net
    if cfg_scale > 1.0:
        model = objective.guided_model(net, cfg_scale, null_label=family.null_label(net),
                                       guidance_channels=guidance_channels)
    generator = torch.Generator(device)
    shape = family.sample_shape(net)
    batches = []
    was_training = net.training
    net.eval()  # a DiT in train mode would drop labels at random
    try:
        with tqdm(total=len(labels), desc=description, unit="img", disable=not progress) as bar:
            for start, batch_labels in zip(range(0, len(labels), batch_size), labels.split(batch_size), strict=True):
                generator.manual_seed(batch_seed(seed, first_index + start))
                noise = torch.randn((len(batch_labels), *shape), device=device, generator=generator)  # (B, C, H, W)
                samples = objective.sample(model, noise, model_kwargs=family.condition(batch_labels.to(device)),
                                           generator=generator, **sampler_options)  # (B, C, H, W)
                if decode is not None:
                    samples = decode(samples)  # (B, 3, H', W') images in [-1, 1]
                batches.append(samples.float().cpu())
                bar.update(len(batch_labels))
    finally:
        net.train(was_training)
    return torch.cat(batches)  # (N, C, H, W)


def batch_seed(seed: int, first_image: int) -> int:
    """The seed of the random stream of the sampling batch that starts at image number `first_image`."""
    return int(np.random.SeedSequence([seed, first_image]).generate_state(1, np.uint64)[0])


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] as uint8 (N, H, W, C) in [0, 255], rounded and clipped, on the CPU."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor in [-1, 1], got {shape}.")
    channels = images.shape[1]
    if channels not in IMAGE_CHANNELS:
        raise ValueError(
            f"images have {channels} channels, but an image has 1 (gray) or 3 (RGB): these look like latents. "
            "Decode them first: pass decode= to sample_images, e.g. sd_vae_decoder('stabilityai/sd-vae-ft-ema') "
            "(needs `pip install diffusers`), or in stage=evaluate set evaluate.vae=<name or local folder>."
        )
    levels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)  # (N, C, H, W)
    return levels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)


def uint8_to_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) images back to float (N, C, H, W) in [-1, 1] (e.g. for a sample grid)."""
    images = check_uint8_nhwc(images, "images")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)


def check_uint8_nhwc(images: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """`images` as a uint8 (N, H, W, C) tensor with C in (1, 3), or one error that says what was expected."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[-1] not in IMAGE_CHANNELS:
        described = (f"a {images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                     else type(images).__name__)
        raise ValueError(f"{name} must be uint8 images (N, H, W, C) with C = 1 or 3, got {described}; "
                         "convert samples in [-1, 1] with images_to_uint8.")
    return images


def save_npz(path: str | Path, images: torch.Tensor | np.ndarray, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 (N, H, W, C) images under 'arr_0' (the ADM evaluator's sample batch format), atomically.

    Labels, when given, go under 'labels', which the ADM evaluator ignores.
    """
    arrays = {NPZ_IMAGES_KEY: check_uint8_nhwc(images, "images").numpy()}
    if labels is not None:
        if len(labels) != len(arrays[NPZ_IMAGES_KEY]):
            raise ValueError(f"labels has {len(labels)} entries for {len(arrays[NPZ_IMAGES_KEY])} images; "
                             "pass one label per image or none.")
        arrays[NPZ_LABELS_KEY] = torch.as_tensor(labels).cpu().numpy()

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:  # a file handle: np.savez would append '.npz' to a bare path
            np.savez(handle, **arrays)

    return write_atomically(path, write)


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a sample batch .npz: uint8 (N, H, W, C) images from 'arr_0', and labels when present."""
    with np.load(path) as archive:
        if NPZ_IMAGES_KEY not in archive:
            raise UsageError(f"{path} has no '{NPZ_IMAGES_KEY}' array (keys: {sorted(archive.files)}); a sample "
                             "batch holds uint8 (N, H, W, C) images under 'arr_0'.")
        images = check_uint8_nhwc(archive[NPZ_IMAGES_KEY], f"'{NPZ_IMAGES_KEY}' of {path}")
        labels = torch.from_numpy(archive[NPZ_LABELS_KEY]) if NPZ_LABELS_KEY in archive else None
    return images, labels


def sd_vae_decoder(pretrained: str, device: torch.device | str = "cpu", scale: float = SD_VAE_SCALE) -> Decoder:
    """A decoder from DiT latents (scaled by `scale`) to RGB images in [-1, 1], through diffusers' AutoencoderKL.

    pretrained: a Hugging Face name such as 'stabilityai/sd-vae-ft-ema' (downloaded once), or a local folder of
    it for machines without network.
    """
    try:
        from diffusers.models import AutoencoderKL
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "decoding latents to images needs diffusers' AutoencoderKL, which is not installed: "
            "`pip install diffusers`. Without network, also copy the VAE folder (e.g. stabilityai/sd-vae-ft-ema) "
            "to the machine and pass its path."
        ) from error
    vae = AutoencoderKL.from_pretrained(pretrained).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(device) / scale).sample  # (N, 3, 8H, 8W) in about [-1, 1]

    return decode
