"""Figures of the ablation report: loss curves per factor and the main effects (Agg backend, no display).

The curves of one factor are drawn three times, against epoch, tokens seen and wall time: stride and
context length change how many tokens an epoch holds, so curves per epoch alone mislead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

if TYPE_CHECKING:
    from gpt.ablation.analysis import RunData

X_AXES = (("epoch", "epoch"), ("tokens_seen", "tokens seen"), ("wall_seconds", "wall time (s)"))
LINE_STYLES = ("-", "--", ":", "-.")


def file_name(prefix: str, key: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # renders without pyplot (global state) or a display
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def seed_average(curves: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per epoch: the mean of the seeds' curves (x positions included), and the seeds' val loss range.

    A loss is averaged only at epochs where every seed logged it: a mean over a changing set of
    seeds would draw steps that no run took.
    """
    stacked = pd.concat(list(curves), keys=range(len(curves)), names=["seed", "epoch"])
    by_epoch = stacked.groupby(level="epoch")
    mean = by_epoch.mean()
    mean["val_min"], mean["val_max"] = by_epoch["val_loss"].min(), by_epoch["val_loss"].max()
    mean.loc[by_epoch["val_loss"].count() < len(curves), ["val_loss", "val_min", "val_max"]] = np.nan
    mean.loc[by_epoch["train_loss"].count() < len(curves), "train_loss"] = np.nan
    mean["epoch"] = mean.index.astype(float)
    return mean


def factor_curves(
    runs: Sequence[RunData], factor: str, factors: Sequence[str], levels: Sequence[str], path: Path
) -> Path:
    """One line per cell, coloured by this factor's level, styled by the other factors' levels."""
    colours = colormaps["tab10"]
    others = [f for f in factors if f != factor]
    cells: dict[tuple[str, ...], list[RunData]] = {}
    for run in runs:
        cells.setdefault(tuple(run.levels[f] for f in factors), []).append(run)
    contexts = sorted({tuple(run.levels[f] for f in others) for run in runs})

    figure = _figure(15, 4.6)
    axes = figure.subplots(1, len(X_AXES), sharey=True)
    for members in cells.values():
        levels_of = members[0].levels
        colour = colours(levels.index(levels_of[factor]) % colours.N)
        style = LINE_STYLES[contexts.index(tuple(levels_of[f] for f in others)) % len(LINE_STYLES)]
        mean = seed_average([run.curves for run in members])
        val, train = mean.dropna(subset=["val_loss"]), mean.dropna(subset=["train_loss"])
        for axis, (x, _) in zip(axes, X_AXES, strict=True):
            axis.plot(val[x], val["val_loss"], color=colour, linestyle=style, linewidth=1.8)
            axis.plot(train[x], train["train_loss"], color=colour, linestyle=style, linewidth=0.8, alpha=0.5)
            if len(members) > 1:
                axis.fill_between(val[x], val["val_min"], val["val_max"], color=colour, alpha=0.15, linewidth=0)
    for axis, (_, label) in zip(axes, X_AXES, strict=True):
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats)")
    handles = [
        Line2D([], [], color=colours(i % colours.N), linewidth=2, label=f"{factor} = {level}")
        for i, level in enumerate(levels)
    ]
    if len(contexts) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="black",
                linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                label=", ".join(f"{f}={v}" for f, v in zip(others, context, strict=True)),
            )
            for i, context in enumerate(contexts)
        ]
    axes[-1].legend(handles=handles, fontsize="small", loc="upper right")
    figure.suptitle(f"{factor}: val loss (thick; band: range over seeds) and train loss (thin), mean over seeds")
    return _save(figure, path)


def main_effects(effects: pd.DataFrame, path: Path) -> Path:
    """Per factor: marginal mean best val loss per level with its 95% CI; the base level filled."""
    factors = list(dict.fromkeys(effects["factor"]))
    figure = _figure(max(4.0, 3.6 * len(factors)), 3.8)
    axes = figure.subplots(1, len(factors), sharey=True, squeeze=False)[0]
    for axis, factor in zip(axes, factors, strict=True):
        rows = effects[effects["factor"] == factor]
        x = np.arange(len(rows))
        axis.errorbar(x, rows["mean"], yerr=rows["ci95"].fillna(0), fmt="none", ecolor="grey", capsize=4)
        for i, (_, row) in enumerate(rows.iterrows()):
            axis.plot(i, row["mean"], "o", color="C0", markerfacecolor="C0" if row["base"] else "white")
        ticks = [f"{level}\n(base)" if base else level for level, base in zip(rows["level"], rows["base"], strict=True)]
        axis.set_xticks(x, ticks)
        axis.set_xlim(-0.5, len(rows) - 0.5)
        axis.set_xlabel(factor)
        axis.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("best val loss (nats)")
    figure.suptitle("main effects: marginal mean with 95% CI")
    return _save(figure, path)
