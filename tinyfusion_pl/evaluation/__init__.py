"""Evaluation: sampling to uint8 images and .npz files, FID (digits features or Inception), accuracy, and speed."""

from tinyfusion_pl.evaluation.digits_classifier import (
    DigitsClassifier,
    conditional_accuracy,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from tinyfusion_pl.evaluation.fid import DigitsFeatureExtractor, FIDScorer, digits_fid, inception_fid
from tinyfusion_pl.evaluation.sampling import (
    class_balanced_labels,
    images_to_uint8,
    load_npz,
    sample_images,
    save_npz,
    sd_vae_decoder,
    uint8_to_images,
)
from tinyfusion_pl.evaluation.speed import (
    count_blocks,
    count_parameters,
    forward_flops,
    interleaved_median_seconds,
    sampling_speed,
    speed_table,
)

__all__ = [
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "FIDScorer",
    "class_balanced_labels",
    "conditional_accuracy",
    "count_blocks",
    "count_parameters",
    "digits_fid",
    "forward_flops",
    "images_to_uint8",
    "inception_fid",
    "interleaved_median_seconds",
    "load_npz",
    "load_or_train_digits_classifier",
    "sample_images",
    "sampling_speed",
    "save_npz",
    "sd_vae_decoder",
    "speed_table",
    "train_digits_classifier",
    "uint8_to_images",
]
