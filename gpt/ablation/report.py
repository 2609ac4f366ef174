"""The ablation report: the terminal summary, report.md and report.html with CSV tables and plots, and its upload.

compare() is the whole command: read the grid back from MLflow, analyse it (gpt.ablation.analysis),
write the report, log it to the parent run, and log each run's report-time metrics onto its child
run (gpt.ablation.publish). The report opens with the verdict (gpt.ablation.verdict) and the
warnings (gpt.ablation.cautions); report.html holds the plots inline, so MLflow's artifact viewer
shows the whole report on the parent run.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gpt.ablation import plots
from gpt.ablation.analysis import Analysis, analyze, fetch_grid
from gpt.ablation.cautions import cautions
from gpt.ablation.effects import MEASURE_BY_KEY
from gpt.ablation.grid import default_grid_name, si, table_lines
from gpt.ablation.verdict import fixed_settings, flops_text, interval, signed, verdict
from gpt.errors import UserError, writing


def _pm(mean: float, ci: float, fmt: str = ".3f") -> str:
    if not np.isfinite(mean):
        return "-"
    if fmt == "si":
        return si(mean) + (f" ± {si(ci)}" if np.isfinite(ci) else "")
    return f"{mean:{fmt}}" + (f" ± {ci:{fmt.lstrip('+')}}" if np.isfinite(ci) else "")


def _p(value: float) -> str:
    return f"{value:.2g}" if np.isfinite(value) else ""


def title(analysis: Analysis) -> str:
    """The grid's name and what it varies ('depth-stride: n_layers x stride'); the name alone when it says that."""
    grid = analysis.grid
    varies = default_grid_name(grid.factors)
    name = grid.grid_name or grid.parent_run_id
    return name if name == varies else f"{name}: {varies}"


# the measures a grid's link sorts its runs by, most telling first: the first one its child runs have
LINK_ORDER = (
    "summary/val_loss_at_matched_tokens",
    "summary/val_loss_at_matched_flops",
    "summary/val_loss_at_common_epoch",
    "best_val_loss",
)


def grid_link(tracking_uri: str, experiment_id: str, parent_run_id: str) -> str:
    """A link to the MLflow UI's runs list showing the grid's child runs, sorted by the first LINK_ORDER
    metric they have (a grid whose runs reach no common token budget has no matched-token loss)."""
    import urllib.parse

    from mlflow.tracking import MlflowClient

    from gpt.store import ui_link, with_retries

    children = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = with_retries(lambda: MlflowClient(tracking_uri).search_runs([experiment_id], children, max_results=50))
    logged = {key for run in runs for key in run.data.metrics}
    order = next((key for key in LINK_ORDER if key in logged), LINK_ORDER[-1])
    run_link = ui_link(tracking_uri, experiment_id, parent_run_id)
    base = run_link.split("/#/")[0]
    query = urllib.parse.urlencode(
        {
            "searchFilter": children,
            "orderByKey": f"metrics.`{order}`",
            "orderByAsc": "true",
            "workflowType": "machine_learning",
        },
        quote_via=urllib.parse.quote,
    )
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def _headline(analysis: Analysis) -> str:
    grid = analysis.grid
    text = f"{title(analysis)} (parent run {grid.parent_run_id}): {len(grid.runs)} finished runs in "
    text += f"{len(analysis.summary)} cells"
    return text + (f", {len(grid.others)} not finished (left out)" if grid.others else "")


# ---------------------------------------------------------------- tables


def _comparison_rows(analysis: Analysis, keys: Iterable[str] | None = None) -> tuple[list[str], list[list[str]]]:
    header = ["factor", "level vs base", "measure", "estimate", "95% CI", "test (n)", "p", "p (Holm)"]
    rows = []
    for _, row in analysis.comparisons.iterrows():
        if keys is not None and row["measure"] not in keys:
            continue
        measure = MEASURE_BY_KEY[row["measure"]]
        finite = math.isfinite(row["estimate"])
        estimate = f"{row['estimate']:.2f}x" if measure.ratio else f"{signed(row['estimate'])} nats"
        rows.append(
            [
                row["factor"],
                f"{row['level']} vs {row['base']}",
                measure.label,
                estimate if finite else "-",
                interval(row, measure.ratio),
                f"{row['test']} ({row['n']})",
                _p(row["p_value"]),
                _p(row["p_holm"]),
            ]
        )
    return header, rows


def _anova_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    header = ["term", "df", "sum of squares", "F", "p", "p (Holm)", "partial η²"]
    rows = [
        [
            row["term"],
            f"{row['df']:.0f}",
            f"{row['sum_sq']:.4g}",
            f"{row['F']:.3g}" if np.isfinite(row["F"]) else "",
            _p(row["p_value"]),
            _p(row["p_holm"]),
            f"{row['partial_eta_sq']:.2f}" if np.isfinite(row["partial_eta_sq"]) else "",
        ]
        for _, row in analysis.anova.iterrows()
    ]
    return header, rows


def _size_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    factors = analysis.grid.factors
    header = [*factors, "params", "non-embedding params", "FLOPs/token", "tokens/epoch", "epochs"]
    rows = [
        [
            *(str(s[f]) for f in factors),
            si(s["n_params"]),
            si(s["non_embedding_params"]),
            si(s["flops_per_token"]),
            si(s["tokens_per_epoch"]),
            f"{s['epochs']:.0f}",
        ]
        for _, s in analysis.summary.iterrows()
    ]
    return header, rows


def _summary_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    factors = analysis.grid.factors
    header = [*factors, "seeds", "val @ matched tokens", "val @ equal epochs", "best val", "best epoch"]
    header += ["tokens to target", "wall time (s)", "tokens/s", "still improving"]
    rows = []
    for _, s in analysis.summary.iterrows():
        reached = "" if s["reached_target"] == s["seeds"] else f" ({s['reached_target']}/{s['seeds']} reached)"
        rows.append(
            [
                *(str(s[f]) for f in factors),
                str(s["seeds"]),
                _pm(s["val_at_tokens_mean"], s["val_at_tokens_ci95"]),
                _pm(s["val_at_epoch_mean"], s["val_at_epoch_ci95"]),
                _pm(s["best_val_loss_mean"], s["best_val_loss_ci95"]),
                _pm(s["best_epoch_mean"], s["best_epoch_ci95"], ".1f"),
                _pm(s["tokens_to_target_mean"], s["tokens_to_target_ci95"], "si") + reached,
                _pm(s["wall_seconds_mean"], s["wall_seconds_ci95"], ".0f"),
                _pm(s["tokens_per_second_mean"], s["tokens_per_second_ci95"], "si"),
                f"{s['still_improving']}/{s['seeds']}",
            ]
        )
    return header, rows


def _fit_cell(a: float, a_se: float, c: float, c_se: float, error: str) -> tuple[str, str]:
    if error or not np.isfinite(a):
        return "-", error or "no fit"
    return f"{_pm(a, a_se)}, c = {_pm(c, c_se)}", "ok"


def _fit_rows(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    factors = analysis.grid.factors
    header = ["run", *factors, "seed", "val epochs", "val: a, c", "val fit", "train per step: a, c", "train fit"]
    rows = []
    for _, r in analysis.runs.iterrows():
        val = _fit_cell(r["fit_a"], r["fit_a_se"], r["fit_c"], r["fit_c_se"], r["fit_error"] or "")
        step = _fit_cell(r["step_fit_a"], r["step_fit_a_se"], r["step_fit_c"], r["step_fit_c_se"], r["step_fit_error"])
        epochs = f"{r['fit_from_epoch']:.0f}–{r['fit_to_epoch']:.0f}" if np.isfinite(r["fit_from_epoch"]) else ""
        rows.append([r["run_name"], *(str(r[f]) for f in factors), str(r["seed"]), epochs, *val, *step])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in line) + " |" for line in lines)


# ---------------------------------------------------------------- the terminal


def format_table(analysis: Analysis) -> str:
    """The verdict, the warnings, the matched comparisons and the cells, as fixed-width text for the terminal."""
    if not analysis.grid.runs:
        return _headline(analysis) + "\nno finished child run to compare"
    parts = [_headline(analysis), "", "verdict:", *(f"  {line}" for line in verdict(analysis))]
    warnings = cautions(analysis)
    if warnings:
        parts += ["", "warnings:", *(f"  - {line}" for line in warnings)]
    if len(analysis.comparisons):
        parts += ["", "against the base level (95% CI over seeds):"]
        parts.append("\n".join(table_lines(*_comparison_rows(analysis, ("flops", "tokens", "epochs", "wall")))))
    parts += ["", "cells (mean ± 95% CI over seeds):", "\n".join(table_lines(*_summary_rows(analysis)))]
    return "\n".join(parts)


# ---------------------------------------------------------------- report.md


def _setup(analysis: Analysis) -> list[str]:
    grid, where = analysis.grid, analysis.matching
    factors = [
        f"`{f}` ∈ {{{', '.join(f'**{v}** (base)' if v == analysis.base_levels.get(f) else v for v in levels)}}}"
        for f, levels in analysis.levels.items()
    ]
    seeds = sorted(analysis.runs["seed"].astype(str).unique(), key=lambda s: (len(s), s))
    lines = [
        f"- Design: {grid.design}; factors: {'; '.join(factors)}; seeds {', '.join(seeds)}"
        + (f"; grid id `{grid.grid_id}`." if grid.grid_id else "."),
        *_data_lines(analysis),
        f"- Target val loss **{analysis.target_loss:.4f} nats** ({analysis.target_source}), for tokens/FLOPs to "
        "target.",
    ]
    if math.isfinite(where.tokens.value):
        lines.append(
            f"- Matched tokens: each run's val loss interpolated (linearly in log tokens) at "
            f"**{si(where.tokens.value)} training tokens**, the most every run reached (every run was first "
            f"evaluated by {si(where.tokens.earliest)}); never extrapolated."
        )
    if math.isfinite(where.flops.value):
        lines.append(
            f"- Matched FLOPs: the same at **{flops_text(where.flops.value)} training FLOPs** (FLOPs per token × "
            "tokens; 6 per non-embedding parameter and head weight plus attention), for factors that change the model "
            "size."
        )
    lines.append(f"- Equal epochs: val loss at epoch **{where.epoch}**, the last that every run evaluated.")
    fixed = fixed_settings(analysis)
    return lines + ([f"- {fixed}"] if fixed else [])


def _data_lines(analysis: Analysis) -> list[str]:
    params = analysis.grid.runs[0].params if analysis.grid.runs else {}
    files, i = [], 0
    while f"data.file{i}.path" in params:
        files.append(
            f"{Path(params[f'data.file{i}.path']).name} (sha256 {params.get(f'data.file{i}.sha256', '')[:12]}, "
            f"{params.get(f'data.file{i}.tokens', '?')} tokens)"
        )
        i += 1
    return [f"- Data: {', '.join(files)}."] if files else []


def _comparison_section(analysis: Analysis) -> list[str]:
    return [
        "## Against the base level",
        "",
        "Each level is compared with its factor's base level on runs paired by seed and the other factors' levels "
        "(paired t-test on the differences; Welch's t-test where runs cannot be paired). Loss differences are in "
        "nats (negative: lower loss than the base); compute is a ratio to the base (geometric mean over pairs, "
        "tested on the log scale). p (Holm): adjusted with Holm's method over every test of this report "
        "(comparisons and ANOVA terms), which the verdict uses; the 95% CIs are each comparison's own, so one may "
        "exclude 0 while its adjusted test is n.s. Wall time is machine-dependent and not tested.",
        "",
        _markdown(*_comparison_rows(analysis)),
        "",
    ]


def _anova_section(analysis: Analysis) -> list[str]:
    measure = MEASURE_BY_KEY[analysis.anova_measure].label
    lines = ["## ANOVA", ""]
    if not len(analysis.anova):
        return lines + [f"No ANOVA: {analysis.anova_note}.", ""]
    return lines + [
        f"Of the {measure}: main effects and two-way interactions, type II sums of squares (statsmodels), seeds as "
        "replicates. Partial η² = SS / (SS + SS residual).",
        "",
        _markdown(*_anova_rows(analysis)),
        "",
    ]


def _run_lists(analysis: Analysis) -> list[str]:
    grid, lines = analysis.grid, []
    reused = [r for r in grid.runs if r.reused_from]
    if reused:
        lines += ["## Reused runs", "", "Cells this grid did not train: a finished run of another grid has the same "]
        lines[-1] += "cell id (the same config, seed and data), so it stands for the cell."
        rows = [[r.name, r.run_id, r.reused_from, r.cell_id, r.seed] for r in reused]
        lines += ["", _markdown(["run", "run id", "trained under parent", "cell", "seed"], rows), ""]
    if grid.others:
        rows = [[r.name, r.run_id, r.status, r.cell_id, r.seed] for r in grid.others]
        lines += ["## Runs not included", "", _markdown(["run", "run id", "status", "cell", "seed"], rows), ""]
    return lines


def report_markdown(analysis: Analysis, plot_files: list[str]) -> str:
    """The whole report as Markdown; plot_files are the plots' paths relative to the report."""
    grid = analysis.grid
    lines = [f"# Ablation: {title(analysis)}", "", _headline(analysis) + ".", ""]
    if not grid.runs:
        return "\n".join(lines + _run_lists(analysis)) + "\n"
    lines += ["## Verdict", "", *(f"- {line}" for line in verdict(analysis)), ""]
    warnings = cautions(analysis)
    lines += ["## Warnings", "", *(f"- {line}" for line in warnings), ""] if warnings else []
    lines += ["## Setup", "", *_setup(analysis), "", _markdown(*_size_rows(analysis)), ""]
    lines += _comparison_section(analysis) + _anova_section(analysis)
    lines += ["## Cells", "", "Mean ± 95% confidence interval over seeds (Student t).", ""]
    lines += [_markdown(*_summary_rows(analysis)), ""]
    lines += [
        "## Convergence fits",
        "",
        "L(t) = a + b·t^(−c) over training tokens t, per run, on the val loss of each epoch and on the training loss "
        "of every logged step: a is the asymptotic loss, c the rate, ± one standard error. A power law falls ever "
        "more slowly per log token, so each fit starts at the curve's steepest drop (after a plateau, small models "
        "often speed up first) and a val fit ends at the best epoch of a run that overfits. A fit whose estimate "
        "sits on a bound of its search or whose errors are as large as its estimates is not identified and not "
        "reported.",
        "",
        _markdown(*_fit_rows(analysis)),
        "",
    ]
    lines += _run_lists(analysis)
    lines += ["## Plots", "", *(f"![{Path(name).stem}]({name})\n" for name in plot_files)]
    return "\n".join(lines) + "\n"


def report_html(markdown_text: str, folder: Path) -> str:
    """report.md as one HTML page with the plots inline (base64), which MLflow's artifact viewer renders."""
    import markdown

    for path in sorted((folder / "plots").glob("*.png")):
        data = base64.b64encode(path.read_bytes()).decode()
        markdown_text = markdown_text.replace(f"](plots/{path.name})", f"](data:image/png;base64,{data})")
    body = markdown.markdown(markdown_text, extensions=["tables"])
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}"
    )
    page_title = html.escape(markdown_text.splitlines()[0].lstrip("# "))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{page_title}</title><style>{style}</style>'
        f"</head><body>{body}</body></html>\n"
    )


def write_report(analysis: Analysis, out_dir: str | Path) -> list[Path]:
    """Write report.md, report.html, summary.csv, runs.csv, comparisons.csv, anova.csv and plots/*.png.

    Raises DiskFault (exit 5) naming out_dir when the disk is full or read-only.
    """
    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        if analysis.grid.runs:
            tables = {"summary": analysis.summary, "runs": analysis.runs, "comparisons": analysis.comparisons}
            if len(analysis.anova):
                tables["anova"] = analysis.anova
            for name, table in tables.items():
                table.to_csv(out_dir / f"{name}.csv", index=False)
                files.append(out_dir / f"{name}.csv")
            files += plots.draw_all(analysis, out_dir / "plots")
        plot_names = [f"plots/{p.name}" for p in files if p.suffix == ".png"]
        text = report_markdown(analysis, plot_names)
        (out_dir / "report.md").write_text(text, encoding="utf-8")  # ± and Δ whatever the locale
        (out_dir / "report.html").write_text(report_html(text, out_dir), encoding="utf-8")
    return [out_dir / "report.md", out_dir / "report.html", *files]


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
    """fetch_grid, analyze, write the report (and upload it, with each child's metrics): the terminal text and files."""
    from gpt.ablation.publish import publish_run_metrics

    analysis = analyze(fetch_grid(parent_run_id, tracking_uri), target_loss)
    files = write_report(analysis, out_dir)
    if log:
        log_report(parent_run_id, files, tracking_uri)
        publish_run_metrics(analysis, tracking_uri)
    return format_table(analysis), files
