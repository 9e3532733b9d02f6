"""Cost of a masked-KD recovery step against a plain KD step and a plain fine-tuning step.

All three variants train the same pruned student (the teacher's blocks picked by BK-SDM's rule, half the
depth) on the same batch, with the same frozen teacher, on the same machine, in one run:
  finetune   DiffusionModule's diffusion loss (MSE + VB) on the student alone; no teacher forward.
  kd         DistillationModule: 0.9 * KD + 0.1 * GT, the teacher run once without autograd.
  masked_kd  the same plus beta * FEAT over every student block (decision pairing, 2-sigma mask).
Each step is forward, backward, gradient clipping at 1.0 and an AdamW update of the student.

Time: steps of the three variants rotate (ABC, BCA, CAB, ...) in one process, so drifts in machine load
hit all alike; the median over the steps after warm-up is reported.
Peak memory: each variant runs alone in a fresh subprocess, so no variant inherits another's allocator
cache. On CPU the figure is the kernel's high-water mark of resident memory (VmHWM), which sees every
short-lived peak; it is reset through /proc/self/clear_refs once the models are built, so it covers the
training steps only, and the resident memory at that point is reported as the baseline (the difference
is what a step adds: gradients, optimizer state, activations, teacher outputs and features).
On CUDA it is torch.cuda.max_memory_allocated after reset_peak_memory_stats.

Example:
    python benchmarks/bench_distill_step.py --out bench_distill_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from tinyfusion_pl.distill import DistillationModule, decision_pairing
from tinyfusion_pl.io import save_json
from tinyfusion_pl.models import DiT_models
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.selectors import bk_sdm_blocks

VARIANTS = ("finetune", "kd", "masked_kd")
TARGET_RATIO = 1.10  # masked KD step time / plain KD step time


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-Mini/2", choices=sorted(DiT_models), help="registry entry of the teacher")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample (a square grid of patches)")
    parser.add_argument("--sigma-k", type=float, default=2.0, help="k of the masked-KD mask")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per variant in the memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--measure-memory", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    grid = math.isqrt(arguments.tokens)
    if grid * grid != arguments.tokens:
        parser.error(f"--tokens={arguments.tokens} must be a perfect square (a grid of patches), e.g. 64 or 256.")
    if arguments.batch < 1 or arguments.steps < 1 or arguments.warmup < 0 or arguments.memory_steps < 1:
        parser.error("--batch, --steps and --memory-steps must be >= 1 and --warmup >= 0.")
    return arguments


def build_models(arguments: argparse.Namespace) -> tuple[nn.Module, nn.Module, list[int]]:
    """The teacher (every block made non-trivial) and its half-depth student, on the device."""
    torch.manual_seed(arguments.seed)
    patch_size = int(arguments.model.rsplit("/", 1)[1])
    teacher = DiT_models[arguments.model](input_size=patch_size * math.isqrt(arguments.tokens))
    # adaLN-Zero makes fresh blocks identities; a pretrained model's blocks are not, so perturb the zeros.
    with torch.no_grad():
        for parameter in teacher.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.normal_(std=0.02)
    kept = bk_sdm_blocks(len(teacher.blocks))
    student = prune_blocks(teacher, "blocks", kept)
    return teacher.to(arguments.device), student.to(arguments.device), kept


def build_batch(student: nn.Module, arguments: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    x = torch.randn(arguments.batch, student.in_channels, student.input_size, student.input_size, generator=generator)
    y = torch.randint(0, student.num_classes, (arguments.batch,), generator=generator)
    return x.to(arguments.device), y.to(arguments.device)


def build_module(variant: str, teacher: nn.Module, student: nn.Module, kept: list[int],
                 arguments: argparse.Namespace) -> DiffusionModule:
    """The LightningModule the recover stage builds for this variant, around its own copy of the student."""
    options = dict(lr=arguments.lr, ema_decay=None)
    if variant == "finetune":
        return DiffusionModule(student, **options).to(arguments.device)
    pairs = decision_pairing(kept, len(teacher.blocks)) if variant == "masked_kd" else None
    module = DistillationModule(student, teacher, feature_pairs=pairs, sigma_k=arguments.sigma_k, **options)
    module.teacher.to(arguments.device)
    return module.to(arguments.device)


def step_function(variant: str, module: DiffusionModule, arguments: argparse.Namespace) -> Callable[[tuple], float]:
    """One optimisation step of `module` on a batch, as Lightning runs it (loss, backward, clip, AdamW)."""
    module.train()
    parameters = [p for p in module.net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=arguments.lr, weight_decay=0.0)
    generator = torch.Generator(arguments.device).manual_seed(arguments.seed + 2)

    def loss_of(batch: tuple) -> torch.Tensor:
        if variant == "finetune":
            return module.diffusion_terms(batch, generator=generator)["loss"].mean()
        return module.distillation_losses(batch, feature_weight=1e-2, generator=generator)["loss"].mean()

    def step(batch: tuple) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        return loss.item()

    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(arguments: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of each variant, the order rotating every round after warm-up."""
    teacher, student, kept = build_models(arguments)
    batch = build_batch(student, arguments)
    steps = {name: step_function(name, build_module(name, teacher, copy.deepcopy(student), kept, arguments), arguments)
             for name in VARIANTS}
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for iteration in range(arguments.warmup + arguments.steps):
        shift = iteration % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            synchronize(arguments.device)
            start = time.perf_counter()
            steps[name](batch)
            synchronize(arguments.device)
            if iteration >= arguments.warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def process_status_megabytes(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: resident high-water mark) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**10  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line: CPU peak memory needs Linux.")


def reset_resident_peak() -> None:
    """Set the resident high-water mark to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_memory_here(arguments: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one variant in this (fresh) process, in MiB."""
    teacher, student, kept = build_models(arguments)
    batch = build_batch(student, arguments)
    step = step_function(arguments.measure_memory, build_module(arguments.measure_memory, teacher, student, kept,
                                                                 arguments), arguments)
    if arguments.device.startswith("cuda"):
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_resident_peak()
        baseline = process_status_megabytes("VmRSS")
    for _ in range(arguments.memory_steps):
        step(batch)
    if arguments.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = process_status_megabytes("VmHWM")
    return {"peak_mib": peak, "baseline_mib": baseline, "step_mib": peak - baseline}


def measure_memory_in_subprocess(variant: str, arguments: argparse.Namespace) -> dict[str, float]:
    """Run this script for one variant in a fresh interpreter, with the same settings, and read its result."""
    settings = {key: value for key, value in vars(arguments).items() if key not in ("out", "measure_memory")}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items() if value is not None]
    command = [sys.executable, os.path.abspath(__file__), *flags, "--measure-memory", variant]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Measure the three variants, print the table, write the JSON when --out is given; return the results."""
    arguments = parse_arguments(argv)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    if arguments.measure_memory is not None:
        print(json.dumps(measure_memory_here(arguments)))
        return {}

    seconds = time_interleaved(arguments)
    memory = {name: measure_memory_in_subprocess(name, arguments) for name in VARIANTS}
    median_ms = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    teacher, student, kept = build_models(arguments)
    results = {
        "config": {key: value for key, value in vars(arguments).items() if key not in ("out", "measure_memory")},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],
            "device_name": torch.cuda.get_device_name() if arguments.device.startswith("cuda") else platform.processor(),
        },
        "models": {"teacher_blocks": len(teacher.blocks), "student_blocks": len(student.blocks), "kept_blocks": kept,
                   "feature_pairs": [list(pair) for pair in decision_pairing(kept, len(teacher.blocks))]},
        "median_step_ms": median_ms,
        "step_ms": {name: [1000 * value for value in values] for name, values in seconds.items()},
        "time_ratio_masked_kd_to_kd": median_ms["masked_kd"] / median_ms["kd"],
        "time_ratio_kd_to_finetune": median_ms["kd"] / median_ms["finetune"],
        "memory_mib": memory,
    }
    results["target_met"] = results["time_ratio_masked_kd_to_kd"] <= TARGET_RATIO
    print_table(results)
    if arguments.out is not None:
        save_json(results, arguments.out)
        print(f"wrote {arguments.out}")
    return results


def print_table(results: dict) -> None:
    config, memory, median_ms, models = results["config"], results["memory_mib"], results["median_step_ms"], results["models"]
    print(
        f"{config['model']} teacher ({models['teacher_blocks']} blocks) -> student of {models['student_blocks']} blocks "
        f"{models['kept_blocks']}, batch {config['batch']} x {config['tokens']} tokens, {config['device']}, "
        f"{results['machine']['threads']} threads, {config['steps']} measured steps per variant "
        f"(load average {results['machine']['load_average_1min']:.2f})"
    )
    header = f"{'variant':<11}{'median step ms':>16}{'x finetune':>12}{'x kd':>8}{'peak MiB':>11}{'step MiB':>11}"
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        print(f"{name:<11}{median_ms[name]:>16.1f}{median_ms[name] / median_ms['finetune']:>12.2f}"
              f"{median_ms[name] / median_ms['kd']:>8.2f}{memory[name]['peak_mib']:>11.1f}{memory[name]['step_mib']:>11.1f}")
    verdict = "met" if results["target_met"] else "MISSED"
    print(f"target: masked KD <= {TARGET_RATIO:.2f}x plain KD time: {verdict} "
          f"({results['time_ratio_masked_kd_to_kd']:.3f}x)")


if __name__ == "__main__":
    main()
