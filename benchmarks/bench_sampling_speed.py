"""Sampling speed of a DiT, SiT or MAR against its half-depth version: measured speedup next to the FLOP ratio.

The half-depth model keeps every other block of the dense one (prune_blocks), as a 1:2 TinyFusion result
does. Both sample the same class-conditional batch with the same sampler (evaluation.sampling_speed):
runs alternate in order (A B, B A, ...) after warm-up, so drifts in machine load hit both alike, and the
median run counts. The ideal speedup is the ratio of FLOPs per forward (torch's FlopCounterMode); the
embedders and the final layer are not pruned, so it is a little below depth ratio 2. Target: measured
speedup >= 0.95 of it (the paper: 1.96x sampling it/s for DiT-XL/2, 28 -> 14 blocks). The sampler is the
objective's: by default the model's own (DiT: Gaussian diffusion, DDIM; SiT: flow matching, Euler), or
--objective and --method.

A MAR (--model MAR-Mini, MAR-B, ...; --input-size is its latent side) samples with its own generation:
--steps iterations (num_iter), each running the transformer once and the diffusion head --head-steps times
on the tokens due. Pruning shortens only the transformer, so beside the speedup the report gives the FLOPs
of one whole generation split into transformer and head (FlopCounterMode by module, attention counted in
its math form), the transformer's FLOP ratio, the share of sampling time the head takes (timed around its
calls), and the speedup that share allows (Amdahl: 1 / (head + transformer / transformer FLOP ratio)).

Examples:
    python benchmarks/bench_sampling_speed.py --threads 2 --out bench_sampling_speed.json
    python benchmarks/bench_sampling_speed.py --model SiT-S/2 --threads 2 --out bench_sampling_speed_sit.json
    python benchmarks/bench_sampling_speed.py --model MAR-Mini --input-size 8 --steps 8 --head-steps 50 \
        --cfg-scale 3.0 --batch 16 --threads 1 --out bench_sampling_speed_mar.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn

# Run as a script, Python puts this folder first on sys.path, so the shared benchmark machinery imports as `common`.
from common import (
    add_machine_arguments,
    add_model_arguments,
    build_objective,
    default_objective,
    nontrivial_model,
    patch_size_of,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tinyfusion_pl.evaluation import (
    class_balanced_labels,
    forward_flops,
    sample_images,
    sampling_speed,
    speed_table,
)
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import save_json
from tinyfusion_pl.objectives import DiffusionObjective
from tinyfusion_pl.pruning.export import prune_blocks

TARGET_FRACTION_OF_IDEAL = 0.95
# The sampler each objective is timed with unless --method says otherwise: one model call per step (MAR's
# generation has no method).
DEFAULT_METHODS = {"gaussian": "ddim", "flow_matching": "euler", "mar": None}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model_help="registry entry of the dense model", default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32: 256px images through the SD VAE)")
    parser.add_argument("--batch", type=int, default=4, help="images sampled per timed run")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps per timed run")
    parser.add_argument("--method", default=None,
                        help="the objective's sampler (gaussian: ddpm, ddim; flow_matching: euler, heun, sde); "
                             f"default {DEFAULT_METHODS}")
    parser.add_argument("--head-steps", type=int, default=100,
                        help="MAR: the diffusion head's respaced DDPM steps per token (MAR samples with 100)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (> 1 doubles each batch)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model")
    add_machine_arguments(parser)
    arguments = parser.parse_args(argv)
    arguments.objective = arguments.objective or default_objective(arguments.model)
    arguments.method = arguments.method or DEFAULT_METHODS[arguments.objective]
    if arguments.objective == "mar" and arguments.method is not None:
        parser.error(f"--method={arguments.method} is not used by MAR's generation; leave it out.")
    if min(arguments.batch, arguments.steps, arguments.repeats, arguments.input_size) < 1 or arguments.warmup < 0:
        parser.error("--batch, --steps, --repeats and --input-size must be >= 1 and --warmup >= 0.")
    return arguments


def build_models(arguments: argparse.Namespace) -> dict[str, nn.Module]:
    """The dense registry model with non-trivial blocks, and a copy keeping blocks 0, 2, 4, ... (global indices
    over all its block lists: MAR-L's 16 + 16 become 8 + 8)."""
    dense = nontrivial_model(arguments.model, arguments.input_size, arguments.seed)
    family = family_of(dense)
    half = prune_blocks(dense, blocks=family.block_argument(), keep=range(0, sum(family.block_counts(dense)), 2))
    return {"dense": dense.to(arguments.device).eval(), "half": half.to(arguments.device).eval()}


def main(argv: list[str] | None = None) -> dict:
    arguments = parse_arguments(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    nets = build_models(arguments)
    objective = build_objective(arguments.objective, nets["dense"])
    options = {"head_steps": arguments.head_steps} if arguments.objective == "mar" else {"method": arguments.method}
    results = sampling_speed(nets, objective, batch_size=arguments.batch, steps=arguments.steps,
                             cfg_scale=arguments.cfg_scale, repeats=arguments.repeats, warmup=arguments.warmup,
                             reference="dense", **options)
    half = results["half"]
    fraction = half["speedup"] / half["ideal_speedup"]
    tokens = (arguments.input_size // patch_size_of(arguments.model)) ** 2
    sampler = (f"{arguments.steps} generation steps x {arguments.head_steps} head steps" if arguments.objective == "mar"
               else f"{arguments.steps} {arguments.method} steps")
    print(f"{arguments.model} at {arguments.input_size}x{arguments.input_size} ({tokens} tokens) with {objective!r}, "
          f"batch {arguments.batch}, {sampler}, cfg {arguments.cfg_scale}, {torch.get_num_threads()} threads on "
          f"{arguments.device} ({platform.processor() or platform.machine()})")
    print(speed_table(results))
    verdict = "meets" if fraction >= TARGET_FRACTION_OF_IDEAL else "misses"
    print(f"measured speedup {half['speedup']:.3f}x = {fraction:.3f} of the FLOP ratio {half['ideal_speedup']:.3f}x: "
          f"{verdict} the target >= {TARGET_FRACTION_OF_IDEAL}")
    report = {
        "arguments": vars(arguments), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "flops_per_forward": {name: forward_flops(net, objective) for name, net in nets.items()},
        "results": results, "fraction_of_ideal": fraction, "target": TARGET_FRACTION_OF_IDEAL,
    }
    if arguments.objective == "mar":
        report["mar"] = mar_breakdown(nets, objective, arguments)
        print_mar_breakdown(report["mar"], half["speedup"])
    if arguments.out:
        save_json(report, arguments.out)
    return json.loads(json.dumps(report))


# ------------------------------------------------------------------------------------ MAR: transformer and head


def generation(net: nn.Module, objective: DiffusionObjective, arguments: argparse.Namespace) -> torch.Tensor:
    """One whole generation of the timed batch, as sampling_speed runs it."""
    labels = class_balanced_labels(arguments.batch, family_of(net).num_classes(net))
    return sample_images(net, objective, labels, cfg_scale=arguments.cfg_scale, batch_size=arguments.batch,
                         seed=arguments.seed, progress=False, steps=arguments.steps, head_steps=arguments.head_steps)


def generation_flops(net: nn.Module, objective: DiffusionObjective, arguments: argparse.Namespace) -> dict[str, int]:
    """FLOPs of one generation: all, the diffusion head's (its module's count) and the transformer's (the rest)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        generation(net, objective, arguments)
    head = sum(counter.get_flop_counts().get(type(net.diffloss.net).__name__, {}).values())
    total = counter.get_total_flops()
    return {"total": total, "head": head, "transformer": total - head}


def head_time_share(net: nn.Module, objective: DiffusionObjective, arguments: argparse.Namespace) -> dict[str, float]:
    """Median over --repeats generations (after a warm-up one) of their seconds and of the share spent inside
    the diffusion head's calls."""
    head_seconds, started = [0.0], [0.0]
    device = torch.device(arguments.device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def before(module: nn.Module, args: tuple) -> None:
        synchronize()
        started[0] = time.perf_counter()

    def after(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        synchronize()
        head_seconds[0] += time.perf_counter() - started[0]

    generation(net, objective, arguments)
    handles = [net.diffloss.net.register_forward_pre_hook(before), net.diffloss.net.register_forward_hook(after)]
    runs = []
    try:
        for _ in range(arguments.repeats):
            head_seconds[0] = 0.0
            synchronize()
            start = time.perf_counter()
            generation(net, objective, arguments)
            synchronize()
            runs.append((time.perf_counter() - start, head_seconds[0]))
    finally:
        for handle in handles:
            handle.remove()
    return {"seconds": statistics.median(total for total, _ in runs),
            "head_seconds": statistics.median(head for _, head in runs),
            "head_share": statistics.median(head / total for total, head in runs)}


def mar_breakdown(nets: dict[str, nn.Module], objective: DiffusionObjective, arguments: argparse.Namespace) -> dict:
    """Per net: generation FLOPs by part and head time share; the transformer FLOP ratio and Amdahl's bound."""
    parts = {name: {"flops": generation_flops(net, objective, arguments), **head_time_share(net, objective, arguments)}
             for name, net in nets.items()}
    ratio = parts["dense"]["flops"]["transformer"] / parts["half"]["flops"]["transformer"]
    share = parts["dense"]["head_share"]
    return {"parts": parts, "transformer_flop_ratio": ratio,
            "total_flop_ratio": parts["dense"]["flops"]["total"] / parts["half"]["flops"]["total"],
            "head_time_share_dense": share, "amdahl_speedup": 1.0 / (share + (1.0 - share) / ratio)}


def print_mar_breakdown(breakdown: dict, measured_speedup: float) -> None:
    print("| model | generation GFLOPs | transformer GFLOPs | head GFLOPs | seconds | head share of time |")
    print("|---|---|---|---|---|---|")
    for name, part in breakdown["parts"].items():
        flops = part["flops"]
        print(f"| {name} | {flops['total'] / 1e9:.3f} | {flops['transformer'] / 1e9:.3f} | {flops['head'] / 1e9:.3f} "
              f"| {part['seconds']:.3f} | {part['head_share']:.3f} |")
    print(f"transformer FLOP ratio {breakdown['transformer_flop_ratio']:.3f}x (whole generation "
          f"{breakdown['total_flop_ratio']:.3f}x); the head takes {breakdown['head_time_share_dense']:.1%} of the dense "
          f"model's sampling time, so pruning the transformer alone allows {breakdown['amdahl_speedup']:.3f}x; "
          f"measured {measured_speedup:.3f}x")


if __name__ == "__main__":
    main()
