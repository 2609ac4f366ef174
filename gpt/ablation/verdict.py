"""What a grid's report says first: one sentence per factor level a user can act on, the warnings, what was held fixed.

Each sentence leads with the comparison at equal compute (matched FLOPs where the levels differ in
model size, else matched tokens), so a setting that only sees more tokens per epoch is not called
better; the loss at equal epochs follows, with the reason it differs. "Significant" means a
Holm-adjusted p below ALPHA (gpt.ablation.effects).
"""

from __future__ import annotations

import math

import pandas as pd

from gpt.ablation.analysis import Analysis
from gpt.ablation.effects import level_ratio
from gpt.ablation.grid import short_keys, si

ALPHA = 0.05
# Settings a comparison holds fixed that change what the effect of a factor is (learning rate above all).
FIXED_KEYS = (
    ("train.lr", "lr {}"),
    ("train.lr_schedule", "{} schedule"),
    ("train.warmup_steps", "{} warmup steps"),
    ("train.batch_size", "batch {} windows"),
    ("train.weight_decay", "weight decay {}"),
    ("train.grad_clip", "grad clip {}"),
    ("model.dropout", "dropout {}"),
    ("train.epochs", "{} epochs"),
)


def signed(x: float, digits: int = 3) -> str:
    """+0.010 / −0.470: a signed difference with a true minus sign."""
    return f"{x:+.{digits}f}".replace("-", "−")


def significance(row: pd.Series) -> str:
    """'p_Holm = 0.003', 'n.s. after Holm: p_Holm = 0.13, unadjusted p = 0.025' (Holm-adjusted p at or
    above ALPHA; the unadjusted p is named when it alone is below ALPHA, since the CI beside it is
    unadjusted too and may then exclude zero), or why there is no test."""
    if not math.isfinite(row["p_holm"]):
        return "no test" if "no test" in row["test"] else row["test"]
    if row["p_holm"] < ALPHA:
        return f"p_Holm = {row['p_holm']:.2g}"
    raw = row.get("p_value", math.nan)
    if math.isfinite(raw) and raw < ALPHA:
        return f"n.s. after Holm: p_Holm = {row['p_holm']:.2g}, unadjusted p = {raw:.2g}"
    return "n.s."


def interval(row: pd.Series, ratio: bool = False) -> str:
    """The 95% CI of a comparison: '−0.004..+0.024' (nats) or '1.9..2.3x' (ratio); '' without one."""
    if not math.isfinite(row["low"]):
        return ""
    if ratio:
        return f"{row['low']:.2f}..{row['high']:.2f}x"
    return f"{signed(row['low'])}..{signed(row['high'])}"


def loss_phrase(row: pd.Series, at: str = "") -> str:
    """'+0.010 nats at 312k tokens (95% CI −0.004..+0.024, n.s.)': a loss difference, its interval and test."""
    ci = f"95% CI {interval(row)}, " if interval(row) else ""
    where = f" {at}" if at else ""
    return f"{signed(row['estimate'])} nats{where} ({ci}{significance(row)})"


def ratio_phrase(row: pd.Series) -> str:
    """'2.1x (95% CI 1.9..2.3x)': a compute ratio with its interval."""
    ci = interval(row, ratio=True)
    return f"{row['estimate']:.2f}x" + (f" (95% CI {ci})" if ci else "")


def _judgement(row: pd.Series, per: str) -> str:
    if not math.isfinite(row["estimate"]):
        return f"not comparable {per}"
    if math.isfinite(row["p_holm"]) and row["p_holm"] < ALPHA:
        return f"{'better' if row['estimate'] < 0 else 'worse'} {per}"
    return f"no detectable difference {per}"


def _level_ratio(analysis: Analysis, factor: str, level: str, column: str) -> float:
    """A per-run number (tokens per epoch, parameters...) at a level over the base's, other factors equal."""
    base = analysis.base_levels[factor]
    return level_ratio(analysis.runs, analysis.grid.factors, factor, level, base, column)


def flops_text(flops: float) -> str:
    """4.1e11: FLOPs in the notation of papers."""
    mantissa, exponent = f"{flops:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _interactions(analysis: Analysis, factor: str) -> str:
    """'; its effect depends on lr (interaction, p_Holm = 2e-18)' for each significant interaction of the ANOVA."""
    if not len(analysis.anova):
        return ""
    short = short_keys(analysis.grid.factors)
    parts = []
    for _, row in analysis.anova.iterrows():
        terms = row["term"].split(" × ")
        if len(terms) == 2 and factor in terms and row["p_holm"] < ALPHA:
            other = terms[1] if terms[0] == factor else terms[0]
            parts.append(f"its effect depends on {short[other]} (interaction, p_Holm = {row['p_holm']:.2g})")
    return "".join(f"; {part}" for part in parts)


def _rows(analysis: Analysis, factor: str, level: str) -> dict[str, pd.Series]:
    table = analysis.comparisons
    chosen = table[(table["factor"] == factor) & (table["level"] == level)]
    return {row["measure"]: row for _, row in chosen.iterrows()}


def _action(primary: pd.Series, base: str, level: str, wall: float) -> str:
    if not math.isfinite(primary["estimate"]):
        return ""
    significant = math.isfinite(primary["p_holm"]) and primary["p_holm"] < ALPHA
    if significant and primary["estimate"] < 0:
        return f" → {level} learns more from the same compute."
    if significant:
        return f" → keep {base}."
    if math.isfinite(wall) and wall > 1.1:
        return f" → no gain shown for its extra cost: keep {base} unless more seeds or epochs show one."
    return " → no difference shown at this budget; more seeds or epochs would narrow the interval."


def _compute_parts(analysis: Analysis, rows: dict[str, pd.Series], factor: str, level: str) -> list[str]:
    """The comparisons at matched FLOPs (where model size differs), matched tokens and equal epochs."""
    where, parts = analysis.matching, []
    if "flops" in rows and math.isfinite(rows["flops"]["estimate"]):
        flops = rows["flops"]
        parts.append(
            f"{_judgement(flops, 'per FLOP')}, {loss_phrase(flops, f'at {flops_text(where.flops.value)} FLOPs')}"
        )
    tokens = rows["tokens"]
    if math.isfinite(tokens["estimate"]):
        parts.append(f"{_judgement(tokens, 'per token')}, {loss_phrase(tokens, f'at {si(where.tokens.value)} tokens')}")
    epochs = rows["epochs"]
    if math.isfinite(epochs["estimate"]):
        per_epoch = _level_ratio(analysis, factor, level, "tokens_per_epoch")
        because = f", as it sees {per_epoch:.2g}x the tokens per epoch" if abs(per_epoch - 1) > 0.05 else ""
        parts.append(f"at equal epochs ({where.epoch}): {loss_phrase(epochs)}{because}")
    return parts


def level_sentence(analysis: Analysis, factor: str, level: str) -> str:
    """The verdict on one level against its factor's base level (see the module docstring)."""
    rows, base = _rows(analysis, factor, level), analysis.base_levels[factor]
    short = short_keys(analysis.grid.factors)[factor]
    parts = _compute_parts(analysis, rows, factor, level)
    wall = rows["wall"]["estimate"] if "wall" in rows else math.nan
    if math.isfinite(wall) and abs(wall - 1) > 0.1:
        parts.append(f"{wall:.2g}x the wall time per epoch")
    size = _level_ratio(analysis, factor, level, "non_embedding_params")
    if math.isfinite(size) and abs(size - 1) > 0.05:
        parts.append(f"{size:.2g}x the non-embedding parameters")
    ranked = [rows[key] for key in ("flops", "tokens", "epochs") if key in rows]
    primary = next((row for row in ranked if math.isfinite(row["estimate"])), ranked[-1])
    action = _action(primary, f"{short}={base}", f"{short}={level}", wall)
    text = "; ".join(parts) or "no comparison"
    return (
        f"{short} {level} vs {base}: {text}{_interactions(analysis, factor)}{_still(analysis, factor, level)}{action}"
    )


def _still(analysis: Analysis, factor: str, level: str) -> str:
    """'(3 of 6 runs still improving at epoch 10, 2 past their best)': where these runs were when they stopped."""
    runs = analysis.runs
    involved = runs[runs[factor].isin([level, analysis.base_levels[factor]])]
    improving = int(involved["still_improving"].fillna(False).sum())
    overfit = int(involved["overfit_epoch"].notna().sum())
    parts = []
    if improving:
        how_many = "all runs" if improving == len(involved) else f"{improving} of {len(involved)} runs"
        parts.append(f"{how_many} still improving at epoch {analysis.matching.epoch}")
    if overfit:
        parts.append(f"{overfit} past their best epoch")
    return f" ({', '.join(parts)})" if parts else ""


def verdict(analysis: Analysis) -> list[str]:
    """One sentence per non-base level of every factor, in the grid's factor order."""
    lines = [
        level_sentence(analysis, factor, level)
        for factor in analysis.grid.factors
        for level in analysis.levels[factor]
        if level != analysis.base_levels.get(factor) and len(analysis.comparisons)
    ]
    return lines or ["no factor has finished runs at two of its levels: nothing to compare yet"]


def fixed_settings(analysis: Analysis) -> str:
    """The training settings every compared run shared, and what that means for the effects."""
    runs = analysis.grid.runs
    held = []
    for key, template in FIXED_KEYS:
        values = {run.params.get(key) for run in runs}
        if len(values) == 1 and None not in values and key not in analysis.grid.factors:
            held.append(template.format(values.pop()))
    if not held:
        return ""
    return (
        f"Held fixed in every run: {', '.join(held)}. The effects are measured at these settings: a level that "
        "would train best at another learning rate or schedule (deeper or wider models often do) may look worse "
        "here than it is."
    )
