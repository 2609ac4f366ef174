"""Figures of the ablation report: loss curves per factor and a forest plot of the comparisons (Agg, no display).

The curves of one factor are drawn against epochs, training tokens, FLOPs (when the model size
varies) and wall time: stride and context length change how many tokens an epoch holds, so curves
per epoch alone mislead. Bands are the same 95% t-intervals over seeds as the report's tables, and
the forest plot shows the same estimates and intervals as its comparison table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from gpt.ablation.stats import mean_ci

if TYPE_CHECKING:
    from gpt.ablation.analysis import Analysis, RunData

LINE_STYLES = ("-", "--", ":", "-.")
LOSS_MEASURES = (("flops", "matched FLOPs", "s"), ("tokens", "matched tokens", "o"), ("epochs", "equal epochs", "^"))
RATIO_MEASURES = (("tokens_to_target", "tokens to target", "o"), ("flops_to_target", "FLOPs to target", "s"))
RATIO_MEASURES += (("wall", "wall time per epoch", "D"),)


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


def seed_average(runs: Sequence[RunData]) -> pd.DataFrame:
    """Per epoch: the mean over seeds of every curve (x positions included), and the val loss's 95% CI half-width.

    A loss is averaged only at epochs where every seed logged it: a mean over a changing set of
    seeds would draw steps that no run took. FLOPs are tokens seen x the run's FLOPs per token.
    """
    frames = []
    for run in runs:
        frame = run.curves.copy()
        frame["flops"] = frame["tokens_seen"] * float(run.params.get("flops_per_token", "nan"))
        frames.append(frame)
    stacked = pd.concat(frames, keys=range(len(frames)), names=["seed", "epoch"])
    by_epoch = stacked.groupby(level="epoch")
    mean = by_epoch.mean()
    mean["val_ci"] = by_epoch["val_loss"].agg(lambda v: mean_ci(v).ci95)
    mean.loc[by_epoch["val_loss"].count() < len(frames), ["val_loss", "val_ci"]] = np.nan
    mean.loc[by_epoch["train_loss"].count() < len(frames), "train_loss"] = np.nan
    mean["epoch"] = mean.index.astype(float)
    return mean


def _x_axes(analysis: Analysis) -> list[tuple[str, str]]:
    axes = [("epoch", "epoch"), ("tokens_seen", "training tokens")]
    if analysis.runs["flops_per_token"].nunique() > 1:
        axes.append(("flops", "training FLOPs"))
    return axes + [("wall_seconds", "wall time (s, machine-dependent)")]


def _style_axis(axis: Axes, x: str, label: str) -> None:
    axis.set_xlabel(label)
    axis.grid(alpha=0.3, which="both")
    if x == "epoch":
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    elif x in ("tokens_seen", "flops"):  # loss curves are close to straight in log compute
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))
        axis.xaxis.set_minor_formatter(NullFormatter())


def _y_range(means: Sequence[pd.DataFrame]) -> tuple[float, float]:
    """The val losses with their CIs and a margin: the differences that matter. Training loss may run below
    (memorizing a small text) and the first evaluation above, when including it would stretch the rest by half."""
    val = [m[["val_loss", "val_ci"]].dropna(subset=["val_loss"]) for m in means]
    later = pd.concat([v.iloc[1:] for v in val if len(v) > 1] or val)
    low, high = (
        float((later["val_loss"] - later["val_ci"].fillna(0)).min()),
        float((later["val_loss"] + later["val_ci"].fillna(0)).max()),
    )
    first = max((float(v["val_loss"].iloc[0]) for v in val if len(v)), default=high)
    if first - high < 0.5 * (high - low):
        high = max(high, first)
    margin = 0.05 * max(high - low, 1e-3)
    return low - margin, high + margin


def factor_curves(analysis: Analysis, factor: str, path: Path) -> Path:
    """One line per cell (mean over seeds), coloured by this factor's level, styled by the other factors' levels."""
    colours, factors, levels = colormaps["tab10"], analysis.grid.factors, analysis.levels[factor]
    others = [f for f in factors if f != factor]
    cells: dict[tuple[str, ...], list[RunData]] = {}
    for run in analysis.grid.runs:
        cells.setdefault(tuple(run.levels[f] for f in factors), []).append(run)
    contexts = sorted({tuple(run.levels[f] for f in others) for run in analysis.grid.runs})
    x_axes = _x_axes(analysis)
    figure = _figure(4.2 * len(x_axes), 4.6)
    axes = figure.subplots(1, len(x_axes), sharey=True)
    means = []
    for members in cells.values():
        levels_of = members[0].levels
        colour = colours(levels.index(levels_of[factor]) % colours.N)
        style = LINE_STYLES[contexts.index(tuple(levels_of[f] for f in others)) % len(LINE_STYLES)]
        mean = seed_average(members)
        means.append(mean)
        val, train = mean.dropna(subset=["val_loss"]), mean.dropna(subset=["train_loss"])
        for axis, (x, _) in zip(axes, x_axes, strict=True):
            axis.plot(val[x], val["val_loss"], color=colour, linestyle=style, linewidth=1.8, marker=".")
            axis.plot(train[x], train["train_loss"], color=colour, linestyle=style, linewidth=0.8, alpha=0.5)
            band = val.dropna(subset=["val_ci"])
            axis.fill_between(
                band[x], band["val_loss"] - band["val_ci"], band["val_loss"] + band["val_ci"], color=colour, alpha=0.15
            )
    for axis, (x, label) in zip(axes, x_axes, strict=True):
        _style_axis(axis, x, label)
    axes[0].set_ylim(*_y_range(means))
    axes[0].set_ylabel("loss (nats)")
    axes[-1].legend(handles=_legend(factor, levels, others, contexts), fontsize="small", loc="upper right")
    figure.suptitle(
        f"{factor}: val loss (thick; band: 95% CI over seeds) and train loss (thin), mean over seeds; "
        "the range fits the val losses"
    )
    return _save(figure, path)


def _legend(factor: str, levels: Sequence[str], others: Sequence[str], contexts: Sequence[tuple]) -> list[Line2D]:
    colours = colormaps["tab10"]
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
                label=", ".join(f"{f} = {v}" for f, v in zip(others, context, strict=True)),
            )
            for i, context in enumerate(contexts)
        ]
    return handles


def _forest_panel(axis: Axes, table: pd.DataFrame, measures: tuple, labels: list[str], ratio: bool) -> None:
    measures = tuple(m for m in measures if (table["measure"] == m[0]).any())
    offsets = np.linspace(-0.25, 0.25, len(measures))
    for i, ((key, _, marker), offset) in enumerate(zip(measures, offsets, strict=True)):
        for _, row in table[table["measure"] == key].iterrows():
            if not np.isfinite(row["estimate"]):
                continue
            y = labels.index(f"{row['factor']} {row['level']} vs {row['base']}") + offset
            below, above = row["estimate"] - row["low"], row["high"] - row["estimate"]
            error = [[below], [above]] if np.isfinite(row["low"]) else None
            axis.errorbar(row["estimate"], y, xerr=error, fmt=marker, capsize=3, color=f"C{i}")
    axis.axvline(1.0 if ratio else 0.0, color="grey", linewidth=1)
    handles = [Line2D([], [], marker=m, linestyle="", color=f"C{i}", label=n) for i, (_, n, m) in enumerate(measures)]
    axis.legend(handles=handles, fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    axis.grid(alpha=0.3, axis="x")
    if ratio:
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.xaxis.set_minor_formatter(NullFormatter())


def forest(analysis: Analysis, path: Path) -> Path:
    """Each level against its base: loss differences (nats) and compute ratios, with the report's 95% CIs."""
    table = analysis.comparisons
    labels = list(dict.fromkeys(f"{r['factor']} {r['level']} vs {r['base']}" for _, r in table.iterrows()))
    figure = _figure(12, 1.8 + 0.9 * len(labels))
    loss_axis, ratio_axis = figure.subplots(1, 2, sharey=True)
    _forest_panel(loss_axis, table, LOSS_MEASURES, labels, ratio=False)
    _forest_panel(ratio_axis, table, RATIO_MEASURES, labels, ratio=True)
    loss_axis.set_yticks(range(len(labels)), labels)
    loss_axis.invert_yaxis()
    loss_axis.set_xlabel("Δ val loss vs base (nats; < 0: better)")
    ratio_axis.set_xlabel("compute vs base (ratio; < 1: less)")
    figure.suptitle("each level against its base level: estimate and 95% CI over seeds (paired by seed)")
    return _save(figure, path)


def draw_all(analysis: Analysis, folder: Path) -> list[Path]:
    """Every plot of the report: curves per factor, then the forest plot."""
    paths = [factor_curves(analysis, f, folder / file_name("curves", f)) for f in analysis.grid.factors]
    if len(analysis.comparisons):
        paths.append(forest(analysis, folder / "comparisons.png"))
    return paths
