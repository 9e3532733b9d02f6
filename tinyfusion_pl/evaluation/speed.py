"""What a denoiser costs: parameters, FLOPs per forward, and sampling speed timed against another net."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from tinyfusion_pl.evaluation.sampling import class_balanced_labels, sample_images
from tinyfusion_pl.objectives import DiffusionObjective

# Middle of the diffusion chain; the cost of a forward does not depend on it.
PROBE_TIMESTEP = 500


def count_parameters(net: nn.Module) -> int:
    """Number of parameter elements, trainable or not (DiT's fixed pos_embed included, as in DiT's 675M)."""
    return sum(parameter.numel() for parameter in net.parameters())


def count_blocks(net: nn.Module) -> int | None:
    """Length of the net's `blocks` container (the depth that pruning changes), or None when it has none."""
    blocks = getattr(net, "blocks", None)
    return len(blocks) if isinstance(blocks, nn.ModuleList | nn.Sequential) else None


def denoiser_inputs(net: nn.Module, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Dummy (x, t, y) for a class-conditional denoiser with in_channels, input_size and num_classes."""
    x = torch.zeros(batch_size, net.in_channels, net.input_size, net.input_size, device=device)  # (N, C, H, W)
    t = torch.full((batch_size,), PROBE_TIMESTEP, device=device, dtype=torch.long)  # (N,)
    y = torch.zeros(batch_size, device=device, dtype=torch.long)  # (N,)
    return x, t, y


def forward_flops(net: nn.Module, batch_size: int = 1) -> int:
    """FLOPs of one forward of `net` on `batch_size` inputs, counted by torch's FlopCounterMode.

    A multiply-add counts as 2 FLOPs (DiT's paper counts it once: its 118.6 "Gflops" for DiT-XL/2 are
    237.2 here). Only matmuls and convolutions are counted. The count runs on meta tensors: nothing is
    computed, and attention is counted on every device (on the CPU the counter has no formula for the
    fused attention kernel that real tensors would take).
    """
    meta_state = {name: torch.empty_like(tensor, device="meta")
                  for name, tensor in [*net.named_parameters(), *net.named_buffers()]}
    x, t, y = denoiser_inputs(net, batch_size, device="meta")
    was_training = net.training
    net.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            torch.func.functional_call(net, meta_state, (x, t), {"y": y})
    finally:
        net.train(was_training)
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_seconds(
    workloads: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Median wall-clock seconds of each workload, run in alternating order (A B, B A, ...) after `warmup` runs.

    Alternating the order makes slow drifts in machine load (other processes, clocks, heat) hit every
    workload alike; the median ignores single disturbed runs. CUDA work is synchronised around each run.
    """
    if not workloads:
        raise ValueError("workloads is empty: pass a mapping of name -> zero-argument callable to time.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: expected a positive int (timed runs per workload).")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} is invalid: expected an int >= 0 (untimed runs per workload).")
    device = torch.device(device)
    names = list(workloads)
    for _ in range(warmup):
        for name in names:
            workloads[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            _synchronize(device)
            start = time.perf_counter()
            workloads[name]()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def sampling_speed(
    nets: Mapping[str, nn.Module],
    objective: DiffusionObjective,
    *,
    batch_size: int = 16,
    steps: int = 10,
    sampler_steps: int | None = None,
    method: str = "ddim",
    cfg_scale: float = 1.0,
    clip_denoised: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    reference: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Cost and sampling speed of each net, and its speedup over `reference` (default: the first net).

    Per net: blocks, params, gflops (one forward of one image), seconds (median time to sample a batch of
    `batch_size` images with `steps` denoising steps), steps_per_s (the paper's "sampling it/s": denoising
    steps of the whole batch per second), samples_per_s (images per second of a full sampler run of
    `sampler_steps` steps, default `steps`, at the measured rate: a few timed steps stand for a long
    sampler), speedup (reference seconds / seconds) and ideal_speedup (reference FLOPs / FLOPs: what
    removing compute alone would give). All nets must be on one device.
    """
    if not nets:
        raise ValueError("nets is empty: pass a mapping of name -> denoiser, e.g. {'teacher': ..., 'pruned': ...}.")
    reference = next(iter(nets)) if reference is None else reference
    if reference not in nets:
        raise ValueError(f"reference={reference!r} is not one of the nets {list(nets)}; name one of them or pass None.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: expected a positive int (denoising steps per timed sample).")
    sampler_steps = steps if sampler_steps is None else sampler_steps
    if isinstance(sampler_steps, bool) or not isinstance(sampler_steps, int) or sampler_steps < 1:
        raise ValueError(f"sampler_steps={sampler_steps!r} is invalid: expected a positive int (the steps of the "
                         "sampler whose images per second to report), or None for `steps`.")
    devices = {str(next(net.parameters()).device) for net in nets.values()}
    if len(devices) > 1:
        raise ValueError(f"the nets are on different devices {sorted(devices)}; move them to one device to compare speed.")

    def workload(net: nn.Module) -> Callable[[], torch.Tensor]:
        labels = class_balanced_labels(batch_size, net.num_classes)
        return lambda: sample_images(net, objective, labels, steps=steps, method=method, cfg_scale=cfg_scale,
                                     clip_denoised=clip_denoised, batch_size=batch_size, progress=False)

    seconds = interleaved_median_seconds({name: workload(net) for name, net in nets.items()}, repeats=repeats,
                                         warmup=warmup, device=devices.pop())
    flops = {name: forward_flops(net) for name, net in nets.items()}
    return {
        name: {
            "blocks": count_blocks(net),
            "params": count_parameters(net),
            "gflops": flops[name] / 1e9,
            "seconds": seconds[name],
            "samples_per_s": batch_size * steps / (seconds[name] * sampler_steps),
            "steps_per_s": steps / seconds[name],
            "speedup": seconds[reference] / seconds[name],
            "ideal_speedup": flops[reference] / flops[name],
        }
        for name, net in nets.items()
    }


def speed_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of sampling_speed's results, one row per net."""
    lines = ["| model | blocks | params (M) | GFLOPs | samples/s | steps/s | speedup | ideal (FLOP ratio) | of ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['blocks']} | {row['params'] / 1e6:.2f} | {row['gflops']:.3f} | {row['samples_per_s']:.2f} "
            f"| {row['steps_per_s']:.2f} | {row['speedup']:.3f} | {row['ideal_speedup']:.3f} "
            f"| {row['speedup'] / row['ideal_speedup']:.3f} |"
        )
    return "\n".join(lines)
