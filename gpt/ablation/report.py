"""The ablation report: the terminal table, report.md with its CSV tables and plots, and its upload to MLflow.

compare() is the whole command: read the grid back from MLflow, analyse it (gpt.ablation.analysis),
write the report and log it to the parent run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.ablation import plots
from gpt.ablation.analysis import Analysis, analyze, fetch_grid, level_order
from gpt.ablation.grid import si, table_lines
from gpt.ablation.stats import OVERFIT_TOLERANCE
from gpt.errors import UserError


def _pm(mean: float, ci: float, fmt: str = ".3f") -> str:
    if not np.isfinite(mean):
        return "-"
    if fmt == "si":
        return si(mean) + (f" ± {si(ci)}" if np.isfinite(ci) else "")
    return f"{mean:{fmt}}" + (f" ± {ci:{fmt.lstrip('+')}}" if np.isfinite(ci) else "")


def _summary_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    factors = analysis.grid.factors
    header = [
        *factors,
        "seeds",
        "best val",
        "best epoch",
        "final val",
        "val-train gap",
        "tokens to target",
        "time to target (s)",
        "tokens/s",
        "overfit from epoch",
    ]
    rows = []
    for _, s in analysis.summary.iterrows():
        reached = "" if s["reached_target"] == s["seeds"] else f" ({s['reached_target']}/{s['seeds']} reached)"
        overfit = f"{s['overfit_epoch']:.0f} ({s['overfit_runs']}/{s['seeds']} seeds)" if s["overfit_runs"] else ""
        rows.append(
            [
                *(str(s[f]) for f in factors),
                str(s["seeds"]),
                _pm(s["best_val_loss_mean"], s["best_val_loss_ci95"]),
                _pm(s["best_epoch_mean"], s["best_epoch_ci95"], ".1f"),
                _pm(s["final_val_loss_mean"], s["final_val_loss_ci95"]),
                _pm(s["train_val_gap_mean"], s["train_val_gap_ci95"]),
                _pm(s["tokens_to_target_mean"], s["tokens_to_target_ci95"], "si") + reached,
                _pm(s["seconds_to_target_mean"], s["seconds_to_target_ci95"], ".1f"),
                _pm(s["tokens_per_second_mean"], s["tokens_per_second_ci95"], "si"),
                overfit,
            ]
        )
    return header, rows


def _effect_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    header = ["factor", "level", "runs", "best val (marginal)", "Δ vs base", "test", "p"]
    rows = [
        [
            e["factor"],
            f"{e['level']} (base)" if e["base"] else e["level"],
            str(e["runs"]),
            _pm(e["mean"], e["ci95"]),
            "" if e["base"] else _pm(e["delta"], e["delta_ci95"], "+.3f"),
            "" if e["base"] else f"{e['test']} (n={e['matched']})",
            f"{e['p_value']:.3g}" if np.isfinite(e["p_value"]) else "",
        ]
        for _, e in analysis.effects.iterrows()
    ]
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def _headline(analysis: Analysis) -> str:
    grid = analysis.grid
    cells = len(analysis.summary)
    text = (
        f"grid {grid.grid_name or '(unnamed)'}, parent run {grid.parent_run_id}: {len(grid.runs)} finished "
        f"runs in {cells} cells"
    )
    return text + (f", {len(grid.others)} not finished (left out)" if grid.others else "")


def format_table(analysis: Analysis) -> str:
    """The summary and the main effects as fixed-width text for the terminal."""
    if not analysis.grid.runs:
        return _headline(analysis) + "\nno finished child run to compare"
    parts = [
        _headline(analysis),
        f"target val loss {analysis.target_loss:.4f} nats ({analysis.target_source}); mean ± 95% CI over seeds",
        "\n".join(table_lines(*_summary_rows(analysis))),
    ]
    if len(analysis.effects):
        parts += ["", "main effects on best val loss:", "\n".join(table_lines(*_effect_rows(analysis)))]
    return "\n".join(parts)


def _report_markdown(analysis: Analysis, plot_files: list[str]) -> str:
    grid, runs = analysis.grid, analysis.runs
    lines = [f"# Ablation report: {grid.grid_name or grid.parent_run_id}", "", _headline(analysis) + ".", ""]
    if grid.runs:
        lines += [
            f"Target val loss: **{analysis.target_loss:.4f} nats** ({analysis.target_source}).",
            "",
            "## Summary per cell",
            "",
            "Mean ± 95% confidence interval over seeds (Student t).",
            "",
            _markdown(*_summary_rows(analysis)),
            "",
            "## Main effects on best val loss",
            "",
            "Marginal mean per level over the other-factor combinations in which every level ran. Each level is "
            "tested against the factor's base level on the runs it can be matched with: a paired t-test when "
            "the same seeds ran at both levels, otherwise Welch's t-test. p-values are not corrected for "
            "multiple comparisons. The interval of a marginal mean also holds the spread due to the other "
            "factors; the matched Δ and its test do not.",
            "",
            *(line for note in analysis.notes for line in (f"- {note}", "")),
            _markdown(*_effect_rows(analysis)),
            "",
            "## Convergence fits",
            "",
            "L(t) = a + b·t^(−c) over tokens seen t, per run; a is the asymptotic loss, c the rate; ± one "
            "standard error from the fit's covariance. A run that overfits is fitted up to its best epoch.",
            "",
            _markdown(
                ["run", *grid.factors, "seed", "a", "c", "fit"],
                [
                    [
                        r["run_name"],
                        *(str(r[f]) for f in grid.factors),
                        str(r["seed"]),
                        _pm(r["fit_a"], r["fit_a_se"]),
                        _pm(r["fit_c"], r["fit_c_se"]),
                        r["fit_error"] or "ok",
                    ]
                    for _, r in runs.iterrows()
                ],
            ),
            "",
            "## Overfitting",
            "",
        ]
        flagged = runs[runs["overfit_epoch"].notna()]
        lines += [
            f"- {r['run_name']}: val loss lowest at epoch {r['overfit_epoch']:.0f}, then rose by more than "
            f"{OVERFIT_TOLERANCE} nats"
            for _, r in flagged.iterrows()
        ] or ["No run's val loss turned upward."]
        lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in plot_files)]
    if grid.others:
        lines += [
            "",
            "## Runs not included",
            "",
            _markdown(
                ["run", "run id", "status", "cell", "seed"],
                [[r.name, r.run_id, r.status, r.cell_id, r.seed] for r in grid.others],
            ),
        ]
    return "\n".join(lines) + "\n"


def write_report(analysis: Analysis, out_dir: str | Path) -> list[Path]:
    """Write report.md, summary.csv, runs.csv, main_effects.csv and plots/*.png; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if analysis.grid.runs:
        for name, table in (
            ("summary.csv", analysis.summary),
            ("runs.csv", analysis.runs),
            ("main_effects.csv", analysis.effects),
        ):
            table.to_csv(out_dir / name, index=False)
            files.append(out_dir / name)
        grid = analysis.grid
        for factor in grid.factors:
            path = out_dir / "plots" / plots.file_name("curves", factor)
            files.append(plots.factor_curves(grid.runs, factor, grid.factors, level_order(analysis.runs[factor]), path))
        if len(analysis.effects):
            files.append(plots.main_effects(analysis.effects, out_dir / "plots" / "main_effects.png"))
    report = out_dir / "report.md"
    plot_names = [f"plots/{p.name}" for p in files if p.suffix == ".png"]
    report.write_text(_report_markdown(analysis, plot_names), encoding="utf-8")  # ± and Δ whatever the locale
    return [report, *files]


def log_report(parent_run_id: str, files: Iterable[Path], tracking_uri: str | None = None) -> None:
    """Upload the report to the parent run: files in a `plots` folder under plots/, the rest at the root."""
    client = MlflowClient(tracking_uri)
    for path in files:
        try:
            folder = "plots" if path.parent.name == "plots" else None
            client.log_artifact(parent_run_id, str(path), artifact_path=folder)
        except MlflowException as exc:
            reason = str(exc).strip().splitlines()[0]
            raise UserError(f"cannot upload {path} to run {parent_run_id}: {reason}") from None


def compare(
    parent_run_id: str,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    target_loss: float | None = None,
    log: bool = True,
) -> tuple[str, list[Path]]:
    """fetch_grid, analyze, write the report (and upload it to the parent run): the terminal table and files."""
    analysis = analyze(fetch_grid(parent_run_id, tracking_uri), target_loss)
    files = write_report(analysis, out_dir)
    if log:
        log_report(parent_run_id, files, tracking_uri)
    return format_table(analysis), files
