"""Training objectives of denoisers: how they are trained and sampled, independent of Lightning."""

from tinyfusion_pl.objectives.base import DiffusionObjective, classifier_free_guidance, split_batch
from tinyfusion_pl.objectives.flow_matching import FlowMatching
from tinyfusion_pl.objectives.gaussian_diffusion import GaussianDiffusion
from tinyfusion_pl.objectives.mar import MaskedAutoregressive
from tinyfusion_pl.objectives.respacing import space_timesteps

__all__ = [
    "DiffusionObjective",
    "FlowMatching",
    "GaussianDiffusion",
    "MaskedAutoregressive",
    "classifier_free_guidance",
    "space_timesteps",
    "split_batch",
]
