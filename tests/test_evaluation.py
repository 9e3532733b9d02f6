"""Evaluation building blocks: sampling and the .npz format, FID in the digits feature space, FLOPs and speed."""

import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

from tests.conftest import tiny_dit
from tinyfusion_pl.data.digits import load_digits_tensors
from tinyfusion_pl.evaluation import (
    DigitsClassifier,
    DigitsFeatureExtractor,
    FIDScorer,
    class_balanced_labels,
    count_blocks,
    count_parameters,
    digits_fid,
    forward_flops,
    images_to_uint8,
    inception_fid,
    interleaved_median_seconds,
    load_npz,
    sample_images,
    sampling_speed,
    save_npz,
    sd_vae_decoder,
    speed_table,
    uint8_to_images,
)
from tinyfusion_pl.evaluation.sampling import batch_seed
from tinyfusion_pl.evaluation.speed import interleaved_seconds
from tinyfusion_pl.families import ModelFamily
from tinyfusion_pl.models import DiT, build_dit, build_sit
from tinyfusion_pl.objectives import FlowMatching, GaussianDiffusion
from tinyfusion_pl.pruning.export import prune_blocks

# --------------------------------------------------------------------------- images and the .npz format


def test_images_to_uint8_maps_the_range_and_moves_channels_last():
    images = torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0, -1.0 + 2.0 * 100 / 255]).view(1, 1, 1, 6).repeat(2, 3, 1, 1)
    images[1, 2] = 1.0  # one channel of the second image differs
    converted = images_to_uint8(images)
    assert converted.dtype == torch.uint8 and converted.shape == (2, 1, 6, 3)  # (N, H, W, C)
    assert converted[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 100]  # ends, middle, clipping, an exact level
    assert converted[1, 0, :, 2].tolist() == [255] * 6 and converted[1, 0, :, 1].tolist() == [0, 255, 128, 0, 255, 100]


def test_uint8_round_trip_is_within_half_a_level():
    images = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    back = uint8_to_images(images_to_uint8(images))
    assert back.shape == images.shape
    assert (back - images).abs().max() <= 1.0 / 255 + 1e-6  # half of a level, 2/255 wide


def test_images_to_uint8_refuses_latents_and_says_how_to_decode():
    with pytest.raises(ValueError, match="4 channels.*latents.*decode="):
        images_to_uint8(torch.zeros(2, 4, 8, 8))


def test_npz_round_trip_is_the_adm_layout(tmp_path):
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6) % 3
    path = save_npz(tmp_path / "samples.npz", images, labels)
    with np.load(path) as archive:  # what the ADM evaluator reads
        assert archive["arr_0"].dtype == np.uint8 and archive["arr_0"].shape == (6, 8, 8, 3)
        np.testing.assert_array_equal(archive["arr_0"], images.numpy())
    loaded, loaded_labels = load_npz(path)
    assert torch.equal(loaded, images) and torch.equal(loaded_labels, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left behind


def test_npz_without_labels_and_gray_images(tmp_path):
    images = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    loaded, labels = load_npz(save_npz(tmp_path / "gray.npz", images))
    assert loaded.shape == (3, 8, 8, 1) and labels is None


def test_npz_refuses_what_is_not_uint8_nhwc(tmp_path):
    with pytest.raises(ValueError, match="images must be uint8 images \\(N, H, W, C\\).*torch.float32.*images_to_uint8"):
        save_npz(tmp_path / "x.npz", torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="must be uint8 images.*\\(2, 3, 8, 8\\)"):
        save_npz(tmp_path / "x.npz", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels has 3 entries for 2 images"):
        save_npz(tmp_path / "x.npz", torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.arange(3))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0' array \\(keys: \\['images'\\]\\)"):
        load_npz(tmp_path / "other.npz")


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed here")
def test_the_latent_decoder_without_diffusers_says_what_to_install():
    with pytest.raises(ModuleNotFoundError, match="needs diffusers' AutoencoderKL.*pip install diffusers"):
        sd_vae_decoder("stabilityai/sd-vae-ft-ema")


# --------------------------------------------------------------------------- sampling


def test_class_balanced_labels_cycle_through_the_classes():
    assert class_balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="num_samples=0 is invalid: expected a positive int"):
        class_balanced_labels(0, 10)


def test_an_untrained_dit_samples_the_ddim_closed_form_batch_by_batch():
    # An untrained DiT predicts eps = 0 (zero-initialised output layer), so each deterministic DDIM step
    # multiplies x by sqrt(abar_prev / abar_t): the chain telescopes to x_T / sqrt(abar at the first step).
    net = tiny_dit(depth=2)
    labels = class_balanced_labels(5, 10)
    samples = sample_images(net, GaussianDiffusion(), labels, steps=10, method="ddim", batch_size=3, seed=7,
                            progress=False)
    # each batch draws from its own stream, seeded by the seed and the number of its first image
    noise = torch.cat([torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(batch_seed(7, 0))),
                       torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(batch_seed(7, 3)))])
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    first_step = 900  # "ddim10" keeps 0, 100, ..., 900
    abar = np.prod(1.0 - betas[: first_step + 1])
    torch.testing.assert_close(samples, noise / math.sqrt(abar), rtol=1e-5, atol=1e-5)


def test_a_share_sampled_in_the_same_batches_gives_the_same_images():
    # what a rank of a data-parallel evaluation samples: batches 2 and 3 of 4, numbered from image 6
    net, objective = tiny_dit(depth=1), GaussianDiffusion()
    labels = class_balanced_labels(11, 10)
    options = dict(steps=3, method="ddpm", batch_size=3, seed=5, progress=False)  # ddpm: noise at every step
    whole = sample_images(net, objective, labels, **options)
    share = sample_images(net, objective, labels[6:], first_index=6, **options)
    assert torch.equal(share, whole[6:])
    assert not torch.equal(sample_images(net, objective, labels[6:], **options), whole[6:])


def test_sampling_restores_train_mode_and_applies_decode_per_batch():
    net = tiny_dit(depth=1).train()
    calls = []

    def decode(latents):
        calls.append(len(latents))
        return latents.repeat(1, 3, 1, 1).tanh()  # (B, 3, H, W)

    samples = sample_images(net, GaussianDiffusion(), class_balanced_labels(5, 10), steps=2, method="ddpm",
                            batch_size=2, decode=decode, progress=False)
    assert samples.shape == (5, 3, 8, 8) and calls == [2, 2, 1] and net.training


class LabelRecorder(nn.Module):
    """A denoiser that predicts eps = 0 and records the labels of every call."""

    in_channels, input_size, num_classes = 1, 4, 3

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append(y.clone())
        return torch.zeros_like(x) * self.weight


class LabelRecorderFamily(ModelFamily):
    """The recorder described as a family: how a user's own model meets generic code."""

    name = "label_recorder"
    model_class = LabelRecorder
    blocks = ()
    depth_arguments = ()

    def sample_shape(self, net):
        return (net.in_channels, net.input_size, net.input_size)


def test_guidance_runs_the_net_on_the_labels_and_the_null_label():
    net, family = LabelRecorder(), LabelRecorderFamily()
    sample_images(net, GaussianDiffusion(learn_sigma=False), torch.tensor([0, 2]), steps=1, method="ddim",
                  cfg_scale=4.0, progress=False, family=family)
    assert [y.tolist() for y in net.seen] == [[0, 2, 3, 3]]  # [conditional; unconditional] with null label 3
    net.seen.clear()
    sample_images(net, GaussianDiffusion(learn_sigma=False), torch.tensor([0, 2]), steps=1, method="ddim",
                  cfg_scale=1.0, progress=False, family=family)
    assert [y.tolist() for y in net.seen] == [[0, 2]]


def test_sampling_refuses_bad_arguments_by_name():
    net, objective = tiny_dit(depth=1), GaussianDiffusion()
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D integer tensor.*torch.float32"):
        sample_images(net, objective, torch.zeros(4), progress=False)
    with pytest.raises(ValueError, match=r"labels range over \[0, 10\].*num_classes=10.*\[0, 9\]"):
        sample_images(net, objective, torch.tensor([0, 10]), progress=False)
    with pytest.raises(ValueError, match="cfg_scale=0.5 is invalid: expected a number >= 1"):
        sample_images(net, objective, torch.tensor([0]), cfg_scale=0.5, progress=False)
    with pytest.raises(ValueError, match="batch_size=0 is invalid: expected a positive int"):
        sample_images(net, objective, torch.tensor([0]), batch_size=0, progress=False)


# --------------------------------------------------------------------------- FID in the digits feature space


@pytest.fixture(scope="module")
def classifier():
    """A fixed (seeded, untrained) digits classifier: FID's properties hold in any fixed feature space,
    and training the real one takes longer than this whole file should."""
    torch.manual_seed(0)
    return DigitsClassifier(image_size=8).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def digits():
    return images_to_uint8(load_digits_tensors(8)[0])  # (1797, 8, 8, 1)


@pytest.fixture(scope="module")
def scorer(classifier, digits):
    scorer = digits_fid(classifier, image_size=8)
    scorer.set_reference(digits)
    return scorer


def noisy(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    floats = uint8_to_images(images)
    return images_to_uint8(floats + sigma * torch.randn(floats.shape, generator=torch.Generator().manual_seed(seed)))


def test_fid_of_a_set_against_itself_is_zero(scorer, digits):
    # zero next to what a visible change gives (the untrained features are small: FID scales with their square)
    assert scorer.reference_size == len(digits)
    assert abs(scorer.score(digits)) <= 1e-6 * scorer.score(noisy(digits, 0.8))


def test_fid_grows_monotonically_with_added_noise(scorer, digits):
    scores = [scorer.score(noisy(digits, sigma)) for sigma in (0.05, 0.1, 0.2, 0.4, 0.8)]
    assert scores[0] > 0 and all(a < b for a, b in zip(scores, scores[1:], strict=False)), scores


def frechet_distance_float64(real: np.ndarray, fake: np.ndarray) -> float:
    """||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), with scipy's matrix square root."""
    mu_real, mu_fake = real.mean(0), fake.mean(0)
    cov_real, cov_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(cov_real @ cov_fake).real
    return float(((mu_real - mu_fake) ** 2).sum() + np.trace(cov_real + cov_fake - 2 * root))


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # the untrained features have a few dead units
def test_fid_matches_an_independent_float64_frechet_distance(scorer, classifier, digits):
    fake = noisy(digits[:900], 0.3, seed=1)

    def features(images):
        floats = images.permute(0, 3, 1, 2).double() / 127.5 - 1.0
        return classifier.double().features(floats).numpy()

    try:
        expected = frechet_distance_float64(features(digits), features(fake))
    finally:
        classifier.float()
    assert scorer.score(fake) == pytest.approx(expected, rel=1e-3)


def test_scoring_keeps_the_reference_and_set_reference_replaces_it(classifier, digits):
    scorer = digits_fid(classifier, image_size=8)
    scorer.set_reference(digits[:600])
    fake = noisy(digits[600:1200], 0.2)
    first, second = scorer.score(fake), scorer.score(fake)
    assert first == pytest.approx(second, rel=1e-6)
    scorer.set_reference(fake)
    assert scorer.reference_size == 600 and abs(scorer.score(fake)) <= 1e-6 * first


def test_fid_refuses_what_it_cannot_score(classifier, digits):
    scorer = digits_fid(classifier, image_size=8)
    with pytest.raises(RuntimeError, match="call set_reference\\(real_images\\) first"):
        scorer.score(digits)
    with pytest.raises(ValueError, match="images must be uint8 images.*images_to_uint8"):
        scorer.set_reference(uint8_to_images(digits))
    with pytest.raises(ValueError, match="reference images hold 1 image\\(s\\); FID needs at least 2"):
        scorer.set_reference(digits[:1])
    with pytest.raises(ValueError, match="images have 3 channels but this feature extractor reads 1"):
        scorer.set_reference(digits.expand(-1, -1, -1, 3))
    with pytest.raises(ValueError, match="expects uint8 images in \\[0, 255\\], got torch.float32"):
        DigitsFeatureExtractor(classifier)(torch.zeros(2, 1, 8, 8))


class MeanColour(nn.Module):
    """A 3-channel feature map: per-channel means and squared means of uint8 images."""

    def forward(self, images):
        floats = images.float() / 255.0
        return torch.cat([floats.mean((2, 3)), (floats**2).mean((2, 3))], dim=1)  # (N, 6)


def test_gray_images_are_scored_as_rgb_by_a_three_channel_extractor(digits):
    scorer = FIDScorer(FrechetInceptionDistance(feature=MeanColour(), input_img_size=(3, 8, 8)), channels=3)
    rgb = digits.expand(-1, -1, -1, 3).contiguous()
    scorer.set_reference(rgb[:800])
    fake = noisy(digits[800:1600], 0.1)
    assert scorer.score(fake) == pytest.approx(scorer.score(fake.expand(-1, -1, -1, 3).contiguous()), rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed here")
def test_inception_fid_without_torch_fidelity_says_what_to_install_and_download():
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity.*weights-inception-2015-12-05"):
        inception_fid()


def test_inception_fid_refuses_a_missing_weights_file_and_a_bad_feature(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist. Download weights-inception-2015-12-05-6726825d.pth "
                                                "from https://github.com/toshas/torch-fidelity/releases"):
        inception_fid(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="feature=1000 is invalid.*\\(64, 192, 768, 2048\\)"):
        inception_fid(feature=1000)


# --------------------------------------------------------------------------- FLOPs, parameters, speed


def analytic_dit_flops(batch, image, patch, channels, width, depth, mlp_ratio=4, frequencies=256, learn_sigma=True):
    """Matmul FLOPs (2 per multiply-add) of one DiT forward, written out from the architecture."""
    tokens, hidden, out_channels = (image // patch) ** 2, int(width * mlp_ratio), channels * (2 if learn_sigma else 1)
    patch_embed = tokens * width * channels * patch * patch
    timestep_mlp = frequencies * width + width * width
    per_block = (
        tokens * (3 * width * width + width * width)  # qkv and output projection
        + tokens * 2 * width * hidden  # fc1 and fc2
        + 2 * tokens * tokens * width  # q k^T and attention-weighted v, over all heads
        + 6 * width * width  # adaLN modulation from the conditioning vector
    )
    final = 2 * width * width + tokens * width * patch * patch * out_channels
    return 2 * batch * (patch_embed + timestep_mlp + depth * per_block + final)


def analytic_dit_params(image, patch, channels, width, depth, classes, mlp_ratio=4, frequencies=256):
    tokens, hidden, out_channels = (image // patch) ** 2, int(width * mlp_ratio), 2 * channels
    embed = width * channels * patch * patch + width + frequencies * width + width + width * width + width
    embed += (classes + 1) * width + tokens * width  # label table with the null row, fixed position embedding
    block = (3 * width * width + 3 * width) + (width * width + width) + (width * hidden + hidden) \
        + (hidden * width + width) + (6 * width * width + 6 * width)
    final = 2 * width * width + 2 * width + width * patch * patch * out_channels + patch * patch * out_channels
    return embed + depth * block + final


@pytest.mark.parametrize("image,patch,channels,width,depth,heads,batch", [
    (8, 2, 1, 32, 3, 2, 1), (8, 1, 3, 16, 2, 4, 3), (16, 4, 4, 48, 1, 3, 2)])
def test_forward_flops_match_an_analytic_count(image, patch, channels, width, depth, heads, batch):
    net = DiT(input_size=image, patch_size=patch, in_channels=channels, hidden_size=width, depth=depth,
              num_heads=heads, num_classes=10).train()
    expected = analytic_dit_flops(batch, image, patch, channels, width, depth)
    # The objective only sets the form of the times (steps here); the count does not depend on them.
    assert forward_flops(net, GaussianDiffusion(), batch_size=batch) == forward_flops(net, batch_size=batch) == expected
    assert net.training and next(net.parameters()).device.type == "cpu"  # counted on meta copies, net untouched


@pytest.mark.parametrize("image,patch,channels,width,depth,heads", [(8, 2, 1, 32, 3, 2), (16, 4, 4, 48, 1, 3)])
def test_parameter_and_block_counts_match_the_architecture(image, patch, channels, width, depth, heads):
    net = DiT(input_size=image, patch_size=patch, in_channels=channels, hidden_size=width, depth=depth,
              num_heads=heads, num_classes=10)
    assert count_parameters(net) == analytic_dit_params(image, patch, channels, width, depth, classes=10)
    assert count_blocks(net) == depth and count_blocks(nn.Linear(2, 2)) is None


def test_dit_xl_2_costs_what_the_dit_paper_reports():
    with torch.device("meta"):
        net = build_dit("DiT-XL/2")
    # DiT's paper: 675M parameters and 118.6 Gflops, counting a multiply-add once (2 FLOPs here).
    assert count_parameters(net) / 1e6 == pytest.approx(675, abs=0.5)
    assert forward_flops(net) / 1e9 == pytest.approx(2 * 118.6, abs=2 * 0.05)


def test_interleaved_timing_alternates_the_order_and_returns_medians():
    order = []
    workloads = {"a": lambda: order.append("a"), "b": lambda: order.append("b"), "c": lambda: order.append("c")}
    seconds = interleaved_median_seconds(workloads, repeats=3, warmup=1)
    assert order == list("abc") + list("bca") + list("cab") + list("abc")  # the order rotates every round
    assert set(seconds) == {"a", "b", "c"} and all(value >= 0 for value in seconds.values())
    for bad, message in [({"repeats": 0}, "repeats=0 is invalid"), ({"warmup": -1}, "warmup=-1 is invalid")]:
        with pytest.raises(ValueError, match=message):
            interleaved_median_seconds(workloads, **bad)


def test_interleaved_seconds_records_wall_and_cpu_seconds_of_the_timed_rounds_only():
    calls = []
    seconds = interleaved_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=2)
    assert calls == list("abba" * 3)
    assert {name: {kind: len(values) for kind, values in timings.items()} for name, timings in seconds.items()} \
        == {"a": {"wall": 4, "cpu": 4}, "b": {"wall": 4, "cpu": 4}}
    with pytest.raises(ValueError, match="workloads is empty"):
        interleaved_seconds({})


def test_sampling_speed_reports_consistent_ratios_for_a_half_depth_model():
    dense = tiny_dit(depth=4)
    half = prune_blocks(dense, blocks="blocks", keep=[0, 2])
    results = sampling_speed({"dense": dense, "half": half}, GaussianDiffusion(), batch_size=4, steps=2,
                             sampler_steps=10, repeats=2, warmup=0, method="ddim", eta=0.0)
    assert results["dense"]["speedup"] == 1.0 and results["dense"]["ideal_speedup"] == 1.0
    assert results["half"]["blocks"] == 2 and results["half"]["params"] == count_parameters(half)
    assert results["half"]["ideal_speedup"] == pytest.approx(forward_flops(dense) / forward_flops(half))
    assert 1.0 < results["half"]["ideal_speedup"] < 2.0  # the embedders and final layer are not pruned
    for row in results.values():
        assert row["seconds"] > 0
        assert row["steps_per_s"] == pytest.approx(2 / row["seconds"])
        assert row["samples_per_s"] == pytest.approx(4 / (10 * row["seconds"] / 2))  # 4 images per 10-step run
    assert results["half"]["speedup"] == pytest.approx(results["dense"]["seconds"] / results["half"]["seconds"])
    table = speed_table(results)
    assert table.count("\n") == 3 and "| half | 2 |" in table


def test_speed_of_a_sit_with_flow_matching_passes_its_sampler_options():
    dense = build_sit("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=10, depth=4)
    half = prune_blocks(dense, blocks="blocks", keep=[0, 2])
    objective = FlowMatching()
    # SiT computes DiT's learned-sigma output and drops that half: DiT's FLOPs, with float times.
    assert forward_flops(dense, objective) == analytic_dit_flops(1, 8, 2, 1, 128, 4)
    results = sampling_speed({"dense": dense, "half": half}, objective, batch_size=2, steps=2, repeats=1, warmup=0,
                             method="heun")
    assert [results[name]["blocks"] for name in ("dense", "half")] == [4, 2]
    assert results["half"]["ideal_speedup"] == pytest.approx(forward_flops(dense, objective) / forward_flops(half, objective))
    with pytest.raises(ValueError, match="FlowMatching has no sampler option 'eta'"):
        sampling_speed({"dense": dense}, objective, eta=0.0)


def test_sampling_speed_refuses_bad_arguments_by_name():
    nets, objective = {"dense": tiny_dit(depth=1)}, GaussianDiffusion()
    with pytest.raises(ValueError, match="reference='teacher' is not one of the nets \\['dense'\\]"):
        sampling_speed(nets, objective, reference="teacher")
    with pytest.raises(ValueError, match="sampler_steps=0 is invalid: expected a positive int"):
        sampling_speed(nets, objective, sampler_steps=0)
    with pytest.raises(ValueError, match="nets is empty"):
        sampling_speed({}, objective)
    with pytest.raises(ValueError, match="GaussianDiffusion has no sampler option 'solver'"):
        sampling_speed(nets, objective, solver="dopri5")  # refused before anything is timed
