"""The analysis of a recoverability study: selectors placed in the ground truth, over seeds, with intervals.

Input: per seed, every measured choice (calibration loss right after pruning; held-out loss, FID and conditional
accuracy after recovery, with per-sample values or bootstrap replicates) and every selector's choice. Output:
placements (rank, percentile, regret) within the set each selector could pick from and within all choices,
their means and intervals over seeds, which differences between selectors are significant, Kendall's tau
between the loss after pruning and the quality after recovery, the tables, plots and report files.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinyfusion_pl.evaluation.statistics import (
    Interval,
    bootstrap_indices,
    excludes_zero,
    kendall_tau_with_interval,
    percentile_interval,
    place,
    t_interval,
)
from tinyfusion_pl.io import save_json, save_text, write_atomically
from tinyfusion_pl.pruning.choices import admits

# measure -> (lower is better, how the report names it)
MEASURES = {
    "heldout_loss": (True, "held-out loss"),
    "fid": (True, "FID"),
    "conditional_accuracy": (False, "conditional accuracy"),
}
AFTER_PRUNING = "calibration_loss"
SCOPES = ("own", "all")
CSV_COLUMNS = ["seed", "kept_blocks", "in_ground_truth", "calibration_loss", "heldout_loss_pruned", "heldout_loss",
               "fid", "fid_low", "fid_high", "conditional_accuracy", "accuracy_low", "accuracy_high", "chosen_by"]


def choice_key(kept_blocks: Sequence[int]) -> str:
    """How a kept-set is named in files and tables: its blocks joined by '-' (e.g. 0-2-5-7)."""
    return "-".join(str(block) for block in kept_blocks)


def measures_of(choices: dict[str, dict[str, Any]]) -> list[str]:
    """The measures every choice has (FID and accuracy need a scorer and a judge)."""
    return [name for name in MEASURES if all(record.get(name) is not None for record in choices.values())]


# --------------------------------------------------------------------------- one seed


def scope_keys(seed_study: dict[str, Any], selector: dict[str, Any], scope: str) -> list[str]:
    """The choices a selector's choice is compared with: those its groups admit ('own') or all ('all'), itself
    included."""
    keys = list(seed_study["ground_truth"])
    if scope == "own":
        keys = [key for key in keys if admits([int(block) for block in key.split("-")], selector["groups"])]
    chosen = choice_key(selector["kept_blocks"])
    return keys if chosen in keys else [*keys, chosen]


def place_selectors(seed_study: dict[str, Any], measures: Sequence[str]) -> dict[str, dict[str, Any]]:
    """selector -> {kept_blocks, scope -> measure -> placement dict} for one seed."""
    choices, placed = seed_study["choices"], {}
    for name, selector in seed_study["selectors"].items():
        chosen = choice_key(selector["kept_blocks"])
        entry: dict[str, Any] = {"kept_blocks": selector["kept_blocks"],
                                 "in_ground_truth": chosen in seed_study["ground_truth"]}
        for scope in SCOPES:
            keys = scope_keys(seed_study, selector, scope)
            entry[scope] = {measure: {**place({key: choices[key][measure] for key in keys}, chosen,
                                              lower_is_better=MEASURES.get(measure, (True,))[0]).as_dict(),
                                      "value": choices[chosen][measure]}
                            for measure in [AFTER_PRUNING, *measures]}
        placed[name] = entry
    return placed


def rank_correlations(seed_study: dict[str, Any], measures: Sequence[str], replicates: int, level: float,
                      seed: int) -> dict[str, dict[str, Any]]:
    """Kendall's tau between the calibration loss after pruning and each measure's badness after recovery.

    Over the ground-truth choices; accuracy enters as its negative, so for every measure a positive tau means
    that a lower loss after pruning goes with a better recovered model (what the paper finds it does not, much).
    """
    choices = [seed_study["choices"][key] for key in seed_study["ground_truth"]]
    calibration = [record[AFTER_PRUNING] for record in choices]
    result = {}
    for measure in measures:
        sign = 1.0 if MEASURES[measure][0] else -1.0
        tau, interval = kendall_tau_with_interval(calibration, [sign * record[measure] for record in choices],
                                                  replicates=replicates, seed=seed, level=level)
        result[measure] = {"tau": tau, "interval": interval, "choices": len(choices)}
    return result


def difference_interval(first: dict[str, Any], second: dict[str, Any], measure: str, replicates: int, level: float,
                        seed: int) -> Interval | None:
    """Bootstrap interval of first - second in one measure, within one seed (the models' own sampling noise).

    Both were measured on the same held-out batches and noise, and sampled from the same labels and initial
    noise, so the resamples are paired: FID replicates were drawn with the same rows for every model.
    """
    if measure == "fid":
        return percentile_interval(np.subtract(first["fid_replicates"], second["fid_replicates"]), level)
    per_sample = {"heldout_loss": "heldout_losses", "conditional_accuracy": "correct"}[measure]
    difference = np.subtract(first[per_sample], second[per_sample], dtype=np.float64)
    rows = bootstrap_indices(len(difference), replicates, seed)
    return percentile_interval(difference[rows].mean(axis=1), level)


# --------------------------------------------------------------------------- over seeds


def summarize_over_seeds(placed: dict[int, dict[str, dict[str, Any]]], measures: Sequence[str],
                         level: float) -> dict[str, dict[str, Any]]:
    """selector -> scope -> measure -> percentile and regret: per seed, mean and t-interval over seeds."""
    seeds = list(placed)
    summary: dict[str, dict[str, Any]] = {}
    for name in placed[seeds[0]]:
        entry: dict[str, Any] = {"kept_blocks": {seed: placed[seed][name]["kept_blocks"] for seed in seeds}}
        for scope in SCOPES:
            entry[scope] = {}
            for measure in [AFTER_PRUNING, *measures]:
                cells = [placed[seed][name][scope][measure] for seed in seeds]
                figures = {}
                for figure in ("percentile", "regret", "value"):
                    mean, interval = t_interval([cell[figure] for cell in cells], level)
                    if figure == "percentile" and interval is not None:  # a t-interval knows no bounds; percentiles do
                        interval = (max(0.0, interval[0]), min(100.0, interval[1]))
                    figures[figure] = {"mean": mean, "interval": interval, "per_seed": [cell[figure] for cell in cells]}
                figures["rank"] = [cell["rank"] for cell in cells]
                figures["size"] = [cell["size"] for cell in cells]
                entry[scope][measure] = figures
        summary[name] = entry
    return summary


def selector_differences(study: dict[str, Any], placed: dict[int, dict[str, dict[str, Any]]], measures: Sequence[str],
                         level: float, replicates: int) -> list[dict[str, Any]]:
    """Every pair of selectors, every measure: is the difference significant?

    With two or more seeds: the paired t-interval over seeds of the difference in percentile among all choices
    (the spread of teachers and pruning runs). With one seed: the bootstrap interval of the difference of the two
    chosen models' measures (their sampling noise only: a different teacher may order them differently).
    """
    seeds = list(placed)
    rows = []
    for first, second in itertools.combinations(list(placed[seeds[0]]), 2):
        for measure in measures:
            if len(seeds) > 1:
                differences = [placed[seed][first]["all"][measure]["percentile"]
                               - placed[seed][second]["all"][measure]["percentile"] for seed in seeds]
                mean, interval = t_interval(differences, level)
                basis = f"percentile difference, t over {len(seeds)} seeds"
            else:
                seed = seeds[0]
                choices = study["seeds"][seed]["choices"]
                keys = [choice_key(placed[seed][name]["kept_blocks"]) for name in (first, second)]
                chosen = [choices[key] for key in keys]
                mean = chosen[0][measure] - chosen[1][measure]
                interval = (0.0, 0.0) if keys[0] == keys[1] else \
                    difference_interval(*chosen, measure, replicates, level, seed)
                basis = "difference of the chosen models, bootstrap over samples"
            rows.append({"first": first, "second": second, "measure": measure, "difference": mean,
                         "interval": interval, "significant": excludes_zero(interval), "basis": basis})
    return rows


# --------------------------------------------------------------------------- tables and files


def chosen_by(seed_study: dict[str, Any]) -> dict[str, list[str]]:
    """choice key -> the selectors that chose it."""
    names: dict[str, list[str]] = {}
    for name, selector in seed_study["selectors"].items():
        names.setdefault(choice_key(selector["kept_blocks"]), []).append(name)
    return names


def csv_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for seed, seed_study in study["seeds"].items():
        names = chosen_by(seed_study)
        for key, record in seed_study["choices"].items():
            fid_interval = percentile_interval(record["fid_replicates"], study["level"]) \
                if record.get("fid_replicates") else None
            accuracy_interval = accuracy_bootstrap_interval(record, study["bootstrap"], study["level"], seed)
            rows.append({
                "seed": seed, "kept_blocks": key.replace("-", " "),
                "in_ground_truth": key in seed_study["ground_truth"],
                "calibration_loss": record["calibration_loss"], "heldout_loss_pruned": record["heldout_loss_pruned"],
                "heldout_loss": record["heldout_loss"], "fid": record.get("fid"),
                "fid_low": fid_interval and fid_interval[0], "fid_high": fid_interval and fid_interval[1],
                "conditional_accuracy": record.get("conditional_accuracy"),
                "accuracy_low": accuracy_interval and accuracy_interval[0],
                "accuracy_high": accuracy_interval and accuracy_interval[1],
                "chosen_by": " ".join(names.get(key, [])),
            })
    return rows


def accuracy_bootstrap_interval(record: dict[str, Any], replicates: int, level: float, seed: int) -> Interval | None:
    if not record.get("correct"):
        return None
    correct = np.asarray(record["correct"], dtype=np.float64)
    return percentile_interval(correct[bootstrap_indices(len(correct), replicates, seed)].mean(axis=1), level)


def spread_labels(positions: Sequence[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Label heights as close as possible to `positions`, at least `gap` apart, inside [low, high], order kept."""
    if not len(positions):
        return []
    if gap * (len(positions) - 1) > high - low:
        gap = (high - low) / max(1, len(positions) - 1)
    order = sorted(range(len(positions)), key=lambda index: positions[index])
    placed = [min(max(positions[index], low), high) for index in order]
    for position in range(1, len(placed)):  # push up what sits too close above its neighbour below
        placed[position] = max(placed[position], placed[position - 1] + gap)
    overflow = placed[-1] - high
    if overflow > 0:  # then shift the top down, pushing neighbours down as needed
        placed[-1] = high
        for position in range(len(placed) - 2, -1, -1):
            placed[position] = min(placed[position], placed[position + 1] - gap)
    result = [0.0] * len(positions)
    for position, index in enumerate(order):
        result[index] = placed[position]
    return result


def plot_calibration_vs_recovered(seed_study: dict[str, Any], measures: Sequence[str], path: Path, title: str) -> Path:
    """One panel per recovered measure: every choice (grey), the selectors' choices marked, labels apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = chosen_by(seed_study)
    figure, axes_list = plt.subplots(1, len(measures), figsize=(5.6 * len(measures), 4.6), squeeze=False)
    for axes, measure in zip(axes_list[0], measures, strict=True):
        records = seed_study["choices"]
        axes.scatter([records[key][AFTER_PRUNING] for key in seed_study["ground_truth"]],
                     [records[key][measure] for key in seed_study["ground_truth"]],
                     s=14, color="0.6", label="every choice", zorder=2)
        marked = sorted(names)
        xs = [records[key][AFTER_PRUNING] for key in marked]
        ys = [records[key][measure] for key in marked]
        axes.scatter(xs, ys, s=40, color="tab:red", edgecolor="black", zorder=3, label="a selector's choice")
        axes.set_xlabel("calibration loss right after pruning")
        axes.set_ylabel(f"{MEASURES[measure][1]} after recovery")
        axes.grid(alpha=0.3)
        axes.ticklabel_format(useOffset=False)
        bottom, top = axes.get_ylim()
        heights = spread_labels([(y - bottom) / (top - bottom) for y in ys], gap=0.075, low=0.02, high=0.98)
        for key, x, y, height in zip(marked, xs, ys, heights, strict=True):
            axes.annotate(f"{', '.join(names[key])} [{key.replace('-', ',')}]", (x, y), xytext=(1.03, height),
                          textcoords="axes fraction", fontsize=7, va="center",
                          arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6})
        axes.legend(fontsize=7, loc="upper left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)
    return path


def _number(value: Any, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)  # NaN: e.g. tau of a constant


def _ranks(figures: dict[str, Any]) -> str:
    """'rank/size' per seed."""
    return ", ".join(f"{rank}/{size}" for rank, size in zip(figures["rank"], figures["size"], strict=True))


def _with_interval(figures: dict[str, Any], spec: str) -> str:
    text = format(figures["mean"], spec)
    if figures["interval"] is not None:
        text += f" [{format(figures['interval'][0], spec)}, {format(figures['interval'][1], spec)}]"
    return text


def report_markdown(study: dict[str, Any], analysis: dict[str, Any]) -> str:
    measures, seeds, level = analysis["measures"], list(study["seeds"]), study["level"]
    first = study["seeds"][seeds[0]]
    interval_name = f"{level:.0%} t-interval over {len(seeds)} seeds" if len(seeds) > 1 else "one seed: no interval"
    lines = [
        f"# Recoverability study: {study['model']}",
        "",
        f"Ground truth: {'all' if study['enumerated'] else 'a uniform sample of'} {study['measured']} of the "
        f"{study['admissible']} admissible kept-sets (groups {study['ground_truth_groups']}), each pruned from the "
        f"teacher and recovered for {study['recover_steps']} steps (distill={study['distill']}), then measured: "
        f"held-out diffusion loss on the validation split (fixed batches, times and noise), FID and conditional "
        f"accuracy of {study['num_samples']} samples ({first['fid'] or 'no FID'}), with {level:.0%} bootstrap "
        f"intervals over the samples ({study['bootstrap']} resamples). Seeds {seeds} (teacher, pruning, recovery).",
        f"Wall time of the measured pieces: {analysis['seconds'] / 60:.1f} min for the choices "
        f"({analysis['seconds_per_choice']:.0f} s per choice on average), {analysis['selector_seconds'] / 60:.1f} min for "
        "the selectors' choices.",
        "",
        "Percentile: the share of the other choices the selector's choice beats (100 = the best choice, 50 = a "
        "typical one); regret: the distance to the best choice in the measure's units. `own`: among the choices "
        "the selector could pick (its groups); `all`: among every choice of the ground truth.",
        "",
    ]
    for measure in [*measures, AFTER_PRUNING]:
        spec = ".1%" if measure == "conditional_accuracy" else ".2f" if measure == "fid" else ".4f"
        title = f"{MEASURES[measure][1]} after recovery" if measure in MEASURES \
            else "calibration loss right after pruning (what sensitivity ranks by; before recovery)"
        lines += [
            f"## Selectors by {title} ({interval_name})",
            "",
            "| selector | kept blocks per seed | rank own | percentile own | rank all | percentile all | regret all | "
            f"{MEASURES[measure][1] if measure in MEASURES else 'calibration loss'} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in analysis["summary"].items():
            own, every = entry["own"][measure], entry["all"][measure]
            kept = "; ".join(str(blocks) for blocks in entry["kept_blocks"].values())
            lines.append(
                f"| {name} | {kept} | {_ranks(own)} | {_with_interval(own['percentile'], '.0f')} | {_ranks(every)} | "
                f"{_with_interval(every['percentile'], '.0f')} | {_with_interval(every['regret'], '.3g')} | "
                f"{_with_interval(every['value'], spec)} |"
            )
        lines.append("")
    lines += ["## Which differences between selectors are significant", ""]
    significant = [row for row in analysis["differences"] if row["significant"]]
    basis = analysis["differences"][0]["basis"] if analysis["differences"] else ""
    lines.append(f"Basis: {basis}; significant when the {level:.0%} interval excludes 0.")
    lines.append("")
    if significant:
        lines.append("Significant: " + "; ".join(
            f"{row['first']} vs {row['second']} by {MEASURES[row['measure']][1]} ({row['difference']:+.3g})"
            for row in significant) + ".")
    else:
        lines.append("No difference between selectors is significant.")
    lines += ["", "| first | second | measure | difference (first - second) | interval | significant |",
              "|---|---|---|---|---|---|"]
    for row in analysis["differences"]:
        interval = "n/a" if row["interval"] is None else f"[{row['interval'][0]:.3g}, {row['interval'][1]:.3g}]"
        lines.append(f"| {row['first']} | {row['second']} | {MEASURES[row['measure']][1]} | {row['difference']:+.3g} | "
                     f"{interval} | {'yes' if row['significant'] else 'no'} |")
    lines += ["", "## Does the loss right after pruning predict the quality after recovery?", "",
              "Kendall's tau between the calibration loss right after pruning and the badness after recovery (FID, "
              "held-out loss, 1 - accuracy) over the ground-truth choices; positive: a lower loss after pruning goes "
              f"with a better recovered model. Intervals: {level:.0%} bootstrap over the choices.", "",
              "| seed | " + " | ".join(MEASURES[measure][1] for measure in measures) + " |",
              "|---|" + "---|" * len(measures)]
    for seed in seeds:
        cells = []
        for measure in measures:
            entry = analysis["rank_correlations"][seed][measure]
            interval = entry["interval"]
            cells.append(_number(entry["tau"], "+.2f") + ("" if interval is None else
                                                          f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"))
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if len(seeds) > 1:
        lines.append("| mean | " + " | ".join(_with_interval(analysis["tau_over_seeds"][measure], "+.2f")
                                             for measure in measures) + " |")
    lines += [""]
    for seed in seeds:
        lines += [f"![calibration against recovered, seed {seed}](calibration_vs_recovered_seed{seed}.png)", ""]
    lines += ["## Teacher and best choices", ""]
    for seed in seeds:
        seed_study = study["seeds"][seed]
        teacher = seed_study["teacher"]
        ranked = sorted(seed_study["ground_truth"], key=lambda key: seed_study["choices"][key][measures[0]]
                        * (1 if MEASURES[measures[0]][0] else -1))
        lines.append(f"Seed {seed}: teacher " + ", ".join(
            f"{MEASURES[measure][1]} {_number(teacher.get(measure), '.4g')}" for measure in measures)
                     + f"; best by {MEASURES[measures[0]][1]}: " + ", ".join(
            f"[{key.replace('-', ',')}] {seed_study['choices'][key][measures[0]]:.4g}" for key in ranked[:3])
                     + f"; worst: [{ranked[-1].replace('-', ',')}] {seed_study['choices'][ranked[-1]][measures[0]]:.4g}.")
    lines += ["", "Every choice: recoverability.csv (and recoverability.json with the selectors' placements).", ""]
    return "\n".join(lines)


def analyze(study: dict[str, Any]) -> dict[str, Any]:
    """Placements per seed, their summary over seeds, the significance of differences, Kendall's tau."""
    seeds, level, replicates = list(study["seeds"]), study["level"], study["bootstrap"]
    measures = measures_of({f"{seed}/{key}": record for seed in seeds
                            for key, record in study["seeds"][seed]["choices"].items()})
    placed = {seed: place_selectors(study["seeds"][seed], measures) for seed in seeds}
    correlations = {seed: rank_correlations(study["seeds"][seed], measures, replicates, level, seed) for seed in seeds}
    tau_over_seeds = {}
    for measure in measures:
        mean, interval = t_interval([correlations[seed][measure]["tau"] for seed in seeds], level)
        tau_over_seeds[measure] = {"mean": mean, "interval": interval}
    records = [record for seed in seeds for record in study["seeds"][seed]["choices"].values()]
    seconds = sum(sum(record["seconds"].values()) for record in records)
    return {
        "measures": measures, "placements": placed, "summary": summarize_over_seeds(placed, measures, level),
        "differences": selector_differences(study, placed, measures, level, replicates),
        "rank_correlations": correlations, "tau_over_seeds": tau_over_seeds,
        "seconds": seconds, "seconds_per_choice": seconds / max(1, len(records)),
        "selector_seconds": sum(record.get("seconds", 0.0) for seed in seeds
                                for record in study["seeds"][seed]["selectors"].values()),
    }


def compact(study: dict[str, Any]) -> dict[str, Any]:
    """The study without per-sample values and replicates (those stay in the per-choice files)."""
    bulky = {"heldout_losses", "correct", "fid_replicates", "settings"}
    seeds = {seed: {**seed_study,
                    "choices": {key: {name: value for name, value in record.items() if name not in bulky}
                                for key, record in seed_study["choices"].items()},
                    "teacher": {name: value for name, value in seed_study["teacher"].items() if name not in bulky},
                    "selectors": {name: {field: value for field, value in record.items() if field != "settings"}
                                  for name, record in seed_study["selectors"].items()}}
             for seed, seed_study in study["seeds"].items()}
    return {**study, "seeds": seeds}


def write_study_outputs(
    study: dict[str, Any], study_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Path]]:
    """report.md, recoverability.csv and .json and one scatter plot per seed; returns the JSON's content, the CSV
    rows and the plots (for a logger)."""
    analysis = analyze(study)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    rows = csv_rows(study)
    writer.writerows(rows)
    save_text(buffer.getvalue(), study_dir / "recoverability.csv")
    result = {"study": compact(study), "analysis": analysis}
    save_json(result, study_dir / "recoverability.json")
    plots = {}
    for seed, seed_study in study["seeds"].items():
        plots[f"recoverability/seed_{seed}"] = plot_calibration_vs_recovered(
            seed_study, analysis["measures"], study_dir / f"calibration_vs_recovered_seed{seed}.png",
            title=f"{study['model']}, seed {seed}: loss right after pruning against quality after recovery")
    save_text(report_markdown(study, analysis), study_dir / "report.md")
    return result, rows, plots
