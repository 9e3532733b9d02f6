"""What the benchmarks share: their command line, a non-trivial DiT, SiT or MAR with its objective, peak memory.

A MAR registry entry (--model MAR-Mini, MAR-L, ...) runs with MAR's objective: its encoder and decoder blocks
form one sequence, its "input size" is the side of its latent (img_size / vae_stride), and its tokens are the
latent's patch_size x patch_size patches.

A benchmark that opts in (`add_model_arguments(..., diffusers=True)`) also takes `--model diffusers:DiT-Tiny/2`:
diffusers' DiTTransformer2DModel at the size of that registry entry, behind its DiffusersDiT adapter
(tinyfusion_pl.models.diffusers.build_diffusers), so it is stepped, sampled and gated like ours.

Time: the variants' steps rotate (A B, B A, ... for two; A B C, B C A, C A B, ... for three) in one
process, so drifts in machine load hit every variant alike; wall and process CPU seconds are recorded
per step after warm-up (tinyfusion_pl.evaluation.speed.interleaved_seconds, the timer of sampling_speed).
Peak memory: each variant runs alone in a fresh subprocess (this script again, with --measure-memory),
so no variant inherits another's allocator cache. On CPU the figure is the kernel's high-water mark of
this process's resident memory (VmHWM in /proc/self/status): it sees every short-lived peak, which
sampling the RSS can miss, and costs nothing while running. getrusage's ru_maxrss would not do: Linux
carries the parent's high-water mark over fork and exec into it. On CUDA the figure is
torch.cuda.max_memory_allocated after reset_peak_memory_stats. The subprocess prints its result as
the last line of its output, in JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from tinyfusion_pl.evaluation.speed import denoiser_inputs
from tinyfusion_pl.families import family_of
from tinyfusion_pl.models import DiT_models, MAR_models, SiT_models, build_dit, build_mar, build_sit
from tinyfusion_pl.models.diffusers import build_diffusers
from tinyfusion_pl.objectives import DiffusionObjective, FlowMatching, GaussianDiffusion, MaskedAutoregressive

# Whatever a benchmark's step function takes: a dict of tensors, a tuple (x, y), ...
Batch = Any

# Flags that say where results go or which mode runs, not what is measured.
_NOT_SETTINGS = ("out", "measure_memory")

MODEL_NAMES = sorted(DiT_models) + sorted(SiT_models) + sorted(MAR_models)
DIFFUSERS_PREFIX = "diffusers:"
# diffusers' DiT at the size of one of our registry entries: "diffusers:DiT-Tiny/2".
DIFFUSERS_MODEL_NAMES = [f"{DIFFUSERS_PREFIX}{name}" for name in sorted(DiT_models)]
OBJECTIVES = ("flow_matching", "gaussian", "mar")


# ------------------------------------------------------------------------------------ command line


def add_model_arguments(
    parser: argparse.ArgumentParser, model_help: str, default: str = "DiT-Mini/2", diffusers: bool = False
) -> None:
    """Add --model and --objective: which DiT or SiT registry entry is run, trained or sampled with which objective.

    With `diffusers`, --model also takes diffusers:<DiT entry>, diffusers' DiT of that size.
    """
    choices = MODEL_NAMES + (DIFFUSERS_MODEL_NAMES if diffusers else [])
    kinds = "a DiT or SiT registry entry" + (", or diffusers:<DiT entry> for diffusers' DiT of its size" if diffusers else "")
    parser.add_argument("--model", default=default, choices=choices, help=f"{model_help} ({kinds})")
    parser.add_argument("--objective", default=None, choices=OBJECTIVES,
                        help="default: flow_matching for SiT, gaussian for DiT, mar for MAR")


def add_step_model_arguments(parser: argparse.ArgumentParser, model_help: str, diffusers: bool = False) -> None:
    """Add --model, --objective, --batch and --tokens: which model is stepped and on how much data."""
    add_model_arguments(parser, model_help, diffusers=diffusers)
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample (a square grid of patches)")


def add_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --threads, --device, --seed and --out, common to every benchmark."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def add_step_arguments(parser: argparse.ArgumentParser, variants: Sequence[str]) -> None:
    """Add --warmup, --steps, --memory-steps, the machine flags and the internal --measure-memory."""
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per variant in the memory subprocesses")
    add_machine_arguments(parser)
    parser.add_argument("--measure-memory", choices=variants, default=None, help=argparse.SUPPRESS)


def parse_step_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, fill in the model's own objective, refuse a non-square --tokens or step counts out of range."""
    arguments = parser.parse_args(argv)
    arguments.objective = arguments.objective or default_objective(arguments.model)
    grid = math.isqrt(arguments.tokens)
    if grid * grid != arguments.tokens:
        parser.error(f"--tokens={arguments.tokens} must be a perfect square (a grid of patches), e.g. 64 or 256.")
    if arguments.batch < 1 or arguments.steps < 1 or arguments.warmup < 0 or arguments.memory_steps < 1:
        parser.error("--batch, --steps and --memory-steps must be >= 1 and --warmup >= 0.")
    return arguments


def measured_settings(arguments: argparse.Namespace) -> dict:
    """The parsed flags that define the measurement (not --out, not --measure-memory)."""
    return {key: value for key, value in vars(arguments).items() if key not in _NOT_SETTINGS}


def machine_description(device: str) -> dict:
    """Platform, torch version, threads, CPUs, load and device name, to read the timings against."""
    return {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
    }


# ------------------------------------------------------------------------------------ models


def input_size_for_tokens(model_name: str, tokens: int) -> int:
    """The latent side at which the registry model `model_name` sees `tokens` tokens (a square grid)."""
    return patch_size_of(model_name) * math.isqrt(tokens)


def patch_size_of(model_name: str) -> int:
    """The patch side of a registry entry, from its name ('DiT-S/2' -> 2), or a MAR entry's patch_size."""
    if model_name in MAR_models:
        return mar_entry(model_name).patch_size
    return int(model_name.rsplit("/", 1)[1])


def mar_entry(model_name: str) -> nn.Module:
    """A MAR registry entry on the meta device: its architecture without memory."""
    with torch.device("meta"):
        return build_mar(model_name)


def diffusers_dit_like(model_name: str, input_size: int) -> nn.Module:
    """diffusers' DiTTransformer2DModel (in its DiffusersDiT adapter) with the architecture of our registry DiT."""
    with torch.device("meta"):  # only its architecture is read
        reference = build_dit(model_name, input_size=input_size)
    architecture = family_of(reference).architecture(reference)
    if architecture["mlp_ratio"] != 4:
        raise ValueError(f"{model_name} has mlp_ratio={architecture['mlp_ratio']}; diffusers' DiT blocks have 4.")
    in_channels = architecture["in_channels"]
    return build_diffusers(
        "dit", num_layers=architecture["depth"], num_attention_heads=architecture["num_heads"],
        attention_head_dim=architecture["hidden_size"] // architecture["num_heads"], in_channels=in_channels,
        out_channels=2 * in_channels if architecture["learn_sigma"] else in_channels,
        sample_size=architecture["input_size"], patch_size=architecture["patch_size"],
        num_embeds_ada_norm=architecture["num_classes"], class_dropout_prob=architecture["class_dropout_prob"],
    )


def nontrivial_model(model_name: str, input_size: int, seed: int) -> nn.Module:
    """The registry DiT, SiT or MAR (or diffusers:<DiT entry>, diffusers' DiT of its size) built under `seed`, its
    zero-initialised weights perturbed so that every block acts."""
    torch.manual_seed(seed)
    if model_name.startswith(DIFFUSERS_PREFIX):
        model = diffusers_dit_like(model_name.removeprefix(DIFFUSERS_PREFIX), input_size)
    elif model_name in SiT_models:
        model = build_sit(model_name, input_size=input_size)
    elif model_name in MAR_models:
        model = build_mar(model_name, img_size=input_size * mar_entry(model_name).vae_stride)
    else:
        model = build_dit(model_name, input_size=input_size)
    # adaLN-Zero makes fresh blocks identities and the output zero (MAR: its head's); a trained model's are not, so
    # perturb the zeros.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.normal_(std=0.02)
    return model


def default_objective(model_name: str) -> str:
    """The objective a registry model was published with: flow matching for SiT, MAR's for MAR, else Gaussian diffusion."""
    if model_name in MAR_models:
        return "mar"
    return "flow_matching" if model_name in SiT_models else "gaussian"


@torch.no_grad()
def build_objective(name: str, model: nn.Module) -> DiffusionObjective:
    """FlowMatching, MAR's objective, or GaussianDiffusion with a learned variance exactly when the model returns one.

    DiT with learn_sigma returns 2C channels (eps and the variance), SiT returns C whatever its learn_sigma:
    one forward of a single zero sample tells which.
    """
    if name == "flow_matching":
        return FlowMatching()
    if name == "mar":
        return MaskedAutoregressive(mask_ratio_min=model.mask_ratio_min)
    x, t, condition = denoiser_inputs(model, 1, next(model.parameters()).device)
    was_training = model.training
    output_channels = model.eval()(x, t, **condition).shape[1]
    model.train(was_training)
    return GaussianDiffusion(learn_sigma=output_channels == 2 * x.shape[1])


# ------------------------------------------------------------------------------------ memory


def process_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: resident high-water mark) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**10  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field} line: CPU peak memory needs Linux.")


def reset_resident_peak() -> None:
    """Set the resident high-water mark to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_memory_of_steps(
    step: Callable[[Batch], object], batch: Batch, steps: int, device: str, reset_peak: bool
) -> dict[str, float]:
    """Peak, baseline (before the steps) and their difference, in MiB, over `steps` calls of `step(batch)`.

    The difference is what the steps add: gradients, optimizer state, activations. On CPU the peak is
    this process's VmHWM, which covers everything since the process began unless `reset_peak` restarts
    it at the current resident size first.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        if reset_peak:
            reset_resident_peak()
        baseline = process_status_mib("VmRSS")
    for _ in range(steps):
        step(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = process_status_mib("VmHWM")
    return {"peak_mib": peak, "baseline_mib": baseline, "step_mib": peak - baseline}


def report_to_parent(result: dict[str, float]) -> None:
    """Print a subprocess's result as the last line of its output, where measure_memory_in_subprocess reads it."""
    print(json.dumps(result))


def measure_memory_in_subprocess(
    script: str, variant: str, arguments: argparse.Namespace, environment: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Run `script` for one variant in a fresh interpreter, with the same settings, and read its result.

    `environment` adds variables to the subprocess's environment (for instance allocator settings).
    """
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in measured_settings(arguments).items()
             if value is not None]
    command = [sys.executable, os.path.abspath(script), *flags, "--measure-memory", variant]
    completed = subprocess.run(command, check=True, capture_output=True, text=True,
                               env={**os.environ, **(environment or {})})
    return json.loads(completed.stdout.strip().splitlines()[-1])
