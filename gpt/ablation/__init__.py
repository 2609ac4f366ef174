"""Ablation grids: files (grid_file), cells and identity (grid), running (runner, claims, workers, slurm),
analysis (analysis, stats) and the report (report, plots)."""
