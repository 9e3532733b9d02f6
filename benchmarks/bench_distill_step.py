"""Cost of a masked-KD recovery step against a plain KD step and a plain fine-tuning step, for a DiT or SiT.

All three variants train the same pruned student (the teacher's blocks picked by BK-SDM's rule, half the
depth) on the same batch, with the same frozen teacher, on the same machine, in one run:
  finetune   DiffusionModule's training loss on the student alone (the model's own objective by default: DiT
             Gaussian diffusion, MSE + VB; SiT flow matching; or --objective); no teacher forward.
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
import functools
import statistics
from collections.abc import Callable

import torch
import torch.nn as nn

# Run as a script, Python puts this folder first on sys.path, so the shared benchmark machinery imports as `common`.
from common import (
    add_step_arguments,
    add_step_model_arguments,
    build_objective,
    input_size_for_tokens,
    machine_description,
    measure_memory_in_subprocess,
    measured_settings,
    nontrivial_model,
    parse_step_arguments,
    peak_memory_of_steps,
    report_to_parent,
)

from tinyfusion_pl.distill import DistillationModule, decision_pairing
from tinyfusion_pl.evaluation.speed import interleaved_seconds
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import save_json
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.selectors import bk_sdm_blocks

VARIANTS = ("finetune", "kd", "masked_kd")
TARGET_RATIO = 1.10  # masked KD step time / plain KD step time


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_model_arguments(parser, model_help="registry entry of the teacher")
    parser.add_argument("--sigma-k", type=float, default=2.0, help="k of the masked-KD mask")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    add_step_arguments(parser, VARIANTS)
    return parse_step_arguments(parser, argv)


def build_models(arguments: argparse.Namespace) -> tuple[nn.Module, nn.Module, list[int]]:
    """The teacher (every block made non-trivial) and its half-depth student, on the device."""
    teacher = nontrivial_model(arguments.model, input_size_for_tokens(arguments.model, arguments.tokens), arguments.seed)
    blocks = family_of(teacher).block_argument()
    kept = bk_sdm_blocks(len(teacher.get_submodule(blocks)))
    student = prune_blocks(teacher, blocks, kept)
    return teacher.to(arguments.device), student.to(arguments.device), kept


def build_batch(student: nn.Module, arguments: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Random samples and, for a class-conditional model, labels: the (x, y) or x batch the modules take."""
    family = family_of(student)
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    x = torch.randn(arguments.batch, *family.sample_shape(student), generator=generator).to(arguments.device)
    if family.num_classes(student) is None:
        return x
    y = torch.randint(0, family.num_classes(student), (arguments.batch,), generator=generator)
    return x, y.to(arguments.device)


def build_module(variant: str, teacher: nn.Module, student: nn.Module, kept: list[int],
                 arguments: argparse.Namespace) -> DiffusionModule:
    """The LightningModule the recover stage builds for this variant, around its own copy of the student."""
    options = dict(objective=build_objective(arguments.objective, teacher), lr=arguments.lr, ema_decay=None)
    if variant == "finetune":
        return DiffusionModule(student, **options).to(arguments.device)
    teacher_depth = sum(family_of(teacher).block_counts(teacher))
    pairs = decision_pairing(kept, teacher_depth) if variant == "masked_kd" else None
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


def time_variants(arguments: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of each variant, the order rotating every round after warm-up."""
    teacher, student, kept = build_models(arguments)
    batch = build_batch(student, arguments)
    steps = {name: step_function(name, build_module(name, teacher, copy.deepcopy(student), kept, arguments), arguments)
             for name in VARIANTS}
    seconds = interleaved_seconds({name: functools.partial(step, batch) for name, step in steps.items()},
                                  repeats=arguments.steps, warmup=arguments.warmup, device=arguments.device)
    return {name: values["wall"] for name, values in seconds.items()}


def measure_memory_here(arguments: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one variant in this (fresh) process, in MiB."""
    teacher, student, kept = build_models(arguments)
    batch = build_batch(student, arguments)
    step = step_function(arguments.measure_memory, build_module(arguments.measure_memory, teacher, student, kept,
                                                                 arguments), arguments)
    # The high-water mark restarts once the models are built, so the peak covers the training steps only.
    return peak_memory_of_steps(step, batch, arguments.memory_steps, arguments.device, reset_peak=True)


def main(argv: list[str] | None = None) -> dict:
    """Measure the three variants, print the table, write the JSON when --out is given; return the results."""
    arguments = parse_arguments(argv)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    if arguments.measure_memory is not None:
        report_to_parent(measure_memory_here(arguments))
        return {}

    seconds = time_variants(arguments)
    memory = {name: measure_memory_in_subprocess(__file__, name, arguments) for name in VARIANTS}
    median_ms = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    teacher, student, kept = build_models(arguments)
    teacher_depth, student_depth = (sum(family_of(net).block_counts(net)) for net in (teacher, student))
    results = {
        "config": measured_settings(arguments),
        "machine": machine_description(arguments.device),
        "models": {"teacher_blocks": teacher_depth, "student_blocks": student_depth, "kept_blocks": kept,
                   "feature_pairs": [list(pair) for pair in decision_pairing(kept, teacher_depth)]},
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
        f"{config['model']} teacher with {config['objective']} ({models['teacher_blocks']} blocks) -> student of {models['student_blocks']} blocks "
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
