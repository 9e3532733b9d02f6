"""Sampling speed of a DiT or SiT against its half-depth version: measured speedup next to the FLOP ratio.

The half-depth model keeps every other block of the dense one (prune_blocks), as a 1:2 TinyFusion result
does. Both sample the same class-conditional batch with the same sampler (evaluation.sampling_speed):
runs alternate in order (A B, B A, ...) after warm-up, so drifts in machine load hit both alike, and the
median run counts. The ideal speedup is the ratio of FLOPs per forward (torch's FlopCounterMode); the
embedders and the final layer are not pruned, so it is a little below depth ratio 2. Target: measured
speedup >= 0.95 of it (the paper: 1.96x sampling it/s for DiT-XL/2, 28 -> 14 blocks). The sampler is the
objective's: by default the model's own (DiT: Gaussian diffusion, DDIM; SiT: flow matching, Euler), or
--objective and --method.

Examples:
    python benchmarks/bench_sampling_speed.py --threads 2 --out bench_sampling_speed.json
    python benchmarks/bench_sampling_speed.py --model SiT-S/2 --threads 2 --out bench_sampling_speed_sit.json
"""

from __future__ import annotations

import argparse
import json
import platform

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

from tinyfusion_pl.evaluation import forward_flops, sampling_speed, speed_table
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import save_json
from tinyfusion_pl.pruning.export import prune_blocks

TARGET_FRACTION_OF_IDEAL = 0.95
# The sampler each objective is timed with unless --method says otherwise: one model call per step.
DEFAULT_METHODS = {"gaussian": "ddim", "flow_matching": "euler"}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, model_help="registry entry of the dense model", default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32: 256px images through the SD VAE)")
    parser.add_argument("--batch", type=int, default=4, help="images sampled per timed run")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps per timed run")
    parser.add_argument("--method", default=None,
                        help="the objective's sampler (gaussian: ddpm, ddim; flow_matching: euler, heun, sde); "
                             f"default {DEFAULT_METHODS}")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (> 1 doubles each batch)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model")
    add_machine_arguments(parser)
    arguments = parser.parse_args(argv)
    arguments.objective = arguments.objective or default_objective(arguments.model)
    arguments.method = arguments.method or DEFAULT_METHODS[arguments.objective]
    if min(arguments.batch, arguments.steps, arguments.repeats, arguments.input_size) < 1 or arguments.warmup < 0:
        parser.error("--batch, --steps, --repeats and --input-size must be >= 1 and --warmup >= 0.")
    return arguments


def build_models(arguments: argparse.Namespace) -> dict[str, nn.Module]:
    """The dense registry model with non-trivial blocks, and a copy keeping blocks 0, 2, 4, ..."""
    dense = nontrivial_model(arguments.model, arguments.input_size, arguments.seed)
    blocks = family_of(dense).block_argument()
    half = prune_blocks(dense, blocks=blocks, keep=range(0, len(dense.get_submodule(blocks)), 2))
    return {"dense": dense.to(arguments.device).eval(), "half": half.to(arguments.device).eval()}


def main(argv: list[str] | None = None) -> dict:
    arguments = parse_arguments(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    nets = build_models(arguments)
    objective = build_objective(arguments.objective, nets["dense"])
    results = sampling_speed(nets, objective, batch_size=arguments.batch, steps=arguments.steps,
                             method=arguments.method, cfg_scale=arguments.cfg_scale, repeats=arguments.repeats,
                             warmup=arguments.warmup, reference="dense")
    half = results["half"]
    fraction = half["speedup"] / half["ideal_speedup"]
    tokens = (arguments.input_size // patch_size_of(arguments.model)) ** 2
    print(f"{arguments.model} at {arguments.input_size}x{arguments.input_size} ({tokens} tokens) with {objective!r}, "
          f"batch {arguments.batch}, {arguments.steps} {arguments.method} steps, {torch.get_num_threads()} threads on "
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
    if arguments.out:
        save_json(report, arguments.out)
    return json.loads(json.dumps(report))


if __name__ == "__main__":
    main()
