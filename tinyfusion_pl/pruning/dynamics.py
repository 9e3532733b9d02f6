"""The decision-dynamics figure (TinyFusion Fig. 6): kept block indices per group against the step."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from tinyfusion_pl.io import write_atomically
from tinyfusion_pl.pruning.patterns import Group, enumerate_options, group_starts

# Fully uncertain points stay faintly visible instead of vanishing.
_MIN_OPACITY = 0.08


def decision_dynamics_figure(
    history: Sequence[Mapping[str, Any]], groups: Sequence[Group], container_starts: Sequence[int] = ()
) -> Figure:
    """A figure with one dot per kept block per recorded step, coloured by group, opacity = group confidence.

    Block indices are global over the block containers; `container_starts` (the global index of each
    container's first block) draws where one container ends and the next begins.
    """
    figure = Figure(figsize=(7.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)  # attaches an Agg canvas without touching pyplot's global state
    axes = figure.add_subplot()
    starts = group_starts(groups)
    tables = [enumerate_options(keep, size) for keep, size in groups]
    colours = [to_rgba(f"C{index % 10}") for index in range(len(groups))]
    for group, (start, table) in enumerate(zip(starts, tables, strict=True)):
        steps, blocks, rgba = [], [], []
        for record in history:
            option = record["chosen_options"][group]
            opacity = max(float(record["confidences"][group]), _MIN_OPACITY)
            for offset in table[option].nonzero().flatten().tolist():
                steps.append(record["step"])
                blocks.append(start + offset)
                rgba.append((*colours[group][:3], opacity))
        axes.scatter(steps, blocks, c=rgba, s=12, marker="s", linewidths=0)
    depth = sum(size for _, size in groups)
    for start in starts[1:]:
        axes.axhline(start - 0.5, color="0.85", linewidth=0.6)
    for start in list(container_starts)[1:]:
        axes.axhline(start - 0.5, color="0.3", linewidth=1.0, linestyle="--")
    axes.set_ylim(depth - 0.5, -0.5)
    axes.set_xlabel("step")
    axes.set_ylabel("kept block index")
    axes.set_title("Learned block decision (opacity = confidence)")
    figure.tight_layout()
    return figure


def save_figure_atomically(figure: Figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG at `path` atomically: readers never see half a file."""
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
