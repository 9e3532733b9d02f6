"""Do the gate estimators rank a model's keep-options as their exact losses do? A check, not a cost.

For a model that train.py loads (by default a teacher of the embedded digits DiT) and an N:M pattern over its
blocks, every option of every group gets three numbers:

- exact: the model's loss with that option kept, averaged over every option of the other groups (fixed
  calibration batches, times and noise, as `pruning.calibration` scores models);
- straight-through (the paper's estimator): over uniform per-sample draws of the options, the mean of
  sum over the option's blocks of dL/dm_b, the gradient that moves the gates (the lowest value gains);
- score function: over the same kind of draws, the mean loss of the samples that drew the option minus
  their batch's mean loss (REINFORCE's signal, with its standard error).

Each group's options are printed best first by each; where the straight-through order departs from the
exact one, the paper's estimator misjudges the model (README, "How the gates learn"). The weights stay
frozen: this is what the gates see at the start of a prune.

Example (a teacher the recoverability study or `python train.py stage=pretrain` pretrained):
    python benchmarks/check_gate_estimators.py --teacher outputs/.../pretrain/model.pt --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tinyfusion_pl.families import family_of
from tinyfusion_pl.pruning.block_hooks import BlockMaskHooks, sequence_streams
from tinyfusion_pl.pruning.calibration import calibration_batches, calibration_loss
from tinyfusion_pl.pruning.containers import resolve_block_sequence
from tinyfusion_pl.pruning.gates import BlockGates
from tinyfusion_pl.pruning.patterns import BlockPattern
from tinyfusion_pl.stages.common import build_data, load_model

CONF = Path(__file__).resolve().parent.parent / "conf"
MAX_COMBINATIONS = 512


class DrawnMasks:
    """Mask provider for BlockMaskHooks: this batch's (B, L) masks, or every block kept outside a draw."""

    def __init__(self) -> None:
        self.masks: torch.Tensor | None = None

    def __call__(self, index: int, hidden_in: torch.Tensor, block: torch.nn.Module):
        return True if self.masks is None else self.masks[: hidden_in.shape[0], index]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a checkpoint train.py loads as teacher.checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the calibration batches and the draws")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--draw-rounds", type=int, default=8, help="passes of uniform draws over the batches")
    parser.add_argument("--override", nargs="*", default=[], help="further train.py overrides, e.g. model=sit_digits")
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args(argv)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"seed={arguments.seed}",
                                                      f"teacher.checkpoint={arguments.teacher}", *arguments.override])
    net = load_model(cfg, arguments.teacher).eval().requires_grad_(False)
    objective = instantiate(cfg.objective)
    batches = calibration_batches(build_data(cfg), arguments.calibration_batches, seed=arguments.seed)
    family = family_of(net)
    sequence = resolve_block_sequence(net, family.block_argument())
    gates = BlockGates(BlockPattern.parse(arguments.pattern).groups_for_depth(len(sequence)))
    tables = gates.option_tables
    combinations = list(itertools.product(*(range(len(table)) for table in tables)))
    if len(combinations) > MAX_COMBINATIONS:
        raise SystemExit(f"--pattern {arguments.pattern} on {len(sequence)} blocks gives {len(combinations)} kept-sets; "
                         f"the exact losses enumerate them all (at most {MAX_COMBINATIONS}): use a model of fewer blocks.")

    drawn = DrawnMasks()
    hooks = BlockMaskHooks(sequence.blocks, drawn, streams=sequence_streams(net, sequence, None))
    try:
        exact = {}
        for combination in combinations:
            kept = torch.cat([table[option] for table, option in zip(tables, combination, strict=True)])
            drawn.masks = kept.expand(max(len(x) for x, _ in batches), -1)  # every sample alike
            exact[combination] = calibration_loss(net, objective, batches, seed=arguments.seed)

        generator = torch.Generator().manual_seed(arguments.seed)
        straight_through = [[[] for _ in table] for table in tables]
        score_function = [[[] for _ in table] for table in tables]
        for _ in range(arguments.draw_rounds):
            for x, cond in batches:
                choices = [torch.randint(0, len(table), (len(x),), generator=generator) for table in tables]
                masks = gates.masks_of(choices).requires_grad_(True)
                drawn.masks = masks
                t = objective.sample_timesteps(len(x), x.device, generator=generator)
                noise = torch.randn(x.shape, generator=generator)
                losses = objective.training_losses(net, x, t, noise=noise, model_kwargs=cond, generator=generator)["loss"]
                mask_gradient, = torch.autograd.grad(losses.sum(), masks)  # per sample: dL_i / dm_i
                advantage = (losses - losses.mean()).detach()
                start = 0
                for group, (table, choice) in enumerate(zip(tables, choices, strict=True)):
                    width = table.shape[1]
                    option_gradient = mask_gradient[:, start:start + width] @ table.T  # (B, C)
                    start += width
                    for option in range(len(table)):
                        straight_through[group][option] += option_gradient[:, option].tolist()
                        score_function[group][option] += advantage[choice == option].tolist()
    finally:
        hooks.remove()

    report = []
    starts = gates.starts
    for group, table in enumerate(tables):
        names = [str([starts[group] + int(i) for i in row.nonzero().flatten()]) for row in table]
        rows = []
        for option, name in enumerate(names):
            exact_mean = statistics.mean(loss for combination, loss in exact.items() if combination[group] == option)
            drawn_losses = score_function[group][option]
            rows.append({"kept": name, "exact": exact_mean,
                         "straight_through": statistics.mean(straight_through[group][option]),
                         "score_function": statistics.mean(drawn_losses) if drawn_losses else float("nan"),
                         "score_function_se": (statistics.stdev(drawn_losses) / len(drawn_losses) ** 0.5
                                               if len(drawn_losses) > 1 else float("nan"))})
        report.append(rows)
        print(f"\ngroup {group} (blocks {starts[group]}-{starts[group] + table.shape[1] - 1}): options best first")
        for measure in ("exact", "straight_through", "score_function"):
            ordered = sorted(rows, key=lambda row: row[measure])
            print(f"  {measure:>16}: " + ", ".join(f"{row['kept']} {row[measure]:+.4f}" for row in ordered))
    if arguments.out is not None:
        arguments.out.write_text(json.dumps({"teacher": arguments.teacher, "pattern": arguments.pattern,
                                             "seed": arguments.seed, "groups": report}, indent=2))


if __name__ == "__main__":
    main()
