"""What a denoiser costs: parameters, FLOPs per forward, and sampling speed timed against another net."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.evaluation.sampling import class_balanced_labels, sample_images
from tinyfusion_pl.families import family_of, find_family
from tinyfusion_pl.objectives import DiffusionObjective


def count_parameters(net: nn.Module) -> int:
    """Number of parameter elements, trainable or not (DiT's fixed pos_embed included, as in DiT's 675M)."""
    return sum(parameter.numel() for parameter in net.parameters())


def count_blocks(net: nn.Module) -> int | None:
    """Number of blocks over all of the net's block containers (the depth that pruning changes).

    None for a net that no model family describes.
    """
    family = find_family(net)
    return None if family is None else sum(family.block_counts(net))


def denoiser_inputs(
    net: nn.Module, batch_size: int, device: torch.device | str, objective: DiffusionObjective | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Dummy (x, t, condition) that the net's family says it takes: `net(x, t, **condition)` runs.

    Zero samples, class 0 for a class-conditional net, and the objective's first calibration times as the
    net receives them. Without an objective t is 0.0 (float): any net that embeds float times accepts it.
    """
    family = family_of(net)
    x = torch.zeros(batch_size, *family.sample_shape(net), device=device)  # (N, C, H, W)
    if objective is None:
        t = torch.zeros(batch_size, device=device)  # (N,)
    else:
        t = objective.model_timesteps(objective.stratified_timesteps(batch_size, 0, device))  # (N,)
    labels = None if family.num_classes(net) is None else torch.zeros(batch_size, device=device, dtype=torch.long)
    return x, t, family.condition(labels)


def forward_flops(net: nn.Module, objective: DiffusionObjective | None = None, batch_size: int = 1) -> int:
    """FLOPs of one forward of `net` on `batch_size` inputs, counted by torch's FlopCounterMode.

    The objective only supplies the times in the form the net takes them (steps or floats); the count does
    not depend on their values. A multiply-add counts as 2 FLOPs (DiT's paper counts it once: its 118.6
    "Gflops" for DiT-XL/2 are 237.2 here). Only matmuls and convolutions are counted. The count runs on
    meta tensors: nothing is computed, and attention is counted on every device (on the CPU the counter
    has no formula for the fused attention kernel that real tensors would take).
    """
    meta_state = {name: torch.empty_like(tensor, device="meta")
                  for name, tensor in [*net.named_parameters(), *net.named_buffers()]}
    x, t, condition = denoiser_inputs(net, batch_size, "meta", objective)
    was_training = net.training
    net.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            torch.func.functional_call(net, meta_state, (x, t), condition)
    finally:
        net.train(was_training)
    return counter.get_total_flops()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(
    workloads: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of every timed run of each workload: {name: {"wall": [...], "cpu": [...]}}.

    The workloads run in rounds whose order rotates (A B C, B C A, C A B, ...; A B, B A, ... for two), so
    slow drifts in machine load (other processes, clocks, heat) hit every workload alike and every workload
    holds every position equally often; run k of each workload shares its round with run k of the others.
    The first `warmup` rounds are not recorded. CUDA work is synchronised around each run.
    """
    if not workloads:
        raise ValueError("workloads is empty: pass a mapping of name -> zero-argument callable to time.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"repeats={repeats!r} is invalid: expected a positive int (timed runs per workload).")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"warmup={warmup!r} is invalid: expected an int >= 0 (untimed runs per workload).")
    device = torch.device(device)
    names = tuple(workloads)
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            workloads[name]()
            _synchronize(device)
            if round_index >= warmup:
                seconds[name]["wall"].append(time.perf_counter() - wall_start)
                seconds[name]["cpu"].append(time.process_time() - cpu_start)
    return seconds


def interleaved_median_seconds(
    workloads: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Median wall-clock seconds of each workload, timed by interleaved_seconds (the median ignores disturbed runs)."""
    seconds = interleaved_seconds(workloads, repeats=repeats, warmup=warmup, device=device)
    return {name: statistics.median(values["wall"]) for name, values in seconds.items()}


def sampling_speed(
    nets: Mapping[str, nn.Module],
    objective: DiffusionObjective,
    *,
    batch_size: int = 16,
    steps: int = 10,
    sampler_steps: int | None = None,
    cfg_scale: float = 1.0,
    repeats: int = 5,
    warmup: int = 1,
    reference: str | None = None,
    **sampler_options: Any,
) -> dict[str, dict[str, Any]]:
    """Cost and sampling speed of each net, and its speedup over `reference` (default: the first net).

    Per net: blocks, params, gflops (one forward of one sample), seconds (median time to sample a batch of
    `batch_size` with the objective's sampler run for `steps` steps), steps_per_s (the paper's "sampling
    it/s": sampler steps of the whole batch per second), samples_per_s (samples per second of a full sampler
    run of `sampler_steps` steps, default `steps`, at the measured rate: a few timed steps stand for a long
    sampler), speedup (reference seconds / seconds) and ideal_speedup (reference FLOPs / FLOPs: what
    removing compute alone would give). `sampler_options` go to the objective's sampler with `steps`
    (GaussianDiffusion: method, eta, clip_denoised; FlowMatching: method, ...). All nets must be on one device.
    """
    if not nets:
        raise ValueError("nets is empty: pass a mapping of name -> denoiser, e.g. {'teacher': ..., 'pruned': ...}.")
    reference = next(iter(nets)) if reference is None else reference
    if reference not in nets:
        raise ValueError(f"reference={reference!r} is not one of the nets {list(nets)}; name one of them or pass None.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps!r} is invalid: expected a positive int (sampler steps per timed sample).")
    sampler_steps = steps if sampler_steps is None else sampler_steps
    if isinstance(sampler_steps, bool) or not isinstance(sampler_steps, int) or sampler_steps < 1:
        raise UsageError(f"sampler_steps={sampler_steps!r} is invalid: expected a positive int (the steps of the "
                         "sampler whose samples per second to report), or None for `steps`.")
    objective.check_sampler_options({"steps": steps, **sampler_options})
    devices = {str(next(net.parameters()).device) for net in nets.values()}
    if len(devices) > 1:
        raise ValueError(f"the nets are on different devices {sorted(devices)}; move them to one device to compare speed.")

    def workload(net: nn.Module) -> Callable[[], torch.Tensor]:
        num_classes = family_of(net).num_classes(net)
        # An unconditional net ignores its labels; they only set how many samples to draw.
        labels = (torch.zeros(batch_size, dtype=torch.long) if num_classes is None
                  else class_balanced_labels(batch_size, num_classes))
        return lambda: sample_images(net, objective, labels, cfg_scale=cfg_scale, batch_size=batch_size,
                                     progress=False, steps=steps, **sampler_options)

    seconds = interleaved_median_seconds({name: workload(net) for name, net in nets.items()}, repeats=repeats,
                                         warmup=warmup, device=devices.pop())
    flops = {name: forward_flops(net, objective) for name, net in nets.items()}
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
