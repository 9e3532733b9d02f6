"""Cost of a TinyFusion pruning step against a plain full fine-tuning step of the same dense DiT or SiT.

--model diffusers:DiT-Tiny/2 runs diffusers' DiTTransformer2DModel of that registry entry's size instead, in
its DiffusersDiT adapter; its blocks, and the blocks its family requires every decision to keep, come from
its model family like ours.

Both variants run on the same model weights, batch and machine, in one run:
  plain    AdamW on every weight of the dense model.
  pruning  N:M block mask (per-sample straight-through Gumbel gates, BlockGates + BlockMaskHooks, the
           machinery of DifferentiableBlockMask) and LoRA placed as CoOptimizedWeightUpdate places it
           (inject_block_lora: the family's target, every Linear of the blocks by default; layers a block
           calls on one tensor share their products); every original weight frozen; AdamW on the adapters
           (lr) and the gate logits (10 x lr, no weight decay).
The loss is the objective's training loss on random latents: by default the model's own (DiT: Gaussian
diffusion, MSE + VB; SiT: flow matching, velocity MSE), or --objective.

Time: steps of the two variants alternate (ABBA order) in one process, so drifts in machine load hit
both alike. Reported: the median wall time per step of each variant and, as the time ratio, the median
over iterations of (pruning step / plain step) of the two steps measured next to each other, which a
shared machine disturbs least. The process CPU time per step is recorded too.
Peak memory: each variant runs alone in a fresh subprocess. On CPU the figure is the kernel's
high-water mark of this process's resident memory (VmHWM in /proc/self/status): it sees every
short-lived peak, which sampling the RSS can miss, and costs nothing while running; it cannot be
reset, hence one process per variant. (getrusage's ru_maxrss would not do: Linux carries the parent's
high-water mark over fork and exec into it.) The subprocesses run with MALLOC_MMAP_THRESHOLD_=65536 so
that freed tensors leave the resident set at once; glibc's heap otherwise keeps freed memory and the
peak measures the allocator rather than the step. The resident memory after imports and model
construction is subtracted too, to show what a training step adds (gradients, optimizer state,
activations, adapters). On CUDA the figure is torch.cuda.max_memory_allocated.

Examples (the figures in benchmarks/README.md):
    python benchmarks/bench_pruning_step.py --out bench_pruning_step.json
    python benchmarks/bench_pruning_step.py --model SiT-Mini/2 --out bench_pruning_step_sit.json
    python benchmarks/bench_pruning_step.py --model diffusers:DiT-Tiny/2 --threads 1 --out bench_pruning_step_diffusers.json
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

from tinyfusion_pl.evaluation.speed import interleaved_seconds
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import save_json
from tinyfusion_pl.objectives import DiffusionObjective
from tinyfusion_pl.pruning.block_hooks import BlockMaskHooks, sequence_streams
from tinyfusion_pl.pruning.containers import resolve_block_sequence
from tinyfusion_pl.pruning.gates import BlockGates
from tinyfusion_pl.pruning.lora import LoRALinear, inject_block_lora
from tinyfusion_pl.pruning.patterns import BlockPattern

VARIANTS = ("plain", "pruning")
TARGET_TIME_RATIO = 0.85  # pruning step time / plain step time
# glibc serves blocks >= 64 KiB with mmap and unmaps them when freed, so resident memory follows the
# live tensors instead of heap arenas that keep freed memory (which made the peaks depend on luck).
MEMORY_SUBPROCESS_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_model_arguments(parser, model_help="registry entry", diffusers=True)
    parser.add_argument("--pattern", default="1:2", help="N:M block pattern of the pruning variant")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--lora-target", default=None,
                        help="comma-separated names (or dotted name endings) of the block Linears to adapt, e.g. "
                             "'to_q,to_out.0'; default: the model family's, like CoOptimizedWeightUpdate (every "
                             "Linear of the blocks; diffusers' DiT: those of DiT's block)")
    parser.add_argument("--lora-products", choices=("shared", "separate"), default="shared",
                        help="shared (default): adapted Linears that a block calls on one tensor (q, k, v) are "
                             "computed with shared LoRA products (SharedInputLoRA); separate: every layer on its own")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (gates get 10x)")
    add_step_arguments(parser, VARIANTS)
    return parse_step_arguments(parser, argv)


def build_dense_model(arguments: argparse.Namespace) -> nn.Module:
    """The registry model at the input size that gives --tokens tokens, with every block made non-trivial."""
    input_size = input_size_for_tokens(arguments.model, arguments.tokens)
    return nontrivial_model(arguments.model, input_size, arguments.seed).to(arguments.device)


def build_batch(model: nn.Module, objective: DiffusionObjective, arguments: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Random samples, noise, training times and class labels of the shape the model's family gives."""
    family = family_of(model)
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    shape = (arguments.batch, *family.sample_shape(model))
    batch = {
        "x": torch.randn(shape, generator=generator),
        "noise": torch.randn(shape, generator=generator),
        "t": objective.sample_timesteps(arguments.batch, "cpu", generator=generator),
    }
    if family.num_classes(model) is not None:
        batch["labels"] = torch.randint(0, family.num_classes(model), (arguments.batch,), generator=generator)
    return {name: tensor.to(arguments.device) for name, tensor in batch.items()}


def training_loss(model: nn.Module, objective: DiffusionObjective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    condition = family_of(model).condition(batch.get("labels"))
    terms = objective.training_losses(model, batch["x"], batch["t"], noise=batch["noise"], model_kwargs=condition)
    return terms["loss"].mean()


def plain_step_function(
    model: nn.Module, objective: DiffusionObjective, arguments: argparse.Namespace
) -> Callable[[dict], float]:
    """Full fine-tuning of the dense model: AdamW on every trainable weight."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=arguments.lr, weight_decay=0.0)

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = training_loss(model, objective, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def pruning_step_function(
    model: nn.Module, objective: DiffusionObjective, arguments: argparse.Namespace
) -> Callable[[dict], float]:
    """TinyFusion: gated blocks (one per-sample draw per step), LoRA on the blocks, original weights frozen.

    The gates keep the blocks the model's family requires, as DifferentiableBlockMask's do.
    """
    family = family_of(model)
    sequence = resolve_block_sequence(model, family.block_argument())
    model.requires_grad_(False)
    target = None if arguments.lora_target is None else arguments.lora_target.split(",")
    inject_block_lora(model, sequence, rank=arguments.rank, alpha=arguments.alpha, target=target)
    if arguments.lora_products == "separate":
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.shared_input = None
    groups = BlockPattern.parse(arguments.pattern).groups_for_depth(len(sequence))
    gates = BlockGates(groups, required_blocks=family.required_blocks(model)).to(arguments.device)
    noise_generator = torch.Generator().manual_seed(arguments.seed + 2)
    current = {}
    BlockMaskHooks(sequence.blocks, lambda index, hidden, block: current["masks"][:, index],
                   streams=sequence_streams(model, sequence, None))
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": adapters, "lr": arguments.lr},
            {"params": list(gates.gate_logits), "lr": 10 * arguments.lr},
        ],
        weight_decay=0.0,
    )

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        noise = gates.draw_noise(batch["x"].shape[0], noise_generator)
        # Fixed scaling and tau: a step costs the same wherever the annealing schedules stand.
        current["masks"] = gates.sample_masks(noise, scaling=100.0, tau=1.0).to(arguments.device)  # (B, L)
        loss = training_loss(model, objective, batch)
        loss.backward()
        optimizer.step()
        gates.update_ema(0.999)
        return loss.item()

    return step


STEP_FUNCTIONS = {"plain": plain_step_function, "pruning": pruning_step_function}


def time_variants(arguments: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds per step of each variant, steps alternating in ABBA order after warm-up."""
    dense = build_dense_model(arguments)
    objective = build_objective(arguments.objective, dense)
    batch = build_batch(dense, objective, arguments)
    steps = {name: STEP_FUNCTIONS[name](copy.deepcopy(dense).train(), objective, arguments) for name in VARIANTS}
    del dense
    return interleaved_seconds({name: functools.partial(step, batch) for name, step in steps.items()},
                               repeats=arguments.steps, warmup=arguments.warmup, device=arguments.device)


def measure_memory_here(arguments: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one variant in this (fresh) process, in MiB."""
    model = build_dense_model(arguments).train()
    objective = build_objective(arguments.objective, model)
    batch = build_batch(model, objective, arguments)
    step = STEP_FUNCTIONS[arguments.measure_memory](model, objective, arguments)
    # The high-water mark is not reset: the peak counts from the process start, the baseline after construction.
    return peak_memory_of_steps(step, batch, arguments.memory_steps, arguments.device, reset_peak=False)


def parameter_counts(arguments: argparse.Namespace) -> dict[str, int]:
    model = build_dense_model(arguments)
    total = sum(p.numel() for p in model.parameters())
    pruning_step_function(model, build_objective(arguments.objective, model), arguments)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"dense": total, "lora_adapters": adapters}


def main(argv: list[str] | None = None) -> dict:
    """Measure both variants, print the table, write the JSON when --out is given; return the results."""
    arguments = parse_arguments(argv)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    if arguments.measure_memory is not None:
        report_to_parent(measure_memory_here(arguments))
        return {}

    seconds = time_variants(arguments)
    memory = {name: measure_memory_in_subprocess(__file__, name, arguments, MEMORY_SUBPROCESS_ENVIRONMENT)
              for name in VARIANTS}
    median_ms = {name: 1000 * statistics.median(values["wall"]) for name, values in seconds.items()}
    median_cpu_ms = {name: 1000 * statistics.median(values["cpu"]) for name, values in seconds.items()}
    paired = [p / q for p, q in zip(seconds["pruning"]["wall"], seconds["plain"]["wall"], strict=True)]
    time_ratio = statistics.median(paired)
    results = {
        "config": measured_settings(arguments),
        "machine": machine_description(arguments.device),
        "parameters": parameter_counts(arguments),
        "median_step_ms": median_ms,
        "median_step_cpu_ms": median_cpu_ms,
        "step_ms": {name: [1000 * value for value in values["wall"]] for name, values in seconds.items()},
        "time_ratio": time_ratio,
        "time_ratio_of_medians": median_ms["pruning"] / median_ms["plain"],
        "memory_mib": memory,
        "targets": {
            f"time_ratio_at_most_{TARGET_TIME_RATIO}": time_ratio <= TARGET_TIME_RATIO,
            "peak_memory_below_plain": memory["pruning"]["peak_mib"] < memory["plain"]["peak_mib"],
        },
    }
    print_table(results)
    if arguments.out is not None:
        save_json(results, arguments.out)
        print(f"wrote {arguments.out}")
    return results


def print_table(results: dict) -> None:
    config, memory, median_ms = results["config"], results["memory_mib"], results["median_step_ms"]
    print(
        f"{config['model']} with {config['objective']}, batch {config['batch']} x {config['tokens']} tokens, "
        f"{config['device']}, "
        f"{results['machine']['threads']} threads, {config['steps']} measured steps per variant "
        f"(load average {results['machine']['load_average_1min']:.2f})"
    )
    parameters = results["parameters"]
    print(
        f"pruning variant: {config['pattern']} mask, LoRA rank {config['rank']} on "
        f"{'the family target' if config['lora_target'] is None else config['lora_target']}"
        f"{', every layer separately' if config['lora_products'] == 'separate' else ''} "
        f"({parameters['lora_adapters']:,} adapter weights = {100 * parameters['lora_adapters'] / parameters['dense']:.2f}% "
        f"of {parameters['dense']:,})"
    )
    header = f"{'variant':<10}{'median step ms':>16}{'CPU ms':>10}{'peak MiB':>12}{'step MiB':>12}"
    print(header)
    print("-" * len(header))
    cpu_ms = results["median_step_cpu_ms"]
    for name in VARIANTS:
        print(
            f"{name:<10}{median_ms[name]:>16.1f}{cpu_ms[name]:>10.1f}"
            f"{memory[name]['peak_mib']:>12.1f}{memory[name]['step_mib']:>12.1f}"
        )
    peak_ratio = memory["pruning"]["peak_mib"] / memory["plain"]["peak_mib"]
    step_ratio = memory["pruning"]["step_mib"] / memory["plain"]["step_mib"]
    cpu_ratio = cpu_ms["pruning"] / cpu_ms["plain"]
    print(f"{'ratio':<10}{results['time_ratio']:>16.2f}{cpu_ratio:>10.2f}{peak_ratio:>12.2f}{step_ratio:>12.2f}")
    print("(time ratio: median of the ratios of neighbouring pruning and plain steps)")
    load, cpus = results["machine"]["load_average_1min"], results["machine"]["cpu_count"] or 1
    if load > cpus:
        print(
            f"warning: the machine was busy (load average {load:.1f} on {cpus} CPUs); multi-threaded steps then wait "
            "on descheduled threads, which penalises the step with more small kernels. Rerun when idle or "
            "with --threads 1."
        )
    targets = results["targets"]
    print(
        f"targets: time ratio <= {TARGET_TIME_RATIO}: "
        f"{'met' if targets[f'time_ratio_at_most_{TARGET_TIME_RATIO}'] else 'MISSED'}; "
        f"peak memory below plain: {'met' if targets['peak_memory_below_plain'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
