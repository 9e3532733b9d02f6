"""Cost of a TinyFusion pruning step against a plain full fine-tuning step of the same dense DiT.

Both variants run on the same model weights, batch and machine, in one run:
  plain    AdamW on every weight of the dense model.
  pruning  N:M block mask (per-sample straight-through Gumbel gates, BlockGates + BlockMaskHooks, the
           machinery of DifferentiableBlockMask) and LoRA on every Linear of the blocks; every original
           weight frozen; AdamW on the adapters (lr) and the gate logits (10 x lr, no weight decay).
The loss is DiT's diffusion loss (GaussianDiffusion: MSE + VB) on random latents.

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

Example (the figures in benchmarks/README.md):
    python benchmarks/bench_pruning_step.py --out bench_pruning_step.json
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
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from tinyfusion_pl.models import DiT_models
from tinyfusion_pl.objectives import GaussianDiffusion
from tinyfusion_pl.pruning.block_hooks import BlockMaskHooks
from tinyfusion_pl.pruning.gates import BlockGates
from tinyfusion_pl.pruning.lora import inject_lora
from tinyfusion_pl.pruning.patterns import BlockPattern

VARIANTS = ("plain", "pruning")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-Mini/2", choices=sorted(DiT_models), help="registry entry")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample (a square grid of patches)")
    parser.add_argument("--pattern", default="1:2", help="N:M block pattern of the pruning variant")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (gates get 10x)")
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


def build_dense_model(arguments: argparse.Namespace) -> nn.Module:
    """The registry DiT at the input size that gives --tokens tokens, with every block made non-trivial."""
    torch.manual_seed(arguments.seed)
    patch_size = int(arguments.model.rsplit("/", 1)[1])
    model = DiT_models[arguments.model](input_size=patch_size * math.isqrt(arguments.tokens))
    # adaLN-Zero makes fresh blocks identities; a pretrained model's blocks are not, so perturb the zeros.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.normal_(std=0.02)
    return model.to(arguments.device)


def build_batch(model: nn.Module, arguments: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(arguments.seed + 1)
    shape = (arguments.batch, model.in_channels, model.input_size, model.input_size)
    batch = {
        "x": torch.randn(shape, generator=generator),
        "noise": torch.randn(shape, generator=generator),
        "t": torch.randint(0, 1000, (arguments.batch,), generator=generator),
        "y": torch.randint(0, model.num_classes, (arguments.batch,), generator=generator),
    }
    return {name: tensor.to(arguments.device) for name, tensor in batch.items()}


def diffusion_loss(model: nn.Module, diffusion: GaussianDiffusion, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = diffusion.training_losses(model, batch["x"], batch["t"], noise=batch["noise"], model_kwargs={"y": batch["y"]})
    return terms["loss"].mean()


def plain_step_function(model: nn.Module, arguments: argparse.Namespace) -> Callable[[dict], float]:
    """Full fine-tuning of the dense model: AdamW on every trainable weight."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=arguments.lr, weight_decay=0.0)
    diffusion = GaussianDiffusion()

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(model, diffusion, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def pruning_step_function(model: nn.Module, arguments: argparse.Namespace) -> Callable[[dict], float]:
    """TinyFusion: gated blocks (one per-sample draw per step), LoRA on the blocks, original weights frozen."""
    model.requires_grad_(False)
    inject_lora(model.blocks, rank=arguments.rank, alpha=arguments.alpha)
    groups = BlockPattern.parse(arguments.pattern).groups_for_depth(len(model.blocks))
    gates = BlockGates(groups).to(arguments.device)
    noise_generator = torch.Generator().manual_seed(arguments.seed + 2)
    current = {}
    BlockMaskHooks(list(model.blocks), lambda index, hidden, block: current["masks"][:, index])
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": adapters, "lr": arguments.lr},
            {"params": list(gates.gate_logits), "lr": 10 * arguments.lr},
        ],
        weight_decay=0.0,
    )
    diffusion = GaussianDiffusion()

    def step(batch: dict[str, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        noise = gates.draw_noise(batch["x"].shape[0], noise_generator)
        # Fixed scaling and tau: a step costs the same wherever the annealing schedules stand.
        current["masks"] = gates.sample_masks(noise, scaling=100.0, tau=1.0).to(arguments.device)  # (B, L)
        loss = diffusion_loss(model, diffusion, batch)
        loss.backward()
        optimizer.step()
        gates.update_ema(0.999)
        return loss.item()

    return step


STEP_FUNCTIONS = {"plain": plain_step_function, "pruning": pruning_step_function}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(arguments: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds per step of each variant, steps alternating in ABBA order after warm-up."""
    dense = build_dense_model(arguments)
    batch = build_batch(dense, arguments)
    steps = {name: STEP_FUNCTIONS[name](copy.deepcopy(dense).train(), arguments) for name in VARIANTS}
    del dense
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in VARIANTS}
    for iteration in range(arguments.warmup + arguments.steps):
        order = VARIANTS if iteration % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            synchronize(arguments.device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            steps[name](batch)
            synchronize(arguments.device)
            if iteration >= arguments.warmup:
                seconds[name]["wall"].append(time.perf_counter() - wall_start)
                seconds[name]["cpu"].append(time.process_time() - cpu_start)
    return seconds


def memory_status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field} line; peak CPU memory is measured on Linux only.")


def measure_memory_here(arguments: argparse.Namespace) -> dict[str, float]:
    """Peak memory of one variant in this (fresh) process, in MiB."""
    model = build_dense_model(arguments).train()
    batch = build_batch(model, arguments)
    step = STEP_FUNCTIONS[arguments.measure_memory](model, arguments)
    if arguments.device.startswith("cuda"):
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = memory_status_mib("VmRSS")
    for _ in range(arguments.memory_steps):
        step(batch)
    if arguments.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = memory_status_mib("VmHWM")
    return {"peak_mib": peak, "baseline_mib": baseline, "step_mib": peak - baseline}


def measure_memory_in_subprocess(variant: str, arguments: argparse.Namespace) -> dict[str, float]:
    """Run this script for one variant in a fresh interpreter, with the same settings, and read its result."""
    settings = {key: value for key, value in vars(arguments).items() if key not in ("out", "measure_memory")}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items() if value is not None]
    command = [sys.executable, os.path.abspath(__file__), *flags, "--measure-memory", variant]
    # glibc serves blocks >= 64 KiB with mmap and unmaps them when freed, so resident memory follows the
    # live tensors instead of heap arenas that keep freed memory (which made the peaks depend on luck).
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    completed = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def parameter_counts(arguments: argparse.Namespace) -> dict[str, int]:
    model = build_dense_model(arguments)
    total = sum(p.numel() for p in model.parameters())
    pruning_step_function(model, arguments)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"dense": total, "lora_adapters": adapters}


def write_json_atomically(payload: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".bench_pruning_step.", suffix=".tmp", dir=folder)
    with os.fdopen(handle, "w") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> dict:
    """Measure both variants, print the table, write the JSON when --out is given; return the results."""
    arguments = parse_arguments(argv)
    if arguments.threads is not None:
        torch.set_num_threads(arguments.threads)
    if arguments.measure_memory is not None:
        print(json.dumps(measure_memory_here(arguments)))
        return {}

    seconds = time_interleaved(arguments)
    memory = {name: measure_memory_in_subprocess(name, arguments) for name in VARIANTS}
    median_ms = {name: 1000 * statistics.median(values["wall"]) for name, values in seconds.items()}
    median_cpu_ms = {name: 1000 * statistics.median(values["cpu"]) for name, values in seconds.items()}
    paired = [p / q for p, q in zip(seconds["pruning"]["wall"], seconds["plain"]["wall"], strict=True)]
    time_ratio = statistics.median(paired)
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
        "parameters": parameter_counts(arguments),
        "median_step_ms": median_ms,
        "median_step_cpu_ms": median_cpu_ms,
        "step_ms": {name: [1000 * value for value in values["wall"]] for name, values in seconds.items()},
        "time_ratio": time_ratio,
        "time_ratio_of_medians": median_ms["pruning"] / median_ms["plain"],
        "memory_mib": memory,
        "targets": {
            "time_ratio_at_most_0.90": time_ratio <= 0.90,
            "peak_memory_below_plain": memory["pruning"]["peak_mib"] < memory["plain"]["peak_mib"],
        },
    }
    print_table(results)
    if arguments.out is not None:
        write_json_atomically(results, arguments.out)
        print(f"wrote {arguments.out}")
    return results


def print_table(results: dict) -> None:
    config, memory, median_ms = results["config"], results["memory_mib"], results["median_step_ms"]
    print(
        f"{config['model']}, batch {config['batch']} x {config['tokens']} tokens, {config['device']}, "
        f"{results['machine']['threads']} threads, {config['steps']} measured steps per variant "
        f"(load average {results['machine']['load_average_1min']:.2f})"
    )
    parameters = results["parameters"]
    print(
        f"pruning variant: {config['pattern']} mask, LoRA rank {config['rank']} on every block Linear "
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
        f"targets: time ratio <= 0.90: {'met' if targets['time_ratio_at_most_0.90'] else 'MISSED'}; "
        f"peak memory below plain: {'met' if targets['peak_memory_below_plain'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
