"""Recovery fine-tuning of a pruned model from a teacher: output KD and masked representation KD."""

from tinyfusion_pl.distill.losses import (
    beta_schedule,
    decision_pairing,
    layer_pairing,
    masked_feature_mse,
    reference_pairing,
    within_k_sigma,
)
from tinyfusion_pl.distill.module import DistillationModule, FeatureCapture, FrozenTeacher

__all__ = [
    "DistillationModule",
    "FeatureCapture",
    "FrozenTeacher",
    "beta_schedule",
    "decision_pairing",
    "layer_pairing",
    "masked_feature_mse",
    "reference_pairing",
    "within_k_sigma",
]
